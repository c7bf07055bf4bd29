"""The collector's plain-Python parts: when to wait (pacing), how big (budget), how to split
(grouping). No event loop, no model: times are given, not measured."""

from __future__ import annotations

import random

import pytest

from batching.dynamic.budget import BatchBudget, FormingBatch
from batching.dynamic.grouping import padding_groups
from batching.dynamic.pacing import GAP_WINDOW, BatchPacer


def paced(arrival_gaps_s: list[float], batch_duration_s: float | None) -> BatchPacer:
    pacer = BatchPacer()
    now_s = 100.0
    for gap_s in [0.0, *arrival_gaps_s]:
        now_s += gap_s
        pacer.on_arrival(now_s)
    if batch_duration_s is not None:
        pacer.on_batch_done(batch_duration_s)
    return pacer


def test_without_history_a_batch_never_waits() -> None:
    assert not BatchPacer().worth_waiting()
    assert not paced([0.001] * 8, batch_duration_s=None).worth_waiting()
    assert not paced([], batch_duration_s=0.05).worth_waiting()


def test_waiting_pays_when_requests_arrive_faster_than_batches_complete() -> None:
    assert paced([0.001] * 8, batch_duration_s=0.020).worth_waiting()


def test_waiting_needs_the_next_request_within_half_a_batch() -> None:
    # A request every 6 ms and batches of 10 ms: one arrives per batch, but too late to wait for.
    assert not paced([0.006] * 8, batch_duration_s=0.010).worth_waiting()
    assert paced([0.004] * 8, batch_duration_s=0.010).worth_waiting()


def test_sporadic_requests_never_wait() -> None:
    # One request every 50 ms, a batch takes 5 ms: nobody would come in time.
    assert not paced([0.050] * 8, batch_duration_s=0.005).worth_waiting()


def test_a_few_quick_arrivals_do_not_outvote_a_sporadic_history() -> None:
    # The median ignores one pair that happened to arrive together.
    assert not paced([0.050] * 6 + [0.0001], batch_duration_s=0.005).worth_waiting()


def test_the_rule_follows_the_load_after_a_burst_ends() -> None:
    pacer = paced([0.0001] * GAP_WINDOW, batch_duration_s=0.010)
    assert pacer.worth_waiting()
    now_s = 200.0
    for _ in range(GAP_WINDOW // 2 + 1):  # light traffic again: a request every 100 ms
        now_s += 0.1
        pacer.on_arrival(now_s)
    assert not pacer.worth_waiting()


def test_batch_duration_is_a_running_mean() -> None:
    pacer = BatchPacer()
    pacer.on_batch_done(0.010)
    pacer.on_batch_done(0.050)
    assert pacer.batch_duration_s == pytest.approx(0.010 + 0.25 * 0.040)


def test_budget_bounds_rows_times_longest_but_always_admits_one_item() -> None:
    budget = BatchBudget(max_items=4, max_padded_tokens=100)
    assert budget.admits(rows=4, longest=25)
    assert not budget.admits(rows=4, longest=26)
    assert not budget.admits(rows=5, longest=1)
    assert budget.admits(rows=1, longest=10_000)  # a text over the budget still runs, alone
    assert BatchBudget(max_items=4).admits(rows=4, longest=10_000)


@pytest.mark.parametrize("bad", [{"max_items": 0}, {"max_items": 1, "max_padded_tokens": 0}])
def test_budget_refuses_impossible_limits(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        BatchBudget(**bad)


def test_forming_batch_closes_at_the_first_item_that_does_not_fit() -> None:
    forming = FormingBatch(BatchBudget(max_items=8, max_padded_tokens=12))
    assert [forming.offer(size) for size in (3, 1, 2)] == [True, True, True]
    assert not forming.is_full and forming.padded_tokens == 9
    assert not forming.offer(4)  # 4 x 4 = 16 > 12
    assert forming.is_full
    assert not forming.offer(1)  # closed: a later short item does not jump the queue


def test_forming_batch_is_full_at_the_count() -> None:
    forming = FormingBatch(BatchBudget(max_items=2))
    forming.offer(5)
    forming.offer(500)
    assert forming.is_full and forming.padded_tokens == 1000


def test_groups_keep_padding_within_the_bound() -> None:
    sizes = [1, 1, 2, 5, 5, 6]
    assert padding_groups(sizes, 2) == [range(0, 3), range(3, 6)]
    assert padding_groups(sizes, 0) == [range(0, 2), range(2, 3), range(3, 5), range(5, 6)]
    assert padding_groups(sizes, None) == [range(0, 6)]
    assert padding_groups(sizes, 1000) == [range(0, 6)]
    assert padding_groups([], 10) == []


def test_groups_cover_every_item_once_in_order_whatever_the_sizes() -> None:
    rng = random.Random(7)
    for _ in range(200):
        sizes = sorted(rng.randint(1, 80) for _ in range(rng.randint(1, 40)))
        bound = rng.choice([0, 8, 45, 200])
        groups = padding_groups(sizes, bound)
        assert [i for group in groups for i in group] == list(range(len(sizes)))
        for group in groups:
            members = [sizes[i] for i in group]
            assert len(members) * max(members) - sum(members) <= bound
