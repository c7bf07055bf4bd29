"""POST /predict and /predict/batch: validate, hand texts to the BatchCollector, answer."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request

from batching.errors import EngineError
from service.audit import audit_predictions
from service.deps import ApiKeyDep, PredictServiceDep, SettingsDep
from service.errors import ApiError, as_api_error
from service.limits import RateLimitDep
from service.predictor import Classification, Prediction
from service.request_id import request_id_of
from service.runtime import PredictService
from service.schemas import (
    PredictBatchRequest,
    PredictBatchResponse,
    PredictRequest,
    PredictResponse,
)
from service.settings import Settings

router = APIRouter(tags=["predict"], dependencies=[ApiKeyDep, RateLimitDep])


def check_text_lengths(texts: list[str], settings: Settings) -> None:
    """MAX_INPUT_CHARS and MAX_BATCH_TEXTS are runtime settings, so they are checked here."""
    if len(texts) > settings.max_batch_texts:
        raise ApiError(
            422,
            "invalid_request",
            f"texts: {len(texts)} items, more than the limit of {settings.max_batch_texts}",
        )
    for i, text in enumerate(texts):
        if len(text) > settings.max_input_chars:
            where = "text" if len(texts) == 1 else f"texts.{i}"
            raise ApiError(
                422,
                "invalid_request",
                f"{where}: {len(text)} characters, more than the limit of "
                f"{settings.max_input_chars}",
            )


async def predict_texts(
    service: PredictService, texts: list[str], request_id: str
) -> list[Prediction]:
    """Submit every text as its own item: they may land in different batches.

    If one fails (a full queue, a timeout, a bad input), its siblings are cancelled, so they
    leave the queue before they cost compute, and the caller gets that first error. The
    collector counts its own rejections (queue_full, timeout, invalid) in the metrics.
    """
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(service.collector.submit(text)) for text in texts]
    except ExceptionGroup as failures:
        first = failures.exceptions[0]
        if isinstance(first, EngineError):
            raise as_api_error(first, request_id) from first
        raise
    return [task.result() for task in tasks]


def to_response(
    prediction: Prediction, service: PredictService, started: float, request_id: str
) -> PredictResponse:
    common = {
        "model": service.loaded.name,
        "model_revision": service.loaded.revision,
        "processing_time_ms": round((time.perf_counter() - started) * 1000, 3),
        "request_id": request_id,
    }
    if isinstance(prediction, Classification):
        service.metrics.score.observe(prediction.score)
        return PredictResponse(
            label=prediction.label, score=prediction.score, scores=prediction.scores, **common
        )
    return PredictResponse(embedding=prediction.embedding, **common)


@router.post("/predict", response_model=PredictResponse, response_model_exclude_none=True)
async def predict(
    body: PredictRequest, request: Request, service: PredictServiceDep, settings: SettingsDep
) -> PredictResponse:
    started = time.perf_counter()
    check_text_lengths([body.text], settings)
    request_id = request_id_of(request)
    (prediction,) = await predict_texts(service, [body.text], request_id)
    audit_predictions(request, [prediction])
    return to_response(prediction, service, started, request_id)


@router.post(
    "/predict/batch", response_model=PredictBatchResponse, response_model_exclude_none=True
)
async def predict_batch(
    body: PredictBatchRequest, request: Request, service: PredictServiceDep, settings: SettingsDep
) -> PredictBatchResponse:
    started = time.perf_counter()
    check_text_lengths(body.texts, settings)
    request_id = request_id_of(request)
    predictions = await predict_texts(service, body.texts, request_id)
    audit_predictions(request, predictions)
    return PredictBatchResponse(
        results=[to_response(p, service, started, request_id) for p in predictions]
    )
