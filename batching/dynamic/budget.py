"""How big one batch may be: a count of items and a budget of padded tokens.

A padded model computes `rows x longest` token positions for a batch, whatever the real
lengths are, so that product is what the budget bounds (TEI's `max_batch_tokens` for padded
models works the same way). The first item of a batch is always admitted, so a text longer
than the whole budget still runs: alone.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchBudget:
    """Limits of one batch; `max_padded_tokens=None` bounds the count only."""

    max_items: int
    max_padded_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_items < 1:
            raise ValueError("max_items must be at least 1")
        if self.max_padded_tokens is not None and self.max_padded_tokens < 1:
            raise ValueError("max_padded_tokens must be at least 1 (or None for no budget)")

    def admits(self, rows: int, longest: int) -> bool:
        """Whether `rows` items padded to `longest` tokens fit (one item always does)."""
        if rows > self.max_items:
            return False
        if rows <= 1 or self.max_padded_tokens is None:
            return True
        return rows * longest <= self.max_padded_tokens


class FormingBatch:
    """The batch being formed from the front of the queue, item by item, in arrival order.

    Items are offered in FIFO order; the first one that does not fit closes the batch (it
    opens the next one), so a long text never waits behind a stream of short ones.
    """

    def __init__(self, budget: BatchBudget) -> None:
        self.budget = budget
        self.rows = 0
        self.longest = 0
        self.closed = False

    def offer(self, size: int) -> bool:
        """Add an item of `size` tokens if it fits; if not, close the batch and say False."""
        if self.closed or not self.budget.admits(self.rows + 1, max(self.longest, size)):
            self.closed = True
            return False
        self.rows += 1
        self.longest = max(self.longest, size)
        return True

    @property
    def is_full(self) -> bool:
        """Nothing more can join: an item did not fit, or the count is reached."""
        return self.closed or self.rows >= self.budget.max_items

    @property
    def padded_tokens(self) -> int:
        return self.rows * self.longest
