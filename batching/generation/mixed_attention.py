"""Attention for a mixed step: decode rows and prefill chunks packed into ONE forward.

A step that prefills a prompt chunk while other rows decode used to run two forwards, the chunk's
prefill and then the decode. On hardware where a forward has a large fixed cost (weights read
from memory, kernel launches, Python), the second forward is most of what the running streams
wait for. Packing both into one forward [1, N] (N = decode rows + chunk tokens) shares that cost:
every layer's projections and MLP run once over all N tokens. Only attention differs per part,
because each part attends to its own slot of the KV cache:

* the decode part: rows 0..B-1, one query each, over their blocks up to `decode_kv_len`
  (exactly what a decode step does);
* each prefill segment: `length` queries of one sequence, at positions start.., over its
  blocks up to start + length, causally.

`install(model)` routes the model's attention through `_mixed_or_plain`, registered with
transformers' AttentionInterface as "slots+<the model's implementation>". Without a
`mixed_layout` keyword (every forward but a mixed step's) it calls the model's own attention
function unchanged (on a CPU with grouped K/V heads, torch's sdpa with enable_gqa: see
`_grouped_sdpa_applies`), so prefill, decode and CUDA graphs see no difference. With one,
it gathers each part's K/V from the blocks (kv_cache.gather_kv), calls that same function
once per part, with that part's queries, keys and mask, and concatenates the outputs in
packing order. The model's own function is used for each part (sdpa or eager, GQA,
scaling, softcapping as the model defines them), so a mixed step computes what separate forwards
would, up to floating-point summation order.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from batching.generation.kv_cache import gather_kv
from batching.generation.layer_masks import Masks, for_layer

PREFIX = "slots+"  # our registered names: "slots+sdpa", "slots+eager"
PLAIN_IMPLEMENTATIONS = ("sdpa", "eager")  # the ones that take the runner's 4D additive mask


@dataclass(frozen=True)
class PrefillSegment:
    """One row's chunk inside the packed forward: queries offset.. offset+length-1."""

    table: torch.Tensor  # [1, blocks]: the sequence's block table
    offset: int  # first column of the segment in the packed sequence
    length: int
    kv_len: int  # start + length: the sequence's K/V this chunk attends over
    mask: Masks  # [1, 1, length, kv_len] additive, causal from start (per layer kind)


@dataclass(frozen=True)
class MixedLayout:
    """Where each part of a packed forward sits, passed to every layer's attention."""

    decode_rows: int  # columns 0..decode_rows-1 are decode rows
    decode_kv_len: int
    decode_tables: torch.Tensor  # [B, blocks]: each decode row's block table
    decode_mask: Masks  # [B, 1, 1, decode_kv_len] additive (per layer kind)
    segments: tuple[PrefillSegment, ...]


def install(model: PreTrainedModel) -> None:
    """Route the model's attention through the mixed-step dispatcher (idempotent)."""
    current = model.config._attn_implementation
    plain = current.removeprefix(PREFIX)
    if plain not in PLAIN_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {current!r} is not supported: the runner passes 4D "
            f"additive masks, which {PLAIN_IMPLEMENTATIONS} take"
        )
    name = PREFIX + plain
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, functools.partial(_mixed_or_plain, plain=plain))
        # generate() (and any forward without a 4D mask) builds masks for the plain one
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[plain])
    if current != name:
        model.set_attn_implementation(name)


def _mixed_or_plain(
    module: torch.nn.Module,
    query: torch.Tensor,  # [b, heads, q, head_dim]
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    plain: str,
    mixed_layout: MixedLayout | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    attend = _plain_attention(module, plain)
    kv_heads = key.shape[1] if mixed_layout is None else key.shape[2]
    if _grouped_sdpa_applies(plain, query, kv_heads, attention_mask, kwargs):
        attend = _grouped_sdpa
    if mixed_layout is None:
        return attend(module, query, key, value, attention_mask, **kwargs)
    # Mixed: query is [1, heads, N, D]; key and value are the layer's whole block pool
    # [num_blocks + 1, block_size, kv_heads, D] (a mixed BlockView returns them ungathered).
    layout = mixed_layout
    rows, kv_len = layout.decode_rows, layout.decode_kv_len
    outputs = []
    if rows:
        decode_query = query[0, :, :rows].transpose(0, 1)[:, :, None]  # [B, heads, 1, D]
        tables = layout.decode_tables
        out, _ = attend(
            module, decode_query, gather_kv(key, tables, kv_len),
            gather_kv(value, tables, kv_len), for_layer(layout.decode_mask, module), **kwargs,
        )  # fmt: skip
        outputs.append(out.reshape(1, rows, *out.shape[2:]))  # [1, B, heads, D]
    for segment in layout.segments:
        columns = slice(segment.offset, segment.offset + segment.length)
        out, _ = attend(
            module, query[:, :, columns], gather_kv(key, segment.table, segment.kv_len),
            gather_kv(value, segment.table, segment.kv_len), for_layer(segment.mask, module),
            **kwargs,
        )  # fmt: skip
        outputs.append(out)  # [1, length, heads, D]
    return torch.cat(outputs, dim=1), None  # [1, N, heads, D], packing order


def _grouped_sdpa_applies(
    plain: str,
    query: torch.Tensor,
    kv_heads: int,
    attention_mask: torch.Tensor | None,
    kwargs: dict[str, Any],
) -> bool:
    """A masked sdpa call on CPU with grouped K/V heads (GQA), and nothing
    sdpa_attention_forward would add to the scores. There transformers' sdpa repeats each
    layer's K/V across the query heads: a copy of the whole context per layer, on top of the
    copy that gathers it from the blocks (measured on the 2-core CPU, at a 1,500-token context
    that copy was half of a 16-token chunk's cost). torch's CPU kernels take grouped heads with
    a mask as they are (enable_gqa), so the gather is the only copy. On CUDA they do not (a
    mask sends enable_gqa to the slow math kernel), so there the model's sdpa runs as is."""
    extras = ("softcap", "position_bias", "s_aux")
    return (
        plain == "sdpa"
        and query.device.type == "cpu"
        and attention_mask is not None
        and query.shape[1] != kv_heads
        and all(kwargs.get(name) is None for name in extras)
    )


def _grouped_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,  # [b, heads, q, D]
    key: torch.Tensor,  # [b, kv_heads, kv, D]
    value: torch.Tensor,
    attention_mask: torch.Tensor,  # additive [b, 1, q, kv]
    *,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """What sdpa_attention_forward computes for a masked, non-causal call, with enable_gqa."""
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        enable_gqa=True,
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None  # [b, q, heads, D], as the model's returns


def _plain_attention(module: torch.nn.Module, plain: str) -> Callable[..., Any]:
    if plain != "eager":
        return ALL_ATTENTION_FUNCTIONS[plain]
    # transformers keeps eager attention in each model's own modeling file, not the registry.
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise TypeError(f"{type(module).__name__}'s module defines no eager_attention_forward")
    return eager
