"""EngineConfig: every setting of the generation engine, in one place (nano-vllm's Config).

Plain values with defaults, built once (service/generate/service.py builds it from Settings)
and handed to GenerationEngine, which passes it on to StepPlanner and RunningBatch instead of a
long list of keyword arguments. Objects the engine talks to (the model, its tokenizer, the
metrics observer, the grammar tokenizer) are arguments of their own, not settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from batching.generation.attention import PagedAttentionMode
from batching.generation.chunk_sizing import DEFAULT_MAX_STALL_STEPS, ChunkLimits
from batching.generation.static_decode import CudaGraphsMode
from batching.priority import DEFAULT_AGING_S

# Prompt tokens prefilled per step while other rows decode (GENERATE_PREFILL_CHUNK_TOKENS).
# A prefill runs before that step's decode, so every running stream waits for it: this bounds
# that pause, while a burst of short prompts still shares one forward. See BENCHMARKS.md.
DEFAULT_PREFILL_CHUNK_TOKENS = 256
DEFAULT_KV_BLOCK_SIZE = 16  # token positions per KV block (vLLM's default)


@dataclass(frozen=True)
class EngineConfig:
    """`num_slots` rows are decoded together at most; `kv_cache_blocks` blocks of
    `kv_block_size` positions hold the K/V of every sequence (None: enough for num_slots
    sequences of max_seq_len, the memory a slot per row used to take). max_seq_len is capped by
    the pool. `prefix_cache_tokens` > 0 turns the prefix cache on (its blocks live in free pool
    memory)."""

    num_slots: int  # GENERATE_SLOTS
    max_seq_len: int  # GENERATE_MAX_SEQ_LEN
    max_queue: int  # GENERATE_MAX_QUEUE
    timeout_s: float  # REQUEST_TIMEOUT_S: queued or running, a request ends by then
    eos_token_ids: tuple[int, ...] = ()
    special_tokens: tuple[str, ...] = ()  # their text never reaches a client
    # "auto": measured at warm-up against max_stall_steps; a number: for every case
    prefill_chunk_tokens: int | Literal["auto"] | ChunkLimits = DEFAULT_PREFILL_CHUNK_TOKENS
    max_stall_steps: float = DEFAULT_MAX_STALL_STEPS  # GENERATE_MAX_STALL_STEPS
    mixed_steps: bool = True  # prefill inside the decode forward (attention.py)
    prefix_cache_tokens: int = 0  # > 0: the prefix cache is on
    kv_block_size: int = DEFAULT_KV_BLOCK_SIZE
    kv_cache_blocks: int | None = None  # None: num_slots x max_seq_len positions
    cuda_graphs: CudaGraphsMode = "auto"
    # how the decode step's attention reads KV blocks: auto = in place on CUDA if it checks out
    paged_attention: PagedAttentionMode = "auto"
    kv_bucket_min: int | None = None  # None: see static_decode.decode_kv_buckets
    priority_aging_s: float = DEFAULT_AGING_S

    def __post_init__(self) -> None:
        if self.kv_block_size < 1:
            raise ValueError(f"kv_block_size must be >= 1, got {self.kv_block_size}")
        if self.max_stall_steps < 1:
            raise ValueError("max_stall_steps must be >= 1 (a decode step at least)")
