"""Where a cached prefix is kept and when it is evicted: an index of prompt blocks, LRU.

A prompt's K/V is cut into blocks of `block_size` tokens. Block i is known by a hash chained
from the start, hash(hash of block i-1, tokens of block i), so a block can only ever match as
part of the very same prefix; every match is also checked token for token, and against the
exact parent block, so a hash collision is a miss, never a wrong hit.

Each prefix lives in a namespace (the service uses one per API key): the namespace seeds the
chain (the first block's hash is hash(namespace, tokens)) and is checked on the first block,
so a prompt only ever matches blocks its own namespace stored, and a hit (cached_tokens)
tells a client nothing about another namespace's prompts. A shared cache is namespace "".

The K/V of each cached block lives in its own storage row (`block_id`) of a pool that the slots
do not use (`BlockPool` in kv_cache.py), bounded by GENERATE_PREFIX_CACHE_TOKENS. On a hit, the
blocks are copied into the new request's slot and only the rest of the prompt is prefilled.
Nothing else writes to the pool: decode steps and prefills write to slots only.

Eviction is least recently used, by block. A hit or an insert touches its chain from the
deepest block back to the first, so a block is always more recent than every block that
extends it: the LRU order evicts the ends of prefixes first and never strands a descendant
whose ancestor is gone.

Plain Python and single-threaded (the engine thread is its only user), so it is unit-tested
without a model.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(eq=False)
class CachedBlock:
    key: int  # the chain hash it is indexed by
    block_id: int  # its row in the block pool
    tokens: tuple[int, ...]
    parent: CachedBlock | None  # the block before it in its prefix (None: the first block)
    namespace: str = ""  # whose prefix: checked on first blocks (parents carry it on)


@dataclass(frozen=True)
class BlockToFill:
    """insert() reserved `block_id` for the prompt's block number `index`: copy the K/V of
    positions index*block_size .. (index+1)*block_size - 1 from the slot into it."""

    block_id: int
    index: int


class PrefixCache:
    """Chained-hash index of cached prompt blocks, least recently used evicted first."""

    def __init__(self, block_size: int, num_blocks: int) -> None:
        if block_size < 1 or num_blocks < 1:
            raise ValueError("block_size and num_blocks must be >= 1")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._blocks: OrderedDict[int, CachedBlock] = OrderedDict()  # by chain hash, LRU first
        self._free_ids = list(range(num_blocks - 1, -1, -1))

    @property
    def cached_tokens(self) -> int:
        return len(self._blocks) * self.block_size

    @property
    def usage_ratio(self) -> float:
        return len(self._blocks) / self.num_blocks

    def match(
        self, prompt: Sequence[int], max_tokens: int, namespace: str = ""
    ) -> list[CachedBlock]:
        """The longest chain of cached blocks that starts `prompt` in `namespace` and covers
        at most `max_tokens` tokens (whole blocks only). Touches what it returns."""
        chain = self._walk(prompt, max_tokens // self.block_size, namespace)
        self._touch(chain)
        return chain

    def insert(self, prompt: Sequence[int], namespace: str = "") -> list[BlockToFill]:
        """Index every whole block of `prompt` (its K/V complete in its slot) that is not
        cached yet. Returns the new blocks for the caller to fill, evicting the least recently
        used blocks of other prefixes to make room."""
        full_blocks = len(prompt) // self.block_size
        chain = self._walk(prompt, full_blocks, namespace)
        to_fill: list[BlockToFill] = []
        parent = chain[-1] if chain else None
        key: object = parent.key if parent is not None else namespace
        keep = {id(block) for block in chain}
        for index in range(len(chain), full_blocks):
            block_id = self._take_free_id(keep)
            if block_id is None:
                break  # the cache is smaller than this prompt: keep what fits
            tokens = self._block_tokens(prompt, index)
            key = hash((key, tokens))
            if key in self._blocks:  # a colliding hash: keep the older entry, stop here
                self._free_ids.append(block_id)
                break
            block = CachedBlock(key, block_id, tokens, parent, namespace)
            self._blocks[key] = block
            keep.add(id(block))
            chain.append(block)
            to_fill.append(BlockToFill(block_id, index))
            parent = block
        self._touch(chain)
        return to_fill

    def clear(self) -> None:
        self._blocks.clear()
        self._free_ids = list(range(self.num_blocks - 1, -1, -1))

    def _walk(self, prompt: Sequence[int], max_blocks: int, namespace: str) -> list[CachedBlock]:
        chain: list[CachedBlock] = []
        key: object = namespace  # the chain's seed: another namespace's hashes all differ
        for index in range(min(max_blocks, len(prompt) // self.block_size)):
            tokens = self._block_tokens(prompt, index)
            key = hash((key, tokens))
            block = self._blocks.get(key)
            parent = chain[-1] if chain else None
            if block is None or block.tokens != tokens or block.parent is not parent:
                break
            if parent is None and block.namespace != namespace:  # a colliding seed hash
                break
            chain.append(block)
        return chain

    def _block_tokens(self, prompt: Sequence[int], index: int) -> tuple[int, ...]:
        return tuple(prompt[index * self.block_size : (index + 1) * self.block_size])

    def _take_free_id(self, keep: set[int]) -> int | None:
        """A free pool row, evicting the least recently used block unless it is in `keep`."""
        if not self._free_ids and self._blocks:
            oldest_key = next(iter(self._blocks))
            if id(self._blocks[oldest_key]) in keep:
                return None
            self._free_ids.append(self._blocks.pop(oldest_key).block_id)
        return self._free_ids.pop() if self._free_ids else None

    def _touch(self, chain: list[CachedBlock]) -> None:
        """Deepest first, so that each block ends up more recent than its descendants."""
        for block in reversed(chain):
            if self._blocks.get(block.key) is block:
                self._blocks.move_to_end(block.key)
