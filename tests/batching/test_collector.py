"""Behaviour of the dynamic batcher behind /predict, driven by tiny fake models (no torch)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import pytest

from batching.dynamic.collector import BatchCollector
from batching.errors import (
    EngineStoppedError,
    InvalidInputError,
    ModelExecutionError,
    QueueFullError,
    QueueTimeoutError,
    RequestInterruptedError,
)
from tests.batching.collector_fakes import (
    ONE_MINUTE_MS,
    WAIT_S,
    FakeModel,
    MakeCollector,
    RecordingObserver,
    enqueue,
    finish_busy_batch,
    gather,
    keep_busy,
)


async def test_item_at_an_idle_collector_starts_without_waiting_for_the_deadline(
    make_collector: MakeCollector,
) -> None:
    model, observer = FakeModel(), RecordingObserver()
    collector = make_collector(model, max_wait_ms=ONE_MINUTE_MS, observer=observer)

    # gather() gives up after WAIT_S, far below the minute the batch could have waited.
    assert await gather(collector.submit("a")) == ["A"]
    assert model.batches == [["a"]]
    assert threading.current_thread() not in model.threads  # the model ran off the loop
    assert observer.batch_sizes == [1]


async def test_items_arriving_together_at_an_idle_collector_share_a_batch(
    make_collector: MakeCollector,
) -> None:
    model = FakeModel()
    collector = make_collector(model, max_wait_ms=ONE_MINUTE_MS)

    assert await gather(*(collector.submit(item) for item in "abc")) == ["A", "B", "C"]
    assert model.batches == [["a", "b", "c"]]


async def test_partial_batch_waits_while_requests_arrive_faster_than_batches_complete(
    make_collector: MakeCollector,
) -> None:
    model, observer = FakeModel(blocked=True), RecordingObserver()
    collector = make_collector(
        model, max_batch_size=8, max_wait_ms=ONE_MINUTE_MS, observer=observer
    )
    busy = await keep_busy(collector, model)
    queued = await enqueue(collector, list("abcde"))  # microseconds apart, during one batch
    await finish_busy_batch(model, busy)

    # The worker is free, but a-e (5 of 8) wait for more: later items join the same batch,
    # and the batch closes at once when it is full, not a minute later.
    late = [collector.submit(item) for item in "fgh"]
    assert await gather(*queued, *late) == list("ABCDEFGH")
    assert model.batches == [["x"], list("abcdefgh")]
    assert observer.batch_sizes == [1, 8]
    assert len(observer.queue_waits_s) == 9 and min(observer.queue_waits_s) >= 0
    assert len(observer.inference_s) == 2


async def test_partial_batch_is_flushed_at_the_deadline(make_collector: MakeCollector) -> None:
    model = FakeModel(blocked=True)
    collector = make_collector(model, max_batch_size=8, max_wait_ms=100.0)
    busy = await keep_busy(collector, model)
    loop = asyncio.get_running_loop()
    queued_at_s = loop.time()
    queued = await enqueue(collector, list("abcde"))
    await finish_busy_batch(model, busy)

    assert await gather(*queued) == list("ABCDE")
    assert model.batches == [["x"], list("abcde")]
    assert loop.time() - queued_at_s >= 0.09  # it did wait for more until the deadline


async def test_burst_fills_batches_to_the_maximum(make_collector: MakeCollector) -> None:
    model, observer = FakeModel(), RecordingObserver()
    collector = make_collector(model, max_batch_size=4, observer=observer)
    items = [f"item{i}" for i in range(17)]

    assert await gather(*(collector.submit(item) for item in items)) == [i.upper() for i in items]
    assert observer.batch_sizes == [4, 4, 4, 4, 1]


async def test_token_budget_bounds_rows_times_longest(make_collector: MakeCollector) -> None:
    model, observer = FakeModel(blocked=True), RecordingObserver()
    collector = make_collector(
        model, max_batch_size=8, max_batch_tokens=12, size_of=len, observer=observer
    )
    busy = await keep_busy(collector, model)
    items = ["aaa", "b", "cc", "dddd", "e", "ff", "ggg", "h", "i", "jjjjj", "k"]
    queued = await enqueue(collector, items)
    model.release.set()

    assert await gather(busy, *queued) == ["X", *(item.upper() for item in items)]
    batches = model.batches[1:]
    assert [item for batch in batches for item in sorted(batch, key=items.index)] == items
    for batch in batches:
        assert len(batch) * max(map(len, batch)) <= 12, batch
    # Arrival order is kept across batches; each closes just before the item that would not fit.
    assert observer.batch_sizes[1:] == [3, 3, 3, 2]


async def test_text_longer_than_the_budget_runs_alone(make_collector: MakeCollector) -> None:
    model = FakeModel(blocked=True)
    collector = make_collector(model, max_batch_size=8, max_batch_tokens=6, size_of=len)
    busy = await keep_busy(collector, model)
    items = ["a", "b", "far-too-long-for-the-budget", "c", "d"]
    queued = await enqueue(collector, items)
    model.release.set()

    assert await gather(busy, *queued) == ["X", *(item.upper() for item in items)]
    assert model.batches == [["x"], ["a", "b"], ["far-too-long-for-the-budget"], ["c", "d"]]


async def test_sorted_batch_runs_in_groups_whose_padding_stays_small(
    make_collector: MakeCollector,
) -> None:
    model, observer = FakeModel(), RecordingObserver()
    collector = make_collector(
        model, max_batch_size=8, size_of=len, max_group_padding_tokens=2, observer=observer
    )
    items = ["bbbbb", "a", "cc", "dddddd", "e", "fffff"]

    outcomes = await gather(*(collector.submit(item) for item in items))

    assert outcomes == [item.upper() for item in items]
    assert observer.batch_sizes == [6]  # one batch taken from the queue ...
    assert model.batches == [["a", "e", "cc"], ["bbbbb", "fffff", "dddddd"]]  # ... two forwards
    assert len(observer.inference_s) == 1


async def test_poisoned_item_reruns_only_its_own_group(make_collector: MakeCollector) -> None:
    model = FakeModel(poison=frozenset({"bad"}))
    collector = make_collector(model, max_batch_size=8, size_of=len, max_group_padding_tokens=0)

    outcomes = await gather(*(collector.submit(item) for item in ["a", "bad", "cc", "dd"]))

    assert outcomes[0] == "A" and outcomes[2:] == ["CC", "DD"]
    assert isinstance(outcomes[1], ModelExecutionError)
    assert model.batches == [["a"], ["cc", "dd"], ["bad"]]  # bad alone: no halving of others


async def test_batch_is_sorted_by_length_but_results_go_to_their_callers(
    make_collector: MakeCollector,
) -> None:
    model = FakeModel()
    collector = make_collector(model, max_wait_ms=ONE_MINUTE_MS, size_of=len)

    results = await gather(*(collector.submit(item) for item in ["ccc", "a", "dddd", "bb"]))

    assert results == ["CCC", "A", "DDDD", "BB"]
    assert model.batches == [["a", "bb", "ccc", "dddd"]]


async def test_cancelled_caller_is_dropped_before_compute(make_collector: MakeCollector) -> None:
    model = FakeModel(blocked=True)
    collector = make_collector(model, max_wait_ms=0.0)
    busy = asyncio.create_task(collector.submit("x"))
    await model.wait_entered()
    a, b, c = await enqueue(collector, ["a", "b", "c"])

    b.cancel()  # what the route's task sees when its client disconnects
    with pytest.raises(asyncio.CancelledError):
        await b
    assert collector.queue_depth == 2
    model.release.set()

    assert await gather(busy, a, c) == ["X", "A", "C"]
    assert model.batches == [["x"], ["a", "c"]]


async def test_full_queue_is_refused_at_once(make_collector: MakeCollector) -> None:
    model, observer = FakeModel(blocked=True), RecordingObserver()
    collector = make_collector(model, max_batch_size=1, max_queue=2, observer=observer)
    busy = asyncio.create_task(collector.submit("x"))
    await model.wait_entered()
    queued = await enqueue(collector, ["a", "b"])

    with pytest.raises(QueueFullError):
        await collector.submit("c")
    assert observer.rejected == ["queue_full"]
    model.release.set()

    assert await gather(busy, *queued) == ["X", "A", "B"]


async def test_stale_waiter_times_out_without_compute(make_collector: MakeCollector) -> None:
    model, observer = FakeModel(blocked=True), RecordingObserver()
    collector = make_collector(model, max_wait_ms=0.0, timeout_s=0.5, observer=observer)
    busy = asyncio.create_task(collector.submit("x"))
    await model.wait_entered()

    # Answered while the model is still busy: a timeout does not wait for the worker.
    with pytest.raises(QueueTimeoutError):
        await asyncio.wait_for(collector.submit("late"), WAIT_S)
    assert collector.queue_depth == 0
    model.release.set()

    assert await gather(busy) == ["X"]  # started in time: a slow compute is not a timeout
    assert model.batches == [["x"]]
    assert observer.rejected == ["timeout"]


async def test_poisoned_item_fails_alone_and_neighbours_succeed(
    make_collector: MakeCollector,
) -> None:
    model = FakeModel(poison=frozenset({"bad"}))
    collector = make_collector(model, max_batch_size=8, max_wait_ms=ONE_MINUTE_MS)
    items = ["a", "b", "c", "bad", "d", "e", "f", "g"]

    outcomes = await gather(*(collector.submit(item) for item in items))

    assert outcomes[:3] == ["A", "B", "C"] and outcomes[4:] == ["D", "E", "F", "G"]
    assert isinstance(outcomes[3], ModelExecutionError)
    assert isinstance(outcomes[3].__cause__, ValueError)
    assert len(model.batches) == 1 + 2 * 3  # the batch, then both halves at each of 3 levels
    assert collector.is_alive


async def test_two_poisoned_items_each_get_their_own_error(make_collector: MakeCollector) -> None:
    model, observer = FakeModel(frozenset({"b", "g"}), InvalidInputError), RecordingObserver()
    collector = make_collector(
        model, max_batch_size=8, max_wait_ms=ONE_MINUTE_MS, observer=observer
    )

    outcomes = await gather(*(collector.submit(item) for item in "abcdefgh"))

    assert [outcomes[i] for i in (0, 2, 3, 4, 5, 7)] == ["A", "C", "D", "E", "F", "H"]
    assert type(outcomes[1]) is InvalidInputError and "'b'" in str(outcomes[1])
    assert type(outcomes[6]) is InvalidInputError and "'g'" in str(outcomes[6])
    assert observer.rejected == ["invalid", "invalid"]


async def test_next_batch_is_collected_while_one_computes(make_collector: MakeCollector) -> None:
    model = FakeModel(blocked=True)
    collector = make_collector(model, max_wait_ms=0.0)
    busy = asyncio.create_task(collector.submit("x"))
    await model.wait_entered()

    queued = await enqueue(collector, ["a", "b", "c", "d", "e"])
    assert collector.queue_depth == 5 and len(model.batches) == 1
    model.release.set()

    assert await gather(busy, *queued) == ["X", "A", "B", "C", "D", "E"]
    assert model.batches == [["x"], ["a", "b", "c", "d"], ["e"]]


async def test_stop_answers_everything_accepted(make_collector: MakeCollector) -> None:
    model = FakeModel(blocked=True)
    collector = make_collector(model, max_batch_size=2, max_wait_ms=ONE_MINUTE_MS)
    computing = await enqueue(collector, ["x", "y"])
    await model.wait_entered()
    queued = await enqueue(collector, ["a", "b", "c"])  # "c" alone would wait a minute

    stopping = asyncio.create_task(collector.stop(drain_timeout_s=WAIT_S))
    await asyncio.sleep(0)
    with pytest.raises(EngineStoppedError):
        await collector.submit("late")
    model.release.set()
    await asyncio.wait_for(stopping, WAIT_S)

    assert await gather(*computing, *queued) == ["X", "Y", "A", "B", "C"]
    assert model.batches == [["x", "y"], ["a", "b"], ["c"]]
    assert not collector.is_alive
    assert not any(thread.is_alive() for thread in model.threads)


async def test_stop_after_drain_timeout_fails_what_is_left(make_collector: MakeCollector) -> None:
    model = FakeModel(blocked=True)
    collector = make_collector(model, max_batch_size=1, max_wait_ms=0.0)
    busy = asyncio.create_task(collector.submit("x"))
    await model.wait_entered()
    queued = await enqueue(collector, ["a"])

    await collector.stop(drain_timeout_s=0.05)
    outcomes = await gather(busy, *queued)
    model.release.set()

    running, waiting = outcomes
    assert isinstance(running, RequestInterruptedError)  # computed in part: HTTP 500
    assert isinstance(waiting, EngineStoppedError)
    assert not isinstance(waiting, RequestInterruptedError)  # never started: HTTP 503
    assert model.batches == [["x"]]


async def test_wrong_result_count_fails_the_batch_cleanly(make_collector: MakeCollector) -> None:
    batches: list[list[str]] = []

    def short_the_first_time(items: list[str]) -> list[str]:
        batches.append(list(items))
        results = [item.upper() for item in items]
        return results[:-1] if len(batches) == 1 else results

    collector = make_collector(short_the_first_time, max_batch_size=3, max_wait_ms=ONE_MINUTE_MS)

    outcomes = await gather(*(collector.submit(item) for item in "abc"))
    assert all(isinstance(outcome, ModelExecutionError) for outcome in outcomes)
    assert len({id(outcome) for outcome in outcomes}) == 3  # each caller its own error
    assert batches == [["a", "b", "c"]]  # a miscount is a bug, not a bad input: no re-runs

    assert await gather(*(collector.submit(item) for item in "def")) == ["D", "E", "F"]


async def test_dead_collector_is_not_alive_and_answers_its_callers(
    make_collector: MakeCollector,
) -> None:
    class BrokenObserver(RecordingObserver):
        def observe_batch_size(self, size: int) -> None:
            raise RuntimeError("metrics backend broke")

    collector = make_collector(FakeModel(), max_wait_ms=0.0, observer=BrokenObserver())

    with pytest.raises(EngineStoppedError):
        await asyncio.wait_for(collector.submit("a"), WAIT_S)
    assert not collector.is_alive
    with pytest.raises(EngineStoppedError):
        await collector.submit("b")


async def test_submit_before_start_is_refused() -> None:
    collector: BatchCollector[str, str] = BatchCollector(FakeModel())
    with pytest.raises(EngineStoppedError):
        await collector.submit("a")
    await collector.stop()


def test_collector_imports_no_web_framework() -> None:
    code = (
        "import sys, batching.dynamic.collector; "
        "sys.exit(sorted({'fastapi', 'starlette', 'pydantic'} & set(sys.modules)) or 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
