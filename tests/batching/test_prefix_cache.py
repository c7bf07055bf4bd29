"""The prefix cache's index: chained block hashes, token-checked matches, LRU eviction."""

from __future__ import annotations

from batching.generation.prefix_cache import PrefixCache

BLOCK = 4


def prompt(*blocks: int, tail: int = 0) -> list[int]:
    """Whole blocks whose tokens are [b, b, b, b] for each b given, then `tail` extra tokens."""
    return [b for b in blocks for _ in range(BLOCK)] + [99] * tail


def test_a_prompt_matches_the_whole_blocks_it_shares_with_a_cached_one() -> None:
    cache = PrefixCache(BLOCK, num_blocks=8)
    filled = cache.insert(prompt(1, 2, 3, tail=2))
    assert [(f.index) for f in filled] == [0, 1, 2]  # whole blocks only
    assert len(cache.match(prompt(1, 2, 7), max_tokens=100)) == 2
    assert [b.block_id for b in cache.match(prompt(1, 2, 3), 100)] == [f.block_id for f in filled]
    assert cache.match(prompt(5, 2, 3), 100) == []  # same later blocks, other start: no match


def test_a_match_never_covers_more_than_max_tokens() -> None:
    cache = PrefixCache(BLOCK, num_blocks=8)
    cache.insert(prompt(1, 2, 3))
    whole = prompt(1, 2, 3)
    assert len(cache.match(whole, max_tokens=len(whole) - 1)) == 2  # one token must be left
    assert len(cache.match(whole, max_tokens=BLOCK - 1)) == 0


def test_inserting_a_cached_prefix_again_fills_only_its_new_blocks() -> None:
    cache = PrefixCache(BLOCK, num_blocks=8)
    cache.insert(prompt(1, 2))
    assert [f.index for f in cache.insert(prompt(1, 2, 3, 4))] == [2, 3]
    assert cache.cached_tokens == 4 * BLOCK
    assert cache.insert(prompt(1, 2, 3)) == []


def test_a_hash_collision_is_a_miss_not_a_wrong_hit() -> None:
    cache = PrefixCache(BLOCK, num_blocks=8)
    cache.insert(prompt(1, 2))
    [first, _] = cache.match(prompt(1, 2), 100)
    first.tokens = (7, 7, 7, 7)  # as if another prefix had hashed to the same key
    assert cache.match(prompt(1, 2), 100) == []


def test_the_least_recently_used_prefix_is_evicted_first_within_the_bound() -> None:
    cache = PrefixCache(BLOCK, num_blocks=4)
    cache.insert(prompt(1, 2))
    cache.insert(prompt(3, 4))
    cache.match(prompt(1, 2), 100)  # (1, 2) is now the more recent prefix
    filled = cache.insert(prompt(5, 6))
    assert len(filled) == 2
    assert cache.cached_tokens == 4 * BLOCK  # never above the bound
    assert cache.match(prompt(3, 4), 100) == []  # evicted: a correct miss
    assert len(cache.match(prompt(1, 2), 100)) == 2
    assert len(cache.match(prompt(5, 6), 100)) == 2


def test_eviction_takes_the_ends_of_prefixes_before_their_starts() -> None:
    cache = PrefixCache(BLOCK, num_blocks=3)
    cache.insert(prompt(1, 2, 3))
    cache.insert(prompt(8))  # evicts the deepest block of the older prefix, (3)
    assert len(cache.match(prompt(1, 2, 3), 100)) == 2
    assert len(cache.match(prompt(8), 100)) == 1


def test_a_prompt_longer_than_the_cache_keeps_what_fits() -> None:
    cache = PrefixCache(BLOCK, num_blocks=2)
    assert [f.index for f in cache.insert(prompt(1, 2, 3, 4))] == [0, 1]
    assert len(cache.match(prompt(1, 2, 3, 4), 100)) == 2
    assert cache.usage_ratio == 1.0


def test_a_prefix_stored_in_one_namespace_is_never_matched_from_another() -> None:
    cache = PrefixCache(block_size=4, num_blocks=8)
    prompt = list(range(1, 13))
    cache.insert(prompt, namespace="key:a")
    assert cache.match(prompt, 12, namespace="key:b") == []
    assert cache.match(prompt, 12, namespace="") == []
    assert len(cache.match(prompt, 12, namespace="key:a")) == 3
