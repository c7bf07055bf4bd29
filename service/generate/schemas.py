"""/generate request and response shapes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from service.schemas import NonEmptyText, Priority, StopString


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: NonEmptyText
    max_new_tokens: int | None = Field(
        None, ge=1, description="Default: all that fits the context, up to GENERATE_MAX_NEW_TOKENS"
    )
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[StopString] = Field(default_factory=list, max_length=8)
    json_schema: dict[str, Any] | None = Field(
        None, description="The output is JSON valid against this schema (constrained decoding)"
    )
    priority: Priority = None
    stream: StrictBool = False


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
