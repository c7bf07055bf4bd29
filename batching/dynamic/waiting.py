"""The collector's queue: accepted items whose batch has not started, oldest first.

Used only on the event loop thread (submit() adds, the collector task takes). Each item has
a timer: one still waiting after `timeout_s` is answered with QueueTimeoutError at once,
whether or not the worker is free, and never costs compute.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from batching.dynamic.budget import BatchBudget, FormingBatch
from batching.errors import QueueTimeoutError

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


@dataclass(eq=False)  # hashed by identity: entries are keys of the waiting set
class Entry(Generic[ItemT, ResultT]):
    """One accepted submit(): the caller awaits `future`; only the collector resolves it."""

    item: ItemT
    size: int  # size_of(item), e.g. its token count; 0 without size_of
    future: asyncio.Future[ResultT]
    enqueued_at_s: float  # loop.time() at submit()
    expiry: asyncio.TimerHandle | None = None


class WaitingQueue(Generic[ItemT, ResultT]):
    """FIFO from the front, O(1) removal of a caller that gave up (an ordered set)."""

    def __init__(self, timeout_s: float, on_timeout: Callable[[], None]) -> None:
        self._timeout_s = timeout_s
        self._on_timeout = on_timeout  # counts the rejection in the metrics
        self._entries: OrderedDict[Entry[ItemT, ResultT], None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry[ItemT, ResultT]]:
        return iter(self._entries)

    def oldest(self) -> Entry[ItemT, ResultT]:
        return next(iter(self._entries))

    def add(self, item: ItemT, size: int) -> Entry[ItemT, ResultT]:
        loop = asyncio.get_running_loop()
        entry: Entry[ItemT, ResultT] = Entry(item, size, loop.create_future(), loop.time())
        entry.expiry = loop.call_at(entry.enqueued_at_s + self._timeout_s, self.expire, entry)
        self._entries[entry] = None
        return entry

    def forget(self, entry: Entry[ItemT, ResultT]) -> None:
        self._entries.pop(entry, None)
        if entry.expiry is not None:
            entry.expiry.cancel()

    def expire(self, entry: Entry[ItemT, ResultT]) -> None:
        """The item waited timeout_s and its batch has not started: answer now, compute nothing."""
        self.forget(entry)
        if not entry.future.done():
            waited_s = asyncio.get_running_loop().time() - entry.enqueued_at_s
            entry.future.set_exception(QueueTimeoutError(waited_s, self._timeout_s))
            self._on_timeout()

    def take(self, budget: BatchBudget, now_s: float) -> list[Entry[ItemT, ResultT]]:
        """Remove and return live items from the front while they fit `budget`; gone or stale
        ones are dropped on the way and cost nothing."""
        batch = FormingBatch(budget)
        taken: list[Entry[ItemT, ResultT]] = []
        while self._entries:
            entry = self.oldest()
            if entry.future.done():  # cancelled by its caller, or already timed out
                self.forget(entry)
            elif now_s - entry.enqueued_at_s > self._timeout_s:
                self.expire(entry)  # its timer is late (a busy loop); same answer
            elif batch.offer(entry.size):
                self.forget(entry)
                taken.append(entry)
            else:
                break  # the first item that does not fit opens the next batch
        return taken

    def drain(self) -> list[Entry[ItemT, ResultT]]:
        """Remove and return everything (the collector is stopping)."""
        entries = list(self._entries)
        for entry in entries:
            self.forget(entry)
        return entries
