"""Fakes for the dynamic batcher's tests: a run_batch stand-in, a recording observer, helpers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from batching.dynamic.collector import BatchCollector
from batching.dynamic.observer import RejectReason

WAIT_S = 5.0  # generous bound for anything that should happen "at once"
ONE_MINUTE_MS = 60_000.0  # a max_wait_ms no test ever reaches

MakeCollector = Callable[..., BatchCollector[str, str]]


class FakeModel:
    """A run_batch stand-in: upper-cases items, records batches, can block and can fail."""

    def __init__(
        self,
        poison: frozenset[str] = frozenset(),
        error: type[Exception] = ValueError,
        blocked: bool = False,
    ) -> None:
        self.poison = poison
        self.error = error
        self.batches: list[list[str]] = []
        self.threads: set[threading.Thread] = set()
        self.entered = threading.Event()  # set by the first call
        self.release = threading.Event()  # calls block until it is set
        if not blocked:
            self.release.set()

    def __call__(self, items: list[str]) -> list[str]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread())
        self.entered.set()
        if not self.release.wait(WAIT_S):
            raise TimeoutError("the test never released the model")
        bad = [item for item in items if item in self.poison]
        if bad:
            raise self.error(f"cannot handle {bad}")
        return [item.upper() for item in items]

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, WAIT_S)


class RecordingObserver:
    """Keeps every metric hook call."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.queue_waits_s: list[float] = []
        self.inference_s: list[float] = []
        self.rejected: list[RejectReason] = []
        self.wait_priorities: list[int] = []
        self.rejected_priorities: list[int] = []

    def observe_batch_size(self, size: int) -> None:
        self.batch_sizes.append(size)

    def observe_queue_wait_seconds(self, seconds: float, priority: int) -> None:
        self.queue_waits_s.append(seconds)
        self.wait_priorities.append(priority)

    def observe_inference_seconds(self, seconds: float) -> None:
        self.inference_s.append(seconds)

    def count_rejected(self, reason: RejectReason, priority: int) -> None:
        self.rejected.append(reason)
        self.rejected_priorities.append(priority)


@pytest.fixture
async def make_collector() -> AsyncIterator[MakeCollector]:
    """Start collectors with small limits; stop each one (answering everything) afterwards."""
    made: list[BatchCollector[str, str]] = []
    models: list[FakeModel] = []

    def make(run_batch: Callable[[list[str]], list[str]], **options: Any) -> BatchCollector:
        limits = {"max_batch_size": 4, "max_wait_ms": 20.0, "max_queue": 64, "timeout_s": WAIT_S}
        collector: BatchCollector[str, str] = BatchCollector(run_batch, **{**limits, **options})
        collector.start()
        made.append(collector)
        if isinstance(run_batch, FakeModel):
            models.append(run_batch)
        return collector

    yield make
    for model in models:
        model.release.set()  # a failed test must not leave a model blocked
    for collector in made:
        await collector.stop(drain_timeout_s=WAIT_S)


async def enqueue(
    collector: BatchCollector[str, str], items: list[str], priority: int = 0
) -> list[asyncio.Task]:
    """Start one submit() per item and let each of them reach the queue."""
    tasks = [asyncio.create_task(collector.submit(item, priority)) for item in items]
    await asyncio.sleep(0)
    assert collector.queue_depth >= len(items)
    return tasks


async def gather(*awaitables: Any) -> list[Any]:
    return await asyncio.wait_for(asyncio.gather(*awaitables, return_exceptions=True), WAIT_S)


async def keep_busy(collector: BatchCollector[str, str], model: FakeModel) -> asyncio.Task:
    """Occupy the worker with item "x" (the model must be blocked); returns its task."""
    busy = asyncio.create_task(collector.submit("x"))
    await model.wait_entered()
    return busy


async def finish_busy_batch(model: FakeModel, busy: asyncio.Task) -> None:
    """Let "x" compute a while (the items queued meanwhile arrived faster than it completes),
    then release the model and wait for x's answer."""
    await asyncio.sleep(0.01)
    model.release.set()
    assert await gather(busy) == ["X"]
