"""POST /generate: validate, tokenise, hand the prompt to the GenerationEngine, answer as
one JSON document or as a Server-Sent Events stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from batching.errors import InvalidInputError
from batching.generation.handle import GenerationDelta, GenerationHandle, GenerationResult
from batching.generation.sampling import SamplingParams
from service.audit import audit_generations
from service.deps import (
    ApiKeyDep,
    GenerationServiceDep,
    prefix_cache_namespace,
    resolve_priority,
)
from service.errors import ApiError
from service.generate.schemas import GenerateRequest, GenerateResponse, GenerateTimings
from service.generate.service import GenerationService, sampling_params
from service.generate.streaming import (
    SSE_HEADERS,
    error_event,
    first_delta,
    sse_event,
    stream_deltas,
    submit,
    wait_or_cancel_on_disconnect,
)
from service.limits import RateLimitDep
from service.request_id import request_id_of

router = APIRouter(tags=["generate"], dependencies=[ApiKeyDep, RateLimitDep])


def checked_max_new_tokens(requested: int | None, service: GenerationService) -> int:
    limit = service.settings.generate_max_new_tokens
    if requested is None:
        return limit
    if requested > limit:
        raise ApiError(
            422, "invalid_request", f"max_new_tokens: {requested} is above the limit of {limit}"
        )
    return requested


def checked_prompt_ids(prompt: str, service: GenerationService) -> list[int]:
    limit = service.settings.generate_max_prompt_chars
    if len(prompt) > limit:
        raise ApiError(
            422,
            "invalid_request",
            f"prompt: {len(prompt)} characters, more than the limit of {limit}",
        )
    return service.encode(prompt)


async def compiled_json_schema(
    service: GenerationService, params: SamplingParams, json_schema: dict[str, Any] | None
) -> SamplingParams:
    """params with json_schema's grammar (compiled off the event loop and the engine thread,
    under GRAMMAR_* limits); a refused schema is a 422 naming json_schema."""
    try:
        return await service.with_grammar(params, json_schema)
    except InvalidInputError as exc:
        raise ApiError(422, "invalid_request", f"json_schema: {exc}") from exc


def to_response(result: GenerationResult, model: str, request_id: str) -> GenerateResponse:
    if result.finish_reason == "cancelled":  # only reachable if the client is gone anyway
        raise ApiError(499, "client_closed", "the request was cancelled")
    return GenerateResponse(
        text=result.text,
        finish_reason=result.finish_reason,
        prompt_tokens=result.prompt_tokens,
        cached_tokens=result.cached_tokens,
        completion_tokens=result.completion_tokens,
        model=model,
        request_id=request_id,
        timings=GenerateTimings(
            queue_ms=round(result.timings.queue_ms, 3),
            ttft_ms=round(result.timings.ttft_ms or 0.0, 3),
            total_ms=round(result.timings.total_ms, 3),
        ),
    )


async def sse_stream(
    handle: GenerationHandle,
    first: GenerationDelta | None,
    model: str,
    request_id: str,
    cancel_on_disconnect: bool,
) -> AsyncIterator[str]:
    try:
        async for delta in stream_deltas(handle, first, cancel_on_disconnect):
            yield sse_event({"text": delta.text, "token_ids": list(delta.token_ids)})
        result = to_response(handle.result, model, request_id)
        yield sse_event(
            {
                "text": "",
                "finish_reason": result.finish_reason,
                "usage": {
                    "prompt_tokens": result.prompt_tokens,
                    "cached_tokens": result.cached_tokens,
                    "completion_tokens": result.completion_tokens,
                },
                "timings": result.timings.model_dump(),
                "request_id": request_id,
            }
        )
    except Exception as exc:
        # Headers are gone already: the failure travels as a last event.
        yield sse_event(error_event(exc, request_id))
    yield sse_event("[DONE]")


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def generate(
    body: GenerateRequest, request: Request, service: GenerationServiceDep
) -> GenerateResponse | StreamingResponse:
    request_id = request_id_of(request)
    params = sampling_params(
        max_new_tokens=checked_max_new_tokens(body.max_new_tokens, service),
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stop,
    )
    params = await compiled_json_schema(service, params, body.json_schema)
    priority = resolve_priority(request, service.settings, body.priority)
    handle = await submit(
        service,
        checked_prompt_ids(body.prompt, service),
        params,
        request_id,
        priority,
        prefix_cache_namespace(request, service.settings),
    )
    audit_generations(request, [handle])
    model, cancel = service.loaded.name, service.cancel_on_disconnect
    if not body.stream:
        result = await wait_or_cancel_on_disconnect(handle, request, cancel)
        return to_response(result, model, request_id)
    first = await first_delta(handle, request, cancel)
    return StreamingResponse(
        sse_stream(handle, first, model, request_id, cancel),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )
