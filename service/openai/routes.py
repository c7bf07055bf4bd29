"""The OpenAI-compatible API: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

The same engine, auth, rate limits, metrics and disconnect handling as /generate; only the
request and response shapes differ. One model is served, so the request's `model` field is
accepted whatever it says and answers carry the served model id (the one /v1/models lists).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from batching.generation.handle import GenerationDelta, GenerationHandle, GenerationResult
from service.deps import ApiKeyDep, RuntimeDep
from service.errors import ApiError, as_api_error
from service.generation import GenerationService
from service.limits import RateLimitDep
from service.openai.errors import OpenAIError, OpenAIRoute, openai_error_body
from service.openai.requests import (
    chat_prompt_ids,
    checked_max_tokens,
    completion_prompt_ids,
    reject_unsupported,
    to_sampling_params,
)
from service.openai.schemas import (
    ERROR_RESPONSES,
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    FinishReason,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    SamplingRequest,
    Usage,
)
from service.request_id import request_id_of
from service.routes.generate import GenerationServiceDep
from service.streaming import (
    SSE_HEADERS,
    first_delta,
    sse_event,
    stream_deltas,
    submit,
    wait_or_cancel_on_disconnect,
)

router = APIRouter(
    prefix="/v1",
    tags=["openai"],
    route_class=OpenAIRoute,
    dependencies=[ApiKeyDep, RateLimitDep],
    responses=ERROR_RESPONSES,
)
STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}}}
ChoiceMaker = Callable[[str, FinishReason | None], dict[str, Any]]


@dataclass(frozen=True)
class Completion:
    """One admitted request and the fields every response or chunk of it repeats."""

    handle: GenerationHandle
    id: str
    model: str
    created: int
    cancel_on_disconnect: bool

    def chunk(self, kind: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        head = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        return head | {"choices": choices} | extra


async def start(
    body: SamplingRequest,
    prompt_ids: list[int],
    param: str,
    request: Request,
    service: GenerationService,
    id_prefix: str,
) -> Completion:
    request_id = request_id_of(request)
    params = to_sampling_params(body, checked_max_tokens(body, len(prompt_ids), service))
    try:
        handle = await submit(service, prompt_ids, params, request_id)
    except ApiError as exc:
        if exc.status == 422:  # context overflow or a bad token id: the prompt is at fault
            code = exc.error_type if exc.error_type == "context_length_exceeded" else None
            raise OpenAIError(exc.message, param, code) from exc
        raise
    return Completion(
        handle,
        f"{id_prefix}-{request_id}",
        service.loaded.name,
        int(time.time()),
        service.cancel_on_disconnect,
    )


def finish_reason(result: GenerationResult) -> FinishReason:
    if result.finish_reason == "cancelled":  # only reachable if the client is gone anyway
        raise ApiError(499, "client_closed", "the request was cancelled")
    return "length" if result.finish_reason == "length" else "stop"  # eos and stop strings


def usage(result: GenerationResult) -> Usage:
    prompt, completion = result.prompt_tokens, result.completion_tokens
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=result.cached_tokens),
    )


async def sse_chunks(
    run: Completion,
    first: GenerationDelta | None,
    kind: str,
    choice: ChoiceMaker,
    include_usage: bool,
    opening: dict[str, Any] | None = None,
) -> AsyncIterator[str]:
    try:
        if opening is not None:
            yield sse_event(run.chunk(kind, [opening]))
        async for delta in stream_deltas(run.handle, first, run.cancel_on_disconnect):
            if delta.text:  # "" while a multi-byte character is still incomplete
                yield sse_event(run.chunk(kind, [choice(delta.text, None)]))
        result = run.handle.result
        yield sse_event(run.chunk(kind, [choice("", finish_reason(result))]))
        if include_usage:
            yield sse_event(run.chunk(kind, [], usage=usage(result).model_dump()))
    except Exception as exc:
        # Headers are gone already: the failure travels as an event the SDKs raise from.
        yield sse_event(openai_error_body(as_api_error(exc, run.handle.request_id))[1])
    yield sse_event("[DONE]")


async def streamed(
    run: Completion,
    request: Request,
    kind: str,
    choice: ChoiceMaker,
    body: SamplingRequest,
    opening: dict[str, Any] | None = None,
) -> StreamingResponse:
    # Peek the first token so that queue errors still get a real status.
    first = await first_delta(run.handle, request, run.cancel_on_disconnect)
    chunks = sse_chunks(run, first, kind, choice, body.include_usage, opening)
    return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)


def chat_choice(text: str, reason: FinishReason | None) -> dict[str, Any]:
    delta = {"content": text} if reason is None else {}
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}


def completion_choice(text: str, reason: FinishReason | None) -> dict[str, Any]:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}


@router.get("/models", response_model=ModelList)
async def list_models(runtime: RuntimeDep) -> ModelList:
    served = runtime.settings.generate_model
    return ModelList(data=[ModelCard(id=served, created=int(runtime.started_at))] if served else [])


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=STREAM_RESPONSE)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, service: GenerationServiceDep
) -> ChatCompletionResponse | StreamingResponse:
    reject_unsupported(body)
    prompt_ids = chat_prompt_ids(body.messages, service)
    run = await start(body, prompt_ids, "messages", request, service, "chatcmpl")
    if body.stream:
        opening = chat_choice("", None) | {"delta": {"role": "assistant", "content": ""}}
        return await streamed(run, request, "chat.completion.chunk", chat_choice, body, opening)
    result = await wait_or_cancel_on_disconnect(run.handle, request, run.cancel_on_disconnect)
    choice = ChatChoice(
        message=AssistantMessage(content=result.text), finish_reason=finish_reason(result)
    )
    return ChatCompletionResponse(
        id=run.id, created=run.created, model=run.model, choices=[choice], usage=usage(result)
    )


@router.post("/completions", response_model=CompletionResponse, responses=STREAM_RESPONSE)
async def completions(
    body: CompletionRequest, request: Request, service: GenerationServiceDep
) -> CompletionResponse | StreamingResponse:
    reject_unsupported(body)
    prompt_ids = completion_prompt_ids(body.prompt, service)
    run = await start(body, prompt_ids, "prompt", request, service, "cmpl")
    if body.stream:
        return await streamed(run, request, "text_completion", completion_choice, body)
    result = await wait_or_cancel_on_disconnect(run.handle, request, run.cancel_on_disconnect)
    choice = CompletionChoice(text=result.text, finish_reason=finish_reason(result))
    return CompletionResponse(
        id=run.id, created=run.created, model=run.model, choices=[choice], usage=usage(result)
    )
