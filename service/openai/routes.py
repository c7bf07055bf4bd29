"""The OpenAI-compatible API: GET /v1/models, POST /v1/completions, POST /v1/chat/completions
(POST /v1/embeddings is in embeddings.py).

The same engine, auth, rate limits, metrics and disconnect handling as /generate; only the
request and response shapes differ. One model is served, so the request's `model` field is
accepted whatever it says and answers carry the served model id (the one /v1/models lists).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from batching.errors import EngineError
from batching.generation.handle import GenerationResult
from service.audit import audit_generations
from service.deps import (
    GenerationServiceDep,
    RuntimeDep,
    prefix_cache_namespace,
    resolve_priority,
)
from service.errors import as_api_error
from service.generate.service import GenerationService
from service.generate.streaming import SSE_HEADERS, first_delta, wait_all_or_cancel_on_disconnect
from service.openai.errors import OpenAIError
from service.openai.logprobs import TokenTexts, chat_logprobs, completion_logprobs
from service.openai.requests import (
    chat_prompt_ids,
    checked_choices,
    checked_max_tokens,
    choice_params,
    completion_prompt_ids,
    reject_unsupported,
    to_sampling_params,
    with_response_format,
)
from service.openai.router import v1_router
from service.openai.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    SamplingRequest,
)
from service.openai.streams import (
    ChatChunks,
    ChunkFormat,
    Completion,
    CompletionChunks,
    finish_reason,
    sse_chunks,
    usage,
)
from service.request_id import request_id_of

router = v1_router()
STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}}}


async def start(
    body: SamplingRequest,
    prompt_ids: list[int],
    param: str,
    request: Request,
    service: GenerationService,
    id_prefix: str,
    echo: bool = False,
) -> Completion:
    request_id = request_id_of(request)
    choices = checked_choices(body, service)
    max_tokens = checked_max_tokens(body, len(prompt_ids), service, echo)
    # Echo with logprobs scores the prompt too (lm-evaluation-harness's loglikelihood).
    prompt_logprobs = body.top_logprobs_asked() if echo else None
    params = await with_response_format(
        body, to_sampling_params(body, max_tokens, prompt_logprobs), service
    )
    try:
        handles = await service.engine.submit_choices(
            prompt_ids,
            choice_params(params, choices),
            request_id=request_id,
            priority=resolve_priority(request, service.settings, body.priority),
            cache_namespace=prefix_cache_namespace(request, service.settings),
        )
    except EngineError as exc:
        error = as_api_error(exc, request_id)
        if error.status == 422:  # context overflow, a bad token id, a bad grammar
            code = error.error_type if error.error_type == "context_length_exceeded" else None
            raise OpenAIError(error.message, param, code) from exc
        raise error from exc
    audit_generations(request, handles)
    return Completion(
        handles,
        f"{id_prefix}-{request_id}",
        service.loaded.name,
        int(time.time()),
        service.cancel_on_disconnect,
        TokenTexts(service.grammar_tokenizer, service.loaded.tokenizer),
    )


async def streamed(
    run: Completion, request: Request, form: ChunkFormat, body: SamplingRequest
) -> StreamingResponse:
    # Peek the first output so that queue errors still get a real status.
    first = await first_delta(run.handles[0], request, run.cancel_on_disconnect, run.handles[1:])
    chunks = sse_chunks(run, first, form, body.include_usage)
    return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)


@router.get("/models", response_model=ModelList)
async def list_models(runtime: RuntimeDep) -> ModelList:
    """The generation model, and the embedding model once loaded (a classifier has no /v1)."""
    served = [runtime.settings.generate_model] if runtime.settings.generate_model else []
    if runtime.predict is not None and runtime.predict.loaded.task == "embedding":
        served.append(runtime.predict.loaded.name)
    created = int(runtime.started_at)
    return ModelList(data=[ModelCard(id=model, created=created) for model in served])


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=STREAM_RESPONSE)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, service: GenerationServiceDep
) -> ChatCompletionResponse | StreamingResponse:
    reject_unsupported(body)
    prompt_ids = chat_prompt_ids(body.messages, service)
    run = await start(body, prompt_ids, "messages", request, service, "chatcmpl")
    if body.stream:
        return await streamed(run, request, ChatChunks(run.texts), body)
    results = await wait_all_or_cancel_on_disconnect(run.handles, request, run.cancel_on_disconnect)
    choices = [
        ChatChoice(
            index=index,
            message=AssistantMessage(content=result.text),
            finish_reason=finish_reason(result),
            logprobs=chat_logprobs(result.logprobs, run.texts) if body.logprobs else None,
        )
        for index, result in enumerate(results)
    ]
    return ChatCompletionResponse(
        id=run.id, created=run.created, model=run.model, choices=choices, usage=usage(results)
    )


@router.post("/completions", response_model=CompletionResponse, responses=STREAM_RESPONSE)
async def completions(
    body: CompletionRequest, request: Request, service: GenerationServiceDep
) -> CompletionResponse | StreamingResponse:
    reject_unsupported(body)
    prompt_ids = completion_prompt_ids(body.prompt, service)
    echo = bool(body.echo)
    run = await start(body, prompt_ids, "prompt", request, service, "cmpl", echo)
    echo_text = echoed_text(body.prompt, prompt_ids, service) if echo else None
    if body.stream:
        waits = echo and body.logprobs is not None
        form = CompletionChunks(run.texts, echo_text, prompt_ids, waits)
        return await streamed(run, request, form, body)
    results = await wait_all_or_cancel_on_disconnect(run.handles, request, run.cancel_on_disconnect)
    choices = [
        CompletionChoice(
            index=index,
            text=(echo_text or "") + result.text,
            finish_reason=finish_reason(result),
            logprobs=None
            if body.logprobs is None
            else result_logprobs(result, run, prompt_ids, echo),
        )
        for index, result in enumerate(results)
    ]
    return CompletionResponse(
        id=run.id, created=run.created, model=run.model, choices=choices, usage=usage(results)
    )


def echoed_text(
    prompt: str | list[str] | list[int], prompt_ids: list[int], service: GenerationService
) -> str:
    """The prompt as the client sent it; token ids are decoded."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    return str(service.loaded.tokenizer.decode(prompt_ids))


def result_logprobs(
    result: GenerationResult, run: Completion, prompt_ids: list[int], echo: bool
) -> CompletionLogprobs:
    entries = [*(result.prompt_logprobs if echo else ()), *result.logprobs]
    token_ids = [*(prompt_ids if echo else ()), *result.token_ids]
    return completion_logprobs(entries, token_ids, run.texts)
