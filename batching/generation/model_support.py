"""Which decoder models the engine serves, and how, read from the model's config at start-up.

The engine drives a model through its public forward with its own cache views and 4D masks
(model_runner.py). That is exact for attention-only decoders whose attention reads a 4D additive
mask, whatever mix of full, sliding-window and chunked layers they have (attention.py builds a
mask per layer type). It cannot be exact for:

* hybrid models with linear-attention, recurrent (SSM) or convolution layers: those keep a
  state per sequence that the KV slots have no place for;
* multi-head latent attention (DeepSeek MLA): K and V have different head sizes, the slots one;
* ALiBi models (Bloom, MPT, Falcon with alibi): they build their position biases from a 2D
  padding mask, and the engine passes per-row 4D masks;
* GPT-Neo above its local window: its local layers cut their window out of a fixed mask by the
  batch's padded KV length, not by each row's own position.

Those are refused here with a reason a user can act on (`UnsupportedModelError`), before any
step runs; everything else is still checked against the model's own forward at warm-up (the
path checks, below), so a model this file does not know cannot be served silently wrong.

The path checks: the engine's own paths against the model's own forward, at warm-up.

The engine replaces what a model would do by itself: it hands the model cache views and 4D masks
it built (model_runner.py, attention.py), and in a mixed step it replaces the attention
function (attention.py). A model that does not follow the conventions those rely on may
not raise at all: its attention can broadcast a mask it ignores, or slice a window its own way,
and produce wrong tokens silently. So before serving, the engine runs probe rows through each
path and compares the logits with one plain forward of the model over the same tokens, where
the model builds its own masks and keeps its own cache:

* `check_prefill_and_decode`: a two-row left-padded prefill, a continuation chunk (what a
  chunked prefill or a prefix-cache hit does) and decode steps of two rows at different
  lengths (replaying CUDA graphs where they were captured). A difference here means the model
  cannot be served: UnsupportedModelError.
* `check_mixed_step`: two mixed steps (a fresh chunk, then a continuation chunk, both beside a
  decoding row). A difference turns mixed steps off; the model is served without them.

The probe is long enough to cross every sliding window and attention chunk twice where the
block pool allows (two rows side by side, up to MAX_PROBE_TOKENS), so the per-layer-type masks
are checked too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # model_runner.py imports this module; the checks only drive a runner
    from batching.generation.model_runner import ModelRunner

FULL = "full_attention"
SLIDING = "sliding_attention"
CHUNKED = "chunked_attention"
ATTENTION_KINDS = (FULL, SLIDING, CHUNKED)

# model_type -> what its non-attention layers are, for the refusal message.
HYBRID_MODEL_TYPES = {
    "mamba": "Mamba (state-space) layers",
    "mamba2": "Mamba-2 (state-space) layers",
    "falcon_mamba": "Mamba (state-space) layers",
    "jamba": "Mamba (state-space) layers",
    "falcon_h1": "Mamba-2 (state-space) layers",
    "bamba": "Mamba-2 (state-space) layers",
    "zamba": "Mamba (state-space) layers",
    "zamba2": "Mamba-2 (state-space) layers",
    "granitemoehybrid": "Mamba-2 (state-space) layers",
    "nemotron_h": "Mamba-2 (state-space) layers",
    "qwen3_next": "linear-attention (Gated DeltaNet) layers",
    "lfm2": "short-convolution layers",
    "lfm2_moe": "short-convolution layers",
    "recurrent_gemma": "recurrent (RG-LRU) layers",
    "rwkv": "RWKV recurrent layers",
    "xlstm": "xLSTM recurrent layers",
}
ALIBI_MODEL_TYPES = ("bloom", "mpt")
HYBRID_ADVICE = (
    "the engine's KV slots have no place for the per-sequence state such layers carry; "
    "serve an attention-only model"
)


class UnsupportedModelError(ValueError):
    """The engine cannot serve this model exactly; the message says why and what to do."""


@dataclass(frozen=True)
class AttentionPattern:
    """Each layer's attention kind (FULL, SLIDING, CHUNKED) and the sizes they use."""

    layer_types: tuple[str, ...]
    sliding_window: int | None = None  # SLIDING: a query sees the last `sliding_window` tokens
    chunk_size: int | None = None  # CHUNKED: a query sees its own chunk of `chunk_size` tokens

    @property
    def names(self) -> tuple[str, ...]:
        """The distinct layer types as the config names them, in layer order."""
        return tuple(dict.fromkeys(self.layer_types))

    def rule(self, layer_type: str) -> str:
        """How a layer of this type attends: SLIDING or CHUNKED where the config gives the
        size (a sliding layer with no window attends to everything), else FULL."""
        if layer_type == SLIDING and self.sliding_window is not None:
            return SLIDING
        if layer_type == CHUNKED and self.chunk_size is not None:
            return CHUNKED
        return FULL

    @property
    def windowed(self) -> bool:
        """Whether any layer sees less than the whole past."""
        return any(self.rule(name) != FULL for name in self.names)

    def describe(self) -> str:
        """For logs and /info: "full", "sliding 4096 + full", "chunked 8192 + full"..."""
        parts = []
        for rule in dict.fromkeys(self.rule(name) for name in self.names):
            size = {SLIDING: self.sliding_window, CHUNKED: self.chunk_size}.get(rule)
            parts.append(rule.removesuffix("_attention") + (f" {size}" if size else ""))
        return " + ".join(parts)


def _positive(value: object) -> int | None:
    """A window or chunk size: 0, None, False or anything not a positive int means none."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def attention_pattern(config: Any) -> AttentionPattern:
    """Read the layers' attention kinds from any of the spellings transformers configs use:
    `layer_types`, `sliding_window` (0 or None: none; ignored when `use_sliding_window` is
    false, as Qwen2-MoE sets 0 then), `attention_chunk_size` (Llama-4). (GPT-Neo's
    `window_size` is read by refusal_reason.)"""
    config = text_config(config)
    use_sliding = getattr(config, "use_sliding_window", True) is not False
    window = _positive(getattr(config, "sliding_window", None)) if use_sliding else None
    chunk = _positive(getattr(config, "attention_chunk_size", None))
    layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "num_layers", 0))
    declared = getattr(config, "layer_types", None)
    if declared:
        types = tuple(str(t) for t in declared)
    elif window is not None:
        types = (SLIDING,) * layers  # Mistral, Mixtral, Phi-3, Starcoder2: every layer slides
    elif chunk is not None:
        types = (CHUNKED,) * layers
    else:
        # GPT-Neo's local layers too: it applies their window itself (refusal_reason says when
        # that is wrong), so the engine's mask for them is the full causal one.
        types = (FULL,) * layers
    return AttentionPattern(types, window, chunk)


def refusal_reason(config: Any, max_seq_len: int, name: str | None = None) -> str | None:
    """Why the engine cannot serve a model of this config exactly, or None. One sentence that
    names the architecture (`name`, else the config's), the cause and what to do."""
    name = name or _architecture(config)
    config = text_config(config)
    model_type = str(getattr(config, "model_type", "unknown"))
    if model_type in HYBRID_MODEL_TYPES:
        return f"{name} has {HYBRID_MODEL_TYPES[model_type]}, not only attention: {HYBRID_ADVICE}"
    # layer_types (Qwen3-Next, LFM2...) or layers_block_type (Jamba, Zamba...) naming layers
    # other than attention, in a model this file does not know yet
    declared = [
        *(getattr(config, "layer_types", None) or ()),
        *(getattr(config, "layers_block_type", None) or ()),
    ]
    other = sorted({str(t) for t in declared} - {*ATTENTION_KINDS, "attention"})
    if other:
        return f"{name} has {', '.join(other)} layers, not only attention: {HYBRID_ADVICE}"
    if getattr(config, "kv_lora_rank", None):
        key = getattr(config, "qk_head_dim", None) or (
            (getattr(config, "qk_nope_head_dim", 0) or 0)
            + (getattr(config, "qk_rope_head_dim", 0) or 0)
        )
        return (
            f"{name} uses multi-head latent attention (MLA): its K and V have different head "
            f"sizes ({key} and {getattr(config, 'v_head_dim', '?')}), and the engine's KV "
            "slots store both at one size; serve a model with standard attention"
        )
    attn_config = getattr(config, "attn_config", None)
    if (
        model_type in ALIBI_MODEL_TYPES
        or getattr(config, "alibi", False) is True
        or getattr(attn_config, "alibi", False) is True
    ):
        return (
            f"{name} adds ALiBi position biases, which it builds from a 2D padding mask; the "
            "engine passes per-row 4D masks, so the biases would be wrong: serve a model with "
            "rotary or learned positions"
        )
    rope_limit = _batch_dependent_rope(config)
    if rope_limit is not None and max_seq_len > rope_limit[1]:
        kind, limit = rope_limit
        return (
            f"{name} uses {kind} RoPE scaling, whose frequencies change once the longest "
            f"sequence in a batch passes {limit} tokens, so a row's output would depend on its "
            f"neighbours: set GENERATE_MAX_SEQ_LEN to at most {limit} (it is {max_seq_len})"
        )
    if model_type == "gpt_neo" and "local" in (getattr(config, "attention_layers", None) or ()):
        window = _positive(getattr(config, "window_size", None))
        if window is not None and max_seq_len > window:
            return (
                f"{name}'s local attention layers take their {window}-token window from the "
                "batch's padded length, not each row's position: set GENERATE_MAX_SEQ_LEN to "
                f"at most {window} (it is {max_seq_len})"
            )
    return None


def _batch_dependent_rope(config: Any) -> tuple[str, int] | None:
    """("dynamic" or "longrope", the length past which transformers rescales the rotary
    frequencies from the largest position in the forward), or None."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(rope, dict):
        return None
    per_layer_type = [p for p in rope.values() if isinstance(p, dict)]
    for params in per_layer_type or [rope]:
        kind = str(params.get("rope_type") or params.get("type") or "")
        if "dynamic" in kind or kind == "longrope":
            original = params.get("original_max_position_embeddings")
            limit = original if kind == "longrope" and original else config.max_position_embeddings
            return kind, int(limit)
    return None


def check_supported(model: Any, max_seq_len: int) -> AttentionPattern:
    """The model's attention pattern, or UnsupportedModelError with the reason."""
    reason = refusal_reason(model.config, max_seq_len, model_name(model))
    if reason is not None:
        raise UnsupportedModelError(reason)
    return attention_pattern(model.config)


def cache_kv_heads(config: Any) -> int:
    """K/V heads per layer as the model writes them to its cache. Falcon's own spelling:
    the new decoder architecture caches K/V repeated to every query head, multi-query one."""
    config = text_config(config)
    if config.model_type == "falcon":
        if config.new_decoder_architecture:
            return int(config.num_attention_heads)
        return 1 if config.multi_query else int(config.num_kv_heads)
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def model_name(model: Any) -> str:
    """The architecture a user knows the model by (its config's, else its class's)."""
    architectures = getattr(model.config, "architectures", None) or []
    return str(architectures[0]) if architectures else type(model).__name__


def mixed_steps_unavailable(model: Any) -> str | None:
    """Why a mixed step (attention.py) cannot be used with this model, or None.

    A mixed step replaces the model's attention function through transformers'
    AttentionInterface; a model whose attention does not go through it (GPT-J, CodeGen,
    GPT-Neo, Falcon, StableLM...) would run its own attention over the whole cache instead,
    and transformers only warns about it.
    """
    if not getattr(model, "_supports_attention_backend", False):
        return (
            f"{model_name(model)}'s attention does not go through transformers' "
            "AttentionInterface, so a mixed step cannot split it"
        )
    return None


def _architecture(config: Any) -> str:
    architectures = getattr(config, "architectures", None) or []
    return str(architectures[0]) if architectures else str(getattr(config, "model_type", "?"))


def model_context(model: torch.nn.Module) -> int:
    """The longest sequence the model supports: its position embeddings. A sliding window
    does not shorten it: the runner masks each layer type itself (attention.py), so a
    sliding-window model serves its full context."""
    return config_context(model.config)


def config_context(config: Any) -> int:
    """model_context from the config alone (to refuse a model before its weights load)."""
    text = config.get_text_config()
    return int(getattr(text, "max_position_embeddings", None) or 2048)


# ---- the path checks, at warm-up ----

MAX_PROBE_TOKENS = 512  # bounds the reference forward at warm-up for models with huge windows
DECODE_STEPS = 4
# Largest |difference| allowed, relative to the largest |logit| (at least 1). fp32 forwards of
# the same tokens differ in summation order only (~1e-6); a wrong mask moves logits by far more.
# Half precision and quantized matmuls round per kernel and per batch shape, so they get more
# (a false refusal would stop a good model from serving at all); a wrong mask past a window
# still moves logits by more than that.
FP32_TOLERANCE = 1e-3
LOW_PRECISION_TOLERANCE = 1e-1


@dataclass(frozen=True)
class Probe:
    """Probe tokens and the model's own logits for them: reference[p] follows tokens[: p + 1]."""

    tokens: list[int]
    reference: torch.Tensor  # [L, V] float32
    tolerance: float


def make_probe(runner: ModelRunner) -> Probe:
    length = probe_length(runner)
    vocab = int(runner.model.get_input_embeddings().num_embeddings)  # type: ignore[operator]
    tokens = [(37 * i + 11) % vocab for i in range(length)]  # varied, deterministic
    with torch.inference_mode():
        output = runner.model(  # the model's own masks and cache: what generate() runs
            input_ids=torch.tensor([tokens], device=runner.device), use_cache=False
        )
    reference = output.logits[0].float()  # [L, V]
    quantized = bool(getattr(runner.model, "is_quantized", False))
    exact = runner.dtype == torch.float32 and not quantized
    return Probe(tokens, reference, FP32_TOLERANCE if exact else LOW_PRECISION_TOLERANCE)


def probe_length(runner: ModelRunner) -> int:
    """Twice the largest window or chunk plus some, else 24; within the context and two
    rows' share of the block pool."""
    pattern = runner.masks.pattern
    rules = {pattern.rule(name) for name in pattern.names}
    sizes = [
        size
        for rule, size in ((SLIDING, pattern.sliding_window), (CHUNKED, pattern.chunk_size))
        if rule in rules and size is not None
    ]
    wanted = 2 * max(sizes) + 2 * DECODE_STEPS if sizes else 24
    # Two probe rows must fit the block pool side by side (blocks of their own, scratch_tables).
    two_rows = max(1, runner.cache.num_blocks // 2) * runner.cache.block_size
    return min(wanted, runner.cache.max_seq_len, MAX_PROBE_TOKENS, two_rows)


def _probe_rows(runner: ModelRunner, length: int) -> int:
    """2 where the batch and the block pool hold two probe rows apart, else 1."""
    blocks_per_row = -(-length // runner.cache.block_size)
    fits = runner.cache.num_blocks >= 2 * blocks_per_row
    return 2 if runner.max_rows >= 2 and fits else 1


def check_prefill_and_decode(runner: ModelRunner, probe: Probe) -> None:
    """Raise UnsupportedModelError if the engine's prefill or decode logits differ from the
    model's own forward (or fail). Writes scratch blocks (scratch_tables): call before serving."""
    tokens, length = probe.tokens, len(probe.tokens)
    decode_from = max(2, length - DECODE_STEPS)
    first = max(1, decode_from // 2)  # the first chunk; the second continues it
    short = max(1, first // 2)  # a second, shorter row (left padding, rows of two lengths)
    rows = _probe_rows(runner, length)
    tables = runner.scratch_tables(rows, length)
    compare = _comparer(probe)
    try:
        logits = runner.prefill(tables, [tokens[:first], tokens[:short]][:rows])
        problem = compare("a prefill", [first - 1, short - 1][:rows], logits)
        if problem is None and decode_from > first:
            logits = runner.prefill(tables[:1], [tokens[first:decode_from]], starts=[first])
            problem = compare("a continued (chunked) prefill", [decode_from - 1], logits)
        for step, position in enumerate(range(decode_from, length)):
            if problem is not None:
                break
            # Row 1 stays shorter than row 0: a model that takes every row to end at the
            # batch's KV length (GPT-Neo's local layers) shows here.
            positions = [position, short + step][:rows]
            logits = runner.decode_step([tokens[p] for p in positions], positions, tables)
            problem = compare("a decode step", positions, logits)
    except Exception as exc:
        problem = f"the engine's forward failed on this model: {exc!r}"
    if problem is not None:
        raise UnsupportedModelError(
            f"{model_name(runner.model)} cannot be served exactly by this engine: {problem}"
        )


def check_mixed_step(runner: ModelRunner, probe: Probe) -> str | None:
    """Why mixed steps give different logits from the model's own forward (or fail), or None.
    Needs two rows; writes scratch blocks (scratch_tables)."""
    tokens = probe.tokens
    if _probe_rows(runner, len(tokens)) < 2:
        return "the batch or the KV block pool is too small to check a mixed step at warm-up"
    tables = runner.scratch_tables(2, len(tokens))
    decoded = max(2, len(tokens) - 2)  # row 0 decodes at positions decoded, decoded + 1
    chunk = max(1, decoded // 2)  # row 1 prefills tokens[:chunk], then tokens[chunk:decoded]
    compare = _comparer(probe)
    try:
        runner.prefill(tables[:1], [tokens[:decoded]])
        decode, prefill = runner.mixed_step(
            [tokens[decoded], 0], [decoded, 0], tables, {1}, 1, [tokens[:chunk]], [0]
        )
        problem = compare("a mixed step", [decoded], decode[:1]) or compare(
            "a mixed step's prefill", [chunk - 1], prefill
        )
        if problem is None and decoded > chunk:
            decode, prefill = runner.mixed_step(
                [tokens[decoded + 1], 0], [decoded + 1, chunk], tables, {1}, 1,
                [tokens[chunk:decoded]], [chunk],
            )  # fmt: skip
            problem = compare("a mixed step", [decoded + 1], decode[:1]) or compare(
                "a mixed step's continued prefill", [decoded - 1], prefill
            )
    except Exception as exc:
        return f"a mixed step fails on this model: {exc!r}"
    return problem


def _comparer(probe: Probe) -> Callable[[str, list[int], torch.Tensor], str | None]:
    def compare(path: str, positions: list[int], logits: torch.Tensor) -> str | None:
        """logits [rows, V]: row r should equal the reference at positions[r]."""
        want = probe.reference[positions]  # [rows, V]
        got = logits[: len(positions)].float()
        scale = max(1.0, float(want.abs().max()))
        difference = float((got - want).abs().max())
        if difference <= probe.tolerance * scale:
            return None
        return (
            f"{path}'s logits differ from the model's own forward (max |diff| "
            f"{difference:.3g}, largest |logit| {scale:.3g}, at position {max(positions)})"
        )

    return compare
