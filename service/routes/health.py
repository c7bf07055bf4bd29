"""Liveness, readiness, info and metrics: cheap, never rate limited, never touch the models."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import RuntimeDep
from service.errors import RETRY_AFTER, error_response

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health(request: Request, runtime: RuntimeDep) -> Response:
    """200 while the process and its engine loops are alive; a dead loop needs a restart."""
    if runtime.fatal_error or not runtime.engines_alive:
        reason = runtime.fatal_error or "an engine loop has died"
        return error_response(request, 503, "unhealthy", reason)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request, runtime: RuntimeDep) -> Response:
    """200 only once models are loaded and warmed up, and while not draining."""
    if runtime.draining:
        return error_response(request, 503, "unavailable", "draining", RETRY_AFTER)
    if not runtime.ready:
        return error_response(request, 503, "unavailable", "loading", RETRY_AFTER)
    return JSONResponse({"status": "ready"})


@router.get("/info")
async def info(runtime: RuntimeDep) -> dict[str, Any]:
    return runtime.info()


@router.get("/metrics", include_in_schema=False)
async def metrics(runtime: RuntimeDep) -> Response:
    runtime.refresh_gauges()
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)
