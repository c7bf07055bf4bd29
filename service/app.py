"""create_app(): the FastAPI application, wired from one Settings object.

Run it with `python -m service` (see __main__), which adds graceful draining on SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from prometheus_fastapi_instrumentator import Instrumentator
from starlette.types import ASGIApp, Receive, Scope, Send

from batching.generation.model_support import UnsupportedModelError
from service import health
from service.audit import AuditLog, AuditMiddleware
from service.body_limit import BodySizeLimitMiddleware
from service.errors import install_error_handlers
from service.generate import routes as generate
from service.limits import RateLimiter, rate_limit_key
from service.metrics import LATENCY_BUCKETS_S, ServiceMetrics
from service.openai import embeddings as openai_embeddings
from service.openai import routes as openai_routes
from service.openai import tokenize
from service.predict import routes as predict
from service.request_id import RequestIdMiddleware
from service.revision_header import ModelRevisionMiddleware
from service.runtime import Runtime
from service.settings import Settings

log = logging.getLogger(__name__)

UNMETERED_PATHS = ("/health", "/ready", "/metrics", "/info")


class InFlightMiddleware:
    """Counts requests that are being answered (streams included) and notes when the last one
    arrived, so that a drain can wait for them and for the traffic to stop."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNMETERED_PATHS:
            await self.app(scope, receive, send)
            return
        runtime: Runtime = scope["app"].state.runtime
        runtime.last_request_s = time.monotonic()
        runtime.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            runtime.in_flight -= 1


async def load_streaming_machinery() -> None:
    """Starlette's StreamingResponse runs each stream in an anyio task group, and anyio imports
    its asyncio backend (with its streams and sockets modules) when the process opens its first
    one. Left to the first streamed response, that import ran on the event loop after the first
    token, while the engine went on producing: the stream's deliveries paused (~0.2 s on a busy
    machine) and then came in a burst. Open one task group at start-up instead."""
    async with anyio.create_task_group():
        pass


async def start_runtime(runtime: Runtime) -> None:
    """Background start; a model that cannot load stops the process instead of idling half-alive."""
    try:
        await runtime.start()
    except UnsupportedModelError as exc:  # a known reason: one line a user can act on
        runtime.fatal_error = f"startup failed: model not supported: {exc}"
        log.critical("%s -- stopping the process", runtime.fatal_error)
        os.kill(os.getpid(), signal.SIGTERM)
    except Exception as exc:
        runtime.fatal_error = f"startup failed: {exc}"
        log.critical("%s -- stopping the process", runtime.fatal_error, exc_info=exc)
        os.kill(os.getpid(), signal.SIGTERM)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = ServiceMetrics(settings.predict_max_batch_size, settings.generate_slots)

    audit = (
        AuditLog(
            settings.audit_log,
            with_content=settings.audit_log_content,
            max_bytes=settings.audit_log_max_bytes,
            backups=settings.audit_log_backups,
        )
        if settings.audit_log
        else None
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings, metrics)
        app.state.runtime = runtime
        if audit is not None:
            audit.start()
        await load_streaming_machinery()
        starting = asyncio.create_task(start_runtime(runtime))
        try:
            yield
        finally:
            starting.cancel()
            await runtime.stop()
            if audit is not None:
                audit.stop()

    # With API keys configured the schema (every route and limit) is not public: no /docs
    # page, and /openapi.json needs a key. An open API serves both as FastAPI does.
    is_open = not settings.api_key_set
    app = FastAPI(
        title="Model serving template",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs" if is_open else None,
        openapi_url="/openapi.json" if is_open else None,
        redoc_url=None,
        # No 307 to the slash-less path: its Location would echo the client's Host header.
        redirect_slashes=False,
    )
    install_error_handlers(app)
    app.include_router(health.router)
    if not is_open:
        app.include_router(health.keyed_schema_router)
    app.include_router(predict.router)
    app.include_router(generate.router)
    app.include_router(tokenize.router)
    app.include_router(openai_routes.router)
    app.include_router(openai_embeddings.router)
    app.state.rate_limiter = RateLimiter(settings)
    Instrumentator(
        registry=metrics.registry,
        excluded_handlers=list(UNMETERED_PATHS),
        should_group_status_codes=False,
    ).instrument(app, latency_lowr_buckets=LATENCY_BUCKETS_S)
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
        )
    app.add_middleware(InFlightMiddleware)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    if audit is not None:
        keys = settings.api_key_set
        app.add_middleware(
            AuditMiddleware, log=audit, client_of=lambda request: rate_limit_key(request, keys)
        )
    app.add_middleware(ModelRevisionMiddleware)  # outside the body limit: its 413s carry it too
    # Added last, so it runs first: every response, errors included, carries the id.
    app.add_middleware(RequestIdMiddleware)
    return app
