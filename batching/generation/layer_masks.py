"""The additive attention masks of a forward, one per kind of attention layer.

A model's layers may attend in different ways (model_support.AttentionPattern): over the whole
past (full), over the last `sliding_window` tokens (sliding: Mistral, Gemma2/3, gpt-oss...), or
within their own `chunk_size`-token chunk (chunked: Llama-4). The runner knows each row's
positions, so it builds every mask itself from them, the same rules transformers' masking_utils
applies to one sequence:

* full:    key column c is visible to a query at position p when c <= p;
* sliding: ... and c > p - sliding_window;
* chunked: ... and c // chunk_size == p // chunk_size.

A model whose layers are all of one kind gets one 4D tensor (every model takes that); a model
with several kinds gets a dict keyed by layer type, which the models that mix kinds accept in
place of the mask they would build (`isinstance(attention_mask, dict)` in their forward). The
whole slot's K/V stays in the cache either way: no block is freed when every layer has slid
past it.
"""

from __future__ import annotations

import torch

from batching.generation.model_support import CHUNKED, SLIDING, AttentionPattern

Masks = torch.Tensor | dict[str, torch.Tensor]  # what a forward's attention_mask receives


class LayerMasks:
    """Builds the masks for queries at known positions over the first `kv_len` cache columns."""

    def __init__(
        self, pattern: AttentionPattern, max_seq_len: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.pattern = pattern
        self._dtype = dtype
        self._mask_min = torch.finfo(dtype).min
        self._columns = torch.arange(max_seq_len, device=device)  # [S], static (graphs read it)

    def build(self, positions: torch.Tensor, kv_len: int) -> Masks:
        """positions [b, q] (each query's absolute position) -> additive [b, 1, q, kv_len]
        per layer kind: a tensor if the model has one kind, else {layer type: tensor}."""
        pattern = self.pattern
        by_rule = {
            rule: self._additive(self.allowed(rule, positions, kv_len))
            for rule in dict.fromkeys(pattern.rule(name) for name in pattern.names)
        }
        if len(by_rule) == 1:
            return next(iter(by_rule.values()))
        return {name: by_rule[pattern.rule(name)] for name in pattern.names}

    def allowed(self, rule: str, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """bool [b, q, kv_len], True where a query at positions[b, q] attends to a column
        under `rule` (FULL, SLIDING or CHUNKED)."""
        columns = self._columns[None, None, :kv_len]  # [1, 1, kv]
        queries = positions[:, :, None]  # [b, q, 1]
        allowed = columns <= queries
        if rule == SLIDING and self.pattern.sliding_window is not None:
            allowed &= columns > queries - self.pattern.sliding_window
        elif rule == CHUNKED and self.pattern.chunk_size is not None:
            size = self.pattern.chunk_size
            allowed &= torch.div(columns, size, rounding_mode="floor") == torch.div(
                queries, size, rounding_mode="floor"
            )
        return allowed

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """bool [b, q, kv] (True = attend) -> additive float [b, 1, q, kv] in the model's dtype."""
        zeros = torch.zeros(allowed.shape, dtype=self._dtype, device=allowed.device)
        return zeros.masked_fill_(~allowed, self._mask_min)[:, None]


def for_layer(masks: Masks, module: torch.nn.Module) -> torch.Tensor:
    """The mask of one attention module's layer kind (used inside a mixed step's attention)."""
    if isinstance(masks, torch.Tensor):
        return masks
    config = getattr(module, "config", None)
    layer_types = getattr(config, "layer_types", None)
    layer_idx = getattr(module, "layer_idx", None)
    if layer_types is None or layer_idx is None:
        raise TypeError(f"{type(module).__name__} does not say which kind of layer it is")
    return masks[layer_types[layer_idx]]
