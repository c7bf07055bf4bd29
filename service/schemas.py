"""Request and response shapes of the HTTP API (pydantic lives here, never in batching/)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

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


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: NonEmptyText = Field(description="Text to classify or embed")
    priority: Priority = None


class PredictBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[NonEmptyText] = Field(min_length=1, description="Texts, answered in order")
    priority: Priority = None


class PredictResponse(BaseModel):
    label: str | None = None
    score: float | None = None
    scores: dict[str, float] | None = None
    embedding: list[float] | None = None
    model: str
    model_revision: str
    processing_time_ms: float
    request_id: str
    cached: bool | None = Field(
        None, description="Served from the response cache (only with PREDICT_CACHE_SIZE > 0)"
    )


class PredictBatchResponse(BaseModel):
    results: list[PredictResponse]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: NonEmptyText
    max_new_tokens: int | None = Field(None, ge=1, description="Defaults to the server's limit")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[StopString] = Field(default_factory=list, max_length=8)
    json_schema: dict[str, Any] | None = Field(
        None, description="The output is JSON valid against this schema (constrained decoding)"
    )
    priority: Priority = None
    stream: bool = False


class GenerateTimings(BaseModel):
    queue_ms: float
    ttft_ms: float
    total_ms: float


class GenerateResponse(BaseModel):
    text: str
    finish_reason: Literal["eos", "stop", "length"]
    prompt_tokens: int
    cached_tokens: int = Field(description="Prompt tokens whose K/V came from the prefix cache")
    completion_tokens: int
    model: str
    request_id: str
    timings: GenerateTimings


class ErrorDetail(BaseModel):
    type: str
    message: str
    request_id: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
