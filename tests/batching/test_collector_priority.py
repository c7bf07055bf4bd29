"""Priority in the dynamic batcher: batches are taken by (priority with aging, arrival), and a
full queue refuses its least urgent item."""

from __future__ import annotations

import asyncio

import pytest

from batching.errors import QueueFullError
from tests.batching.collector_fakes import (
    FakeModel,
    MakeCollector,
    RecordingObserver,
    enqueue,
    gather,
    keep_busy,
)


async def test_an_urgent_item_joins_the_next_batch_ahead_of_earlier_ones(
    make_collector: MakeCollector,
) -> None:
    model, observer = FakeModel(blocked=True), RecordingObserver()
    collector = make_collector(model, max_batch_size=2, max_wait_ms=0.0, observer=observer)
    busy = await keep_busy(collector, model)
    background = await enqueue(collector, ["b1", "b2", "b3"], priority=10)
    urgent = await enqueue(collector, ["u"], priority=0)
    model.release.set()

    assert await gather(busy, *background, *urgent) == ["X", "B1", "B2", "B3", "U"]
    assert model.batches == [["x"], ["u", "b1"], ["b2", "b3"]]
    assert observer.wait_priorities == [0, 0, 10, 10, 10]  # x; then u before b1


async def test_equal_priorities_keep_arrival_order(make_collector: MakeCollector) -> None:
    model = FakeModel(blocked=True)
    collector = make_collector(model, max_batch_size=1, max_wait_ms=0.0)
    busy = await keep_busy(collector, model)
    queued = await enqueue(collector, ["c", "bb", "a"], priority=5)
    model.release.set()

    assert await gather(busy, *queued) == ["X", "C", "BB", "A"]
    assert model.batches == [["x"], ["c"], ["bb"], ["a"]]


async def test_a_long_wait_ages_a_low_priority_item_past_fresh_urgent_ones(
    make_collector: MakeCollector,
) -> None:
    model = FakeModel(blocked=True)
    collector = make_collector(model, max_batch_size=1, max_wait_ms=0.0, priority_aging_s=0.01)
    busy = await keep_busy(collector, model)
    (old,) = await enqueue(collector, ["old"], priority=2)
    await asyncio.sleep(0.1)  # ten agings: it now competes like priority -8
    fresh = await enqueue(collector, ["new"], priority=0)
    model.release.set()

    assert await gather(busy, old, *fresh) == ["X", "OLD", "NEW"]
    assert model.batches == [["x"], ["old"], ["new"]]


async def test_a_full_queue_refuses_its_least_urgent_item(make_collector: MakeCollector) -> None:
    model, observer = FakeModel(blocked=True), RecordingObserver()
    collector = make_collector(
        model, max_batch_size=1, max_wait_ms=0.0, max_queue=2, observer=observer
    )
    busy = await keep_busy(collector, model)
    low, mid = (
        (await enqueue(collector, ["low"], 20))[0],
        (await enqueue(collector, ["mid"], 10))[0],
    )

    with pytest.raises(QueueFullError):  # as little urgent as the least: the newcomer goes
        await collector.submit("also-low", 20)
    urgent = asyncio.create_task(collector.submit("urgent", 0))  # evicts "low"
    await asyncio.sleep(0)
    assert collector.queue_depth == 2
    model.release.set()

    results = await gather(busy, low, mid, urgent)
    assert results[0] == "X" and isinstance(results[1], QueueFullError)
    assert results[2:] == ["MID", "URGENT"]
    assert model.batches == [["x"], ["urgent"], ["mid"]]
    assert list(zip(observer.rejected, observer.rejected_priorities, strict=True)) == [
        ("queue_full", 20),
        ("queue_full", 20),
    ]
