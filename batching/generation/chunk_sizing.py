"""How many prompt tokens a step may prefill while streams decode: `ChunkLimits`, fixed by
GENERATE_PREFILL_CHUNK_TOKENS or, with `auto`, measured on this machine at warm-up against the
stall bound GENERATE_MAX_STALL_STEPS.

While streams decode, a step's prefill runs in the same forward as their decode (a mixed
step), so during a prefill the streams' gap is one mixed step. What that costs depends on
the hardware and on how far into its prompt the chunk is. On a GPU a decode step is bound by
reading the weights, and a chunk of a few hundred tokens rides in it almost for free. On a CPU
every token is compute, and so is attention over the prompt so far: on the 2-core box, next to
a 21 ms decode step of 16 rows, a 64-token chunk made the step 36 ms at the start of a prompt
and 70 ms at position 1,400. No fixed chunk is right everywhere.

Two limits follow from one stall bound (a mixed step may take at most `max_stall_steps`
decode steps of a full batch), and which one a step uses depends on the queue:

* Requests wait: throughput wins within the bound. `admit_tokens` is the most prompt tokens
  of short waiting prompts (padded) admitted together in one step, so a burst starts decoding
  at prefill speed; `busy_chunks` is the chunk of a long prompt while others wait behind it.
* Nobody waits: smoothness wins. A long prompt is prefilled in `chunks` whose step takes at
  most MAX_STALL decode steps (or the bound, if lower): it costs the streams a series of short
  pauses, and a bigger chunk would only give that one prompt its first token sooner.

`measure_chunk_limits` times, over all slots but one decoding, mixed steps with a chunk of 16,
32, 64, ... tokens in the last slot ending at a quarter, half, three quarters and all of the
context, each right after a decode step of the same rows, a few pairs each. For each of those
contexts it keeps the largest chunk whose mixed step stayed within each bound (the median of
the pairs' ratios: other load on the machine, such as other servers starting, slows both
steps of a pair alike, where it would shift absolute timings). A chunk size that was too slow
at one context is not tried at longer ones (attention only costs more there). `admit_tokens`
is measured the same way with 16, 32, 64, ... tokens spread as short prompts over the free
rows. The decode rows are all slots but the prefilling ones, so the bound holds for a full
batch; with fewer streams a decode step is cheaper and the same chunk costs it somewhat more
decode steps. With GENERATE_MIXED_STEPS=false the same is measured for what the engine then
runs: a prefill forward, then the decode.

Where even the smallest chunk's step takes longer than a bound, shrinking chunks cannot keep
it and only costs prefill throughput: on a GPU the decode step replays a CUDA graph while a
mixed step runs eagerly, so its launch overhead alone can be several decode steps. There a
chunk may make the step at most CHUNK_GROWTH times the smallest chunk's step, which keeps the
streams' pause near that unavoidable floor while each step prefills as much as it costs
nothing extra to (so on a GPU admission is not throttled: hundreds of tokens ride free).
At run time a chunk starting at position `start` gets the limit of the first
context it fits under (`chunk_at`): a limit measured with the chunk ending there, where it
costs the most.
"""

from __future__ import annotations

import bisect
import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from batching.generation.model_runner import ModelRunner

MAX_STALL = 1.5  # nobody waits: a mixed step may take this many decode steps
DEFAULT_MAX_STALL_STEPS = 4.0  # requests wait: ... this many (GENERATE_MAX_STALL_STEPS)
CHUNK_GROWTH = 1.25  # ... or, where the smallest chunk's step is longer, this times that step
SMALLEST_CHUNK, LARGEST_CHUNK = 16, 2048
SHORT_PROMPT = 32  # admit_tokens is measured as prompts of this many tokens, one per row
PAIRS = 3  # (decode, mixed) timings per chunk size
STREAM_CONTEXT = 128  # the decoding rows' length while measuring (short: a conservative base)


@dataclass(frozen=True)
class ChunkLimits:
    """chunks[i]: the most prompt tokens a step prefills when they end by contexts[i] and
    nobody waits; busy_chunks[i]: the same while requests wait (() = chunks); admit_tokens:
    the padded prompt tokens of waiting requests admitted together in one step (0 = chunks[0])."""

    contexts: tuple[int, ...]
    chunks: tuple[int, ...]
    busy_chunks: tuple[int, ...] = ()
    admit_tokens: int = 0
    max_stall_steps: float | None = None  # the bound they were measured against (auto)
    decode_step_ms: float | None = None  # what the limits were measured against (auto)
    mixed_step_ms: tuple[dict[int, float], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not self.busy_chunks:
            object.__setattr__(self, "busy_chunks", self.chunks)
        if not self.admit_tokens:
            object.__setattr__(self, "admit_tokens", self.chunks[0])

    @classmethod
    def fixed(cls, tokens: int) -> ChunkLimits:
        """One number for every case (GENERATE_PREFILL_CHUNK_TOKENS=<n>)."""
        return cls((0,), (tokens,))

    @property
    def largest(self) -> int:
        return max(*self.chunks, *self.busy_chunks, self.admit_tokens)

    def chunk_at(self, start: int, busy: bool = False) -> int:
        """The limit for a chunk starting at `start`: that of the first measured context the
        chunk fits under, else the last one's; `busy`: while requests wait."""
        limits = self.busy_chunks if busy else self.chunks
        first = bisect.bisect_left(self.contexts, start)
        for context, chunk in zip(self.contexts[first:], limits[first:], strict=True):
            if start + chunk <= context:
                return chunk
        return limits[-1]

    def as_dict(self) -> dict[str, object]:
        measured = self.decode_step_ms is not None
        return {
            "measured": measured,
            "by_context": dict(zip(self.contexts, self.chunks, strict=True)) if measured else {},
            "busy_by_context": dict(zip(self.contexts, self.busy_chunks, strict=True))
            if measured
            else {},
            "admit_tokens": self.admit_tokens,
            "decode_step_ms": None
            if self.decode_step_ms is None
            else round(self.decode_step_ms, 2),
            "max_stall_steps": self.max_stall_steps,
            "smooth_stall_steps": None
            if self.max_stall_steps is None
            else min(MAX_STALL, self.max_stall_steps),
            "chunk_growth": CHUNK_GROWTH if measured else None,
        }


def measure_chunk_limits(
    runner: ModelRunner,
    fallback: int,
    mixed: bool = True,
    max_stall_steps: float = DEFAULT_MAX_STALL_STEPS,
) -> ChunkLimits:
    """Time decode steps against steps that also prefill over the runner's slots (warm-up
    only: it writes K/V to them): mixed steps, or with `mixed` off what the engine then runs,
    a prefill forward followed by the decode. With one slot nothing ever decodes beside a
    prefill: `fallback` is kept."""
    slots, seq_len = runner.max_rows, runner.cache.max_seq_len
    if slots < 2 or seq_len < SMALLEST_CHUNK:
        return ChunkLimits.fixed(fallback)
    bounds = (min(MAX_STALL, max_stall_steps), max_stall_steps)  # nobody waits, requests wait
    decode_s: list[float] = []
    step = functools.partial(_stall, runner, mixed, decode_s)
    contexts = sorted({max(SMALLEST_CHUNK, seq_len * q // 4) for q in (1, 2, 3, 4)})
    per_context: list[list[int]] = []
    timings = []
    caps = [LARGEST_CHUNK] * len(bounds)  # a chunk too slow at some context is as slow further
    for context in contexts:
        measured: dict[int, float] = {}
        sizes = _doubling(min(max(caps), context))
        chosen, over = _largest_within(
            sizes, functools.partial(_chunk_stall, step, context, measured), bounds
        )
        chosen = [min(c, cap) for c, cap in zip(chosen, caps, strict=True)]
        caps = [c if o else cap for c, o, cap in zip(chosen, over, caps, strict=True)]
        per_context.append(chosen)
        timings.append(measured)
    # Short prompts, one per row, in the last rows: what a burst admitted together costs.
    bursts = [n for n in _doubling(LARGEST_CHUNK) if _burst(n, slots)[1] <= seq_len]
    (admit,), _ = _largest_within(
        bursts, functools.partial(_burst_stall, step, slots), bounds[1:]
    )  # fmt: skip
    smooth = tuple(c[0] for c in per_context)
    busy = tuple(max(c) for c in per_context)  # a floor-grown smooth bound may pass the other
    return ChunkLimits(
        tuple(contexts),
        smooth,
        busy,
        max(admit, busy[0]),
        max_stall_steps,
        min(decode_s) * 1000,
        tuple(timings),
    )


def _doubling(largest: int) -> list[int]:
    """SMALLEST_CHUNK, twice that, ... up to `largest`."""
    steps = max(0, int(math.log2(max(largest, SMALLEST_CHUNK) / SMALLEST_CHUNK)))
    return [SMALLEST_CHUNK << i for i in range(steps + 1)]


def _burst(tokens: int, slots: int) -> tuple[int, int]:
    """(rows, tokens per row) for `tokens` prompt tokens as short prompts in free rows."""
    rows = min(slots - 1, math.ceil(tokens / SHORT_PROMPT))
    return rows, math.ceil(tokens / rows)


StepStall = Callable[[list[list[int]], list[int], dict[int, float]], float]


def _chunk_stall(step: StepStall, context: int, measured: dict[int, float], tokens: int) -> float:
    """One chunk of `tokens` ending at `context`."""
    return step([[1] * tokens], [context - tokens], measured)


def _burst_stall(step: StepStall, slots: int, tokens: int) -> float:
    """`tokens` as short prompts, one per free row."""
    rows, each = _burst(tokens, slots)
    return step([[1] * each] * rows, [0] * rows, {})


def _largest_within(
    sizes: Sequence[int], stall_of: Callable[[int], float], bounds: Sequence[float]
) -> tuple[list[int], list[bool]]:
    """For each bound, the largest of `sizes` (increasing) whose stall stays within it (the
    first size at least), and whether a size went over it. A bound the first size already
    exceeds becomes CHUNK_GROWTH times that size's stall (see the module docstring)."""
    chosen, over = [sizes[0]] * len(bounds), [False] * len(bounds)
    limits = list(bounds)
    for size in sizes:
        stall = stall_of(size)
        if size == sizes[0]:
            limits = [CHUNK_GROWTH * stall if stall > b else b for b in limits]
        for i, limit in enumerate(limits):
            if not over[i]:
                over[i] = stall > limit
                chosen[i] = chosen[i] if over[i] else size
        if all(over):
            break
    return chosen, over


def _stall(
    runner: ModelRunner,
    mixed: bool,
    decode_s: list[float],
    chunks: list[list[int]],
    starts: list[int],
    measured: dict[int, float],
) -> float:
    """A step prefilling `chunks` in the last rows while the others decode, in decode steps
    of the same rows (median of PAIRS pairs); records its fastest ms in `measured`."""
    slots = runner.max_rows
    lengths = [min(STREAM_CONTEXT, runner.cache.max_seq_len - 1)] * slots
    tokens, first_slot = [1] * slots, slots - len(chunks)
    riders = set(range(first_slot, slots))
    tables = runner.scratch_tables(slots, runner.cache.max_seq_len)
    decode = functools.partial(runner.decode_step, tokens, lengths, tables, riders)
    step: Callable[[], object] = (
        functools.partial(
            runner.mixed_step, tokens, lengths, tables, riders, first_slot, chunks, starts
        )
        if mixed
        else functools.partial(_separate_steps, runner, tables[first_slot:], chunks, starts, decode)
    )
    pairs = _time_pairs(runner, decode, step)
    decode_s.extend(d for d, _ in pairs)
    measured[sum(map(len, chunks))] = round(min(m for _, m in pairs) * 1000, 2)
    return statistics.median(m / d for d, m in pairs)


def _separate_steps(
    runner: ModelRunner,
    tables: list[list[int]],
    chunks: list[list[int]],
    starts: list[int],
    decode: Callable[[], object],
) -> None:
    runner.prefill(tables, chunks, starts)
    decode()


def _time_pairs(
    runner: ModelRunner, decode: Callable[[], object], mixed: Callable[[], object]
) -> list[tuple[float, float]]:
    """(decode step seconds, mixed step seconds), PAIRS times, one right after the other."""
    mixed()  # the first run of a shape pays for allocations
    return [(_seconds(runner, decode), _seconds(runner, mixed)) for _ in range(PAIRS)]


def _seconds(runner: ModelRunner, step: Callable[[], object]) -> float:
    started = time.perf_counter()
    step()
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)  # the step's kernels are queued, not done
    return time.perf_counter() - started
