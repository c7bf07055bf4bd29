"""One mapping from failures to what clients see, shared by HTTP errors, /generate's SSE error
event and /v1's; server-side failures never carry internal text."""

from __future__ import annotations

import pytest

from batching.errors import (
    EngineStoppedError,
    InvalidInputError,
    ModelExecutionError,
    QueueFullError,
    QueueTimeoutError,
    RequestInterruptedError,
)
from service.errors import ApiError, as_api_error
from service.generate.streaming import error_event
from service.openai.errors import openai_error_body

SECRET = "RuntimeError('CUDA error at /srv/app/kernels.cu:42')"


@pytest.mark.parametrize(
    ("failure", "status", "error_type"),
    [
        (ApiError(499, "client_closed", "the client closed the connection"), 499, "client_closed"),
        (QueueFullError(8), 503, "queue_full"),
        (QueueTimeoutError(31.0, 30.0), 504, "timeout"),
        (InvalidInputError("token ids must be in [0, 10)"), 422, "invalid_request"),
        (EngineStoppedError(f"the loop died: {SECRET}"), 503, "unavailable"),
        (RequestInterruptedError(f"the loop died mid-step: {SECRET}"), 500, "interrupted"),
        (ModelExecutionError(f"the model failed: {SECRET}"), 500, "model_error"),
        (RuntimeError(SECRET), 500, "internal_error"),
    ],
)
def test_every_failure_means_the_same_on_every_route_and_stream(failure, status, error_type):
    error = as_api_error(failure, "req-7")
    assert (error.status, error.error_type) == (status, error_type)
    event = error_event(failure, "req-7")["error"]
    assert (event["type"], event["message"], event["request_id"]) == (
        error_type,
        error.message,
        "req-7",
    )
    openai_status, body = openai_error_body(error)
    assert openai_status == (400 if status == 422 else status)
    assert body["error"]["message"] == error.message
    assert "CUDA" not in error.message and "/srv" not in error.message
