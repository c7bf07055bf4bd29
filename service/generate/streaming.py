"""Plumbing shared by /generate and /v1 after submit: first-token peek, disconnects, SSE framing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

from fastapi import Request

from batching.errors import EngineError
from batching.generation.handle import GenerationDelta, GenerationHandle, GenerationResult
from service.errors import ApiError, as_api_error

T = TypeVar("T")

# Keep every proxy on the path (NGINX included) from buffering the stream.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}


def sse_event(payload: Any) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def let_go(handle: GenerationHandle, cancel: bool) -> None:
    """The client is gone. Normally the slot is freed at once; a shadow deployment sets
    GENERATE_CANCEL_ON_DISCONNECT=false so that mirrored requests (whose reader NGINX drops)
    still do the full work and the shadow sees production load."""
    if cancel:
        handle.cancel()


async def _disconnected(request: Request) -> None:
    # The body was read already, so the next ASGI message is the client's disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(
    work: Awaitable[T], handles: Sequence[GenerationHandle], request: Request, cancel: bool
) -> T:
    """Await `work` (the first token, or the whole result), but if the client hangs up first,
    let its generations go (a queued one is then dropped before it costs any compute) and
    answer 499. Engine errors become their HTTP errors."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            for handle in handles:
                let_go(handle, cancel)
            if cancel:
                task.cancel()
            else:  # let it run to the end; nobody reads the result
                task.add_done_callback(lambda t: t.cancelled() or t.exception())
    if not task.done() or task.cancelled():
        raise ApiError(499, "client_closed", "the client closed the connection")
    try:
        return task.result()
    except EngineError as exc:
        for handle in handles:  # nobody will read the other choices of a failed request
            let_go(handle, cancel)
        raise as_api_error(exc, handles[0].request_id) from exc


async def _first_or_none(handle: GenerationHandle) -> GenerationDelta | None:
    try:
        return await anext(handle)
    except StopAsyncIteration:
        return None


async def first_delta(
    handle: GenerationHandle,
    request: Request,
    cancel: bool = True,
    siblings: Sequence[GenerationHandle] = (),
) -> GenerationDelta | None:
    """Wait for generation to start, so queue errors (504, 500) still get a proper status
    instead of arriving inside a 200 stream. None: it finished without any delta. `siblings`
    (the other choices of the same request) are let go too if the client leaves."""
    handles = [handle, *siblings]
    return await unless_disconnected(_first_or_none(handle), handles, request, cancel)


async def wait_or_cancel_on_disconnect(
    handle: GenerationHandle, request: Request, cancel: bool = True
) -> GenerationResult:
    """A non-streamed generation that frees its slot if the client hangs up meanwhile."""
    return await unless_disconnected(handle.wait(), [handle], request, cancel)


async def wait_all_or_cancel_on_disconnect(
    handles: Sequence[GenerationHandle], request: Request, cancel: bool = True
) -> list[GenerationResult]:
    """Every choice's result; all are let go if the client hangs up meanwhile."""
    work = asyncio.gather(*(handle.wait() for handle in handles))
    return list(await unless_disconnected(work, handles, request, cancel))


async def stream_deltas(
    handle: GenerationHandle, first: GenerationDelta | None, cancel: bool = True
) -> AsyncIterator[GenerationDelta]:
    """Yield the peeked delta, then the rest; cancel the request if the consumer stops early
    (Starlette cancels the response task when the client disconnects)."""
    try:
        if first is not None:
            yield first
        async for delta in handle:
            yield delta
    finally:
        if not handle.done:
            let_go(handle, cancel)


def error_event(exc: BaseException, request_id: str) -> dict[str, Any]:
    """The last event of a /generate stream that failed after its headers were sent."""
    error = as_api_error(exc, request_id)
    return {"error": {"type": error.error_type, "message": error.message, "request_id": request_id}}
