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


def queue(*requests: FakeRequest, max_queue: int = 10, timeout_s: float = 5.0) -> Scheduler:
    scheduler: Scheduler[FakeRequest] = Scheduler(max_queue=max_queue, timeout_s=timeout_s)
    for request in requests:
        scheduler.add(request)
    return scheduler


def test_a_full_queue_refuses_at_once() -> None:
    scheduler = queue(FakeRequest("a"), FakeRequest("b"), max_queue=2)
    with pytest.raises(QueueFullError) as caught:
        scheduler.add(FakeRequest("c"))
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
