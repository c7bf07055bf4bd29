"""The collector's queue: accepted items whose batch has not started.

Batches are taken in order of (priority with aging, arrival) (batching/priority.py); while every
waiting item has the same priority, the usual case, that is arrival order and costs no sort.
Used only on the event loop thread (submit() adds, the collector task takes). Each item has
a timer: one still waiting after `timeout_s` is answered with QueueTimeoutError at once,
whether or not the worker is free, and never costs compute.
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from batching.dynamic.budget import BatchBudget, FormingBatch
from batching.errors import QueueTimeoutError
from batching.priority import DEFAULT_AGING_S, urgency

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


@dataclass(eq=False)  # hashed by identity: entries are keys of the waiting set
class Entry(Generic[ItemT, ResultT]):
    """One accepted submit(): the caller awaits `future`; only the collector resolves it."""

    item: ItemT
    size: int  # size_of(item), e.g. its token count; 0 without size_of
    future: asyncio.Future[ResultT]
    enqueued_at_s: float  # loop.time() at submit()
    priority: int = 0  # lower is sooner
    expiry: asyncio.TimerHandle | None = None


class WaitingQueue(Generic[ItemT, ResultT]):
    """Items in arrival order with O(1) removal of a caller that gave up (an ordered set),
    taken by urgency."""

    def __init__(
        self,
        timeout_s: float,
        on_timeout: Callable[[int], None],
        aging_s: float = DEFAULT_AGING_S,
    ) -> None:
        self._timeout_s = timeout_s
        self._on_timeout = on_timeout  # counts the rejection (by priority) in the metrics
        self._aging_s = aging_s
        self._entries: OrderedDict[Entry[ItemT, ResultT], None] = OrderedDict()
        self._priorities: Counter[int] = Counter()  # of the waiting entries

    def __len__(self) -> int:
        return len(self._entries)

    def oldest(self) -> Entry[ItemT, ResultT]:
        return next(iter(self._entries))

    def add(self, item: ItemT, size: int, priority: int = 0) -> Entry[ItemT, ResultT]:
        loop = asyncio.get_running_loop()
        entry: Entry[ItemT, ResultT] = Entry(
            item, size, loop.create_future(), loop.time(), priority
        )
        entry.expiry = loop.call_at(entry.enqueued_at_s + self._timeout_s, self.expire, entry)
        self._entries[entry] = None
        self._priorities[priority] += 1
        return entry

    def forget(self, entry: Entry[ItemT, ResultT]) -> None:
        if entry in self._entries:
            del self._entries[entry]
            self._priorities[entry.priority] -= 1
            if not self._priorities[entry.priority]:
                del self._priorities[entry.priority]
        if entry.expiry is not None:
            entry.expiry.cancel()

    def urgency(self, entry: Entry[ItemT, ResultT], now_s: float) -> tuple[float, float]:
        return urgency(entry.priority, entry.enqueued_at_s, now_s, self._aging_s)

    def in_order(self, now_s: float) -> list[Entry[ItemT, ResultT]]:
        """The waiting entries, most urgent first."""
        if len(self._priorities) <= 1:  # one priority: aging moves none past another
            return list(self._entries)
        return sorted(self._entries, key=lambda entry: self.urgency(entry, now_s))

    def evict_for(
        self, priority: int, now_s: float, count: int = 1
    ) -> list[Entry[ItemT, ResultT]] | None:
        """The queue is full and newcomers of `priority` arrive: remove and return the `count`
        least urgent waiting entries if that many are less urgent than a newcomer, else None
        and remove nothing (the newcomers are the ones to refuse; so at equal priority the
        queue stays first come, first served)."""
        newcomer = urgency(priority, now_s, now_s, self._aging_s)
        less_urgent = [e for e in self._entries if self.urgency(e, now_s) > newcomer]
        if len(less_urgent) < count:
            return None
        less_urgent.sort(key=lambda entry: self.urgency(entry, now_s), reverse=True)
        for entry in less_urgent[:count]:
            self.forget(entry)
        return less_urgent[:count]

    def expire(self, entry: Entry[ItemT, ResultT]) -> None:
        """The item waited timeout_s and its batch has not started: answer now, compute nothing."""
        self.forget(entry)
        if not entry.future.done():
            waited_s = asyncio.get_running_loop().time() - entry.enqueued_at_s
            entry.future.set_exception(QueueTimeoutError(waited_s, self._timeout_s))
            self._on_timeout(entry.priority)

    def take(self, budget: BatchBudget, now_s: float, into: list[Entry[ItemT, ResultT]]) -> None:
        """Move live items, most urgent first, while they fit `budget`, onto `into` (one at a
        time, so none is ever in neither list); gone or stale ones are dropped on the way and
        cost nothing."""
        batch = FormingBatch(budget)
        for entry in self.in_order(now_s):
            if entry.future.done():  # cancelled by its caller, or already timed out
                self.forget(entry)
            elif now_s - entry.enqueued_at_s > self._timeout_s:
                self.expire(entry)  # its timer is late (a busy loop); same answer
            elif batch.offer(entry.size):
                self.forget(entry)
                into.append(entry)
            else:
                break  # the first item that does not fit opens the next batch

    def drain(self) -> list[Entry[ItemT, ResultT]]:
        """Remove and return everything (the collector is stopping)."""
        entries = list(self._entries)
        for entry in entries:
            self.forget(entry)
        return entries
