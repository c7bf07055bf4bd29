"""Attention over the KV blocks: the masks of each layer kind, mixed-step attention, and the
path that reads K/V from the blocks in place.

Three sections, in this order:

1. Masks per layer kind (LayerMasks). A model's layers may attend in different ways
   (model_support.AttentionPattern): over the whole past (full), over the last
   `sliding_window` tokens (sliding: Mistral, Gemma2/3, gpt-oss...), or within their own
   `chunk_size`-token chunk (chunked: Llama-4). The runner knows each row's positions, so it
   builds every mask itself from them, the rules transformers' masking_utils applies to one
   sequence:

   * full:    key column c is visible to a query at position p when c <= p;
   * sliding: ... and c > p - sliding_window;
   * chunked: ... and c // chunk_size == p // chunk_size.

   A model whose layers are all of one kind gets one 4D additive tensor (every model takes
   that); a model with several kinds gets a dict keyed by layer type, which the models that mix
   kinds accept in place of the mask they would build (`isinstance(attention_mask, dict)`).
   The whole sequence's K/V stays in its blocks either way.

2. The attention function (`install`). It routes the model's attention through `_attend`,
   registered with transformers' AttentionInterface as "slots+<the model's implementation>".
   Without a layout keyword (prefill, and the decode step on the gather path) it calls the
   model's own attention function unchanged (on a CPU with grouped K/V heads, torch's sdpa
   with enable_gqa: see `_grouped_sdpa_applies`) over the K/V the cache view gathered
   (kv_cache.gather_kv). With `mixed_layout` it runs a mixed step; with `paged_layout` the
   in-place path.

   A mixed step packs decode rows and prefill chunks into ONE forward [1, N]: every layer's
   projections and MLP run once over all N tokens, and only attention differs per part. The
   view hands back the layer's whole block pool; `_attend` gathers each part's K/V, calls the
   model's own function once per part with that part's queries and mask, and concatenates the
   outputs in packing order (the decode part: rows 0..B-1, one query each, over their blocks up
   to `decode_kv_len`; each prefill segment: `length` queries of one sequence, causally).

3. In place (`InPlaceAttention`, the decode step only). The gather copies every row's K/V out
   of the pool in every layer of every step: on a GPU that copy reads and writes as many bytes
   as attention itself reads. FlexAttention (torch.nn.attention.flex_attention, in torch since
   2.5; chosen over FlashInfer, which needs a CUDA toolchain to install, has no CPU path for
   the equality tests, and ties the template to its CUDA builds) reads the blocks where they
   are: its BlockMask lists, per row, the physical blocks of the row's table in logical order,
   so the kernel loads only those, and the mask function maps a physical pool position back to
   the row's logical position (`physical_to_logical`, as torch's experimental PagedAttention
   does) to apply the layer kind's rule. Grouped K/V heads ride as extra query rows
   ([B, kv_heads, groups, D]), so the kernel sees equal head counts: no K/V is repeated and
   flex's decoding kernel applies at every group size (it takes only power-of-two groups).
   On CUDA flex_attention is compiled (one kernel per batch bucket, at warm-up); elsewhere it
   runs torch's unfused reference (scores over every pool position up to the highest block in
   use), correct but slower than the gather. Which path decodes is chosen at warm-up
   (ModelRunner.choose_paged_attention), never assumed. Prefill and mixed steps gather on
   every path: their shapes change every step, and a compiled kernel per shape would
   recompile while serving.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

import torch
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from batching.generation.kv_cache import gather_kv
from batching.generation.model_support import CHUNKED, SLIDING, AttentionPattern

logger = logging.getLogger(__name__)

# ---- 1. masks per layer kind ----

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
        return self.pattern_map(lambda rule: self._additive(self.allowed(rule, positions, kv_len)))

    def pattern_map(self, make: Callable[[str], Any]) -> Any:
        """make(rule) once per distinct rule: its result if the model has one layer kind, else
        {layer type: result} (the shape a forward's attention_mask, or a paged layout, takes)."""
        pattern = self.pattern
        by_rule = {rule: make(rule) for rule in dict.fromkeys(map(pattern.rule, pattern.names))}
        if len(by_rule) == 1:
            return next(iter(by_rule.values()))
        return {name: by_rule[pattern.rule(name)] for name in pattern.names}

    def allowed(self, rule: str, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """bool [b, q, kv_len], True where a query at positions[b, q] attends to a column
        under `rule` (FULL, SLIDING or CHUNKED)."""
        columns = self._columns[None, None, :kv_len]  # [1, 1, kv]
        return visible(self.pattern, rule, columns, positions[:, :, None])  # [b, q, kv]

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """bool [b, q, kv] (True = attend) -> additive float [b, 1, q, kv] in the model's dtype."""
        zeros = torch.zeros(allowed.shape, dtype=self._dtype, device=allowed.device)
        return zeros.masked_fill_(~allowed, self._mask_min)[:, None]


def visible(
    pattern: AttentionPattern, rule: str, columns: torch.Tensor, queries: torch.Tensor
) -> torch.Tensor:
    """Whether key columns are visible to queries at these positions under `rule` (broadcast):
    the one statement of the rules, for the additive masks and the in-place mask function."""
    allowed = columns <= queries
    if rule == SLIDING and pattern.sliding_window is not None:
        allowed = allowed & (columns > queries - pattern.sliding_window)
    elif rule == CHUNKED and pattern.chunk_size is not None:
        size = pattern.chunk_size
        allowed = allowed & (
            torch.div(columns, size, rounding_mode="floor")
            == torch.div(queries, size, rounding_mode="floor")
        )
    return allowed


def for_layer(masks: Any, module: torch.nn.Module) -> Any:
    """The mask (or block mask) of one attention module's layer kind, from what pattern_map
    built: the one value, or the dict entry of the module's layer type."""
    if not isinstance(masks, dict):
        return masks
    config = getattr(module, "config", None)
    layer_types = getattr(config, "layer_types", None)
    layer_idx = getattr(module, "layer_idx", None)
    if layer_types is None or layer_idx is None:
        raise TypeError(f"{type(module).__name__} does not say which kind of layer it is")
    return masks[layer_types[layer_idx]]


# ---- 2. the attention function: plain, mixed, in place ----

PREFIX = "slots+"  # our registered names: "slots+sdpa", "slots+eager"
PLAIN_IMPLEMENTATIONS = ("sdpa", "eager")  # the ones that take the runner's 4D additive mask
# Keywords a model may hand its attention function that change the scores. The in-place path
# applies softcap (Gemma2) and sinks (s_aux, gpt-oss) and refuses position_bias (the warm-up
# check would catch it anyway; this says why).
SCORE_EXTRAS = ("softcap", "position_bias", "s_aux")
NOT_IN_PLACE = ("position_bias",)


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
    """Route the model's attention through `_attend` (idempotent)."""
    current = model.config._attn_implementation
    plain = current.removeprefix(PREFIX)
    if plain not in PLAIN_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {current!r} is not supported: the runner passes 4D "
            f"additive masks, which {PLAIN_IMPLEMENTATIONS} take"
        )
    name = PREFIX + plain
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, functools.partial(_attend, plain=plain))
        # generate() (and any forward without a 4D mask) builds masks for the plain one
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[plain])
    if current != name:
        model.set_attn_implementation(name)


def _attend(
    module: torch.nn.Module,
    query: torch.Tensor,  # [b, heads, q, head_dim]
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    plain: str,
    mixed_layout: MixedLayout | None = None,
    paged_layout: PagedLayout | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if paged_layout is not None:
        # key and value are the layer's whole block pool (an in-place BlockView's update)
        return paged_layout.attend(module, query, key, value, kwargs), None
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
    return (
        plain == "sdpa"
        and query.device.type == "cpu"
        and attention_mask is not None
        and query.shape[1] != kv_heads
        and all(kwargs.get(name) is None for name in SCORE_EXTRAS)
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


# ---- 3. in place over the blocks (FlexAttention) ----

PagedAttentionMode = Literal["auto", "gather", "in_place"]  # GENERATE_PAGED_ATTENTION
PagedPath = Literal["gather", "in_place"]  # the path the decode step takes
GATHER: Final = "gather"
IN_PLACE: Final = "in_place"
QUERY_BLOCK = 128  # flex's sparse query block: one step's (grouped) queries fit in one
# Compiled flex_attention specialises per batch bucket and layer kind; dynamo's default limit
# of 8 compilations per function would send later buckets to the unfused reference.
RECOMPILE_LIMIT = 256


@dataclass(frozen=True)
class PagedLayout:
    """What one decode step's attention reads in place, passed to every layer's attention:
    a BlockMask per layer kind over the flat pool (see InPlaceAttention.layout)."""

    block_masks: BlockMask | dict[str, BlockMask]
    query_length: int
    flex: Callable[..., Any]  # flex_attention, compiled on CUDA
    pool_blocks: int  # the pool's first blocks the kernel sees (all of them where compiled)

    def attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,  # [b, heads, q, D]
        key: torch.Tensor,  # [num_blocks + 1, block_size, kv_heads, D]: the layer's pool
        value: torch.Tensor,
        extras: dict[str, Any],
    ) -> torch.Tensor:
        """[b, q, heads, D], as the model's own attention function returns."""
        present = [name for name in NOT_IN_PLACE if extras.get(name) is not None]
        if present:
            raise NotImplementedError(f"in-place attention does not apply {present}")
        b, heads, q, dim = query.shape
        kv_heads = key.shape[2]
        groups = heads // kv_heads
        # Grouped heads as extra query rows: head h reads K/V head h // groups (repeat_kv).
        grouped = query.reshape(b, kv_heads, groups * q, dim)  # row g * q + i: query i
        seen = slice(0, self.pool_blocks)
        pool_keys = key[seen].view(1, -1, kv_heads, dim).transpose(1, 2)  # [1, kv_heads, N, D]
        pool_values = value[seen].view(1, -1, kv_heads, dim).transpose(1, 2)
        sinks = extras.get("s_aux")  # [heads]: one more logit per head, with no value
        out = self.flex(
            grouped, pool_keys, pool_values, score_mod=_softcapped(extras.get("softcap")),
            block_mask=for_layer(self.block_masks, module), scale=extras.get("scaling"),
            return_aux=None if sinks is None else AuxRequest(lse=True),
        )  # fmt: skip  # [b, kv_heads, groups * q, D]
        if sinks is not None:
            out, aux = out
            # A sink joins the softmax's denominator: each weight shrinks by Z / (Z + e^sink),
            # Z = e^lse, i.e. sigmoid(lse - sink). Row g * q + i of K/V head k: head k*groups+g.
            sink = sinks.view(kv_heads, groups, 1).expand(kv_heads, groups, q)
            shrink = torch.sigmoid(aux.lse - sink.reshape(kv_heads, groups * q).float())
            out = out * shrink[..., None].to(out.dtype)  # a row that sees nothing: lse -inf, 0
        return out.reshape(b, heads, q, dim).transpose(1, 2).contiguous()


class InPlaceAttention:
    """Builds a step's PagedLayout from its rows' positions and block tables; holds the
    flex_attention it runs (compiled on CUDA)."""

    def __init__(
        self,
        pattern: AttentionPattern,
        *,
        num_blocks: int,  # in the pool, the spare block included
        block_size: int,
        spare_block: int,
        query_groups: int,  # query heads per K/V head
        device: torch.device,
    ) -> None:
        self._masks = LayerMasks(pattern, 1, torch.float32, device)  # pattern_map only
        self._pattern = pattern
        self._pool_blocks = num_blocks
        self._block_size = block_size
        self._spare = spare_block
        self._groups = query_groups
        self._logical = torch.arange(num_blocks, dtype=torch.int32, device=device)  # [P]
        self.flex = _flex_for(device)
        # The unfused reference computes scores over every pool position it is given. Blocks
        # are handed out lowest first and reused last-freed first, so the blocks in use sit at
        # the start of the pool: there it sees only up to the highest block a row reads (one
        # host sync a step, which the compiled kernel, in a CUDA graph, could not take).
        self._whole_pool = device.type == "cuda"

    def layout(self, positions: torch.Tensor, tables: torch.Tensor) -> PagedLayout:
        """positions [b, q] (each query's absolute position; a padding row: 0 with a table of
        spare blocks), tables [b, M] (logical block -> pool block, spare past the row's
        blocks). On CUDA only tensor work on the device: a CUDA graph captures it."""
        rows, width = tables.shape
        size = self._block_size
        seen = self._pool_blocks if self._whole_pool else int(tables.max()) + 1
        # physical_to_logical [b, P]: block p holds positions j*size.. of row b, or -1
        device = tables.device
        physical_to_logical = torch.full((rows, seen), -1, dtype=torch.int32, device=device)
        logical = self._logical[:width].expand(rows, width)  # [b, M]
        physical_to_logical.scatter_(1, tables, logical)
        physical_to_logical[:, self._spare] = -1  # padding columns: never attended
        first = positions.min(dim=1).values  # [b]
        last = positions.max(dim=1).values  # [b]
        q = positions.shape[1]

        def block_mask(rule: str) -> BlockMask:
            # The row's blocks that can hold a visible column, in logical order.
            start = torch.div(self._first_visible(rule, first), size, rounding_mode="floor")
            count = torch.div(last, size, rounding_mode="floor") + 1 - start  # [b]
            order = (start[:, None] + self._logical[None, :width]).clamp_(max=width - 1)
            # As wide as the pool, as torch's PagedAttention makes it: kernels may size their
            # view of the mask by it (inductor's CPU template asserts it covers the KV length).
            indices = torch.zeros((rows, max(seen, width)), dtype=torch.int32, device=device)
            indices[:, :width] = torch.gather(tables, 1, order.long())  # [b, P]
            return BlockMask.from_kv_blocks(
                count.to(torch.int32)[:, None, None],  # [b, 1, 1]
                indices[:, None, None, :],  # [b, 1, 1, P]
                BLOCK_SIZE=(QUERY_BLOCK, size),
                mask_mod=_paged_mask_mod(
                    self._pattern, rule, physical_to_logical, positions, size, q
                ),
                seq_lengths=(self._groups * q, seen * size),
                compute_q_blocks=False,  # the backward's tables: never used here
            )

        return PagedLayout(self._masks.pattern_map(block_mask), q, self.flex, seen)

    def _first_visible(self, rule: str, first: torch.Tensor) -> torch.Tensor:
        """[b]: the lowest column any of the row's queries may see (0 for full attention)."""
        pattern = self._pattern
        if rule == SLIDING and pattern.sliding_window is not None:
            return (first - pattern.sliding_window + 1).clamp_(min=0)
        if rule == CHUNKED and pattern.chunk_size is not None:
            return torch.div(first, pattern.chunk_size, rounding_mode="floor") * pattern.chunk_size
        return torch.zeros_like(first)


def _paged_mask_mod(
    pattern: AttentionPattern,
    rule: str,
    physical_to_logical: torch.Tensor,  # [b, P]
    positions: torch.Tensor,  # [b, q]
    block_size: int,
    query_length: int,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    def mask_mod(
        b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        logical_block = physical_to_logical[b, kv_idx // block_size]
        column = logical_block * block_size + kv_idx % block_size
        query = positions[b, q_idx % query_length]  # grouped rows g * q + i: query i
        return (logical_block >= 0) & visible(pattern, rule, column, query)

    return mask_mod


def _softcapped(cap: float | None) -> Callable[..., torch.Tensor] | None:
    """Gemma2's logit softcapping of the scaled scores (before the mask), or None."""
    if not cap:
        return None

    def score_mod(
        score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor
    ) -> torch.Tensor:
        return cap * torch.tanh(score / cap)

    return score_mod


def _flex_for(device: torch.device) -> Callable[..., Any]:
    """flex_attention compiled where a fused kernel exists (CUDA), else the eager reference."""
    if device.type == "cuda":
        return _compiled_flex()
    eager: Callable[..., Any] = flex_attention
    return eager


@functools.cache  # one per process, like torch's own compile caches: a runner built again
def _compiled_flex() -> Callable[..., Any]:  # (tests, benchmarks) reuses its kernels
    compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)

    def run(*args: Any, **kwargs: Any) -> Any:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return compiled(*args, **kwargs)

    return run


@dataclass(frozen=True)
class PagedAttentionReport:
    """Which path the decode step's attention takes over the KV blocks, and why."""

    requested: PagedAttentionMode
    path: PagedPath
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"requested": self.requested, "path": self.path, "reason": self.reason}

    def log(self) -> None:
        """The start-up log line; a warning when in_place was asked for and is not used."""
        level = logging.WARNING if self.requested == IN_PLACE != self.path else logging.INFO
        logger.log(level, "paged attention: %s (%s)", self.path, self.reason)
