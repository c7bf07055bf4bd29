"""FastAPI dependencies, as Annotated aliases the routes use.

They are `async def` on purpose: none of them blocks, and FastAPI would send each plain
`def` dependency through its thread pool, a thread hop per dependency per request.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request

from service.audit import audit_model, audit_priority
from service.errors import RETRY_AFTER, ApiError
from service.generate.service import GenerationService
from service.predict.service import PredictService
from service.runtime import Runtime
from service.settings import Settings


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_settings(runtime: RuntimeDep) -> Settings:
    return runtime.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def bearer_token(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def configured_key(request: Request, keys: frozenset[str]) -> str | None:
    """The request's Bearer token if it is one of API_KEYS, else None."""
    token = bearer_token(request)
    # compare_digest against every key: the time taken does not reveal how much matched.
    matches = [hmac.compare_digest(token.encode(), key.encode()) for key in keys]
    return token if token and any(matches) else None


def cache_share(request: Request, settings: Settings, shared: bool) -> str:
    """Whose share of a cache a request may use: its configured API key's, so that a hit (a
    `cached: true`, `cached_tokens`, or just the speed) never tells one key what another sent;
    "" (one share for all) for an open API, or when `shared` (PREDICT_CACHE_SHARED for the
    /predict response cache, GENERATE_PREFIX_CACHE_SHARED for the prefix cache). The key is
    hashed: keys never sit in a cache in clear."""
    key = None if shared else configured_key(request, settings.api_key_set)
    return "key:" + hashlib.sha256(key.encode()).hexdigest() if key else ""


async def require_api_key(request: Request, settings: SettingsDep) -> None:
    """401 unless the Bearer token is one of API_KEYS (no keys configured = open API)."""
    keys = settings.api_key_set
    if keys and configured_key(request, keys) is None:
        message = "invalid API key" if bearer_token(request) else "missing API key"
        raise ApiError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


ApiKeyDep = Depends(require_api_key)


# A draining server closes each connection after its 503, so that a proxy's pooled
# connections to it are gone before it exits (none is reused just as it closes).
DRAINING_HEADERS = RETRY_AFTER | {"Connection": "close"}


def accepting_work(runtime: Runtime) -> None:
    """Every 503 here comes before any work: NGINX may retry it on another replica."""
    if runtime.draining:
        raise ApiError(503, "unavailable", "the server is shutting down", DRAINING_HEADERS)
    if not runtime.ready:
        raise ApiError(503, "unavailable", "the models are still loading", RETRY_AFTER)


async def get_predict_service(request: Request, runtime: RuntimeDep) -> PredictService:
    if runtime.ready and runtime.predict is None:
        raise ApiError(404, "not_found", "/predict is disabled: PREDICT_MODEL is not set")
    accepting_work(runtime)
    if runtime.predict is None:  # ready implies loaded; this only guards a broken invariant
        raise ApiError(503, "unavailable", "the predict model is not loaded", RETRY_AFTER)
    audit_model(request, runtime.predict.loaded.name, runtime.predict.loaded.revision)
    return runtime.predict


PredictServiceDep = Annotated[PredictService, Depends(get_predict_service)]


async def get_generation_service(request: Request, runtime: RuntimeDep) -> GenerationService:
    if runtime.ready and runtime.generate is None:
        raise ApiError(404, "not_found", "generation is disabled: GENERATE_MODEL is not set")
    accepting_work(runtime)
    if runtime.generate is None:
        raise ApiError(503, "unavailable", "the generation model is not loaded", RETRY_AFTER)
    audit_model(request, runtime.generate.loaded.name, runtime.generate.loaded.revision)
    return runtime.generate


GenerationServiceDep = Annotated[GenerationService, Depends(get_generation_service)]


def resolve_priority(request: Request, settings: Settings, requested: int | None) -> int:
    """A request's priority (lower is sooner). Its API key's configured priority
    (API_KEY_PRIORITIES, else 0) is the most urgent it may be: it may ask for less urgency,
    never for more, so a batch key cannot jump the queue by sending priority 0."""
    key = configured_key(request, settings.api_key_set)
    floor = settings.key_priorities.get(key, 0) if key is not None else 0
    priority = floor if requested is None else max(requested, floor)
    audit_priority(request, priority)
    return priority
