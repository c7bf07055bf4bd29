"""The worker-thread side of the collector: run one batch so that only bad items fail.

Plain functions of their arguments, no collector state. A batch is sorted by size and run as
groups whose padding stays small (grouping.py), one `run_batch` call per group. If a call
raises, that group is re-run in halves, recursively, until each failing item is alone; only
those callers get an error. Cost: one bad item in a group of n adds about 2*log2(n) calls
recomputing about 2n items; if every item fails it takes 2n - 1 calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import TypeVar

from batching.dynamic.grouping import padding_groups
from batching.errors import EngineError, ModelExecutionError

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class Failed:
    """One item's own error, as handed back from the worker thread."""

    error: EngineError


def run_sorted(
    run_batch: Callable[[list[ItemT]], list[ResultT]],
    sizes: list[int],
    items: list[ItemT],
    max_padding_tokens: int | None = None,
) -> tuple[list[ResultT | Failed], float]:
    """Sort by size, run each padding group with isolation, restore the callers' order; time it.

    `sizes[i]` is the size of `items[i]` (all equal: the arrival order is kept, in one group).
    """
    started_s = time.perf_counter()
    order = sorted(range(len(items)), key=sizes.__getitem__)  # stable: ties keep arrival order
    by_position: dict[int, ResultT | Failed] = {}
    for group in padding_groups([sizes[i] for i in order], max_padding_tokens):
        positions = [order[i] for i in group]
        outcomes = _run_isolating(run_batch, [items[i] for i in positions])
        by_position.update(zip(positions, outcomes, strict=True))
    return [by_position[i] for i in range(len(items))], time.perf_counter() - started_s


def _run_isolating(
    run_batch: Callable[[list[ItemT]], list[ResultT]], items: list[ItemT]
) -> list[ResultT | Failed]:
    """Run items as one batch; if that raises, re-run each half so only the culprits fail."""
    try:
        results = run_batch(items)
    except Exception as exc:
        if len(items) == 1:
            return [Failed(_as_engine_error(exc))]
        middle = len(items) // 2
        return _run_isolating(run_batch, items[:middle]) + _run_isolating(run_batch, items[middle:])
    return _checked(results, len(items))


def _checked(results: list[ResultT], expected: int) -> list[ResultT | Failed]:
    """One result per item, or a ModelExecutionError for each item: a miscount is a bug."""
    count = len(results) if isinstance(results, Sized) else None
    if count == expected:
        outcomes: list[ResultT | Failed] = list(results)
        return outcomes
    message = f"run_batch returned {count} results for {expected} items"
    return [Failed(ModelExecutionError(message)) for _ in range(expected)]


def _as_engine_error(exc: Exception) -> EngineError:
    """Our own errors pass through (InvalidInputError -> 422); anything else is a model failure."""
    if isinstance(exc, EngineError):
        return exc
    error = ModelExecutionError(f"the model failed on this input ({type(exc).__name__})")
    error.__cause__ = exc
    return error
