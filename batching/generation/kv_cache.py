"""Where the KV cache is written: one preallocated tensor, one region per slot, and the pool
of cached prefix blocks beside it.

`SlotKVCache` owns the memory: [2 (K, V), layers, num_slots + 1, kv_heads, max_seq_len,
head_dim] in one tensor, so moving a sequence between slots, or copying a cached prefix into
one, is a single copy rather than two per layer. For each forward the model runner asks it for
a small adapter (`PrefillView`, `DecodeView` or `MixedView`) and passes that as `past_key_values`.
transformers' attention layers call `adapter.update(key_states, value_states, layer_idx)` once
per layer; the adapter writes each row at its own positions and returns the K/V the layer
attends over.

`BlockPool` holds the K/V of cached prompt blocks (which blocks, and when they are evicted:
prefix_cache.py). Only two copies touch it: a finished prefill saves its prompt's new blocks
into it, and an admission with a hit loads blocks from it into the new slot.

Minimal interface (transformers 5.23): attention layers only call `update()`. The model
calls `get_seq_length()` only when it is not given `position_ids`, and sizes its masks from
the cache (`get_mask_sizes`, `get_query_offset`) only when it is not given a 4D mask. The
runner always passes both, so those methods exist only as a safety net.
"""

from __future__ import annotations

from typing import Any

import torch


class SlotKVCache:
    """K and V per layer: [num_slots + 1, kv_heads, max_seq_len, head_dim], allocated once.

    Slots 0..num_slots-1 hold sequences. The last row, `spare_slot`, belongs to no sequence:
    the padded rows of a bucketed decode step write their K/V there (see decode_buffers.py).
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_slots: int,
        kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (2, num_layers, num_slots + 1, kv_heads, max_seq_len, head_dim)
        self.storage = torch.zeros(shape, dtype=dtype, device=device)
        self.keys = list(self.storage[0])  # per layer: [num_slots + 1, kv_heads, S, head_dim]
        self.values = list(self.storage[1])  # views of the one tensor, never reallocated
        self.num_slots = num_slots
        self.spare_slot = num_slots
        self.max_seq_len = max_seq_len

    @property
    def nbytes(self) -> int:
        """Memory held by all K/V tensors (for logs and /info)."""
        return self.storage.numel() * self.storage.element_size()

    def move_slot(self, source: int, target: int, length: int) -> None:
        """Copy one sequence's first `length` entries to another slot (keeps rows packed)."""
        self.storage[:, :, target, :, :length] = self.storage[:, :, source, :, :length]

    def prefill_view(
        self, first_slot: int, write_slots: torch.Tensor, positions: torch.Tensor, kv_len: int
    ) -> PrefillView:
        return PrefillView(self, first_slot, write_slots, positions, kv_len)

    def decode_view(
        self, write_slots: torch.Tensor, positions: torch.Tensor, kv_len: int
    ) -> DecodeView:
        return DecodeView(self, write_slots, positions, kv_len)

    def mixed_view(self, write_slots: torch.Tensor, positions: torch.Tensor) -> MixedView:
        return MixedView(self, write_slots, positions)


class _ViewBase:
    """What transformers may ask a cache besides update(); see the module docstring."""

    is_compileable = False

    def __init__(self, kv_len: int, q_len: int) -> None:
        self._kv_len = kv_len
        self._q_len = q_len

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len - self._q_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._kv_len, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self._kv_len - self._q_len


class PrefillView(_ViewBase):
    """New tokens for rows at slots first_slot.. first_slot+k-1, left-padded to one length q.

    Row r's input column j goes to slot write_slots[r, j] at position positions[r, j]: its own
    slot, right after the tokens it holds already (a cached prefix, or earlier chunks of its
    prompt), so a prefill can continue a sequence. Pad columns go to the spare slot. The
    layer then attends over each row's slot up to kv_len: what it held plus what was just
    written (the mask keeps each query to its own past).
    """

    def __init__(
        self,
        cache: SlotKVCache,
        first_slot: int,
        write_slots: torch.Tensor,
        positions: torch.Tensor,
        kv_len: int,
    ) -> None:
        rows, q_len = write_slots.shape
        super().__init__(kv_len=kv_len, q_len=q_len)
        self._cache = cache
        self._slots = slice(first_slot, first_slot + rows)
        self._write_slots = write_slots  # [k, q]
        self._positions = positions  # [k, q]

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [k, kv_heads, q, head_dim], left-padded like the input
        keys, values = self._cache.keys[layer_idx], self._cache.values[layer_idx]
        keys[self._write_slots, :, self._positions] = key_states.transpose(1, 2)  # [k, q, H, D]
        values[self._write_slots, :, self._positions] = value_states.transpose(1, 2)
        # The rows' slots are contiguous, so this is a view: no copy of the cache.
        return keys[self._slots, :, : self._kv_len], values[self._slots, :, : self._kv_len]


class DecodeView(_ViewBase):
    """One new token for each of the rows 0..B-1: row r's K/V goes to slot write_slots[r] at
    position positions[r], and row r attends over slot r.

    Live rows write to their own slot (write_slots[r] = r); the padded rows of a bucket write
    to the spare slot, and read the free slot under them, masked down to one column.
    """

    def __init__(
        self, cache: SlotKVCache, write_slots: torch.Tensor, positions: torch.Tensor, kv_len: int
    ) -> None:
        super().__init__(kv_len=kv_len, q_len=1)
        self._cache = cache
        self._write_slots = write_slots  # [B]
        self._positions = positions  # [B]

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [B, kv_heads, 1, head_dim]
        batch = key_states.shape[0]
        keys, values = self._cache.keys[layer_idx], self._cache.values[layer_idx]
        keys[self._write_slots, :, self._positions] = key_states[:, :, 0]
        values[self._write_slots, :, self._positions] = value_states[:, :, 0]
        # Rows are packed at slots 0..B-1, so this is a view: no copy of the cache.
        return keys[:batch, :, : self._kv_len], values[:batch, :, : self._kv_len]


class MixedView(_ViewBase):
    """The packed tokens of a mixed step (mixed_attention.py): token i's K/V goes to slot
    write_slots[i] at position positions[i]. Returns the layer's whole K/V tensors: the
    mixed attention slices each part's slot and length itself."""

    def __init__(
        self, cache: SlotKVCache, write_slots: torch.Tensor, positions: torch.Tensor
    ) -> None:
        super().__init__(kv_len=cache.max_seq_len, q_len=len(positions))
        self._cache = cache
        self._write_slots = write_slots  # [N]
        self._positions = positions  # [N]

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [1, kv_heads, N, head_dim]
        keys, values = self._cache.keys[layer_idx], self._cache.values[layer_idx]
        keys[self._write_slots, :, self._positions] = key_states[0].transpose(0, 1)  # [N, H, D]
        values[self._write_slots, :, self._positions] = value_states[0].transpose(0, 1)
        return keys, values


class BlockPool:
    """The K/V of cached prompt blocks: [2, layers, num_blocks, kv_heads, block_size, head_dim],
    memory the slots do not use, sized by GENERATE_PREFIX_CACHE_TOKENS."""

    def __init__(self, cache: SlotKVCache, block_size: int, num_blocks: int) -> None:
        _, layers, _, heads, _, dim = cache.storage.shape
        shape = (2, layers, num_blocks, heads, block_size, dim)
        self.storage = torch.zeros(shape, dtype=cache.storage.dtype, device=cache.storage.device)
        self.block_size = block_size
        self._cache = cache

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    def load(self, block_ids: list[int], slot: int) -> None:
        """Copy blocks (in prefix order) into positions 0.. of `slot`: one gather, one copy."""
        count = len(block_ids) * self.block_size
        blocks = self.storage[:, :, block_ids]  # [2, L, n, H, bs, D]
        two, layers, _, heads, _, dim = blocks.shape
        flat = blocks.permute(0, 1, 3, 2, 4, 5).reshape(two, layers, heads, count, dim)
        self._cache.storage[:, :, slot, :, :count] = flat

    def save(self, slot: int, block_ids: list[int], block_indices: list[int]) -> None:
        """Copy the slot's blocks number block_indices[i] into pool rows block_ids[i]."""
        size = self.block_size
        end = (max(block_indices) + 1) * size
        region = self._cache.storage[:, :, slot, :, :end]  # [2, L, H, end, D]
        two, layers, heads, _, dim = region.shape
        blocks = region.reshape(two, layers, heads, end // size, size, dim)[:, :, :, block_indices]
        self.storage[:, :, block_ids] = blocks.permute(0, 1, 3, 2, 4, 5)  # [2, L, n, H, bs, D]
