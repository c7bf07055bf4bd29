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

from batching.generation.handle import GenerationResult
from service.deps import GenerationServiceDep, RuntimeDep
from service.generate.service import GenerationService
from service.generate.streaming import SSE_HEADERS, first_delta, wait_all_or_cancel_on_disconnect
from service.generate.submit import GenerationCall, submit_generation
from service.openai.logprobs import TokenTexts, chat_logprobs, completion_logprobs
from service.openai.requests import (
    chat_prompt_ids,
    completion_prompts,
    generation_call,
    reject_unsupported,
    response_output,
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
    FunctionCall,
    ModelCard,
    ModelList,
    SamplingRequest,
    ToolCall,
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
from service.openai.tools.parsers import ToolParser, choose_parser
from service.openai.tools.plan import ToolPlan, new_call_id, tool_plan
from service.request_id import request_id_of

router = v1_router()
STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}}}


async def start(
    call: GenerationCall, request: Request, service: GenerationService, id_prefix: str
) -> Completion:
    """Into the engine through the one submit path; /v1 only decodes and encodes."""
    groups = await submit_generation(service, request, call)
    return Completion(
        [handle for handles in groups for handle in handles],
        f"{id_prefix}-{request_id_of(request)}",
        service.loaded.name,
        int(time.time()),
        service.cancel_on_disconnect,
        TokenTexts(service.grammar_tokenizer, service.loaded.tokenizer),
        call.choices,
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


def tool_parser(service: GenerationService) -> ToolParser:
    template = getattr(service.loaded.tokenizer, "chat_template", None)
    return choose_parser(service.settings.generate_tool_parser, str(template or ""))


def assistant_message(result: GenerationResult, plan: ToolPlan) -> tuple[AssistantMessage, Any]:
    """encode_response of one chat choice: its text, or the tool calls it holds."""
    reason = finish_reason(result)
    parsed = plan.parse(result.text)
    if parsed is None:
        return AssistantMessage(content=result.text), reason
    calls = [FunctionCall(name=c.name, arguments=c.arguments) for c in parsed.calls]
    if plan.legacy:
        return AssistantMessage(content=parsed.content, function_call=calls[0]), "function_call"
    tool_calls = [ToolCall(id=new_call_id(), function=call) for call in calls]
    return AssistantMessage(content=parsed.content, tool_calls=tool_calls), "tool_calls"


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=STREAM_RESPONSE)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, service: GenerationServiceDep
) -> ChatCompletionResponse | StreamingResponse:
    reject_unsupported(body)
    plan = tool_plan(body, tool_parser(service))
    prompt_ids = chat_prompt_ids(body.messages, service, plan.for_template())
    output = plan.json_output() or response_output(body)
    call = generation_call(body, [prompt_ids], service, "messages", output)
    run = await start(call, request, service, "chatcmpl")
    if body.stream:
        return await streamed(run, request, ChatChunks(run.texts, plan), body)
    results = await wait_all_or_cancel_on_disconnect(run.handles, request, run.cancel_on_disconnect)
    choices = []
    for index, result in enumerate(results):
        message, reason = assistant_message(result, plan)
        logprobs = chat_logprobs(result.logprobs, run.texts) if body.logprobs else None
        choices.append(
            ChatChoice(index=index, message=message, finish_reason=reason, logprobs=logprobs)
        )
    return ChatCompletionResponse(
        id=run.id, created=run.created, model=run.model, choices=choices, usage=usage(results)
    )


@router.post("/completions", response_model=CompletionResponse, responses=STREAM_RESPONSE)
async def completions(
    body: CompletionRequest, request: Request, service: GenerationServiceDep
) -> CompletionResponse | StreamingResponse:
    reject_unsupported(body)
    prompts = completion_prompts(body, service)
    echo = bool(body.echo)
    call = generation_call(body, prompts, service, "prompt", None, echo)
    run = await start(call, request, service, "cmpl")
    echoes = echoed_texts(body, prompts, service) if echo else None
    if body.stream:
        waits = echo and body.logprobs is not None
        form = CompletionChunks(run.texts, echoes, prompts, waits, run.choices)
        return await streamed(run, request, form, body)
    results = await wait_all_or_cancel_on_disconnect(run.handles, request, run.cancel_on_disconnect)
    choices = []
    for index, result in enumerate(results):
        prompt = index // run.choices
        logprobs = None
        if body.logprobs is not None:
            logprobs = result_logprobs(result, run, prompts[prompt], echo)
        choices.append(
            CompletionChoice(
                index=index,
                text=(echoes[prompt] if echoes else "") + result.text,
                finish_reason=finish_reason(result),
                logprobs=logprobs,
            )
        )
    return CompletionResponse(
        id=run.id,
        created=run.created,
        model=run.model,
        choices=choices,
        usage=usage(results, run.choices),
    )


def echoed_texts(
    body: CompletionRequest, prompts: list[list[int]], service: GenerationService
) -> list[str]:
    """Each prompt as the client sent it; token ids are decoded."""
    if isinstance(body.prompt, str):
        return [body.prompt]
    if isinstance(body.prompt[0], str):
        return [str(text) for text in body.prompt]
    return [str(service.loaded.tokenizer.decode(ids)) for ids in prompts]


def result_logprobs(
    result: GenerationResult, run: Completion, prompt_ids: list[int], echo: bool
) -> CompletionLogprobs:
    entries = [*(result.prompt_logprobs if echo else ()), *result.logprobs]
    token_ids = [*(prompt_ids if echo else ()), *result.token_ids]
    return completion_logprobs(entries, token_ids, run.texts)
