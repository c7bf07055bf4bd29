"""The one way to make a /v1 router: OpenAI's error shape, API keys and rate limits on every
route, the error responses in the schema."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import ApiKeyDep
from service.limits import RateLimitDep
from service.openai.errors import OpenAIRoute
from service.openai.schemas import ERROR_RESPONSES


def v1_router() -> APIRouter:
    return APIRouter(
        prefix="/v1",
        tags=["openai"],
        route_class=OpenAIRoute,
        dependencies=[ApiKeyDep, RateLimitDep],
        responses=ERROR_RESPONSES,
    )
