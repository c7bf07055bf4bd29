"""Failures on /v1 in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

The SDKs pick their exception class from the status (400 BadRequestError, 401
AuthenticationError, 429 RateLimitError, 5xx InternalServerError) and show `message`. The
conversion happens inside the /v1 routes (OpenAIRoute), so the app-wide handlers, and the
error shape of /predict and /generate, stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from service.errors import ApiError, as_api_error
from service.request_id import request_id_of

# Our error types that OpenAI names differently (the rest pass through as the code).
CODES = {
    "unauthorized": "invalid_api_key",
    "rate_limited": "rate_limit_exceeded",
    "invalid_request": None,  # OpenAI leaves the code empty for plain bad input
}
TYPES = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_error"}


class OpenAIError(ApiError):
    """An ApiError that knows which request parameter was at fault (400 unless told)."""

    def __init__(
        self, message: str, param: str | None, code: str | None = None, status: int = 400
    ) -> None:
        super().__init__(status, code or "invalid_request", message)
        self.param = param
        self.code = code


def openai_error_body(exc: ApiError) -> tuple[int, dict[str, Any]]:
    """(status, body). Our 422 becomes 400: OpenAI reports every bad request as 400."""
    status = 400 if exc.status == 422 else exc.status
    error_type = TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    if isinstance(exc, OpenAIError):
        param, code = exc.param, exc.code
    else:  # a FieldError (generate/limits.py) names its field too
        param, code = getattr(exc, "param", None), CODES.get(exc.error_type, exc.error_type)
    detail = {"message": exc.message, "type": error_type, "param": param, "code": code}
    return status, {"error": detail}


def from_validation_error(exc: RequestValidationError) -> OpenAIError:
    """All problems in the message; the first one's top-level field as `param`."""
    errors = exc.errors()
    if any(err.get("type") == "json_invalid" for err in errors):
        return OpenAIError("the request body is not valid JSON", None, "invalid_json")
    parts, params = [], []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        params.append(loc[0] if loc else None)
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
    return OpenAIError("; ".join(parts) or "invalid request", params[0] if params else None)


def openai_api_error(request: Request, exc: Exception) -> ApiError:
    if isinstance(exc, RequestValidationError):
        return from_validation_error(exc)
    return as_api_error(exc, request_id_of(request))  # logs what it does not expect


class OpenAIRoute(APIRoute):
    """An APIRoute whose failures (auth, rate limit, validation, engine) answer in OpenAI's
    shape. Dependencies run inside the route handler, so their errors are caught here too."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                error = openai_api_error(request, exc)
                status, body = openai_error_body(error)
                return JSONResponse(body, status_code=status, headers=error.headers)

        return handle
