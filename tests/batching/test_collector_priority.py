"""Priority in the dynamic batcher: batches are taken by (priority with aging, arrival), and a
full queue refuses its least urgent item."""

from __future__ import annotations

import asyncio

import pytest

from batching.errors import ModelExecutionError, QueueFullError
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


async def test_several_items_are_queued_all_or_none_and_push_nobody_out_for_nothing(
    make_collector: MakeCollector,
) -> None:
    model, observer = FakeModel(blocked=True), RecordingObserver()
    collector = make_collector(
        model, max_batch_size=1, max_wait_ms=0.0, max_queue=4, observer=observer
    )
    busy = await keep_busy(collector, model)
    low = await enqueue(collector, ["low1", "low2"], priority=10)
    high = await enqueue(collector, ["high1", "high2"], priority=0)

    # Three urgent items would need three less urgent ones pushed out; there are two.
    with pytest.raises(QueueFullError):
        await collector.submit_many(["u1", "u2", "u3"], priority=0)
    assert collector.queue_depth == 4 and not any(t.done() for t in low)
    # Two fit, by pushing out exactly the two less urgent ones.
    both = asyncio.create_task(collector.submit_many(["u1", "u2"], priority=0))
    await asyncio.sleep(0)
    model.release.set()

    assert await gather(both) == [["U1", "U2"]]
    results = await gather(busy, *low, *high)
    assert results[0] == "X" and all(isinstance(r, QueueFullError) for r in results[1:3])
    assert results[3:] == ["HIGH1", "HIGH2"]
    assert observer.rejected_priorities == [0, 0, 0, 10, 10]  # 3 refused newcomers, 2 evicted


async def test_when_one_of_several_items_fails_the_others_leave_the_queue(
    make_collector: MakeCollector,
) -> None:
    model = FakeModel(poison=frozenset({"bad"}), blocked=True)
    collector = make_collector(model, max_batch_size=1, max_wait_ms=0.0)
    busy = await keep_busy(collector, model)
    several = asyncio.create_task(collector.submit_many(["bad", "later1", "later2"]))
    await asyncio.sleep(0)
    model.release.set()

    (failure,) = await gather(several)
    assert isinstance(failure, ModelExecutionError)
    assert await gather(busy) == ["X"]
    # The collector may have started later1's batch before the failure reached the caller
    # (its thread finishes "bad" and picks the next item at once); later2 waited and left.
    assert model.batches[:2] == [["x"], ["bad"]] and ["later2"] not in model.batches
    assert collector.queue_depth == 0
