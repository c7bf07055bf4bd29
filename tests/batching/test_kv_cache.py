"""PagedKVCache and its view, without a model: writes land in a sequence's blocks, reads
gather them back in order."""

from __future__ import annotations

import torch

from batching.generation.kv_cache import PagedKVCache, gather_kv, pool_rows

BLOCK = 2


def small_cache() -> PagedKVCache:
    return PagedKVCache(
        num_layers=2,
        num_blocks=6,
        block_size=BLOCK,
        kv_heads=2,
        head_dim=4,
        max_seq_len=8,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )


def test_memory_bytes_count_every_layer_of_keys_and_values_and_the_spare_block() -> None:
    cache = small_cache()
    assert cache.nbytes == 2 * 2 * (6 + 1) * BLOCK * 2 * 4 * 4
    assert cache.bytes_per_block == cache.nbytes // 7
    assert cache.max_blocks_per_seq == 4


def test_pool_rows_follow_the_block_table() -> None:
    tables = torch.tensor([[5, 2, 0, 0]])
    positions = torch.tensor([[0, 1, 2, 3]])
    assert pool_rows(tables, positions, BLOCK).tolist() == [[10, 11, 4, 5]]


def test_a_prefill_writes_each_row_into_its_blocks_and_reads_them_back_in_order() -> None:
    cache = small_cache()
    tables = torch.tensor([[3, 1], [6, 4]])  # [k, blocks]
    positions = torch.tensor([[0, 1, 2], [0, 1, 2]])
    # key_states [k, H, q, D]: value = 10 * row + position + 1
    values = (10 * torch.arange(2)[:, None] + positions + 1).float()
    keys = values[:, None, :, None].expand(2, 2, 3, 4)
    write_rows = pool_rows(tables, positions, BLOCK).flatten()
    attended, _ = cache.view(write_rows, tables, kv_len=3).update(keys, keys * 2, 0)
    assert attended.shape == (2, 2, 3, 4)  # [k, kv_heads, kv_len, D]
    assert attended[:, 0, :, 0].tolist() == [[1.0, 2.0, 3.0], [11.0, 12.0, 13.0]]
    assert cache.keys[0][3, :, 0, 0].tolist() == [1.0, 2.0]  # block 3: positions 0-1 of row 0
    assert cache.keys[0][1, 0, 0, 0] == 3.0  # block 1: position 2 of row 0
    assert cache.values[0][6, 1, 0, 0] == 24.0
    assert cache.keys[1].abs().sum() == 0  # another layer: untouched


def test_gathering_a_length_inside_a_block_stops_there() -> None:
    cache = small_cache()
    cache.keys[0][2] = 7.0
    gathered = gather_kv(cache.keys[0], torch.tensor([[2, 5]]), kv_len=3)
    assert gathered.shape == (1, 2, 3, 4)
    assert gathered[0, 0, :, 0].tolist() == [7.0, 7.0, 0.0]


def test_a_mixed_view_returns_the_layer_s_blocks_ungathered() -> None:
    cache = small_cache()
    new = torch.ones(1, 2, 1, 4)  # [1, H, N, D]
    keys, _ = cache.view(torch.tensor([9]), None).update(new, new, 1)
    assert keys.data_ptr() == cache.keys[1].data_ptr()
    assert cache.keys[1][4, 1].eq(1.0).all()  # row 9 = block 4, offset 1


def test_copy_block_copies_every_layer() -> None:
    cache = small_cache()
    cache.storage[:, :, 2] = 5.0
    cache.copy_block(2, 3)
    assert cache.storage[:, :, 3].eq(5.0).all()
