"""The prefix cache as the engine uses it: the index (prefix_cache.py) and the block pool
(kv_cache.py) together, copying cached prefixes into slots and prompts' blocks out of them."""

from __future__ import annotations

from collections.abc import Sequence

from batching.generation.kv_cache import BlockPool, SlotKVCache
from batching.generation.prefix_cache import PrefixCache

PREFIX_BLOCK_TOKENS = 16  # tokens per cached block (vLLM's default block size)


class PrefixStore:
    def __init__(self, cache: SlotKVCache, capacity_tokens: int) -> None:
        blocks = capacity_tokens // PREFIX_BLOCK_TOKENS
        if blocks < 1:
            raise ValueError(f"a prefix cache needs at least {PREFIX_BLOCK_TOKENS} tokens")
        self.index = PrefixCache(PREFIX_BLOCK_TOKENS, blocks)
        self.pool = BlockPool(cache, PREFIX_BLOCK_TOKENS, blocks)

    @property
    def nbytes(self) -> int:
        return self.pool.nbytes

    @property
    def usage_ratio(self) -> float:
        return self.index.usage_ratio

    def load(self, prompt: Sequence[int], slot: int, namespace: str = "") -> int:
        """Copy the longest cached prefix of `prompt` (stored in `namespace`) into `slot`,
        leaving at least its last token to prefill (its logits give the first output token).
        Returns its length."""
        blocks = self.index.match(prompt, len(prompt) - 1, namespace)
        if blocks:
            self.pool.load([b.block_id for b in blocks], slot)
        return len(blocks) * PREFIX_BLOCK_TOKENS

    def save(self, prompt: Sequence[int], slot: int, namespace: str = "") -> None:
        """The prompt's K/V is whole in `slot`: keep its blocks that are not cached yet."""
        fills = self.index.insert(prompt, namespace)
        if fills:
            self.pool.save(slot, [f.block_id for f in fills], [f.index for f in fills])
