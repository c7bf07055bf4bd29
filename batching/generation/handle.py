"""One request's result channel: the caller's async stream of deltas and result, and the engine's
outbox that fills it.

The engine thread never touches asyncio objects directly. It collects a step's deltas and
endings in the `Outbox` and hands each event loop one list with
`loop.call_soon_threadsafe(deliver_all, items)`, one call per engine step for all the handles of
that loop (crossing threads costs a wake-up of the event loop). The metric hooks for first
tokens and endings are called in the Outbox too, so they sit next to what they count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from batching.generation.observer import EngineObserver
from batching.generation.sampling import TokenLogprob

if TYPE_CHECKING:  # request.py imports the handle's types from here
    from batching.generation.request import Request

logger = logging.getLogger(__name__)

FinishReason = Literal["eos", "stop", "length", "cancelled"]


@dataclass(frozen=True)
class GenerationDelta:
    """New output: the text that became final (may be "") and the token ids it came from,
    with their logprobs if the request asked. The prompt's logprobs, if asked, come first, in a
    delta of their own (no text, no tokens) once the prompt is prefilled."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()  # None for the first prompt token


@dataclass(frozen=True)
class GenerationTimings:
    queue_ms: float  # submit -> admitted into a slot
    ttft_ms: float | None  # submit -> first token (None if it never got one)
    total_ms: float  # submit -> finished


@dataclass(frozen=True)
class GenerationResult:
    finish_reason: FinishReason
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose K/V came from the prefix cache
    completion_tokens: int  # generated tokens, EOS not counted
    text: str  # the whole output, stop string excluded
    token_ids: tuple[int, ...]
    timings: GenerationTimings
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, if asked
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()  # one per prompt token, if asked


@dataclass(frozen=True)
class _Finished:
    result: GenerationResult


@dataclass(frozen=True)
class _Failed:
    error: BaseException


StreamItem = GenerationDelta | _Finished | _Failed


class GenerationHandle:
    """Returned by `GenerationEngine.submit()`; iterate it on the loop that submitted.

    `async for delta in handle` yields GenerationDelta until the request ends, then
    `handle.result` holds the GenerationResult. If the request failed, iterating (and
    `result`) raise its error: QueueTimeoutError, ModelExecutionError or EngineStoppedError.
    """

    def __init__(
        self, request_id: str, loop: asyncio.AbstractEventLoop, wake_engine: Callable[[], None]
    ) -> None:
        self.request_id = request_id
        self._loop = loop
        self._wake_engine = wake_engine
        self._items: asyncio.Queue[StreamItem] = asyncio.Queue()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self._cancel_requested = threading.Event()  # read by the engine thread
        self._end_claimed = False  # an end (result or error) was sent: see claim_end()
        self._claim_lock = threading.Lock()
        self._on_end: list[Callable[[GenerationResult | None, BaseException | None], None]] = []

    def __aiter__(self) -> GenerationHandle:
        return self

    async def __anext__(self) -> GenerationDelta:
        if self._result is not None:
            raise StopAsyncIteration
        if self._error is not None:
            raise self._error
        item = await self._items.get()
        if isinstance(item, _Finished):
            self._result = item.result
            raise StopAsyncIteration
        if isinstance(item, _Failed):
            self._error = item.error
            raise item.error
        return item

    @property
    def done(self) -> bool:
        """True once the stream has been read to its end (result or error)."""
        return self._result is not None or self._error is not None

    @property
    def result(self) -> GenerationResult:
        """The final result; available after iteration ended (or after `await wait()`)."""
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise RuntimeError("the generation has not finished: iterate the handle first")
        return self._result

    async def wait(self) -> GenerationResult:
        """Read the rest of the stream and return the result (non-streaming callers)."""
        async for _ in self:
            pass
        return self.result

    def cancel(self) -> None:
        """The client went away: the engine frees the slot within one step ("cancelled")."""
        if not self._cancel_requested.is_set():
            self._cancel_requested.set()
            self._wake_engine()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested.is_set()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def add_end_callback(
        self, callback: Callable[[GenerationResult | None, BaseException | None], None]
    ) -> None:
        """callback(result, error) on the handle's loop when the generation ends, whether or
        not anybody reads the stream (an audit log records a mirrored stream's full output)."""
        self._on_end.append(callback)

    def claim_end(self) -> bool:
        """True for the first caller only. Whoever ends the request (the engine thread's
        outbox, or the event loop's queue timer) claims it first, so it is answered exactly
        once even when the engine dies and answers everything it still knows of."""
        with self._claim_lock:
            if self._end_claimed:
                return False
            self._end_claimed = True
            return True

    def put_nowait(self, item: StreamItem) -> None:
        """Called on the handle's loop (via deliver_all) only."""
        self._items.put_nowait(item)
        if isinstance(item, _Finished | _Failed):
            result = item.result if isinstance(item, _Finished) else None
            error = item.error if isinstance(item, _Failed) else None
            for callback in self._on_end:
                try:
                    callback(result, error)
                except Exception:  # a bookkeeping bug must not stop delivery to other handles
                    logger.exception("an end callback of %s failed", self.request_id)


def fail_now(handle: GenerationHandle, error: BaseException) -> bool:
    """End a handle with an error from its own loop (a request the engine never took);
    False if it had been answered already."""
    if not handle.claim_end():
        return False
    handle.put_nowait(_Failed(error))
    return True


def deliver_all(items: list[tuple[GenerationHandle, StreamItem]]) -> None:
    """Runs on the event loop: hand each item to its handle, in order."""
    for handle, item in items:
        handle.put_nowait(item)


class Outbox:
    """Engine-thread only: collect with token/finish/fail, then flush."""

    def __init__(self, observer: EngineObserver) -> None:
        self._observer = observer
        self._items: list[tuple[GenerationHandle, StreamItem]] = []

    def token(self, request: Request, delta: GenerationDelta) -> None:
        if request.tokens_sampled == 1 and request.first_token_s is not None:
            self._observer.on_first_token(
                request.first_token_s - request.arrival_s, request.priority
            )
        if delta.text or delta.token_ids or delta.prompt_logprobs:
            self._items.append((request.handle, delta))

    def finish(self, request: Request, now_s: float) -> None:
        if not request.handle.claim_end():
            return
        result = request.result(now_s)
        self._items.append((request.handle, _Finished(result)))
        self._observer.on_finish(
            result.finish_reason,
            result.prompt_tokens,
            result.completion_tokens,
            now_s - request.arrival_s,
        )

    def fail(self, request: Request, error: BaseException) -> None:
        if not request.handle.claim_end():
            return
        self._items.append((request.handle, _Failed(error)))
        e2e_s = time.perf_counter() - request.arrival_s
        self._observer.on_finish("error", request.prompt_tokens, len(request.output_ids), e2e_s)

    def flush(self) -> None:
        if not self._items:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[GenerationHandle, StreamItem]]] = {}
        for handle, item in self._items:
            by_loop.setdefault(handle.loop, []).append((handle, item))
        self._items = []
        for loop, items in by_loop.items():
            # RuntimeError: that event loop is closed, nobody is left to read these handles.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(deliver_all, items)
