"""POST /predict and /predict/batch: validate, answer through the cache and the collector.

With PREDICT_CACHE_SIZE > 0 each result says whether it came from the response cache
(`cached`), and the response's `X-Cache` header sums it up: `hit` (all cached), `miss` (none),
`partial` (a /predict/batch call with some of each). See service/predict/cache.py for
`Cache-Control: no-cache / no-store`.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response

from service.deps import (
    ApiKeyDep,
    PredictServiceDep,
    SettingsDep,
)
from service.errors import ApiError
from service.limits import RateLimitDep
from service.predict.answers import answer_inputs, audit_answers
from service.predict.predictor import Classification
from service.predict.schemas import (
    PredictBatchRequest,
    PredictBatchResponse,
    PredictRequest,
    PredictResponse,
)
from service.predict.service import Answer, PredictService
from service.request_id import request_id_of
from service.schemas import ERROR_RESPONSES
from service.settings import Settings

router = APIRouter(
    tags=["predict"], dependencies=[ApiKeyDep, RateLimitDep], responses=ERROR_RESPONSES
)


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


def to_response(
    answer: Answer, service: PredictService, started: float, request_id: str
) -> PredictResponse:
    prediction = answer.prediction
    common = {
        "model": service.loaded.name,
        "model_revision": service.loaded.revision,
        "processing_time_ms": round((time.perf_counter() - started) * 1000, 3),
        "request_id": request_id,
        "cached": answer.cached if service.cache is not None else None,
    }
    if isinstance(prediction, Classification):
        service.metrics.score.observe(prediction.score)
        return PredictResponse(
            label=prediction.label, score=prediction.score, scores=prediction.scores, **common
        )
    return PredictResponse(embedding=prediction.embedding, **common)


@router.post("/predict", response_model=PredictResponse, response_model_exclude_none=True)
async def predict(
    body: PredictRequest,
    request: Request,
    response: Response,
    service: PredictServiceDep,
    settings: SettingsDep,
) -> PredictResponse:
    started = time.perf_counter()
    check_text_lengths([body.text], settings)
    (answer,) = await answer_inputs(
        service, [body.text], body.priority, request, response, settings
    )
    audit_answers(request, [answer])
    return to_response(answer, service, started, request_id_of(request))


@router.post(
    "/predict/batch", response_model=PredictBatchResponse, response_model_exclude_none=True
)
async def predict_batch(
    body: PredictBatchRequest,
    request: Request,
    response: Response,
    service: PredictServiceDep,
    settings: SettingsDep,
) -> PredictBatchResponse:
    started = time.perf_counter()
    check_text_lengths(body.texts, settings)
    answers = await answer_inputs(service, body.texts, body.priority, request, response, settings)
    request_id = request_id_of(request)
    audit_answers(request, answers)
    return PredictBatchResponse(
        results=[to_response(a, service, started, request_id) for a in answers]
    )
