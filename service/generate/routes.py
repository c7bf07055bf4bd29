"""POST /generate: decode the request, enter the engine through the one submit path
(submit.py), answer as one JSON document or as a Server-Sent Events stream."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from batching.generation.handle import GenerationDelta, GenerationHandle, GenerationResult
from batching.generation.sampling import SamplingParams
from service.deps import ApiKeyDep, GenerationServiceDep
from service.errors import ApiError
from service.generate.grammars import JsonOutput
from service.generate.limits import checked_text
from service.generate.schemas import GenerateRequest, GenerateResponse, GenerateTimings
from service.generate.streaming import (
    SSE_HEADERS,
    error_event,
    first_delta,
    sse_event,
    stream_deltas,
    wait_or_cancel_on_disconnect,
)
from service.generate.submit import GenerationCall, submit_generation
from service.limits import RateLimitDep
from service.request_id import request_id_of
from service.schemas import ERROR_RESPONSES

router = APIRouter(
    tags=["generate"], dependencies=[ApiKeyDep, RateLimitDep], responses=ERROR_RESPONSES
)


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
    schema = body.json_schema
    call = GenerationCall(
        prompts=[service.encode(checked_text(body.prompt, "prompt", service.settings))],
        sampling=SamplingParams(
            max_new_tokens=1,  # set by the path
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=tuple(body.stop),
        ),
        max_new_tokens=body.max_new_tokens,
        json_output=None if schema is None else JsonOutput(schema, "json_schema"),
        priority=body.priority,
    )
    ((handle,),) = await submit_generation(service, request, call)
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
