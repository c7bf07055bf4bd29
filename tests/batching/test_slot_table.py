"""SlotTable: packed slots, reservations and usage, without a model."""

from __future__ import annotations

import pytest

from batching.generation.slots import SlotMove, SlotTable


def test_allocate_takes_the_next_slot_and_reserves_the_whole_sequence() -> None:
    table: SlotTable[str] = SlotTable(num_slots=3, max_seq_len=100)
    assert table.allocate("a", prompt_tokens=10, max_new_tokens=20) == 0
    assert table.allocate("b", prompt_tokens=5, max_new_tokens=45) == 1
    assert (table.in_use, table.free) == (2, 1)
    assert table.reserved_tokens == 80
    assert table.usage_ratio == pytest.approx(80 / 300)


def test_a_request_that_cannot_fit_one_slot_is_refused() -> None:
    table: SlotTable[str] = SlotTable(num_slots=2, max_seq_len=64)
    assert table.fits(60, 4)
    assert not table.fits(60, 5)
    assert not table.fits(0, 4)
    with pytest.raises(ValueError):
        table.allocate("x", 60, 5)


def test_allocating_beyond_num_slots_raises() -> None:
    table: SlotTable[str] = SlotTable(num_slots=1, max_seq_len=64)
    table.allocate("a", 4, 4)
    with pytest.raises(RuntimeError):
        table.allocate("b", 4, 4)


def test_releasing_a_middle_slot_moves_the_last_row_into_the_hole() -> None:
    table: SlotTable[str] = SlotTable(num_slots=4, max_seq_len=64)
    for owner in "abc":
        table.allocate(owner, 4, 4)
    table.advance(2, 7)
    move = table.release(0)
    assert move == SlotMove(source=2, target=0, length=7)
    assert table.owners == ["c", "b"]
    assert table.lengths == [7, 0]


def test_releasing_the_last_slot_moves_nothing() -> None:
    table: SlotTable[str] = SlotTable(num_slots=4, max_seq_len=64)
    table.allocate("a", 4, 4)
    table.allocate("b", 4, 4)
    assert table.release(1) is None
    assert table.owners == ["a"]


def test_releasing_from_the_highest_slot_down_never_moves_a_released_row() -> None:
    table: SlotTable[str] = SlotTable(num_slots=5, max_seq_len=64)
    for owner in "abcde":
        table.allocate(owner, 4, 4)
    for slot in (3, 1):  # b and d finish in the same step
        table.release(slot)
    assert sorted(table.owners) == ["a", "c", "e"]
    assert table.in_use == 3


def test_all_slots_free_and_nothing_reserved_after_release() -> None:
    table: SlotTable[str] = SlotTable(num_slots=3, max_seq_len=64)
    for owner in "abc":
        table.allocate(owner, 8, 8)
    for slot in (2, 1, 0):
        table.release(slot)
    assert (table.in_use, table.free, table.reserved_tokens, table.usage_ratio) == (0, 3, 0, 0.0)


def test_a_slot_cannot_outgrow_its_reservation() -> None:
    table: SlotTable[str] = SlotTable(num_slots=1, max_seq_len=64)
    table.allocate("a", prompt_tokens=4, max_new_tokens=2)
    table.advance(0, 6)
    with pytest.raises(RuntimeError):
        table.advance(0)
