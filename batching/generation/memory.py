"""How many KV blocks the pool gets: sized by memory, not by rows.

* An explicit byte budget (GENERATE_KV_CACHE_BYTES) wins everywhere.
* On CUDA (vLLM's gpu_memory_utilization idea): `gpu_memory_utilization` of the device's memory,
  minus what the process holds at the peak of one probe prefill of `probe_tokens` tokens after
  the weights are loaded (the weights plus the activations of the largest forward the engine
  runs), goes to the pool.
* On a CPU: DEFAULT_CPU_KV_CACHE_BYTES. The pool is allocated zeroed, so the operating system
  backs only the blocks that are written.
"""

from __future__ import annotations

from typing import Any

import torch

from batching.generation.model_runner import kv_shape

DEFAULT_CPU_KV_CACHE_BYTES = 256 * 2**20
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


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


def model_context(model: torch.nn.Module) -> int:
    """The longest sequence the model supports: its position embeddings. A sliding window
    does not shorten it: the runner masks each layer type itself (layer_masks.py), so a
    sliding-window model serves its full context."""
    return config_context(model.config)


def config_context(config: Any) -> int:
    """model_context from the config alone (to refuse a model before its weights load)."""
    text = config.get_text_config()
    return int(getattr(text, "max_position_embeddings", None) or 2048)
