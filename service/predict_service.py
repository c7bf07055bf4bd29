"""What /predict runs on: one loaded model's predictor, collector, response cache and metrics.

`PredictService.answer()` is the whole one-shot path after validation, for any route that
needs model outputs for texts (/predict, /predict/batch, later /v1/embeddings): look each text
up in the cache, tokenise and submit only the misses (each its own collector item, so they may
share a forward pass with other clients' texts), store what was computed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TypeVar

from batching.dynamic.collector import BatchCollector
from batching.errors import EngineError
from service.errors import as_api_error
from service.metrics import PredictMetrics
from service.models import LoadedModel
from service.predict_cache import CacheKey, CacheUse, PredictionCache
from service.predictor import EncodedText, Prediction, Predictor

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class Answer:
    prediction: Prediction
    cached: bool  # served from the response cache


@dataclass
class PredictService:
    predictor: Predictor
    collector: BatchCollector[EncodedText, Prediction]
    metrics: PredictMetrics
    cache: PredictionCache[Prediction] | None = None  # None: PREDICT_CACHE_SIZE=0

    @property
    def loaded(self) -> LoadedModel:
        return self.predictor.loaded

    def cache_key(self, text: str) -> CacheKey:
        loaded = self.loaded
        return CacheKey(loaded.name, loaded.revision, loaded.task, text)

    async def answer(
        self, texts: list[str], request_id: str, use: CacheUse | None = None
    ) -> list[Answer]:
        """One answer per text, in order. Raises ApiError (the first failure) for the call."""
        use = use or CacheUse()
        found = self._look_up(texts, use)
        # A text repeated within one call is computed once.
        missing = list(dict.fromkeys(t for t, hit in zip(texts, found, strict=True) if hit is None))
        try:
            items = [self.predictor.encode(text) for text in missing]
        except EngineError as exc:
            self.metrics.count_rejected("invalid")
            raise as_api_error(exc, request_id) from exc
        fresh = dict(zip(missing, await submit_all(self.collector, items, request_id), strict=True))
        if self.cache is not None and use.write:
            for text, prediction in fresh.items():
                self.cache.put(self.cache_key(text), prediction)
        return [
            Answer(hit, cached=True) if hit is not None else Answer(fresh[text], cached=False)
            for text, hit in zip(texts, found, strict=True)
        ]

    def _look_up(self, texts: list[str], use: CacheUse) -> list[Prediction | None]:
        if self.cache is None or not use.read:
            return [None] * len(texts)
        found = [self.cache.get(self.cache_key(text)) for text in texts]
        hits = sum(hit is not None for hit in found)
        self.metrics.cache_hits.inc(hits)
        self.metrics.cache_misses.inc(len(texts) - hits)
        return found


async def submit_all(
    collector: BatchCollector[ItemT, ResultT], items: list[ItemT], request_id: str
) -> list[ResultT]:
    """Submit every item as its own collector item: they may land in different batches.

    If one fails (a full queue, a timeout, a bad input), its siblings are cancelled, so they
    leave the queue before they cost compute, and the caller gets that first error. The
    collector counts its own rejections (queue_full, timeout, invalid) in the metrics.
    """
    if len(items) <= 1:  # nothing to cancel: skip the task group (the /predict hot path)
        try:
            return [await collector.submit(item) for item in items]
        except EngineError as exc:
            raise as_api_error(exc, request_id) from exc
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(collector.submit(item)) for item in items]
    except ExceptionGroup as failures:
        first = failures.exceptions[0]
        if isinstance(first, EngineError):
            raise as_api_error(first, request_id) from first
        raise
    return [task.result() for task in tasks]
