"""The two forward passes of the engine, gpt-fast style: `prefill` and `decode_step`.

Any Hugging Face decoder-only model works (Llama, Qwen2, Mistral shapes, bitsandbytes-quantised
too) because the model is driven through its public forward with three explicit inputs:

* `past_key_values`: a per-forward view of the slot cache (see kv_cache.py);
* `position_ids` [B, q]: each row's own positions (rows are at different lengths);
* `attention_mask` [B, 1, q, kv]: a 4D *additive float* mask (0 = attend, dtype min = not).
  transformers returns a 4D mask as is, for every attention implementation. A bool mask would
  be silently wrong with eager attention (it adds the mask to the scores), and a 2D mask would
  be expanded against the wrong lengths.

Shapes change every step (batch size, KV length, prompt lengths). On CUDA, PyTorch's cuDNN
attention backend builds a plan per new shape (measured on an H100, torch 2.11: about 60 ms
extra per new decode shape, 135 ms vs 17 ms per new prefill shape), so a server should turn it
off once at start-up: `torch.backends.cuda.enable_cudnn_sdp(False)` (flash and mem-efficient
attention have no such cost).
"""

from __future__ import annotations

import torch

from batching.generation.kv_cache import SlotKVCache


class ModelRunner:
    """Owns the model and the slot cache; turns token ids into next-token logits."""

    def __init__(self, model: torch.nn.Module, cache: SlotKVCache) -> None:
        self.model = model
        self.cache = cache
        embeddings = model.get_input_embeddings()  # type: ignore[operator]
        self.device: torch.device = embeddings.weight.device
        self.dtype: torch.dtype = embeddings.weight.dtype  # hidden states, scores, mask
        self._mask_min = torch.finfo(self.dtype).min
        self._arange = torch.arange(cache.max_seq_len, device=self.device)  # [S], reused

    def prefill(self, first_slot: int, prompts: list[list[int]]) -> torch.Tensor:
        """Write the prompts' K/V to slots first_slot.. and return their next-token logits.

        The prompts are left-padded to the longest one (T) and run as one batch [k, T].
        Returns float32 logits [k, V] for each prompt's last token.
        """
        seq = max(len(p) for p in prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)  # [k]
        pads = seq - lengths  # [k]
        padded = [[0] * (seq - len(p)) + p for p in prompts]
        input_ids = torch.tensor(padded, device=self.device)  # [k, T]
        columns = self._arange[:seq]  # [T]
        position_ids = (columns[None, :] - pads[:, None]).clamp_(min=0)  # [k, T]
        # Real query column i of row r sees columns pad_r..i. A pad column sees only itself,
        # so no softmax row is empty (an all-masked row would give NaN).
        is_real = columns[None, :] >= pads[:, None]  # [k, T]
        causal = columns[None, :] <= columns[:, None]  # [T(q), T(kv)]
        allowed = causal[None] & is_real[:, None, :]  # [k, T, T]
        allowed |= torch.eye(seq, dtype=torch.bool, device=self.device)[None]
        mask = self._additive(allowed)[:, None]  # [k, 1, T, T]
        gather_index = (columns[None, :] + pads[:, None]).clamp_(max=seq - 1)  # [k, T]
        view = self.cache.prefill_view(first_slot, gather_index)
        logits = self._forward(input_ids, position_ids, mask, view)  # [k, 1, V]
        return logits[:, -1].float()

    def decode_step(self, tokens: list[int], lengths: list[int]) -> torch.Tensor:
        """Feed one token to each of the rows 0..B-1 (row r holds lengths[r] tokens already).

        Returns float32 logits [B, V].
        """
        kv_len = max(lengths) + 1  # attend only up to the longest row, not max_seq_len
        input_ids = torch.tensor(tokens, device=self.device)[:, None]  # [B, 1]
        positions = torch.tensor(lengths, device=self.device)  # [B]; where each token goes
        allowed = self._arange[None, :kv_len] <= positions[:, None]  # [B, kv]
        mask = self._additive(allowed)[:, None, None, :]  # [B, 1, 1, kv]
        view = self.cache.decode_view(positions, kv_len)
        logits = self._forward(input_ids, positions[:, None], mask, view)  # [B, 1, V]
        return logits[:, -1].float()

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """bool (True = attend) -> additive float mask in the model's dtype."""
        zeros = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        return zeros.masked_fill_(~allowed, self._mask_min)

    def _forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor,
        cache_view: object,
    ) -> torch.Tensor:
        output = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=mask,
            past_key_values=cache_view,
            use_cache=True,
            logits_to_keep=1,
        )
        logits: torch.Tensor = output.logits
        return logits


def build_slot_cache(model: torch.nn.Module, num_slots: int, max_seq_len: int) -> SlotKVCache:
    """A slot cache shaped for `model` (reads layers, KV heads and head size from its config)."""
    config = model.config.get_text_config()  # type: ignore[union-attr, operator]
    window = getattr(config, "sliding_window", None)
    if window is not None and max_seq_len > window:
        # The runner builds one full-causal mask for every layer; beyond the window the
        # model's sliding-window layers would need a different one.
        raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's sliding window {window}")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    return SlotKVCache(
        num_layers=config.num_hidden_layers,
        num_slots=num_slots,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        max_seq_len=max_seq_len,
        head_dim=head_dim,
        dtype=embeddings.weight.dtype,
        device=embeddings.weight.device,
    )
