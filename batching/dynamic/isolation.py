"""The worker-thread side of the collector: run one batch so that only bad items fail.

Plain functions of their arguments, no collector state. If `run_batch` raises, the batch is
re-run in halves, recursively, until each failing item is alone; only those callers get an
error. Cost: one bad item in a batch of n adds about 2*log2(n) calls recomputing about 2n
items; if every item fails it takes 2n - 1 calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import TypeVar

from batching.errors import EngineError, ModelExecutionError

logger = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class Failed:
    """One item's own error, as handed back from the worker thread."""

    error: EngineError


def run_sorted(
    run_batch: Callable[[list[ItemT]], list[ResultT]],
    size_of: Callable[[ItemT], int] | None,
    items: list[ItemT],
) -> tuple[list[ResultT | Failed], float]:
    """Sort by size (less padding), run with isolation, restore the callers' order; time it."""
    started_s = time.perf_counter()
    order = _order_by_size(items, size_of)
    outcomes = _run_isolating(run_batch, [items[i] for i in order])
    by_position = dict(zip(order, outcomes, strict=True))
    return [by_position[i] for i in range(len(items))], time.perf_counter() - started_s


def _order_by_size(items: list[ItemT], size_of: Callable[[ItemT], int] | None) -> list[int]:
    """Indices shortest first; the original order if there is no size_of or it fails."""
    indices = list(range(len(items)))
    if size_of is None:
        return indices
    try:
        return sorted(indices, key=lambda i: size_of(items[i]))
    except Exception:
        logger.exception("size_of failed; running this batch unsorted")
        return indices


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
