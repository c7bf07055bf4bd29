"""Dynamic batching for one-shot work (/predict): many awaiting callers, one model call per batch.

Where a /predict request waits: `BatchCollector.submit()` puts (item, future) in a bounded queue
(waiting.py) and awaits the future. A single collector task (the only writer) takes batches
in order of (priority with aging, arrival) and runs them on a worker thread, one batch at a
time. A full queue refuses its least urgent item: the newcomer, or a waiting one less urgent
than the newcomer (batching/priority.py).

When a batch starts: as soon as the worker is free and something is queued, unless waiting
can pay (pacing.py). Waiting pays only while requests arrive faster than batches complete:
when the median recent gap between arrivals is shorter than half a batch's duration, the batch
waits until it is full or `max_wait_ms` after its first item. So a request that reaches an
idle model runs at once, with no batching tax; under load batches form by themselves, since
what arrives while the worker computes is the next batch, and it starts the moment the worker
frees. Triton's dynamic batcher (by default it never delays a batch) and TEI (its batching task
runs whatever is queued whenever the model is free) behave the same way when idle.

How big a batch is: at most `max_batch_size` items and, with `max_batch_tokens`, at most that
many padded tokens (rows x longest, sizes from `size_of`), taken in that order (budget.py);
an item over the budget runs alone. The worker sorts the batch by size and runs it as groups
whose padding stays within `max_group_padding_tokens` (grouping.py, isolation.py).

Callers that left, or that waited past `timeout_s`, are dropped before compute. One bad input
fails only its own caller (isolation.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Generic, TypeVar

from batching.dynamic.budget import BatchBudget, FormingBatch
from batching.dynamic.isolation import Failed, run_sorted
from batching.dynamic.observer import CollectorObserver, NoopObserver
from batching.dynamic.pacing import BatchPacer
from batching.dynamic.waiting import Entry, WaitingQueue
from batching.errors import (
    EngineStoppedError,
    InvalidInputError,
    QueueFullError,
    RequestInterruptedError,
)
from batching.priority import DEFAULT_AGING_S

logger = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


class BatchCollector(Generic[ItemT, ResultT]):
    """Dynamic batcher: each caller submits one item and gets its own result or its own error."""

    def __init__(
        self,
        run_batch: Callable[[list[ItemT]], list[ResultT]],
        *,
        max_batch_size: int = 32,
        max_batch_tokens: int | None = None,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        timeout_s: float = 30.0,
        size_of: Callable[[ItemT], int] | None = None,
        max_group_padding_tokens: int | None = None,
        observer: CollectorObserver | None = None,
        executor: Executor | None = None,
        priority_aging_s: float = DEFAULT_AGING_S,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be at least 1")
        if max_wait_ms < 0 or timeout_s <= 0 or (max_group_padding_tokens or 0) < 0:
            raise ValueError("max_wait_ms and max_group_padding_tokens >= 0, timeout_s > 0")
        self._run_batch = run_batch
        self._size_of = size_of
        self._budget = BatchBudget(max_batch_size, max_batch_tokens)
        self._max_group_padding_tokens = max_group_padding_tokens
        self._max_wait_s = max_wait_ms / 1000
        self._max_queue = max_queue
        self._observer: CollectorObserver = observer if observer is not None else NoopObserver()
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="batch-collector")
        self._pacer = BatchPacer()
        self._waiting: WaitingQueue[ItemT, ResultT] = WaitingQueue(
            timeout_s,
            lambda priority: self._observer.count_rejected("timeout", priority),
            priority_aging_s,
        )
        self._computing: list[Entry[ItemT, ResultT]] = []
        # While the collector waits for a batch to fill, submit() offers each new item to it.
        self._forming: FormingBatch | None = None
        self._wakeup = asyncio.Event()  # set for: a first item, a batch that filled, stop()
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
        the running batch gets RequestInterruptedError and what still waits EngineStoppedError,
        and the worker thread is left to finish its current run_batch call on its own.
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

    async def submit(self, item: ItemT, priority: int = 0) -> ResultT:
        """Queue one item and wait for its own result; a lower `priority` is served sooner.

        Raises EngineStoppedError if not running, QueueFullError at once if max_queue items wait
        and none is less urgent (else that one gets QueueFullError and this one is queued),
        QueueTimeoutError if its batch did not start within timeout_s, and InvalidInputError or
        ModelExecutionError if the model failed on this item. If size_of raises, that error
        reaches the caller and nothing is queued.
        """
        (result,) = await self.submit_many([item], priority)
        return result

    async def submit_many(self, items: Sequence[ItemT], priority: int = 0) -> list[ResultT]:
        """Queue several items (each its own item: they may land in different batches) and
        wait for all their results, in order; the errors are submit()'s.

        All or nothing: the items are queued together, or, if the queue cannot make room for
        all of them, none is and nobody else is pushed out for them. If one fails, or the caller
        leaves, the others leave the queue before they cost compute.
        """
        if not (self._accepting and self.is_alive):
            raise EngineStoppedError("the batch collector is not running")
        if not items:
            return []
        sizes = [self._size_of(item) if self._size_of is not None else 0 for item in items]
        self._make_room(len(items), priority)
        entries = [
            self._waiting.add(item, size, priority) for item, size in zip(items, sizes, strict=True)
        ]
        for entry in entries:
            self._pacer.on_arrival(entry.enqueued_at_s)
        forming = self._forming
        filled = forming is not None and any([_fills(forming, size) for size in sizes])
        if len(self._waiting) == len(entries) or filled:
            self._wakeup.set()
        futures = [entry.future for entry in entries]
        try:
            if len(futures) == 1:  # the /predict hot path: no waiter task for one future
                await futures[0]
            else:
                await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
        except Exception:
            pass  # an item's own failure: raised below, the first in order
        finally:  # the caller left, or one failed: the rest must not cost compute
            for entry in entries:
                self._waiting.forget(entry)  # a no-op for those already taken
                if not entry.future.done():
                    entry.future.cancel()
        return _results_or_first_error(futures)

    def _make_room(self, count: int, priority: int) -> None:
        """Room for `count` newcomers: push out less urgent waiting items if the queue is full
        (each gets QueueFullError), or, if there are not enough of them, refuse the newcomers."""
        missing = len(self._waiting) + count - self._max_queue
        if missing <= 0:
            return
        now_s = asyncio.get_running_loop().time()
        evicted = self._waiting.evict_for(priority, now_s, missing)
        if evicted is None:
            for _ in range(count):
                self._observer.count_rejected("queue_full", priority)
            raise QueueFullError(self._max_queue)
        for entry in evicted:
            if not entry.future.done():
                entry.future.set_exception(QueueFullError(self._max_queue))
            self._observer.count_rejected("queue_full", entry.priority)

    async def _serve(self) -> None:
        """The collector task: form a batch, compute it, repeat; answer everyone on the way out."""
        try:
            while await self._wait_for_batch():
                now_s = asyncio.get_running_loop().time()
                self._computing = []  # filled as taken: _fail_unanswered sees every one
                self._waiting.take(self._budget, now_s, into=self._computing)
                for entry in self._computing:
                    waited_s = now_s - entry.enqueued_at_s
                    self._observer.observe_queue_wait_seconds(waited_s, entry.priority)
                if self._computing:
                    await self._compute()
        finally:
            self._accepting = False
            self._fail_unanswered()

    async def _wait_for_batch(self) -> bool:
        """Wait for a first item; then, only if waiting can pay, until the batch is full or
        max_wait_ms after its first item.

        Returns False once stopping with nothing left. While stopping nothing new can arrive,
        so what is queued goes at once.
        """
        while not self._waiting:
            if not self._accepting:
                return False
            self._wakeup.clear()
            await self._wakeup.wait()
        if not (self._accepting and self._pacer.worth_waiting()):
            return True
        forming = FormingBatch(self._budget)
        loop = asyncio.get_running_loop()
        for entry in self._waiting.in_order(loop.time()):  # the items take() will pick
            if _fills(forming, entry.size):
                break
        deadline_s = self._waiting.oldest().enqueued_at_s + self._max_wait_s
        self._forming = forming  # an item cancelled meanwhile stays counted: it closes early
        try:
            while self._accepting and self._waiting and not forming.is_full:
                if loop.time() >= deadline_s:
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(deadline_s):
                        await self._wakeup.wait()
        finally:
            self._forming = None
        return True

    async def _compute(self) -> None:
        """Run the taken batch on the worker thread and give each caller its own outcome."""
        batch = self._computing
        self._observer.observe_batch_size(len(batch))
        items, sizes = [entry.item for entry in batch], [entry.size for entry in batch]
        loop = asyncio.get_running_loop()
        self._batch_started_s = loop.time()
        try:
            outcomes, inference_s = await loop.run_in_executor(
                self._executor,
                run_sorted,
                self._run_batch,
                sizes,
                items,
                self._max_group_padding_tokens,
            )
        finally:
            self._batch_started_s = None
        for entry, outcome in zip(batch, outcomes, strict=True):
            if entry.future.done():
                continue  # the caller left while its batch ran
            if isinstance(outcome, Failed):
                entry.future.set_exception(outcome.error)
                if isinstance(outcome.error, InvalidInputError):
                    self._observer.count_rejected("invalid", entry.priority)
            else:
                entry.future.set_result(outcome)
        self._computing = []
        self._pacer.on_batch_done(inference_s)
        self._observer.observe_inference_seconds(inference_s)

    def _fail_unanswered(self) -> None:
        """Answer whatever is still pending, so no accepted item is ever left hanging: items in
        the running batch were being computed, the waiting ones never were."""
        computing, self._computing = self._computing, []
        for entry in computing:
            if not entry.future.done():
                entry.future.set_exception(RequestInterruptedError("the batch collector stopped"))
        for entry in self._waiting.drain():
            if not entry.future.done():
                entry.future.set_exception(EngineStoppedError("the batch collector stopped"))

    def _log_death(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("batch collector task died", exc_info=task.exception())


def _results_or_first_error(futures: list[asyncio.Future[ResultT]]) -> list[ResultT]:
    """The results in order, or the first failure in order (every failure is retrieved, so
    asyncio logs none as never retrieved; the siblings cancelled for it do not count)."""
    errors = [f.exception() for f in futures if f.done() and not f.cancelled()]
    first = next((error for error in errors if error is not None), None)
    if first is not None:
        raise first
    return [future.result() for future in futures]


def _fills(forming: FormingBatch, size: int) -> bool:
    """Offer an item to the forming batch; True once the batch can take no more."""
    forming.offer(size)
    return forming.is_full
