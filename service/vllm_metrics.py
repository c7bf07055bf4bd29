"""The metrics of the Model Server Protocol, under vLLM's names, so that the Kubernetes inference
gateway's endpoint picker, KEDA and vLLM dashboards read this server as they read vLLM.

The protocol (gateway-api-inference-extension, docs/proposals/003-model-server-protocol) asks
for three gauges: requests waiting, requests running, KV-cache use (0-1); and, optionally, an
info gauge with the KV block size and block count, which its prefix-cache scorer uses. The rest
are the vLLM series dashboards and autoscalers commonly read, where we count the same thing.

Names, types, label names and histogram buckets are vLLM's (vllm/v1/metrics/loggers.py):
every series carries `model_name` (the served model id) and `engine` ("0": one engine per
process), and request_success_total is by `finished_reason` (stop, length, abort, error,
repetition). They sit beside our own names (README, "Metrics"), fed by the same hooks and the
same engine state, so the two never disagree.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from batching.generation.engine import KVCacheBlocks
from batching.generation.observer import FinishLabel

ENGINE_INDEX = "0"
LABELS = ("model_name", "engine")
# vLLM's buckets, so that histogram_quantile() over a mixed fleet adds like with like.
TTFT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS_S = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
# vLLM's FinishReason strings (vllm/v1/engine/__init__.py), all created at 0 as vLLM does.
VLLM_FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
# Ours to vLLM's: an EOS token and a stop string are both vLLM's "stop"; a client that went
# away is "abort"; queue timeouts, model failures and shutdown are "error".
FINISH_REASON_TO_VLLM: dict[FinishLabel, str] = {
    "eos": "stop",
    "stop": "stop",
    "length": "length",
    "cancelled": "abort",
    "error": "error",
}


class VllmMetrics:
    """vLLM-named series; empty until `bind()` names the model (the engine is built then)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.model_name: str | None = None
        self.num_requests_waiting = Gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            LABELS,
            registry=registry,
        )
        self.num_requests_running = Gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            LABELS,
            registry=registry,
        )
        self.kv_cache_usage_perc = Gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            LABELS,
            registry=registry,
        )
        # An info metric written as a gauge of 1, as vLLM does (its labels carry the values).
        self.cache_config_info = Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            ("block_size", "num_gpu_blocks", "engine"),
            registry=registry,
        )
        # prometheus_client appends `_total` to a counter's name: these export as
        # vllm:prompt_tokens_total, vllm:generation_tokens_total, vllm:request_success_total.
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", LABELS, registry=registry
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            LABELS,
            registry=registry,
        )
        self.request_success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            (*LABELS, "finished_reason"),
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            LABELS,
            buckets=TTFT_BUCKETS_S,
            registry=registry,
        )
        self.e2e_request_latency = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            LABELS,
            buckets=REQUEST_LATENCY_BUCKETS_S,
            registry=registry,
        )

    def bind(self, model_name: str, blocks: KVCacheBlocks) -> None:
        """Name the served model and publish the cache config; creates every series at 0."""
        self.model_name = model_name
        self.cache_config_info.labels(
            block_size=str(blocks.block_size),
            num_gpu_blocks=str(blocks.blocks_total),
            engine=ENGINE_INDEX,
        ).set(1)
        for reason in VLLM_FINISH_REASONS:
            self.request_success.labels(model_name, ENGINE_INDEX, reason)
        for metric in (
            self.num_requests_waiting,
            self.num_requests_running,
            self.kv_cache_usage_perc,
            self.prompt_tokens,
            self.generation_tokens,
            self.time_to_first_token,
            self.e2e_request_latency,
        ):
            metric.labels(model_name, ENGINE_INDEX)

    def set_state(self, *, waiting: int, running: int, blocks: KVCacheBlocks) -> None:
        """The gauges, from the engine's state at scrape time."""
        if self.model_name is None:
            return
        labels = (self.model_name, ENGINE_INDEX)
        self.num_requests_waiting.labels(*labels).set(waiting)
        self.num_requests_running.labels(*labels).set(running)
        self.kv_cache_usage_perc.labels(*labels).set(blocks.usage_ratio)

    # Called from GenerateMetrics' engine hooks (the engine thread).
    def on_first_token(self, ttft_s: float) -> None:
        if self.model_name is not None:
            self.time_to_first_token.labels(self.model_name, ENGINE_INDEX).observe(ttft_s)

    def on_finish(
        self, reason: FinishLabel, prompt_tokens: int, output_tokens: int, e2e_s: float
    ) -> None:
        """Tokens are counted when a request ends, as our generate_*_tokens_total are (vLLM
        counts them step by step): the same totals, the rate lags by a request's length."""
        if self.model_name is None:
            return
        labels = (self.model_name, ENGINE_INDEX)
        self.request_success.labels(*labels, FINISH_REASON_TO_VLLM[reason]).inc()
        self.prompt_tokens.labels(*labels).inc(prompt_tokens)
        self.generation_tokens.labels(*labels).inc(output_tokens)
        if reason != "error":
            self.e2e_request_latency.labels(*labels).observe(e2e_s)
