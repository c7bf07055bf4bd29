"""Dynamic batching for one-shot work (/predict): many awaiting callers, one model call per batch.

Where a /predict request waits: `BatchCollector.submit()` puts (item, future) in a bounded FIFO
and awaits the future. A single collector task (the only writer) takes batches from the front:
it waits for a first item, then until `max_batch_size` items are there or `max_wait_ms` has
passed since that item arrived, and runs `run_batch` on a worker thread.

Pipelining: at most one batch is inside `run_batch` at a time. While it computes, new items
keep queueing, so the next batch forms meanwhile; when the worker frees, that batch starts at
once if it is full or its first item is already `max_wait_ms` old. Batches are taken only when
the worker is free, so callers that left or waited past `timeout_s` are still dropped then.

Isolation: one bad input fails only its own caller (see isolation.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from batching.dynamic.isolation import Failed, run_sorted
from batching.dynamic.observer import CollectorObserver, NoopObserver
from batching.errors import (
    EngineStoppedError,
    InvalidInputError,
    QueueFullError,
    QueueTimeoutError,
    RequestInterruptedError,
)

logger = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


@dataclass(eq=False)  # hashed by identity: entries are keys of the waiting set
class _Entry(Generic[ItemT, ResultT]):
    """One accepted submit(): the caller awaits `future`; only the collector resolves it."""

    item: ItemT
    future: asyncio.Future[ResultT]
    enqueued_at_s: float  # loop.time() at submit()
    expiry: asyncio.TimerHandle | None = None


class BatchCollector(Generic[ItemT, ResultT]):
    """Dynamic batcher: each caller submits one item and gets its own result or its own error."""

    def __init__(
        self,
        run_batch: Callable[[list[ItemT]], list[ResultT]],
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        timeout_s: float = 30.0,
        size_of: Callable[[ItemT], int] | None = None,
        observer: CollectorObserver | None = None,
        executor: Executor | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be at least 1")
        if max_wait_ms < 0 or timeout_s <= 0:
            raise ValueError("max_wait_ms must be >= 0 and timeout_s > 0")
        self._run_batch = run_batch
        self._size_of = size_of
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_ms / 1000
        self._max_queue = max_queue
        self._timeout_s = timeout_s
        self._observer: CollectorObserver = observer if observer is not None else NoopObserver()
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="batch-collector")
        # An ordered set: FIFO from the front, O(1) removal of a caller that gave up.
        self._waiting: OrderedDict[_Entry[ItemT, ResultT], None] = OrderedDict()
        self._computing: list[_Entry[ItemT, ResultT]] = []
        self._wakeup = asyncio.Event()  # set for: a first waiting item, a full batch, stop()
        self._task: asyncio.Task[None] | None = None
        self._accepting = False
        self._batch_started_s: float | None = None  # loop.time() while run_batch computes

    @property
    def queue_depth(self) -> int:
        """Accepted items whose batch has not started yet (the predict_queue_depth gauge)."""
        return len(self._waiting)

    @property
    def is_alive(self) -> bool:
        """True while the collector task runs: False before start(), after stop(), or if it died."""
        return self._task is not None and not self._task.done()

    @property
    def batch_running_s(self) -> float:
        """How long the batch in run_batch has been computing (0 when none): a model call that
        never returns shows here, and /health turns 503 past ENGINE_STEP_TIMEOUT_S."""
        started_s = self._batch_started_s
        return 0.0 if started_s is None else asyncio.get_running_loop().time() - started_s

    def start(self) -> None:
        """Start the collector task on the running event loop (call once)."""
        if self._task is not None:
            raise RuntimeError("BatchCollector.start() may be called only once")
        self._task = asyncio.get_running_loop().create_task(self._serve(), name="batch-collector")
        self._task.add_done_callback(self._log_death)
        self._accepting = True

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Refuse new items, answer every accepted one, then shut the owned worker thread down.

        What is queued is still computed, without waiting for max_wait_ms. After drain_timeout_s
        whatever is left (the running batch included) gets EngineStoppedError, and the worker
        thread is left to finish its current run_batch call on its own.
        """
        self._accepting = False
        self._wakeup.set()
        drained = True
        if self._task is not None:
            done, _ = await asyncio.wait([self._task], timeout=drain_timeout_s)
            if not done:
                drained = False
                self._task.cancel()
                await asyncio.wait([self._task])
        if self._owns_executor:
            self._executor.shutdown(wait=drained, cancel_futures=True)

    async def submit(self, item: ItemT) -> ResultT:
        """Queue one item and wait for its own result.

        Raises EngineStoppedError if not running, QueueFullError at once if max_queue items wait,
        QueueTimeoutError if its batch did not start within timeout_s, and InvalidInputError or
        ModelExecutionError if the model failed on this item.
        """
        if not (self._accepting and self.is_alive):
            raise EngineStoppedError("the batch collector is not running")
        if len(self._waiting) >= self._max_queue:
            self._observer.count_rejected("queue_full")
            raise QueueFullError(self._max_queue)
        loop = asyncio.get_running_loop()
        entry: _Entry[ItemT, ResultT] = _Entry(item, loop.create_future(), loop.time())
        entry.expiry = loop.call_at(entry.enqueued_at_s + self._timeout_s, self._expire, entry)
        self._waiting[entry] = None
        if len(self._waiting) == 1 or len(self._waiting) >= self._max_batch_size:
            self._wakeup.set()
        try:
            return await entry.future
        except asyncio.CancelledError:
            self._forget(entry)  # the client is gone: its item must not cost compute
            raise

    async def _serve(self) -> None:
        """The collector task: form a batch, compute it, repeat; answer everyone on the way out."""
        try:
            while await self._wait_for_batch():
                self._take_batch()
                if self._computing:
                    await self._compute()
        finally:
            self._accepting = False
            self._fail_unanswered()

    async def _wait_for_batch(self) -> bool:
        """Wait for a first item, then until the batch is full or max_wait_ms after that item.

        Returns False once stopping with nothing left. While stopping nothing new can arrive,
        so what is queued goes at once.
        """
        while not self._waiting:
            if not self._accepting:
                return False
            self._wakeup.clear()
            await self._wakeup.wait()
        loop = asyncio.get_running_loop()
        deadline_s = next(iter(self._waiting)).enqueued_at_s + self._max_wait_s
        while (
            self._accepting
            and 0 < len(self._waiting) < self._max_batch_size
            and loop.time() < deadline_s
        ):
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline_s):
                    await self._wakeup.wait()
        return True

    def _take_batch(self) -> None:
        """Move up to max_batch_size live items into the batch; gone or stale ones cost nothing."""
        now_s = asyncio.get_running_loop().time()
        while self._waiting and len(self._computing) < self._max_batch_size:
            entry, _ = self._waiting.popitem(last=False)
            if entry.expiry is not None:
                entry.expiry.cancel()
            waited_s = now_s - entry.enqueued_at_s
            if entry.future.done():
                continue  # cancelled by its caller, or already timed out
            if waited_s > self._timeout_s:
                self._expire(entry)  # its timer is late (a busy loop); same answer
                continue
            self._computing.append(entry)  # from here on _fail_unanswered() can see it
            self._observer.observe_queue_wait_seconds(waited_s)

    async def _compute(self) -> None:
        """Run the taken batch on the worker thread and give each caller its own outcome."""
        batch = self._computing
        self._observer.observe_batch_size(len(batch))
        items = [entry.item for entry in batch]
        loop = asyncio.get_running_loop()
        self._batch_started_s = loop.time()
        try:
            outcomes, inference_s = await loop.run_in_executor(
                self._executor, run_sorted, self._run_batch, self._size_of, items
            )
        finally:
            self._batch_started_s = None
        for entry, outcome in zip(batch, outcomes, strict=True):
            if entry.future.done():
                continue  # the caller left while its batch ran
            if isinstance(outcome, Failed):
                entry.future.set_exception(outcome.error)
                if isinstance(outcome.error, InvalidInputError):
                    self._observer.count_rejected("invalid")
            else:
                entry.future.set_result(outcome)
        self._computing = []
        self._observer.observe_inference_seconds(inference_s)

    def _expire(self, entry: _Entry[ItemT, ResultT]) -> None:
        """The item waited timeout_s and its batch has not started: answer now, compute nothing."""
        self._forget(entry)
        if not entry.future.done():
            waited_s = asyncio.get_running_loop().time() - entry.enqueued_at_s
            entry.future.set_exception(QueueTimeoutError(waited_s, self._timeout_s))
            self._observer.count_rejected("timeout")

    def _forget(self, entry: _Entry[ItemT, ResultT]) -> None:
        self._waiting.pop(entry, None)
        if entry.expiry is not None:
            entry.expiry.cancel()

    def _fail_unanswered(self) -> None:
        """Answer whatever is still pending, so no accepted item is ever left hanging: items in
        the running batch were being computed, the waiting ones never were."""
        computing, self._computing = self._computing, []
        for entry in computing:
            self._forget(entry)
            if not entry.future.done():
                entry.future.set_exception(RequestInterruptedError("the batch collector stopped"))
        for entry in list(self._waiting):
            self._forget(entry)
            if not entry.future.done():
                entry.future.set_exception(EngineStoppedError("the batch collector stopped"))

    def _log_death(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("batch collector task died", exc_info=task.exception())
