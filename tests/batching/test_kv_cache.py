"""SlotKVCache and its per-forward views, without a model."""

from __future__ import annotations

import torch

from batching.generation.kv_cache import BlockPool, SlotKVCache


def small_cache() -> SlotKVCache:
    return SlotKVCache(
        num_layers=2,
        num_slots=3,
        kv_heads=2,
        max_seq_len=8,
        head_dim=4,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )


def test_memory_bytes_count_every_layer_of_keys_and_values_and_the_spare_slot() -> None:
    assert small_cache().nbytes == 2 * 2 * ((3 + 1) * 2 * 8 * 4) * 4


def test_prefill_writes_each_real_column_after_what_its_slot_holds_and_pads_to_the_spare() -> None:
    cache = small_cache()
    cache.keys[0][1, :, :2] = 5.0  # slot 1 already holds 2 tokens (a cached prefix)
    # Row 0 (slot 1): 3 new tokens after 1 pad, at positions 2..4; row 1 (slot 2): 4 new
    # tokens at 0..3. Values = input column + 1.
    keys = torch.arange(1, 5, dtype=torch.float32)[None, None, :, None].expand(2, 2, 4, 4)
    spare = cache.spare_slot
    write_slots = torch.tensor([[spare, 1, 1, 1], [2, 2, 2, 2]])
    positions = torch.tensor([[0, 2, 3, 4], [0, 1, 2, 3]])
    view = cache.prefill_view(1, write_slots, positions, kv_len=5)
    attended, _ = view.update(keys, keys * 10, 0)
    assert cache.keys[0][1, 0, :5, 0].tolist() == [5.0, 5.0, 2.0, 3.0, 4.0]
    assert cache.keys[0][2, 0, :4, 0].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert cache.values[0][2, 1, :4, 0].tolist() == [10.0, 20.0, 30.0, 40.0]
    assert cache.keys[0][0].abs().sum() == 0  # slot 0 untouched
    assert cache.keys[0][spare, 0, 0, 0] == 1.0  # the pad column went to the spare slot
    assert attended.shape == (2, 2, 5, 4)  # slots 1..2 up to kv_len: a view of the cache
    assert attended.untyped_storage().data_ptr() == cache.storage.untyped_storage().data_ptr()


def test_decode_writes_each_row_at_its_position_and_returns_a_view() -> None:
    cache = small_cache()
    new = torch.tensor([1.0, 2.0])[:, None, None, None].expand(2, 2, 1, 4)  # [B, H, 1, D]
    slots, positions = torch.tensor([0, 1]), torch.tensor([5, 2])
    keys, values = cache.decode_view(slots, positions, kv_len=6).update(new, new, layer_idx=1)
    assert keys.shape == (2, 2, 6, 4)
    assert cache.keys[1][0, :, 5].eq(1.0).all() and cache.keys[1][1, :, 2].eq(2.0).all()
    assert keys.data_ptr() == cache.keys[1].data_ptr()  # packed rows: no copy of the cache
    assert values.untyped_storage().data_ptr() == cache.values[1].untyped_storage().data_ptr()


def test_a_padded_row_writes_only_to_the_spare_slot_and_reads_the_free_slot_under_it() -> None:
    cache = small_cache()
    new = torch.tensor([1.0, 9.0])[:, None, None, None].expand(2, 2, 1, 4)  # [B, H, 1, D]
    slots = torch.tensor([0, cache.spare_slot])  # row 1 is padding
    keys, _ = cache.decode_view(slots, torch.tensor([3, 0]), kv_len=4).update(new, new, 0)
    assert cache.spare_slot == 3 and cache.keys[0].shape[0] == 4
    assert cache.keys[0][cache.spare_slot, :, 0].eq(9.0).all()
    assert cache.keys[0][1].abs().sum() == 0  # the free slot under the padded row: untouched
    assert keys.shape == (2, 2, 4, 4)  # rows 0..1 read slots 0..1: a view, never the spare


def test_blocks_saved_from_one_slot_load_into_another_in_prefix_order() -> None:
    cache = small_cache()
    pool = BlockPool(cache, block_size=2, num_blocks=4)
    cache.storage[:, :, 0, :, :6] = torch.arange(6, dtype=torch.float32)[:, None]  # by position
    pool.save(slot=0, block_ids=[3, 1], block_indices=[0, 2])  # positions 0-1 and 4-5
    pool.load([3], slot=2)
    assert cache.storage[:, :, 2, :, :2, 0].eq(torch.tensor([0.0, 1.0])).all()
    pool.load([3, 1], slot=1)
    positions = cache.storage[0, 1, 1, 0, :4, 0].tolist()
    assert positions == [0.0, 1.0, 4.0, 5.0]
    assert pool.nbytes == 2 * 2 * 4 * 2 * 2 * 4 * 4


def test_move_slot_copies_one_sequence_in_every_layer() -> None:
    cache = small_cache()
    for tensor in (*cache.keys, *cache.values):
        tensor[2, :, :5] = 7.0
    cache.move_slot(source=2, target=0, length=5)
    assert all(t[0, :, :5].eq(7.0).all() for t in (*cache.keys, *cache.values))
