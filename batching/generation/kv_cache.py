"""Where the KV cache is written: one preallocated pool of fixed-size blocks, and the one view
class a forward writes through.

`PagedKVCache` owns the memory: [2 (K, V), layers, num_blocks + 1, block_size, kv_heads,
head_dim] in one tensor (block 0 is the spare block, see block_manager.py). Seen flat,
[(num_blocks + 1) * block_size, kv_heads, head_dim], a layer has one row per token position
of the pool: position p of a sequence is row table[p // block_size] * block_size +
p % block_size (`pool_rows`), so the writes of a forward are one index operation.

For each forward the model runner passes a `BlockView` as `past_key_values`. transformers'
attention layers call `view.update(key_states, value_states, layer_idx)` once per layer; the
view writes every new token to its pool row (`write_rows`) and returns the K/V the layer
attends over: `gather_kv` of the rows' block tables (`read_tables`), i.e. each row's positions
0..kv_len-1 in the [rows, kv_heads, kv_len, head_dim] layout the model's attention function
takes. That gather is the reference attention-over-blocks path: it runs on every device and
with every attention implementation; columns past a row's length point at the spare block
and are masked. A mixed step's view returns the layer's whole pool instead, and attention.py
gathers each part's positions itself. The decode step on the in-place path gets the pool too,
and its attention reads the blocks where they are, with no gather (attention.py).

Minimal interface (transformers 5.23): attention layers only call `update()`. The model
calls `get_seq_length()` only when it is not given `position_ids`, and sizes its masks from
the cache (`get_mask_sizes`, `get_query_offset`) only when it is not given a 4D mask. The
runner always passes both, so those methods exist only as a safety net.

How many blocks the pool gets (`kv_cache_blocks`) is sized by memory, not by rows:

* An explicit byte budget (GENERATE_KV_CACHE_BYTES) wins everywhere.
* On CUDA (vLLM's gpu_memory_utilization idea): `gpu_memory_utilization` of the device's memory,
  minus what the process holds at the peak of one probe prefill of `probe_tokens` tokens after
  the weights are loaded (the weights plus the activations of the largest forward the engine
  runs), goes to the pool.
* On a CPU: DEFAULT_CPU_KV_CACHE_BYTES. The pool is allocated zeroed, so the operating system
  backs only the blocks that are written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from batching.generation.block_manager import SPARE_BLOCK
from batching.generation.model_support import cache_kv_heads

DEFAULT_CPU_KV_CACHE_BYTES = 256 * 2**20
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


class PagedKVCache:
    """K and V per layer in `num_blocks` blocks of `block_size` positions, allocated once."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (2, num_layers, num_blocks + 1, block_size, kv_heads, head_dim)
        self.storage = torch.zeros(shape, dtype=dtype, device=device)
        self.keys = list(self.storage[0])  # per layer: [num_blocks + 1, block_size, kv_heads, D]
        self.values = list(self.storage[1])  # views of the one tensor, never reallocated
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_seq_len = max_seq_len  # the longest sequence a block table can describe
        self.max_blocks_per_seq = -(-max_seq_len // block_size)
        self.spare_block = SPARE_BLOCK

    @property
    def nbytes(self) -> int:
        """Memory held by all K/V blocks, the spare one included (for logs and /info)."""
        return self.storage.numel() * self.storage.element_size()

    @property
    def bytes_per_block(self) -> int:
        return self.nbytes // (self.num_blocks + 1)

    def copy_block(self, source: int, target: int) -> None:
        """Copy one block's K/V in every layer (a shared partial block, before a write)."""
        self.storage[:, :, target] = self.storage[:, :, source]

    def view(
        self, write_rows: torch.Tensor, read_tables: torch.Tensor | None, kv_len: int = 0
    ) -> BlockView:
        return BlockView(self, write_rows, read_tables, kv_len)


def pool_rows(tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat pool rows (block * block_size + offset) of `positions` [b, n] in the sequences of
    `tables` [b, blocks]: where a write of those positions goes."""
    blocks = torch.gather(tables, 1, torch.div(positions, block_size, rounding_mode="floor"))
    return blocks * block_size + positions % block_size


def gather_kv(blocks: torch.Tensor, tables: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Positions 0..kv_len-1 of each sequence in `tables` [b, >= kv_len / block_size]:
    [b, kv_heads, kv_len, head_dim], the layout a model's attention takes, in one copy.
    blocks: one layer's K or V, [num_blocks + 1, block_size, kv_heads, head_dim].

    Whole blocks are gathered with index_select (on the 2-core CPU, indexing single positions
    with a second index for the heads was 2-3x slower, and `blocks[tables]` 1.6x), and seen
    head-major: the view has strides, not a second copy (sdpa takes it as it is)."""
    b = tables.shape[0]
    _, size, heads, dim = blocks.shape
    count = -(-kv_len // size)
    picked = blocks.index_select(0, tables[:, :count].reshape(-1))  # [b * count, size, H, D]
    gathered = picked.view(b, count, size, heads, dim).permute(0, 3, 1, 2, 4)
    gathered = gathered.reshape(b, heads, count * size, dim)  # a view: [b, H, kv, D]
    return gathered if count * size == kv_len else gathered[:, :, :kv_len]


class BlockView:
    """What one forward writes and reads. The new tokens' K/V (key_states [b, kv_heads, q, D],
    token (i, j) at flat pool row write_rows[i * q + j]) go to the pool; then row i reads
    positions 0..kv_len-1 of the sequence whose blocks are read_tables[i] (or, with
    read_tables None, the layer's blocks [num_blocks + 1, block_size, kv_heads, D] come back)."""

    is_compileable = False

    def __init__(
        self,
        cache: PagedKVCache,
        write_rows: torch.Tensor,
        read_tables: torch.Tensor | None,
        kv_len: int,
    ) -> None:
        self._cache = cache
        self._write_rows = write_rows  # [b * q]
        self._read_tables = read_tables  # [b, blocks] or None
        self._kv_len = kv_len if read_tables is not None else cache.max_seq_len

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._cache.keys[layer_idx], self._cache.values[layer_idx]
        _, heads, _, dim = key_states.shape
        # [b, H, q, D] -> [b * q, H, D], token-major like the flat pool rows
        keys.view(-1, heads, dim)[self._write_rows] = key_states.transpose(1, 2).reshape(
            -1, heads, dim
        )
        values.view(-1, heads, dim)[self._write_rows] = value_states.transpose(1, 2).reshape(
            -1, heads, dim
        )
        if self._read_tables is None:
            return keys, values
        tables, kv_len = self._read_tables, self._kv_len
        return gather_kv(keys, tables, kv_len), gather_kv(values, tables, kv_len)

    # What transformers may ask a cache besides update(); see the module docstring.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len - 1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._kv_len, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self._kv_len - 1


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int
    itemsize: int

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token position in every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.itemsize


def kv_shape(model: torch.nn.Module) -> KVShape:
    config = model.config.get_text_config()  # type: ignore[union-attr, operator]
    heads = config.num_attention_heads
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    return KVShape(
        layers=config.num_hidden_layers,
        kv_heads=cache_kv_heads(config),  # Falcon's new decoder architecture: every head
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        itemsize=embeddings.weight.element_size(),
    )


def kv_cache_blocks(
    model: torch.nn.Module,
    block_size: int,
    *,
    kv_cache_bytes: int | None = None,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    probe_tokens: int = 2048,
) -> int:
    """Blocks of `block_size` positions that fit the budget (at least 1)."""
    budget = kv_cache_bytes
    if budget is None:
        device = model.get_input_embeddings().weight.device  # type: ignore[operator]
        if device.type == "cuda":
            budget = _cuda_budget(model, device, gpu_memory_utilization, probe_tokens)
        else:
            budget = DEFAULT_CPU_KV_CACHE_BYTES
    per_block = kv_shape(model).bytes_per_token * block_size
    # One block more is allocated: the spare block padded rows write to.
    blocks = budget // per_block - 1
    if blocks < 1:
        raise ValueError(
            f"a KV budget of {budget} bytes holds no block of {block_size} tokens "
            f"({per_block} bytes each)"
        )
    return blocks


def _cuda_budget(
    model: torch.nn.Module, device: torch.device, utilization: float, probe_tokens: int
) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        ids = torch.zeros((1, probe_tokens), dtype=torch.int64, device=device)
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    _, total = torch.cuda.mem_get_info(device)
    return max(0, int(total * utilization) - peak)
