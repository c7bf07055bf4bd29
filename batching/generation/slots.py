"""KV-cache slot bookkeeping in plain Python: who holds which slot, its length, its reservation.

Active rows are kept packed at slots 0..in_use-1, so the model can read the K/V of the whole
batch as a view of the cache (no gather copy per layer per step). The free list is therefore
implicit: the free slots are in_use..num_slots-1, `allocate` takes slot `in_use`, and `release`
moves the last row into the hole it leaves (the caller copies that row's K/V, see
`SlotKVCache.move_slot`).

Admission reserves prompt_tokens + max_new_tokens of the slot's max_seq_len, so a running
sequence always has room for its next token and nothing is ever preempted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

OwnerT = TypeVar("OwnerT")


@dataclass(frozen=True)
class SlotMove:
    """`release` moved the row at `source` into `target`: copy its first `length` K/V entries."""

    source: int
    target: int
    length: int


class SlotTable(Generic[OwnerT]):
    """Slots 0..in_use-1 are held, each by one owner with a length and a reservation."""

    def __init__(self, num_slots: int, max_seq_len: int) -> None:
        if num_slots < 1 or max_seq_len < 1:
            raise ValueError("num_slots and max_seq_len must be >= 1")
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self.owners: list[OwnerT] = []  # owners[slot]; len(owners) == in_use
        self.lengths: list[int] = []  # tokens already written to the K/V cache, per slot
        self._reserved: list[int] = []  # prompt_tokens + max_new_tokens, per slot
        self.reserved_tokens = 0

    @property
    def in_use(self) -> int:
        return len(self.owners)

    @property
    def free(self) -> int:
        return self.num_slots - len(self.owners)

    @property
    def usage_ratio(self) -> float:
        """Reserved tokens / capacity: the kv_cache_usage_ratio gauge."""
        return self.reserved_tokens / (self.num_slots * self.max_seq_len)

    def fits(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        """Whether such a request can ever be admitted (it must fit one slot)."""
        return prompt_tokens > 0 and prompt_tokens + max_new_tokens <= self.max_seq_len

    def allocate(self, owner: OwnerT, prompt_tokens: int, max_new_tokens: int) -> int:
        """Give `owner` the next free slot, reserving its whole sequence; returns the slot."""
        if not self.fits(prompt_tokens, max_new_tokens):
            raise ValueError(
                f"{prompt_tokens} + {max_new_tokens} tokens do not fit a slot of {self.max_seq_len}"
            )
        if self.free == 0:
            raise RuntimeError("no free slot")
        self.owners.append(owner)
        self.lengths.append(0)
        self._reserved.append(prompt_tokens + max_new_tokens)
        self.reserved_tokens += prompt_tokens + max_new_tokens
        return len(self.owners) - 1

    def advance(self, slot: int, tokens: int = 1) -> None:
        """`tokens` more K/V entries were written to `slot`."""
        new_length = self.lengths[slot] + tokens
        if new_length > self._reserved[slot]:
            raise RuntimeError(f"slot {slot} would outgrow its reservation")
        self.lengths[slot] = new_length

    def release(self, slot: int) -> SlotMove | None:
        """Free `slot`; if it was not the last, the last row moves into it (returned).

        Releasing several slots in one step: go from the highest slot down, so a moved row
        is never one that is about to be released.
        """
        if not 0 <= slot < len(self.owners):
            raise IndexError(f"slot {slot} is not in use")
        self.reserved_tokens -= self._reserved[slot]
        last = len(self.owners) - 1
        move = None
        if slot != last:
            move = SlotMove(source=last, target=slot, length=self.lengths[last])
            self.owners[slot] = self.owners[last]
            self.lengths[slot] = self.lengths[last]
            self._reserved[slot] = self._reserved[last]
        self.owners.pop()
        self.lengths.pop()
        self._reserved.pop()
        return move
