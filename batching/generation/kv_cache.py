"""Where the KV cache is written: preallocated per-layer K/V tensors, one region per slot.

`SlotKVCache` owns the memory. For each forward the model runner asks it for a small adapter
(`PrefillView` or `DecodeView`) and passes that as `past_key_values`. transformers' attention
layers call `adapter.update(key_states, value_states, layer_idx)` once per layer; the adapter
writes each row at its own positions and returns the K/V the layer attends over.

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
        shape = (num_slots + 1, kv_heads, max_seq_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.spare_slot = num_slots
        self.max_seq_len = max_seq_len

    @property
    def nbytes(self) -> int:
        """Memory held by all K/V tensors (for logs and /info)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def move_slot(self, source: int, target: int, length: int) -> None:
        """Copy one sequence's first `length` entries to another slot (keeps rows packed)."""
        for cache in (*self.keys, *self.values):
            cache[target, :, :length] = cache[source, :, :length]

    def prefill_view(self, first_slot: int, gather_index: torch.Tensor) -> PrefillView:
        return PrefillView(self, first_slot, gather_index)

    def decode_view(
        self, write_slots: torch.Tensor, positions: torch.Tensor, kv_len: int
    ) -> DecodeView:
        return DecodeView(self, write_slots, positions, kv_len)


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
    """New rows at slots first_slot.. first_slot+k-1, prompts left-padded to one length T.

    Left padding puts every prompt's last token in the last column, so the model computes
    logits for that column only (`logits_to_keep=1`). In the cache each prompt must start at
    position 0: `gather_index` [k, T] maps cache position p of row r to input column
    p + pad_r (clamped), which moves the real tokens to the front. Entries past a prompt's
    length get copies of its last column: they are never attended (masked) and the decode
    steps overwrite them.
    """

    def __init__(self, cache: SlotKVCache, first_slot: int, gather_index: torch.Tensor) -> None:
        rows, seq = gather_index.shape
        super().__init__(kv_len=seq, q_len=seq)
        self._cache = cache
        self._slots = slice(first_slot, first_slot + rows)
        self._gather_index = gather_index

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [k, kv_heads, T, head_dim], left-padded like the input
        rows, heads, seq, dim = key_states.shape
        index = self._gather_index[:, None, :, None].expand(rows, heads, seq, dim)
        self._cache.keys[layer_idx][self._slots, :, :seq] = key_states.gather(2, index)
        self._cache.values[layer_idx][self._slots, :, :seq] = value_states.gather(2, index)
        # A fresh prompt attends only to itself: no need to read back what was just written.
        return key_states, value_states


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
