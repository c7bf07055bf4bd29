"""Request and response shapes of the OpenAI-compatible /v1 API.

Field names, ranges and defaults are OpenAI's, so the official SDKs and tools built on them
work unchanged. Fields this server cannot honour (UNSUPPORTED_FIELDS: penalties, audio,
suffix, ...) are refused with a 400 naming the parameter rather than silently changing what
the client asked for; other unknown fields are ignored.
"""

from __future__ import annotations

import json
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

from batching.generation.sampling import MAX_TOP_LOGPROBS
from service.openai.tools.schemas import (
    FunctionCall,
    FunctionDefinition,
    FunctionName,
    ToolCall,
    ToolChoice,
    ToolDefinition,
)
from service.schemas import Priority, StopString

NonEmptyText = Annotated[str, StringConstraints(min_length=1)]
FinishReason = Literal["stop", "length", "tool_calls", "function_call"]
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries
TokenId = Annotated[StrictInt, Field(ge=0)]  # strict: true is not token 1
TokenIds = Annotated[list[TokenId], Field(min_length=1)]

# Fields that would change the output, which this server does not implement: a request that
# sends one with anything but its no-op value gets a 400 naming it. OpenAI's first, then the
# vLLM extras clients send.
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "min_p": (None, 0),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1),
    "prompt_logprobs": (None,),
    "truncate_prompt_tokens": (None,),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "include_stop_str_in_output": (None, False),
}
CHAT_UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "store": (None, False),
}
COMPLETION_UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "suffix": (None, ""),
    "best_of": (None, 1),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share. None means OpenAI's default
    (some clients send explicit nulls)."""

    # extra="allow": unknown fields are kept, so that the unsupported ones can be named.
    model_config = ConfigDict(extra="allow")
    model: str = Field("", description="Any value is accepted: the served model answers")
    max_tokens: int | None = Field(
        None, ge=0, description="Default: all that fits the context; 0 only with echo"
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
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) -> bias in [-100, 100] added to its logit"
    )
    # vLLM's extras
    min_tokens: int | None = Field(None, ge=0, description="No EOS or stop token before this")
    ignore_eos: bool | None = None
    stop_token_ids: list[TokenId] | None = Field(None, max_length=64)

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return value
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries, got {len(value)}")
        for key, bias in value.items():
            if not key.isdigit():
                raise ValueError(f"keys are token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases are in [-100, 100], got {bias} for {key}")
        return value

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

    def unsupported_fields(self) -> dict[str, tuple[Any, ...]]:
        return UNSUPPORTED_FIELDS

    def unsupported(self) -> dict[str, Any]:
        """Field -> value, for each field sent that asks for what the server cannot do."""
        sent = self.model_extra or {}
        return {
            name: sent[name]
            for name, no_ops in self.unsupported_fields().items()
            if name in sent and sent[name] not in no_ops
        }


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None  # the legacy shape of one tool call

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, value: str | list[TextPart] | None) -> str | list[TextPart] | None:
        if isinstance(value, list) and any(part.type != "text" for part in value):
            raise ValueError("only text content parts are supported")
        return value

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        """The dict chat templates expect: {"role", "content"}, and for tool use the
        assistant's "tool_calls" (arguments as a dict where they are JSON, as transformers'
        templates read them) and a tool message's "tool_call_id" and "name"."""
        # "developer" is OpenAI's newer name for "system"; most templates only know the latter.
        # "function" is the legacy name of a tool result.
        role = {"developer": "system", "function": "tool"}.get(self.role, self.role)
        message: dict[str, Any] = {"role": role, "content": self.text}
        calls = list(self.tool_calls or [])
        if self.function_call is not None:
            calls.append(ToolCall(id="call_0", function=self.function_call))
        if calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": _arguments_for_template(call.function.arguments),
                    },
                }
                for call in calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


def _arguments_for_template(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


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
    tools: list[ToolDefinition] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = Field(None, max_length=128)
    function_call: Literal["none", "auto"] | FunctionName | None = None

    def unsupported_fields(self) -> dict[str, tuple[Any, ...]]:
        return UNSUPPORTED_FIELDS | CHAT_UNSUPPORTED_FIELDS

    def requested_max_tokens(self) -> tuple[str, int | None]:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return super().requested_max_tokens()

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(
        description="A text, a list of texts, a list of token ids, or a list of token-id lists "
        "(at most GENERATE_MAX_PROMPTS prompts, each with n choices)"
    )
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = None

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs

    def unsupported_fields(self) -> dict[str, tuple[Any, ...]]:
        return UNSUPPORTED_FIELDS | COMPLETION_UNSUPPORTED_FIELDS


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens whose K/V came from the prefix cache")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None  # answers to the legacy `functions`


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
