"""What the process holds while it serves: models, engines, metrics and lifecycle flags.

Created in the lifespan and kept on `app.state.runtime`; nothing here lives at module level.
Loading and warm-up run in the background so that /health answers (and /ready says 503)
while big weights load; a model that fails to load stops the process (see __main__).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from batching.dynamic.collector import BatchCollector
from service.generate.service import GenerationService
from service.metrics import ServiceMetrics
from service.models import LoadedModel, load_generate_model, load_predict_model
from service.predict.cache import PredictionCache
from service.predict.embedding_drift import EmbeddingDrift
from service.predict.predictor import EncodedText, Prediction, Predictor
from service.predict.service import Computed, PredictService
from service.settings import Settings

log = logging.getLogger(__name__)
AFTER_DRAIN_STOP_S = 5.0  # per engine, once a drain has run (see Runtime.stop)
T = TypeVar("T")

DEMO_WARNING = (
    "Serving RANDOM-WEIGHT DEMO MODELS: answers are meaningless. Point PREDICT_MODEL / "
    "GENERATE_MODEL at a hub id or a local folder to serve a real model."
)


def freeze_start_up_heap() -> float:
    """Collect once, then move every object alive now (modules, the models' Python objects,
    tokenizers: about 400,000 with the demo models) out of the garbage collector's reach
    (gc.freeze); seconds taken. Otherwise the first full collections while serving walk them
    all: a pause of ~0.4 s (2-core box) for the event loop and the engines alike, every stream
    and /health with them, a few seconds into serving and again later. vLLM freezes its
    start-up heap the same way. Objects made later are collected as usual."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    return time.perf_counter() - started


async def on_fresh_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run model set-up work on a thread that then ends.

    torch's CPU backend keeps a pool of worker threads for every thread that ever ran model
    work. Loading, allocating and warming up on long-lived threads (asyncio.to_thread's pool,
    or the event loop) leaves pools that outnumber the cores beside the engine's own, and
    then the engine's workers sleep between ops: on a 2-core box /generate went from 628 to
    901 tok/s over HTTP with this (BENCHMARKS.md).
    """
    with ThreadPoolExecutor(1, thread_name_prefix="model-setup") as pool:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


@dataclass
class Runtime:
    settings: Settings
    metrics: ServiceMetrics
    predict: PredictService | None = None
    generate: GenerationService | None = None
    ready: bool = False
    draining: bool = False
    fatal_error: str | None = None
    in_flight: int = 0
    last_request_s: float = 0.0  # time.monotonic() when the last request (not a probe) arrived
    started_at: float = field(default_factory=time.time)

    def health_problem(self) -> str | None:
        """Why the process needs a restart (a fixed text: the details are in the log), or None.

        A dead engine loop, or a model step that has run past ENGINE_STEP_TIMEOUT_S (a hung
        kernel or a deadlock: the loop is alive but will never answer anyone again).
        """
        if self.fatal_error:
            return "startup failed; see the server log"
        collector = self.predict.collector if self.predict is not None else None
        engine = self.generate.engine if self.generate is not None else None
        if (collector is not None and not collector.is_alive) or (
            engine is not None and not engine.is_alive
        ):
            return "an engine loop has died"
        longest_s = max(
            collector.batch_running_s if collector is not None else 0.0,
            engine.step_running_s if engine is not None else 0.0,
        )
        if longest_s > self.settings.engine_step_timeout_s:
            return (
                f"a model step has been running for {longest_s:.0f}s, longer than the "
                f"{self.settings.engine_step_timeout_s:g}s ENGINE_STEP_TIMEOUT_S"
            )
        return None

    async def start(self) -> None:
        """Load, warm up, start the engines, then flip ready. Raises on any failure."""
        s = self.settings
        if s.predict_model:
            self.predict = await self._start_predict(s)
        if s.generate_model:
            loaded = await on_fresh_thread(load_generate_model, s)
            self._log_loaded(loaded)
            self.generate = await on_fresh_thread(
                GenerationService.create, loaded, s, self.metrics.generate
            )
            warm_s = await on_fresh_thread(self.generate.warm_up)
            graphs = self.generate.engine.cuda_graphs
            engine = self.generate.engine
            log.info(
                "generate warm-up took %.2fs; KV cache: %d blocks x %d tokens = %d tokens, "
                "%.1f MiB; %d rows decoded together; max_seq_len %d; CUDA graphs: %s; "
                "paged attention: %s (%s)",
                warm_s,
                engine.kv_blocks_total,
                engine.kv_block_size,
                engine.kv_cache_tokens,
                engine.kv_cache_bytes / 2**20,
                engine.slots_total,
                engine.max_seq_len,
                "on" if graphs.enabled else f"off ({graphs.reason})",
                engine.paged_attention.path,
                engine.paged_attention.reason,
            )
            self.generate.start()
        for model in self.loaded_models():
            self.metrics.model_info.labels(
                task=model.task,
                model=model.name,
                revision=model.revision,
                quantization=model.quantization,
                device=str(model.device),
            ).set(1)
        if any("demo_models" in m.name for m in self.loaded_models()):
            log.warning(DEMO_WARNING)
        frozen_s = freeze_start_up_heap()
        log.info("start-up heap frozen: %d objects in %.2fs", gc.get_freeze_count(), frozen_s)
        self.ready = True
        log.info("ready after %.2fs", time.time() - self.started_at)

    async def _start_predict(self, s: Settings) -> PredictService:
        loaded = await on_fresh_thread(load_predict_model, s)
        self._log_loaded(loaded)
        predictor = Predictor(loaded)
        warm_s = await on_fresh_thread(self._warm_up_predictor, predictor)
        log.info("predict warm-up took %.2fs", warm_s)
        metrics = self.metrics.predict
        if loaded.task == "embedding":
            predictor.embedding_observer = EmbeddingDrift(
                metrics.embedding_similarity.observe
            ).observe_batch
        collector: BatchCollector[EncodedText, Prediction] = BatchCollector(
            predictor.run_batch,
            max_batch_size=s.predict_max_batch_size,
            max_batch_tokens=s.predict_max_batch_tokens or None,
            max_wait_ms=s.predict_max_wait_ms,
            max_queue=s.predict_max_queue,
            timeout_s=s.request_timeout_s,
            size_of=predictor.token_count,
            max_group_padding_tokens=s.predict_max_group_padding_tokens,
            observer=metrics,
            priority_aging_s=s.priority_aging_s,
        )
        collector.start()
        # A cache per loaded model: a new model (or revision) starts with an empty one.
        cache: PredictionCache[Computed] | None = None
        if s.predict_cache_size:
            cache = PredictionCache(s.predict_cache_size, s.predict_cache_ttl_s)
        return PredictService(predictor, collector, metrics, cache)

    def loaded_models(self) -> list[LoadedModel]:
        models = []
        if self.predict is not None:
            models.append(self.predict.loaded)
        if self.generate is not None:
            models.append(self.generate.loaded)
        return models

    def _log_loaded(self, loaded: LoadedModel) -> None:
        log.info(
            "loaded %s model %s@%s, revision %s (%s): %.1fM params, device=%s dtype=%s "
            "quantization=%s in %.2fs",
            loaded.task,
            loaded.name,
            loaded.version.requested,
            loaded.revision,
            loaded.version.source,
            loaded.parameter_count / 1e6,
            loaded.device,
            str(loaded.dtype).removeprefix("torch."),
            loaded.quantization,
            loaded.load_seconds,
        )

    def _warm_up_predictor(self, predictor: Predictor) -> float:
        """Run every batch size the collector can form (powers of two up to the max)."""
        started = time.perf_counter()
        size = 1
        while True:
            predictor.predict(["warm-up text of a typical length for this service"] * size)
            if size >= self.settings.predict_max_batch_size:
                break
            size = min(size * 2, self.settings.predict_max_batch_size)
        return time.perf_counter() - started

    async def stop(self) -> None:
        """Stop both engines. After a drain (SIGTERM) the requests have had DRAIN_TIMEOUT_S
        already, so what is still running gets AFTER_DRAIN_STOP_S per engine, no more: a pod's
        terminationGracePeriodSeconds must cover preStop + drain + this, not twice the drain."""
        self.ready = False
        timeout_s = AFTER_DRAIN_STOP_S if self.draining else self.settings.drain_timeout_s
        if self.generate is not None:
            await self.generate.stop(timeout_s)
        if self.predict is not None:
            await self.predict.collector.stop(timeout_s)

    def refresh_gauges(self) -> None:
        """Gauges read at scrape time rather than updated on the hot path."""
        if self.predict is not None:
            self.metrics.predict.queue_depth.set(self.predict.collector.queue_depth)
        if self.generate is not None:
            self.generate.refresh_gauges()
        if torch.cuda.is_available():
            self.metrics.gpu_allocated.set(torch.cuda.memory_allocated())
            self.metrics.gpu_reserved.set(torch.cuda.memory_reserved())

    def info(self) -> dict[str, Any]:
        s = self.settings
        info: dict[str, Any] = {
            "version": _version(),
            "ready": self.ready,
            "draining": self.draining,
            "quantization": s.quantization,
            "limits": {
                "max_input_chars": s.max_input_chars,
                "max_batch_texts": s.max_batch_texts,
                "request_timeout_s": s.request_timeout_s,
                "rate_limit": s.rate_limit,
                "auth": "api_key" if s.api_key_set else "open",
            },
        }
        if self.predict is not None:
            info["predict"] = _model_info(self.predict.loaded) | {
                "max_batch_size": s.predict_max_batch_size,
                "max_batch_tokens": s.predict_max_batch_tokens,
                "max_group_padding_tokens": s.predict_max_group_padding_tokens,
                "max_wait_ms": s.predict_max_wait_ms,
                "cache_size": s.predict_cache_size,
                "max_queue": s.predict_max_queue,
            }
        if self.generate is not None:
            info["generate"] = _model_info(self.generate.loaded) | self.generate.info()
        return info


def _model_info(loaded: LoadedModel) -> dict[str, Any]:
    return {
        "model": loaded.name,
        "revision": loaded.revision,  # immutable: a commit, or a local folder's content hash
        "requested_revision": loaded.version.requested,
        "revision_source": loaded.version.source,
        "task": loaded.task,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "quantization": loaded.quantization,
        "parameters": loaded.parameter_count,
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("model-serving-template")
    except PackageNotFoundError:
        return "0.0.0+local"
