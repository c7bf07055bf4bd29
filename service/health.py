"""Operations routes: liveness, readiness, info, metrics (and the OpenAPI schema when API keys
are configured). Cheap, never rate limited, never touch the models. /health and /ready are
always open (probes carry no key); /info and the schema need a key when keys are configured;
/metrics stays open for Prometheus and NGINX keeps it off the public edge."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import ApiKeyDep, RuntimeDep
from service.errors import RETRY_AFTER, error_response

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health(request: Request, runtime: RuntimeDep) -> Response:
    """200 while the process and its engine loops are alive and no model step hangs."""
    problem = runtime.health_problem()
    if problem is not None:
        return error_response(request, 503, "unhealthy", problem)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request, runtime: RuntimeDep) -> Response:
    """200 only once models are loaded and warmed up, and while not draining."""
    if runtime.draining:
        return error_response(request, 503, "unavailable", "draining", RETRY_AFTER)
    if not runtime.ready:
        return error_response(request, 503, "unavailable", "loading", RETRY_AFTER)
    return JSONResponse({"status": "ready"})


@router.get("/info", dependencies=[ApiKeyDep])
async def info(runtime: RuntimeDep) -> dict[str, Any]:
    return runtime.info()


keyed_schema_router = APIRouter(tags=["operations"])


@keyed_schema_router.get("/openapi.json", include_in_schema=False, dependencies=[ApiKeyDep])
async def keyed_openapi(request: Request) -> JSONResponse:
    """Mounted only when API keys are configured (create_app): the schema lists every route
    and limit, so it is not public then; tools fetch it with their key."""
    return JSONResponse(request.app.openapi())


@router.get("/metrics", include_in_schema=False)
async def metrics(runtime: RuntimeDep) -> Response:
    runtime.refresh_gauges()
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)
