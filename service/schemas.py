"""Shapes shared by every route: priority, stop strings, the error body (pydantic lives in
service/, never in batching/)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, StringConstraints

from batching.priority import PRIORITY_MAX, PRIORITY_MIN

NonEmptyText = Annotated[str, StringConstraints(min_length=1)]
# Stop strings are matched against every new piece of text on the engine thread, at a cost
# that grows with their length: long ones would slow every stream in the batch.
MAX_STOP_CHARS = 64
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
Priority = Annotated[
    int | None,
    Field(
        ge=PRIORITY_MIN,
        le=PRIORITY_MAX,
        description="Lower is served sooner (default: your API key's priority, else 0); "
        "you may ask for less urgency than your key's, never for more",
    ),
]


class ErrorDetail(BaseModel):
    type: str
    message: str
    request_id: str


class ErrorResponse(BaseModel):
    """Every error of /predict, /generate and /tokenize (errors.py); /v1 has OpenAI's shape."""

    error: ErrorDetail


# The OpenAPI schema documents this shape for the statuses these routes answer with, in place of
# FastAPI's default 422 body (`{"detail": [...]}`), which this API never sends.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 422, 429, 500, 503, 504)
}
