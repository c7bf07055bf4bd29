"""The model's answers for validated texts or token ids, shared by /predict, /predict/batch
and /v1/embeddings: the caller's priority and cache share, X-Cache, the audit record."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import Request, Response

from service.audit import audit_predictions
from service.deps import cache_share, resolve_priority
from service.predict.cache import CacheUse
from service.predict.predictor import ModelInput
from service.predict.service import Answer, PredictService
from service.request_id import request_id_of
from service.settings import Settings


async def answer_inputs(
    service: PredictService,
    inputs: Sequence[ModelInput],
    priority: int | None,
    request: Request,
    response: Response,
    settings: Settings,
) -> list[Answer]:
    """The model's answers for validated inputs (also /v1/embeddings'), at the caller's
    priority and in its share of the cache: Cache-Control read, X-Cache set."""
    answers = await service.answer(
        inputs,
        request_id_of(request),
        CacheUse.from_cache_control(request.headers.get("cache-control")),
        resolve_priority(request, settings, priority),
        cache_share(request, settings, settings.predict_cache_shared),
    )
    if service.cache is not None:
        hits = sum(answer.cached for answer in answers)
        response.headers["X-Cache"] = (
            "hit" if hits == len(answers) else "miss" if hits == 0 else "partial"
        )
    return answers


def audit_answers(request: Request, answers: list[Answer]) -> None:
    predictions = [answer.prediction for answer in answers]
    audit_predictions(request, predictions, sum(answer.tokens for answer in answers))
