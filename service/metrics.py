"""Prometheus metrics of the engines and of model behaviour, on a per-app registry.

Each app gets its own CollectorRegistry (no module-level state), so two apps can live in one
test process. HTTP metrics come from prometheus-fastapi-instrumentator on the same registry.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from batching.generation.observer import FinishLabel
from service.vllm_metrics import VllmMetrics

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TOKEN_GAP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2.5)
TOKEN_COUNT_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
SIMILARITY_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def power_of_two_buckets(maximum: int) -> tuple[float, ...]:
    """1, 2, 4, ... up to and including `maximum` (the configured max batch size)."""
    buckets: list[float] = []
    size = 1
    while size < maximum:
        buckets.append(size)
        size *= 2
    buckets.append(maximum)
    return tuple(buckets)


class TotalOnlyCounter(Collector):
    """Exports only `<name>_total` of an unlabelled Counter, without `_created`.

    DESIGN names both a histogram `generate_output_tokens` and a counter
    `generate_output_tokens_total`; their `_created` series would collide, and the registry's
    name check would refuse the pair. With no describe(), the registry skips that check.
    """

    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.counter._name, self.counter._documentation)
        family.add_metric([], self.counter._value.get())
        yield family


class PredictMetrics:
    """The `predict_*` family; also the collector's observer (see batching.dynamic.collector)."""

    def __init__(self, registry: CollectorRegistry, max_batch_size: int) -> None:
        self.queue_depth = Gauge(
            "predict_queue_depth", "Items waiting in the predict queue", registry=registry
        )
        self.batch_size = Histogram(
            "predict_batch_size",
            "Items per batch (a batch runs as one or more length-sorted forwards)",
            buckets=power_of_two_buckets(max_batch_size),
            registry=registry,
        )
        self.queue_wait = Histogram(
            "predict_queue_wait_seconds",
            "Time from submit to the start of the item's batch, by request priority",
            ["priority"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.inference = Histogram(
            "predict_inference_seconds",
            "Model time per batch",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.rejected = Counter(
            "predict_requests_rejected",
            "Predict items refused, by reason and request priority",
            ["reason", "priority"],
            registry=registry,
        )
        self.score = Histogram(
            "predict_score",
            "Top-label confidence of classifications (watch for drift)",
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
            registry=registry,
        )
        # Registered for every model, so dashboards find the series; a classifier leaves it
        # empty, as an embedding model leaves predict_score empty.
        self.embedding_similarity = Histogram(
            "predict_embedding_similarity",
            "Cosine similarity of each embedding to a running mean of recent ones (drift)",
            buckets=SIMILARITY_BUCKETS,
            registry=registry,
        )
        self.cache_hits = Counter(
            "predict_cache_hits", "Texts answered from the response cache", registry=registry
        )
        self.cache_misses = Counter(
            "predict_cache_misses",
            "Texts looked up in the response cache and not found there",
            registry=registry,
        )
        self.queue_wait.labels(priority="0")
        for reason in ("queue_full", "timeout", "invalid"):
            self.rejected.labels(reason=reason, priority="0")

    # batching.dynamic.observer.CollectorObserver
    def observe_batch_size(self, size: int) -> None:
        self.batch_size.observe(size)

    def observe_queue_wait_seconds(self, seconds: float, priority: int) -> None:
        self.queue_wait.labels(priority=str(priority)).observe(seconds)

    def observe_inference_seconds(self, seconds: float) -> None:
        self.inference.observe(seconds)

    def count_rejected(self, reason: str, priority: int) -> None:
        self.rejected.labels(reason=reason, priority=str(priority)).inc()


class GenerateMetrics:
    """The `generate_*` family and kv_cache_usage_ratio; the `vllm:*` family beside them."""

    def __init__(self, registry: CollectorRegistry, max_slots: int) -> None:
        self.vllm = VllmMetrics(registry)
        self.slots_total = Gauge(
            "generate_slots_total", "Batch rows (GENERATE_SLOTS)", registry=registry
        )
        self.slots_in_use = Gauge(
            "generate_slots_in_use", "Rows holding a running sequence", registry=registry
        )
        self.waiting = Gauge(
            "generate_waiting_requests", "Requests waiting for a slot", registry=registry
        )
        self.ttft = Histogram(
            "generate_time_to_first_token_seconds",
            "Submit to first token, by request priority",
            ["priority"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.rejected = Counter(
            "generate_requests_rejected",
            "Generation requests refused (queue_full) or timed out in the queue, by priority",
            ["reason", "priority"],
            registry=registry,
        )
        self.inter_token = Histogram(
            "generate_inter_token_latency_seconds",
            "Gap between consecutive tokens of one request",
            buckets=TOKEN_GAP_BUCKETS_S,
            registry=registry,
        )
        self.e2e = Histogram(
            "generate_e2e_seconds",
            "Submit to last token",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.output_tokens = Histogram(
            "generate_output_tokens",
            "Tokens generated per request (watch for drift)",
            buckets=TOKEN_COUNT_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens_total = Counter(
            "generate_prompt_tokens", "Prompt tokens admitted", registry=registry
        )
        # The histogram above already owns the family name `generate_output_tokens`, so the
        # `_total` counter is exported by a collector of its own (see TotalOnlyCounter).
        self.output_tokens_total = Counter(
            "generate_output_tokens", "Tokens generated", registry=None
        )
        registry.register(TotalOnlyCounter(self.output_tokens_total))
        self.step_batch_size = Histogram(
            "generate_step_batch_size",
            "Sequences decoded together per engine step",
            buckets=power_of_two_buckets(max_slots),
            registry=registry,
        )
        self.finished = Counter(
            "generate_requests_finished",
            "Generation requests finished, by reason",
            ["reason"],
            registry=registry,
        )
        self.kv_cache_usage = Gauge(
            "kv_cache_usage_ratio", "KV blocks in use / blocks in the pool", registry=registry
        )
        self.kv_blocks_total = Gauge(
            "generate_kv_blocks_total", "KV blocks in the pool", registry=registry
        )
        self.kv_blocks_used = Gauge(
            "generate_kv_blocks_used", "KV blocks held by running sequences", registry=registry
        )
        self.kv_blocks_cached = Gauge(
            "generate_kv_blocks_cached",
            "KV blocks indexed by the prefix cache (held or free)",
            registry=registry,
        )
        self.kv_cache_bytes = Gauge(
            "generate_kv_cache_bytes", "Memory of the KV block pool", registry=registry
        )
        self.preemptions = Counter(
            "generate_preemptions",
            "Running sequences preempted for KV blocks (resumed by recomputation)",
            registry=registry,
        )
        self.prefix_cache_queries = Counter(
            "generate_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            registry=registry,
        )
        self.prefix_cache_hits = Counter(
            "generate_prefix_cache_hits",
            "Prompt tokens whose K/V came from the prefix cache",
            registry=registry,
        )
        self.prefix_cache_usage = Gauge(
            "generate_prefix_cache_usage_ratio",
            "KV blocks indexed by the prefix cache / blocks in the pool",
            registry=registry,
        )
        self.prefill_chunks = Counter(
            "generate_prefill_chunks",
            "Prefill chunks of prompts split over several engine steps",
            registry=registry,
        )
        for reason in ("eos", "stop", "length", "cancelled", "error"):
            self.finished.labels(reason=reason)

    # batching.generation.observer.EngineObserver (engine thread; prometheus is thread-safe)
    def on_step(self, batch_size: int) -> None:
        self.step_batch_size.observe(batch_size)

    def on_first_token(self, ttft_s: float, priority: int) -> None:
        self.ttft.labels(priority=str(priority)).observe(ttft_s)
        self.vllm.on_first_token(ttft_s)

    def on_rejected(self, reason: str, priority: int) -> None:
        self.rejected.labels(reason=reason, priority=str(priority)).inc()

    def on_token_gaps(self, gaps_s: Sequence[float]) -> None:
        for gap in gaps_s:
            self.inter_token.observe(gap)

    def on_prefix_cache_query(self, prompt_tokens: int, hit_tokens: int) -> None:
        self.prefix_cache_queries.inc(prompt_tokens)
        self.prefix_cache_hits.inc(hit_tokens)

    def on_prefill_chunks(self, chunks: int) -> None:
        self.prefill_chunks.inc(chunks)

    def on_preemption(self) -> None:
        self.preemptions.inc()

    def on_finish(
        self, reason: FinishLabel, prompt_tokens: int, output_tokens: int, e2e_s: float
    ) -> None:
        self.vllm.on_finish(reason, prompt_tokens, output_tokens, e2e_s)
        self.finished.labels(reason=reason).inc()
        self.prompt_tokens_total.inc(prompt_tokens)
        self.output_tokens_total.inc(output_tokens)
        if reason != "error":
            self.output_tokens.observe(output_tokens)
            self.e2e.observe(e2e_s)


class ServiceMetrics:
    """Everything the service exports, created once per app in the lifespan."""

    def __init__(self, max_batch_size: int, max_slots: int) -> None:
        self.registry = CollectorRegistry()
        self.predict = PredictMetrics(self.registry, max_batch_size)
        self.generate = GenerateMetrics(self.registry, max_slots)
        self.model_info = Gauge(
            "model_info",
            "Loaded models (value is always 1)",
            ["task", "model", "revision", "quantization", "device"],
            registry=self.registry,
        )
        self.gpu_allocated = Gauge(
            "gpu_memory_allocated_bytes", "torch.cuda.memory_allocated", registry=self.registry
        )
        self.gpu_reserved = Gauge(
            "gpu_memory_reserved_bytes", "torch.cuda.memory_reserved", registry=self.registry
        )
