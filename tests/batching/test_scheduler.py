"""Scheduler: bounded FCFS queue, timeouts, cancellation, prefill budget; no model, no threads."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from batching.errors import QueueFullError
from batching.generation.scheduler import Scheduler


@dataclass
class FakeRequest:
    name: str
    prompt_tokens: int = 10
    arrival_s: float = 0.0
    cancelled: bool = False
    prefill_alone: bool = False
    slots_needed: int = 1
    priority: int = 0
    started: bool = False


def queue(*requests: FakeRequest, max_queue: int = 10, timeout_s: float = 5.0) -> Scheduler:
    scheduler: Scheduler[FakeRequest] = Scheduler(max_queue=max_queue, timeout_s=timeout_s)
    for request in requests:
        scheduler.add(request, now_s=request.arrival_s)
    return scheduler


def test_a_full_queue_refuses_at_once() -> None:
    scheduler = queue(FakeRequest("a"), FakeRequest("b"), max_queue=2)
    with pytest.raises(QueueFullError) as caught:
        scheduler.add(FakeRequest("c"), now_s=0.0)
    assert caught.value.max_queue == 2
    assert len(scheduler) == 2


def test_admission_is_first_come_first_served_up_to_the_free_slots() -> None:
    scheduler = queue(*(FakeRequest(n) for n in "abcd"))
    admitted = scheduler.admit(free_slots=3, prefill_token_budget=1000)
    assert [r.name for r in admitted] == ["a", "b", "c"]
    assert [r.name for r in scheduler] == ["d"]


def test_the_prefill_budget_counts_padded_tokens() -> None:
    scheduler = queue(FakeRequest("a", 10), FakeRequest("b", 30), FakeRequest("c", 5))
    # a+b padded to 30 tokens each = 60 fits; adding c keeps 3 x 30 = 90 > 64.
    admitted = scheduler.admit(free_slots=8, prefill_token_budget=64)
    assert [r.name for r in admitted] == ["a", "b"]


def test_a_prompt_longer_than_the_budget_is_still_admitted_alone() -> None:
    scheduler = queue(FakeRequest("long", 500), FakeRequest("short", 5))
    assert [r.name for r in scheduler.admit(free_slots=4, prefill_token_budget=64)] == ["long"]
    assert [r.name for r in scheduler.admit(free_slots=4, prefill_token_budget=64)] == ["short"]


def test_prompts_that_must_fit_leave_a_long_or_lone_front_request_waiting() -> None:
    # Joining a long prompt's chunk: nothing is admitted alone, and nothing overtakes.
    scheduler = queue(FakeRequest("long", 500), FakeRequest("short", 5))
    assert scheduler.admit(free_slots=4, prefill_token_budget=64, must_fit=True) == []
    scheduler = queue(FakeRequest("logprobs", 5, prefill_alone=True), FakeRequest("short", 5))
    assert scheduler.admit(free_slots=4, prefill_token_budget=64, must_fit=True) == []
    assert [r.name for r in scheduler] == ["logprobs", "short"]
    scheduler = queue(FakeRequest("a", 20), FakeRequest("b", 20), FakeRequest("c", 20))
    admitted = scheduler.admit(free_slots=4, prefill_token_budget=48, must_fit=True)
    assert [r.name for r in admitted] == ["a", "b"]  # 3 x 20 would pass 48


def test_a_request_that_does_not_fit_the_budget_is_not_overtaken() -> None:
    scheduler = queue(FakeRequest("a", 10), FakeRequest("big", 100), FakeRequest("c", 1))
    assert [r.name for r in scheduler.admit(free_slots=4, prefill_token_budget=64)] == ["a"]


def test_no_free_slot_admits_nothing() -> None:
    scheduler = queue(FakeRequest("a"))
    assert scheduler.admit(free_slots=0, prefill_token_budget=1000) == []
    assert len(scheduler) == 1


def test_stale_requests_are_dropped_before_admission() -> None:
    old = FakeRequest("old", arrival_s=0.0)
    gone = FakeRequest("gone", arrival_s=9.0, cancelled=True)
    fresh = FakeRequest("fresh", arrival_s=9.5)
    scheduler = queue(old, gone, fresh, timeout_s=5.0)
    cancelled, timed_out = scheduler.drop_stale(now_s=10.0)
    assert (cancelled, timed_out) == ([gone], [old])
    assert scheduler.admit(free_slots=4, prefill_token_budget=1000) == [fresh]


def test_take_all_empties_the_queue() -> None:
    scheduler = queue(FakeRequest("a"), FakeRequest("b"))
    assert [r.name for r in scheduler.take_all()] == ["a", "b"]
    assert len(scheduler) == 0


def test_the_most_urgent_priority_is_admitted_first_then_arrival_order() -> None:
    scheduler = queue(
        FakeRequest("batch-1", priority=10),
        FakeRequest("batch-2", priority=10, arrival_s=0.1),
        FakeRequest("chat", priority=0, arrival_s=0.2),
        FakeRequest("batch-3", priority=10, arrival_s=0.3),
    )
    admitted = scheduler.admit(free_slots=3, prefill_token_budget=1000, now_s=0.5)
    assert [r.name for r in admitted] == ["chat", "batch-1", "batch-2"]


def test_aging_lets_a_low_priority_request_through_after_a_bounded_wait() -> None:
    scheduler: Scheduler[FakeRequest] = Scheduler(max_queue=10, timeout_s=1e9, aging_s=1.0)
    scheduler.add(FakeRequest("old-batch", priority=10, arrival_s=0.0), now_s=0.0)
    scheduler.add(FakeRequest("fresh-chat", priority=0, arrival_s=9.0), now_s=9.0)
    # At t=9.5 the batch request has aged to 0.5: the chat one (0) is still more urgent...
    assert [r.name for r in scheduler.admit(1, 1000, now_s=9.5)] == ["fresh-chat"]
    scheduler.add(FakeRequest("next-chat", priority=0, arrival_s=10.5), now_s=10.5)
    # ...at t=11 it has aged below 0 (10 - 11 = -1) and goes before a fresh chat request.
    assert [r.name for r in scheduler.admit(1, 1000, now_s=11.0)] == ["old-batch"]


def test_a_full_queue_refuses_its_least_urgent_request_first() -> None:
    scheduler = queue(FakeRequest("batch", priority=10), FakeRequest("chat"), max_queue=2)
    evicted = scheduler.add(FakeRequest("urgent", priority=0, arrival_s=0.1), now_s=0.1)
    assert evicted is not None and evicted.name == "batch"
    with pytest.raises(QueueFullError):  # not more urgent than the least urgent left
        scheduler.add(FakeRequest("another", priority=0, arrival_s=0.2), now_s=0.2)
    assert sorted(r.name for r in scheduler) == ["chat", "urgent"]


def test_timeouts_and_cancellation_apply_to_every_priority() -> None:
    old = FakeRequest("old", priority=-5, arrival_s=0.0)
    gone = FakeRequest("gone", priority=50, arrival_s=9.5, cancelled=True)
    kept = FakeRequest("kept", priority=50, arrival_s=9.5)
    scheduler = queue(old, gone, kept, timeout_s=5.0)
    assert scheduler.drop_stale(now_s=10.0) == ([gone], [old])
    assert list(scheduler) == [kept]


def test_a_requeued_started_request_is_served_first_and_never_evicted_or_timed_out() -> None:
    """A preempted request (it had streamed tokens) waits again: before later arrivals of its
    priority, outside the queue bound, and never answered 503 or 504 from the queue."""
    scheduler = queue(FakeRequest("later", arrival_s=5.0), max_queue=1, timeout_s=5.0)
    resumed = FakeRequest("resumed", arrival_s=0.0, started=True)
    scheduler.requeue(resumed)
    assert len(scheduler) == 2  # above max_queue: it was admitted once already
    with pytest.raises(QueueFullError):  # the bound counts the fresh requests only
        scheduler.add(FakeRequest("newcomer", arrival_s=6.0), now_s=6.0)
    cancelled, timed_out = scheduler.drop_stale(now_s=9.0)  # 9 s after it arrived
    assert (cancelled, timed_out) == ([], [])
    assert [r.name for r in scheduler.admit(2, 100, now_s=9.0)] == ["resumed", "later"]
