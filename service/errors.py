"""One JSON error shape for every failure: {"error": {"type", "message", "request_id"}}.

Engine exceptions (batching.errors) are mapped to HTTP statuses here, and only here:
`as_api_error` is what every route, SSE stream and the /v1 adapter use. Server-side failures
get fixed messages; what went wrong inside goes to the log, with the request id.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from batching.errors import (
    EngineStoppedError,
    InvalidInputError,
    ModelExecutionError,
    PromptTooLongError,
    QueueFullError,
    QueueTimeoutError,
    RequestInterruptedError,
)
from service.request_id import request_id_of

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
RETRY_AFTER = {"Retry-After": str(RETRY_AFTER_S)}


class ApiError(Exception):
    """An error the API reports on purpose, with its status and type."""

    def __init__(
        self, status: int, error_type: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.headers = headers or {}


def error_response(
    request: Request,
    status: int,
    error_type: str,
    message: str,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    request_id = request_id_of(request)
    body = {"error": {"type": error_type, "message": message, "request_id": request_id}}
    # Set here too: a 500 answered by Starlette's outermost error middleware skips ours.
    all_headers = {"X-Request-ID": request_id} if request_id else {}
    return JSONResponse(body, status_code=status, headers=all_headers | (headers or {}))


HTTP_ERROR_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def _http_error(exc: StarletteHTTPException) -> ApiError:
    if exc.status_code == 400:  # FastAPI's "error parsing the body": not JSON, not UTF-8
        return ApiError(422, "invalid_request", "body: malformed JSON or not UTF-8")
    error_type = HTTP_ERROR_TYPES.get(exc.status_code, "http_error")
    # Keep what the status needs (a 405's Allow header).
    return ApiError(exc.status_code, error_type, str(exc.detail), dict(exc.headers or {}))


def as_api_error(exc: BaseException, request_id: str = "") -> ApiError:
    """What a client sees of any failure: as an HTTP error or as a stream's last event."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, StarletteHTTPException):
        return _http_error(exc)
    if isinstance(exc, PromptTooLongError):
        return ApiError(422, "context_length_exceeded", str(exc))
    if isinstance(exc, InvalidInputError):
        return ApiError(422, "invalid_request", str(exc))
    if isinstance(exc, QueueFullError):
        return ApiError(503, "queue_full", str(exc), RETRY_AFTER)
    if isinstance(exc, QueueTimeoutError):
        return ApiError(504, "timeout", str(exc))
    if isinstance(exc, RequestInterruptedError):
        log.warning("engine stopped mid-request (request_id=%s): %s", request_id, exc)
        return ApiError(500, "interrupted", "the server stopped while computing this request")
    if isinstance(exc, EngineStoppedError):
        # 503 only for work the engine never started: NGINX retries 503s on another replica
        # (nginx/edge.conf), which is safe only because no 503 follows any work.
        log.warning("engine not running (request_id=%s): %s", request_id, exc)
        return ApiError(503, "unavailable", "the engine is not running; retry later", RETRY_AFTER)
    if isinstance(exc, ModelExecutionError):
        log.error("model failure (request_id=%s): %s", request_id, exc)
        return ApiError(500, "model_error", "the model failed on this request")
    log.error("unexpected error (request_id=%s)", request_id, exc_info=exc)
    return ApiError(500, "internal_error", "internal server error")


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            parts.append("body: malformed JSON")
            continue
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request, exc.status, exc.error_type, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, 422, "invalid_request", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    @app.exception_handler(Exception)
    async def _other(request: Request, exc: Exception) -> JSONResponse:
        # Unexpected errors are logged with their trace; the client never sees one.
        error = as_api_error(exc, request_id_of(request))
        return error_response(request, error.status, error.error_type, error.message, error.headers)
