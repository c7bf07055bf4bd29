"""Where a /generate request waits: a bounded queue in front of the KV-cache slots, served by
priority, then first come first served (priority.py: lower is sooner, with aging).

Plain Python, no threads of its own: the engine guards it with one lock (submit() adds from the
event loop, the engine thread takes), so it can be unit-tested without a model.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

from batching.errors import QueueFullError
from batching.priority import DEFAULT_AGING_S, urgency


class Waiting(Protocol):
    """What the scheduler needs to know about a waiting request."""

    @property
    def arrival_s(self) -> float:
        """time.perf_counter() at submit."""

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def cancelled(self) -> bool: ...

    @property
    def slots_needed(self) -> int:
        """Slots it takes when admitted (n choices of one prompt take n)."""

    @property
    def prefill_alone(self) -> bool:
        """It must not share its prefill forward (prompt logprobs: every position's logits)."""

    @property
    def priority(self) -> int:
        """Lower is served sooner."""

    @property
    def started(self) -> bool:
        """It sampled tokens before it was preempted: it is neither evicted nor timed out."""


WaitingT = TypeVar("WaitingT", bound=Waiting)


class Scheduler(Generic[WaitingT]):
    """Admission by priority (with aging), then arrival, from a bounded waiting queue."""

    def __init__(self, max_queue: int, timeout_s: float, aging_s: float = DEFAULT_AGING_S) -> None:
        if max_queue < 1 or aging_s <= 0:
            raise ValueError("max_queue must be >= 1 and aging_s > 0")
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.aging_s = aging_s
        self._waiting: deque[WaitingT] = deque()  # in arrival order

    def __len__(self) -> int:
        return len(self._waiting)

    def __iter__(self) -> Iterator[WaitingT]:
        return iter(self._waiting)

    def add(self, request: WaitingT, now_s: float, free_slots: int = 0) -> WaitingT | None:
        """Queue a request. With max_queue waiting, the least urgent of them and the newcomer
        is refused: QueueFullError for the newcomer, or the evicted one is returned (the
        caller answers it 503, as if it had just been refused). Up to `free_slots` waiting
        requests are about to be admitted, not queued: they do not count against max_queue."""
        evicted = None
        fresh = [r for r in self._waiting if not r.started]
        if len(fresh) >= self.max_queue + free_slots:
            least = max(fresh, key=lambda r: self._urgency(r, now_s))
            if self._urgency(request, now_s) >= self._urgency(least, now_s):
                raise QueueFullError(self.max_queue)
            self._waiting.remove(least)
            evicted = least
        self._waiting.append(request)
        return evicted

    def requeue(self, request: WaitingT) -> None:
        """A request taken from the running batch (preempted, or admitted when the KV pool had
        no room for it) waits again. It keeps its arrival time, so it is served before every
        later arrival of its priority; the queue bound does not apply (it was admitted once)."""
        self._waiting.appendleft(request)

    def _urgency(self, request: WaitingT, now_s: float) -> tuple[float, float]:
        return urgency(request.priority, request.arrival_s, now_s, self.aging_s)

    def drop_stale(self, now_s: float) -> tuple[list[WaitingT], list[WaitingT]]:
        """Remove (cancelled, timed_out) requests, before they cost any compute."""
        cancelled: list[WaitingT] = []
        timed_out: list[WaitingT] = []
        kept: deque[WaitingT] = deque()
        for request in self._waiting:
            if request.cancelled:
                cancelled.append(request)
            elif now_s - request.arrival_s > self.timeout_s and not request.started:
                timed_out.append(request)
            else:
                kept.append(request)
        self._waiting = kept
        return cancelled, timed_out

    def admit(
        self, free_slots: int, prefill_token_budget: int, now_s: float = 0.0
    ) -> list[WaitingT]:
        """Take the most urgent requests while a slot is free and the prefill budget allows.

        The budget counts padded tokens (rows x longest prompt), which is what a batched
        prefill computes. The front request is always taken when a slot is free, even if it
        alone exceeds the budget (it is then admitted alone and prefilled in chunks, see
        running_batch.py), so a long prompt cannot starve. Strict FCFS: a request that does
        not fit the budget stops admission for this step rather than being overtaken by a less
        urgent one.
        """
        admitted: list[WaitingT] = []
        longest = 0
        for candidate in sorted(self._waiting, key=lambda r: self._urgency(r, now_s)):
            if candidate.slots_needed > free_slots:
                break
            new_longest = max(longest, candidate.prompt_tokens)
            alone = candidate.prefill_alone or (admitted and admitted[0].prefill_alone)
            if admitted and (alone or (len(admitted) + 1) * new_longest > prefill_token_budget):
                break
            admitted.append(candidate)
            free_slots -= candidate.slots_needed
            longest = new_longest
        for request in admitted:
            self._waiting.remove(request)
        return admitted

    def remove(self, request: WaitingT) -> bool:
        """Take one request out if it still waits (True); False if it was admitted or gone."""
        if request in self._waiting:
            self._waiting.remove(request)
            return True
        return False

    def take_all(self) -> list[WaitingT]:
        """Empty the queue (engine stopping or dead); the caller fails each request."""
        taken = list(self._waiting)
        self._waiting.clear()
        return taken
