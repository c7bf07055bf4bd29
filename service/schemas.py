"""Request and response shapes of the HTTP API (pydantic lives here, never in batching/)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

NonEmptyText = Annotated[str, StringConstraints(min_length=1)]
# Stop strings are matched against every new piece of text on the engine thread, at a cost
# that grows with their length: long ones would slow every stream in the batch.
MAX_STOP_CHARS = 64
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: NonEmptyText = Field(description="Text to classify or embed")


class PredictBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[NonEmptyText] = Field(min_length=1, description="Texts, answered in order")


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
    stream: bool = False


class GenerateTimings(BaseModel):
    queue_ms: float
    ttft_ms: float
    total_ms: float


class GenerateResponse(BaseModel):
    text: str
    finish_reason: Literal["eos", "stop", "length"]
    prompt_tokens: int
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
