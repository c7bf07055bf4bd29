"""SlotTable: packed batch rows and their lengths, without a model."""

from __future__ import annotations

import pytest

from batching.generation.scheduler import SlotTable


def test_allocate_takes_the_next_row() -> None:
    table: SlotTable[str] = SlotTable(num_slots=3, max_seq_len=100)
    assert table.allocate("a") == 0
    assert table.allocate("b") == 1
    assert (table.in_use, table.free) == (2, 1)


def test_allocating_beyond_num_slots_raises() -> None:
    table: SlotTable[str] = SlotTable(num_slots=1, max_seq_len=64)
    table.allocate("a")
    with pytest.raises(RuntimeError):
        table.allocate("b")


def test_releasing_a_middle_row_moves_the_last_row_into_the_hole() -> None:
    table: SlotTable[str] = SlotTable(num_slots=4, max_seq_len=64)
    for owner in "abc":
        table.allocate(owner)
    table.advance(2, 7)
    table.release(0)
    assert table.owners == ["c", "b"]
    assert table.lengths == [7, 0]


def test_releasing_from_the_highest_row_down_never_moves_a_released_row() -> None:
    table: SlotTable[str] = SlotTable(num_slots=5, max_seq_len=64)
    for owner in "abcde":
        table.allocate(owner)
    for row in (3, 1):  # b and d finish in the same step
        table.release(row)
    assert sorted(table.owners) == ["a", "c", "e"]
    assert (table.in_use, table.free) == (3, 2)


def test_a_row_cannot_outgrow_the_context() -> None:
    table: SlotTable[str] = SlotTable(num_slots=1, max_seq_len=6)
    table.allocate("a")
    table.advance(0, 6)
    with pytest.raises(RuntimeError):
        table.advance(0)


def test_moving_a_row_to_the_last_swaps_it_with_the_last_row() -> None:
    table: SlotTable[str] = SlotTable(num_slots=4, max_seq_len=64)
    for owner in "abc":
        table.allocate(owner)
    table.advance(0, 5)
    assert table.move_to_last(0) == 2
    assert (table.owners, table.lengths) == (["c", "b", "a"], [0, 0, 5])
    assert table.allocate("d") == 3  # the next row follows it
