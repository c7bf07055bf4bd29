"""Batch-row bookkeeping in plain Python: which request runs in which row, and its length.

A row is a place in the decode batch, not memory: GENERATE_SLOTS rows are the most sequences
decoded together, and a row's K/V lives in the blocks of its request's block table
(block_manager.py), wherever they are in the pool. Active rows are kept packed at
0..in_use-1, so a decode step's batch is rows 0..B-1: `allocate` takes row `in_use`, and
`release` moves the last row into the hole it leaves (only bookkeeping moves: the K/V stays in
its blocks).
"""

from __future__ import annotations

from typing import Generic, TypeVar

OwnerT = TypeVar("OwnerT")


class SlotTable(Generic[OwnerT]):
    """Rows 0..in_use-1 are held, each by one owner with a length (K/V entries written)."""

    def __init__(self, num_slots: int, max_seq_len: int) -> None:
        if num_slots < 1 or max_seq_len < 1:
            raise ValueError("num_slots and max_seq_len must be >= 1")
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self.owners: list[OwnerT] = []  # owners[row]; len(owners) == in_use
        self.lengths: list[int] = []  # tokens already written to the K/V cache, per row

    @property
    def in_use(self) -> int:
        return len(self.owners)

    @property
    def free(self) -> int:
        return self.num_slots - len(self.owners)

    def allocate(self, owner: OwnerT) -> int:
        """Give `owner` the next free row (length 0); returns the row."""
        if self.free == 0:
            raise RuntimeError("no free row")
        self.owners.append(owner)
        self.lengths.append(0)
        return len(self.owners) - 1

    def advance(self, row: int, tokens: int = 1) -> None:
        """`tokens` more K/V entries were written for the sequence in `row`."""
        new_length = self.lengths[row] + tokens
        if new_length > self.max_seq_len:
            raise RuntimeError(f"row {row} would outgrow the context of {self.max_seq_len}")
        self.lengths[row] = new_length

    def release(self, row: int) -> None:
        """Free `row`; if it was not the last, the last row moves into it."""
        if not 0 <= row < len(self.owners):
            raise IndexError(f"row {row} is not in use")
        last = len(self.owners) - 1
        if row != last:
            self.owners[row] = self.owners[last]
            self.lengths[row] = self.lengths[last]
        self.owners.pop()
        self.lengths.pop()
