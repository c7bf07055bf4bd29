"""KV memory bookkeeping in plain Python: which blocks of the pool each sequence holds, and
the prefix cache, which is nothing but blocks that are remembered by what they hold.

The pool (kv_cache.py) is `num_blocks` blocks of `block_size` token positions each, plus block
0, the spare block: it belongs to no sequence, padded rows write there, and unused block-table
entries point at it. A sequence's block table lists its blocks in order: position p of the
sequence lives at offset p % block_size of block table[p // block_size]. Blocks are allocated
as tokens are written and freed when the sequence ends, so a sequence wastes at most one
partial block, and memory no longer depends on how long a request *might* run.

Reference counts let sequences share blocks: a prefix-cache hit maps the cached blocks into
the new sequence's table, and the n choices of one prompt share its prompt's blocks (only a
partial last block is copied, since each choice writes its own next tokens into it).

The prefix cache: once a prompt is prefilled, each of its *whole* blocks is registered under a
hash chained from the start, hash(hash of block i-1, tokens of block i), so a block can only
ever match as part of the very same prefix. Each prefix lives in a namespace (the service can
use one per API key): the namespace seeds the chain and is checked on the first block, so a
prompt only ever matches blocks its own namespace registered. Every match is also checked
token for token and against its parent block, so a hash collision is a miss, never a wrong
hit. A freed block that is
registered keeps its K/V and its place in the index: it is "cached", free to be handed out,
and evicted least recently freed first when a fresh block is needed and no never-cached one
is left. So cached prefixes live in free memory and need no budget of their own.

Single-threaded (the engine thread is its only user), so it is unit-tested without a model.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

SPARE_BLOCK = 0  # the block padded rows write to; never allocated


class OutOfBlocksError(RuntimeError):
    """allocate() was asked for more blocks than are free (callers check can_allocate)."""


@dataclass
class _CachedKey:
    key: int  # the chain hash the block is indexed by
    tokens: tuple[int, ...]
    parent: int | None  # the block before it in its prefix (None: the first block)
    namespace: str  # whose prefix: checked on first blocks (parents carry it on)


class BlockManager:
    """Free blocks, reference counts and the prefix cache's index over one pool."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks  # usable blocks: ids 1..num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._refs = [0] * (num_blocks + 1)
        self._cached: dict[int, _CachedKey] = {}  # block id -> what it holds, if registered
        self._index: dict[int, int] = {}  # chain hash -> block id
        self._never_cached = list(range(num_blocks, 0, -1))  # free, nothing worth keeping
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # free, registered; LRU first

    # ---- counts (gauges, /info, admission) ----

    @property
    def free_blocks(self) -> int:
        """Blocks allocate() can hand out now (cached ones are evicted for it)."""
        return len(self._never_cached) + len(self._free_cached)

    @property
    def used_blocks(self) -> int:
        """Blocks some sequence holds (a shared block counts once)."""
        return self.num_blocks - self.free_blocks

    @property
    def cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, held or free."""
        return len(self._cached)

    @property
    def usage_ratio(self) -> float:
        return self.used_blocks / self.num_blocks

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` positions."""
        return -(-tokens // self.block_size)

    # ---- allocation ----

    def can_allocate(self, count: int) -> bool:
        return count <= self.free_blocks

    def allocate(self, count: int) -> list[int]:
        """`count` blocks for one sequence (reference count 1 each)."""
        if count > self.free_blocks:
            raise OutOfBlocksError(f"{count} blocks asked, {self.free_blocks} free")
        blocks = []
        for _ in range(count):
            if self._never_cached:
                block = self._never_cached.pop()
            else:
                block, _ = self._free_cached.popitem(last=False)  # evict the LRU cached block
                self._forget(block)
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def grow(self, table: list[int], tokens: int) -> bool:
        """Extend `table` so it holds `tokens` positions; False (table unchanged) if the pool
        has too few free blocks."""
        missing = self.blocks_for(tokens) - len(table)
        if missing <= 0:
            return True
        if not self.can_allocate(missing):
            return False
        table += self.allocate(missing)
        return True

    def share(self, blocks: Sequence[int]) -> list[int]:
        """Another reference to each block (a prefix hit, or choices sharing a prompt)."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._free_cached[block]  # only a cached block can be free and matched
            self._refs[block] += 1
        return list(blocks)

    def free(self, table: list[int]) -> None:
        """Drop one reference to each block of a sequence's table, and empty the table. The
        last block is freed first, so a prefix's deeper blocks are evicted before the blocks
        they extend."""
        for block in reversed(table):
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if block in self._cached:
                self._free_cached[block] = None
            else:
                self._never_cached.append(block)
        table.clear()

    # ---- the prefix cache ----

    def match(self, tokens: Sequence[int], max_tokens: int, namespace: str = "") -> list[int]:
        """The longest chain of cached blocks of `namespace` that starts `tokens`, covering at
        most `max_tokens` positions (whole blocks only), each shared (the caller now holds
        them)."""
        if not self.prefix_caching:
            return []
        chain: list[int] = []
        previous: Hashable = namespace  # the chain's seed: another namespace's hashes differ
        for index in range(min(max_tokens, len(tokens)) // self.block_size):
            block_tokens = self._block_tokens(tokens, index)
            previous = key = hash((previous, block_tokens))
            block = self._index.get(key)
            parent = chain[-1] if chain else None
            entry = self._cached.get(block) if block is not None else None
            if block is None or entry is None:
                break
            if entry.tokens != block_tokens or entry.parent != parent:
                break
            if parent is None and entry.namespace != namespace:  # a colliding seed hash
                break
            chain.append(block)
        if chain:
            self.share(chain)
        return chain

    def register(self, tokens: Sequence[int], table: Sequence[int], namespace: str = "") -> None:
        """`table`'s blocks hold the K/V of `tokens` from position 0: index each whole block
        that is not indexed yet (only once its K/V is written, so a failed or cancelled prefill
        never leaves half a prefix behind)."""
        if not self.prefix_caching:
            return
        previous: Hashable = namespace
        parent: int | None = None
        for index in range(min(len(tokens) // self.block_size, len(table))):
            block = table[index]
            block_tokens = self._block_tokens(tokens, index)
            previous = key = hash((previous, block_tokens))
            entry = self._cached.get(block)
            if entry is None:
                if key in self._index:  # the same prefix, computed twice: keep the older
                    return
                self._cached[block] = _CachedKey(key, block_tokens, parent, namespace)
                self._index[key] = block
            elif entry.key != key:
                return  # a block of another prefix (cannot happen for a sequence's own blocks)
            parent = block

    def clear_cache(self) -> None:
        """Forget every free cached block (held blocks stay registered until freed)."""
        while self._free_cached:
            block, _ = self._free_cached.popitem(last=False)
            self._forget(block)
            self._never_cached.append(block)

    def _forget(self, block: int) -> None:
        entry = self._cached.pop(block, None)
        if entry is not None and self._index.get(entry.key) == block:
            del self._index[entry.key]

    def _block_tokens(self, tokens: Sequence[int], index: int) -> tuple[int, ...]:
        return tuple(tokens[index * self.block_size : (index + 1) * self.block_size])
