"""PredictService.answer with a fake predictor: cache keys per model revision, refused texts."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from batching.dynamic.collector import BatchCollector
from batching.errors import InvalidInputError
from service.errors import ApiError
from service.metrics import PredictMetrics
from service.predict.cache import PredictionCache
from service.predict.predictor import Embedding, EncodedText, Prediction
from service.predict.service import Computed, PredictService

WAIT_S = 5.0


class FakePredictor:
    """Encodes a text as one token per character; refuses "unencodable"; embeds its length."""

    def __init__(self, revision: str) -> None:
        self.loaded = SimpleNamespace(name="fake", revision=revision, task="embedding")
        self.batches: list[list[int]] = []

    def encode(self, text: str) -> EncodedText:
        if text == "unencodable":
            raise InvalidInputError("the tokenizer cannot encode this text")
        return EncodedText({"input_ids": [1] * len(text)})

    def encode_input(self, model_input: str) -> EncodedText:
        return self.encode(model_input)

    def run_batch(self, items: list[EncodedText]) -> list[Prediction]:
        self.batches.append([item.token_count for item in items])
        return [Embedding([float(item.token_count)]) for item in items]


MakeService = Callable[..., PredictService]


@pytest.fixture
async def make_service() -> AsyncIterator[MakeService]:
    collectors: list[BatchCollector[Any, Any]] = []

    def make(revision: str, cache: PredictionCache[Computed] | None) -> PredictService:
        predictor = FakePredictor(revision)
        collector: BatchCollector[EncodedText, Prediction] = BatchCollector(
            predictor.run_batch, max_wait_ms=0.0, timeout_s=WAIT_S
        )
        collector.start()
        collectors.append(collector)
        metrics = PredictMetrics(CollectorRegistry(), max_batch_size=32)
        return PredictService(predictor, collector, metrics, cache)  # type: ignore[arg-type]

    yield make
    for collector in collectors:
        await collector.stop(drain_timeout_s=WAIT_S)


async def test_a_new_revision_never_gets_the_old_revision_s_results(
    make_service: MakeService,
) -> None:
    shared: PredictionCache[Computed] = PredictionCache(max_entries=8, ttl_s=0)
    old, new = make_service("v1", shared), make_service("v2", shared)

    assert [a.cached for a in await old.answer(["same text"], "r1")] == [False]
    assert [a.cached for a in await old.answer(["same text"], "r2")] == [True]
    assert [a.cached for a in await new.answer(["same text"], "r3")] == [False]


async def test_a_tenant_only_ever_hits_what_it_stored_itself(make_service: MakeService) -> None:
    service = make_service("v1", PredictionCache(max_entries=8, ttl_s=0))

    async def cached(tenant: str) -> bool:
        (answer,) = await service.answer(["a private text"], "r", tenant=tenant)
        return answer.cached

    assert [await cached("key-a"), await cached("key-b"), await cached("key-a")] == [
        False,
        False,  # key-b sent the same text: computed for it, nothing told about key-a
        True,
    ]


async def test_a_text_the_tokenizer_refuses_is_a_422_and_computes_nothing(
    make_service: MakeService,
) -> None:
    service = make_service("v1", None)

    with pytest.raises(ApiError) as refused:
        await service.answer(["fine", "unencodable"], "r1")

    assert refused.value.status == 422
    assert service.predictor.batches == []  # type: ignore[attr-defined]
    rejected = service.metrics.rejected.labels(reason="invalid", priority="0")._value.get()
    assert rejected == 1


async def test_without_a_cache_every_text_is_computed_and_nothing_says_cached(
    make_service: MakeService,
) -> None:
    service = make_service("v1", None)

    answers = await service.answer(["ab", "ab", "abc"], "r1")

    assert [a.prediction for a in answers] == [Embedding([2.0]), Embedding([2.0]), Embedding([3.0])]
    assert not any(a.cached for a in answers)
    assert sorted(size for batch in service.predictor.batches for size in batch) == [2, 3]  # type: ignore[attr-defined]
