"""Request and response shapes of the OpenAI-compatible /v1 API.

Field names, ranges and defaults are OpenAI's, so the official SDKs and tools built on them
work unchanged. Unknown fields are ignored, as OpenAI does; known fields this server cannot
honour (penalties, suffix, best_of) are refused with a 400 naming the parameter rather than
silently changing what the client asked for.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StringConstraints,
    field_validator,
)

from batching.generation.logprobs import MAX_TOP_LOGPROBS
from service.schemas import Priority, StopString

NonEmptyText = Annotated[str, StringConstraints(min_length=1)]
FinishReason = Literal["stop", "length"]
MAX_STOP_STRINGS = 4  # OpenAI's limit


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share. None means OpenAI's default
    (some clients send explicit nulls)."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field("", description="Any value is accepted: the served model answers")
    max_tokens: int | None = Field(
        None, ge=0, description="Default and cap: the server limit; 0 only with echo"
    )
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Default 1; 0 = greedy")
    top_p: float | None = Field(None, ge=0.0, le=1.0, description="Default 1; 0 = greedy")
    top_k: int | None = Field(None, ge=0, description="Not OpenAI (vLLM-style extra); 0 = off")
    priority: Priority = None  # vLLM's extra field
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: StopString | list[StopString] | None = None
    n: int | None = Field(None, ge=1, description="Choices; at most GENERATE_MAX_CHOICES")
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Accepted and ignored")
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences, got {len(value)}")
        return value

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> tuple[str, int | None]:
        """(parameter name, value) of the output-length limit the client sent."""
        return "max_tokens", self.max_tokens

    @property
    def choices(self) -> int:
        return self.n or 1

    def top_logprobs_asked(self) -> int | None:
        """None: no logprobs; k: each token's logprob and its k most likely alternatives."""
        return None

    def unsupported(self) -> dict[str, bool]:
        """Parameter -> whether this request asks for something the server cannot do."""
        return {
            "presence_penalty": bool(self.presence_penalty),
            "frequency_penalty": bool(self.frequency_penalty),
        }


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, value: str | list[TextPart] | None) -> str | list[TextPart] | None:
        if isinstance(value, list) and any(part.type != "text" for part in value):
            raise ValueError("only text content parts are supported")
        return value

    def for_template(self) -> dict[str, str]:
        """The plain {"role", "content"} dict that chat templates expect."""
        if isinstance(self.content, list):
            content = "".join(part.text for part in self.content)
        else:
            content = self.content or ""
        # "developer" is OpenAI's newer name for "system"; most templates only know the latter.
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content}


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = "response"
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens")
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None

    def requested_max_tokens(self) -> tuple[str, int | None]:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return super().requested_max_tokens()

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[StrictInt] = Field(description="One prompt: text or token ids")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs

    def unsupported(self) -> dict[str, bool]:
        return super().unsupported() | {
            "suffix": bool(self.suffix),
            "best_of": self.best_of not in (None, 1),
        }


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens whose K/V came from the prefix cache")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry]


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    """The legacy shape lm-evaluation-harness reads: per token, its text, its logprob (None for
    the first prompt token), its alternatives, and where its text starts."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "model-serving-template"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": OpenAIErrorResponse} for status in (400, 401, 404, 429, 500, 503, 504)
}
