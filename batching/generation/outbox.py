"""What one engine step produced for the handles, delivered in one event-loop call per flush.

Crossing threads costs a wake-up of the event loop, so the engine thread collects the step's
deltas and endings here and hands each loop one list with `call_soon_threadsafe`. The metric
hooks for first tokens and endings are called here too, so they sit next to what they count.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from batching.generation.handle import (
    GenerationDelta,
    GenerationHandle,
    StreamItem,
    _Failed,
    _Finished,
    deliver_all,
)
from batching.generation.observer import EngineObserver
from batching.generation.request import Request


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
        result = request.result(now_s)
        self._items.append((request.handle, _Finished(result)))
        self._observer.on_finish(
            result.finish_reason,
            result.prompt_tokens,
            result.completion_tokens,
            now_s - request.arrival_s,
        )

    def fail(self, request: Request, error: BaseException) -> None:
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
