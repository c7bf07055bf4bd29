"""POST /tokenize, /detokenize and GET /tokenizer_info in vLLM's shapes: clients
(lm-evaluation-harness among them) use the server's own tokenizer instead of guessing it."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from batching.errors import InvalidInputError
from service.deps import ApiKeyDep, GenerationServiceDep
from service.errors import ApiError, as_api_error
from service.generate.limits import checked_text
from service.generate.special_tokens import prompt_ids
from service.limits import RateLimitDep
from service.openai.errors import OpenAIError
from service.openai.requests import chat_prompt_ids
from service.openai.schemas import ChatMessage
from service.schemas import ERROR_RESPONSES

router = APIRouter(
    tags=["tokenize"], dependencies=[ApiKeyDep, RateLimitDep], responses=ERROR_RESPONSES
)
TokenId = Annotated[int, Field(ge=0)]


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = ""
    prompt: str | None = Field(None, description="Text to tokenize (or give messages)")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description="A chat")
    add_special_tokens: bool = Field(True, description="For prompt: BOS and the like")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    special_tokens_in_text: bool = Field(
        description="Whether special-token text in the prompt or contents became control tokens "
        "(GENERATE_SPECIAL_TOKENS_IN_PROMPTS); else it was tokenised as plain text"
    )


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = ""
    tokens: list[TokenId] = Field(max_length=100_000)


class DetokenizeResponse(BaseModel):
    prompt: str


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, service: GenerationServiceDep) -> TokenizeResponse:
    if (body.prompt is None) == (body.messages is None):
        raise as_api_error(InvalidInputError("give exactly one of prompt and messages"))
    allow = service.settings.generate_special_tokens_in_prompts
    try:
        if body.messages is not None:
            ids = chat_prompt_ids(body.messages, service)  # the chat template, as /v1 does it
        else:
            text = checked_text(body.prompt or "", "prompt", service.settings)
            ids = prompt_ids(service.loaded.tokenizer, text, body.add_special_tokens, allow)
    except OpenAIError as exc:  # /tokenize is not /v1: its input errors are 422, like the rest
        raise ApiError(422, "invalid_request", exc.message) from exc
    return TokenizeResponse(
        count=len(ids),
        max_model_len=service.engine.max_seq_len,
        tokens=ids,
        special_tokens_in_text=allow,
    )


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, service: GenerationServiceDep) -> DetokenizeResponse:
    # The ids a prompt may hold (the model's vocabulary, as the engine checks), not only
    # the tokenizer's: ids past it are padding rows and decode to nothing.
    rows = int(getattr(service.loaded.model.config, "vocab_size", 0) or 0)
    vocab = max(len(service.loaded.tokenizer), rows)
    if any(token >= vocab for token in body.tokens):
        raise as_api_error(InvalidInputError(f"tokens must be in [0, {vocab})"))
    return DetokenizeResponse(prompt=service.loaded.tokenizer.decode(body.tokens))


def _plain(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


@router.get("/tokenizer_info")
async def tokenizer_info(service: GenerationServiceDep) -> dict[str, Any]:
    """The tokenizer's configuration in vLLM's shape (its `tokenizer_class` and its config
    fields), for clients that tokenize on their side (lm-evaluation-harness's remote
    tokenizer): special tokens, chat template, added tokens, the context length."""
    tokenizer = service.loaded.tokenizer
    config = {k: v for k, v in tokenizer.init_kwargs.items() if _plain(v)}
    added = {
        str(token_id): {"content": token.content, "special": token.special}
        for token_id, token in tokenizer.added_tokens_decoder.items()
    }
    return config | {
        "tokenizer_class": type(tokenizer).__name__,
        "model_max_length": service.engine.max_seq_len,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "unk_token": tokenizer.unk_token,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "added_tokens_decoder": added,
    }
