"""/predict and /predict/batch request and response shapes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from service.schemas import NonEmptyText, Priority


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
