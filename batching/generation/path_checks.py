"""Warm-up checks of the engine's own paths against the model's own forward.

The engine replaces what a model would do by itself: it hands the model cache views and 4D masks
it built (model_runner.py, layer_masks.py), and in a mixed step it replaces the attention
function (mixed_attention.py). A model that does not follow the conventions those rely on may
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

import torch

from batching.generation.model_runner import ModelRunner
from batching.generation.model_support import CHUNKED, SLIDING, UnsupportedModelError, model_name

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
