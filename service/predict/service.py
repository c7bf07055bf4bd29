"""What /predict runs on: one loaded model's predictor, collector, response cache and metrics.

`PredictService.answer()` is the whole one-shot path after validation, for any route that
needs model outputs for texts or token ids (/predict, /predict/batch, /v1/embeddings): look
each input up in the cache, tokenise and submit only the misses (each its own collector item
at the request's priority, so they may share a forward pass with other clients' inputs), store
what was computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from batching.dynamic.collector import BatchCollector
from batching.errors import EngineError
from service.errors import as_api_error
from service.metrics import PredictMetrics
from service.models import LoadedModel
from service.predict.cache import CacheKey, CacheUse, PredictionCache
from service.predict.predictor import EncodedText, ModelInput, Prediction, Predictor

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class Computed:
    """What the cache keeps of one input: its output and how many tokens the model saw."""

    prediction: Prediction
    tokens: int  # after truncation, special tokens included (the usage numbers)


@dataclass(frozen=True)
class Answer:
    prediction: Prediction
    tokens: int
    cached: bool  # served from the response cache


@dataclass
class PredictService:
    predictor: Predictor
    collector: BatchCollector[EncodedText, Prediction]
    metrics: PredictMetrics
    cache: PredictionCache[Computed] | None = None  # None: PREDICT_CACHE_SIZE=0

    @property
    def loaded(self) -> LoadedModel:
        return self.predictor.loaded

    def cache_key(self, model_input: ModelInput, tenant: str = "") -> CacheKey:
        loaded = self.loaded
        return CacheKey(tenant, loaded.name, loaded.revision, loaded.task, model_input)

    async def answer(
        self,
        inputs: Sequence[ModelInput],
        request_id: str,
        use: CacheUse | None = None,
        priority: int = 0,
        tenant: str = "",
    ) -> list[Answer]:
        """One answer per input, in order. Raises ApiError (the first failure) for the call.
        `tenant` scopes the cache: a tenant only ever hits what it stored itself."""
        use = use or CacheUse()
        found = self._look_up(inputs, use, tenant)
        # An input repeated within one call is computed once.
        pairs = zip(inputs, found, strict=True)
        missing = list(dict.fromkeys(model_input for model_input, hit in pairs if hit is None))
        try:
            items = [self.predictor.encode_input(model_input) for model_input in missing]
        except EngineError as exc:
            self.metrics.count_rejected("invalid", priority)
            raise as_api_error(exc, request_id) from exc
        predictions = await submit_all(self.collector, items, request_id, priority)
        fresh = {
            model_input: Computed(prediction, item.token_count)
            for model_input, item, prediction in zip(missing, items, predictions, strict=True)
        }
        if self.cache is not None and use.write:
            for model_input, computed in fresh.items():
                self.cache.put(self.cache_key(model_input, tenant), computed)
        answers = []
        for model_input, hit in zip(inputs, found, strict=True):
            computed = hit if hit is not None else fresh[model_input]
            answers.append(Answer(computed.prediction, computed.tokens, cached=hit is not None))
        return answers

    def _look_up(
        self, inputs: Sequence[ModelInput], use: CacheUse, tenant: str
    ) -> list[Computed | None]:
        if self.cache is None or not use.read:
            return [None] * len(inputs)
        found = [self.cache.get(self.cache_key(model_input, tenant)) for model_input in inputs]
        hits = sum(hit is not None for hit in found)
        self.metrics.cache_hits.inc(hits)
        self.metrics.cache_misses.inc(len(inputs) - hits)
        return found


async def submit_all(
    collector: BatchCollector[ItemT, ResultT],
    items: list[ItemT],
    request_id: str,
    priority: int = 0,
) -> list[ResultT]:
    """Every item as its own collector item (they may land in different batches), queued
    together or not at all; the first failure as an ApiError. The collector counts its own
    rejections (queue_full, timeout, invalid) in the metrics."""
    try:
        return await collector.submit_many(items, priority)
    except EngineError as exc:
        raise as_api_error(exc, request_id) from exc
