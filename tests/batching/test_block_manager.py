"""BlockManager: blocks allocated and freed, shared by reference, and the prefix cache over
them (chained hashes, token-checked matches, least recently freed evicted first)."""

from __future__ import annotations

import pytest

from batching.generation.block_manager import SPARE_BLOCK, BlockManager, OutOfBlocksError

BLOCK = 4


def prompt(*blocks: int, tail: int = 0) -> list[int]:
    """Whole blocks whose tokens are [b, b, b, b] for each b given, then `tail` extra tokens."""
    return [b for b in blocks for _ in range(BLOCK)] + [99] * tail


def manager(num_blocks: int = 8, prefix_caching: bool = True) -> BlockManager:
    return BlockManager(num_blocks, BLOCK, prefix_caching=prefix_caching)


def test_blocks_are_allocated_as_tokens_are_written_and_freed_at_the_end() -> None:
    blocks = manager(num_blocks=4)
    table: list[int] = []
    assert blocks.grow(table, 1) and len(table) == 1
    assert blocks.grow(table, 4) and len(table) == 1  # still inside the first block
    assert blocks.grow(table, 5) and len(table) == 2
    assert SPARE_BLOCK not in table
    assert (blocks.used_blocks, blocks.free_blocks, blocks.usage_ratio) == (2, 2, 0.5)
    assert not blocks.grow(table, 4 * BLOCK + 1)  # 5 blocks: more than the pool
    assert len(table) == 2  # unchanged by the failed grow
    blocks.free(table)
    assert table == [] and blocks.free_blocks == 4
    with pytest.raises(OutOfBlocksError):
        blocks.allocate(5)


def test_a_shared_block_is_freed_only_by_its_last_holder() -> None:
    blocks = manager(num_blocks=4)
    first = blocks.allocate(2)
    second = blocks.share(first)
    assert blocks.used_blocks == 2  # counted once
    blocks.free(first)
    assert blocks.used_blocks == 2
    blocks.free(second)
    assert blocks.used_blocks == 0


def test_a_prompt_matches_the_whole_registered_blocks_it_shares_with_another() -> None:
    blocks = manager()
    table = blocks.allocate(4)
    blocks.register(prompt(1, 2, 3, tail=2), table)  # 3 whole blocks; the 4th is partial
    assert blocks.cached_blocks == 3
    assert blocks.match(prompt(1, 2, 7), max_tokens=100) == table[:2]
    assert blocks.match(prompt(1, 2, 3), 100) == table[:3]
    assert blocks.match(prompt(5, 2, 3), 100) == []  # same later blocks, other start: no match


def test_a_match_never_covers_more_than_max_tokens() -> None:
    blocks = manager()
    whole = prompt(1, 2, 3)
    blocks.register(whole, blocks.allocate(3))
    assert len(blocks.match(whole, max_tokens=len(whole) - 1)) == 2  # one token must be left
    assert blocks.match(whole, max_tokens=BLOCK - 1) == []


def test_a_prefix_of_another_namespace_never_matches() -> None:
    blocks = manager()
    blocks.register(prompt(1, 2), blocks.allocate(2), namespace="key-a")
    assert blocks.match(prompt(1, 2), 100, namespace="key-b") == []
    assert blocks.match(prompt(1, 2), 100) == []  # the shared namespace ""
    assert len(blocks.match(prompt(1, 2), 100, namespace="key-a")) == 2


def test_a_hash_collision_is_a_miss_not_a_wrong_hit() -> None:
    blocks = manager()
    table = blocks.allocate(2)
    blocks.register(prompt(1, 2), table)
    blocks._cached[table[0]].tokens = (7, 7, 7, 7)  # as if another prefix had the same hash
    assert blocks.match(prompt(1, 2), 100) == []


def test_cached_blocks_live_in_free_memory_and_the_least_recently_freed_go_first() -> None:
    blocks = manager(num_blocks=4)
    for tokens in (prompt(1, 2), prompt(3, 4)):
        table = blocks.allocate(2)
        blocks.register(tokens, table)
        blocks.free(table)
    assert (blocks.free_blocks, blocks.cached_blocks, blocks.used_blocks) == (4, 4, 0)
    hit = blocks.match(prompt(1, 2), 100)  # (1, 2) is used again: now the more recent
    blocks.free(hit)
    fresh = blocks.allocate(2)  # evicts (3, 4), deepest block first
    assert blocks.match(prompt(3, 4), 100) == []  # evicted: a correct miss
    assert len(blocks.match(prompt(1, 2), 100)) == 2
    assert blocks.cached_blocks == 2 and len(fresh) == 2


def test_blocks_never_cached_are_handed_out_before_cached_ones_are_evicted() -> None:
    blocks = manager(num_blocks=4)
    table = blocks.allocate(2)
    blocks.register(prompt(1, 2), table)
    blocks.free(table)
    blocks.free(blocks.allocate(2))  # the two never-cached blocks
    assert len(blocks.match(prompt(1, 2), 100)) == 2


def test_with_prefix_caching_off_nothing_is_registered_or_matched() -> None:
    blocks = manager(prefix_caching=False)
    blocks.register(prompt(1, 2), blocks.allocate(2))
    assert blocks.cached_blocks == 0 and blocks.match(prompt(1, 2), 100) == []
