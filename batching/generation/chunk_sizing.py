"""How many prompt tokens a step may prefill while streams decode: `ChunkLimits`, fixed by
GENERATE_PREFILL_CHUNK_TOKENS or, with `auto`, measured on this machine at warm-up.

While streams decode, a step's prefill runs in the same forward as their decode (a mixed
step), so during a long prefill the streams' gap is one mixed step. What that costs depends on
the hardware and on how far into its prompt the chunk is. On a GPU a decode step is bound by
reading the weights, and a chunk of a few hundred tokens rides in it almost for free. On a CPU
every token is compute, and so is attention over the prompt so far: on the 2-core box, next to
a 21 ms decode step of 16 rows, a 64-token chunk made the step 36 ms at the start of a prompt
and 70 ms at position 1,400. No fixed chunk is right everywhere.

`measure_chunk_limits` times, over all slots but one decoding, mixed steps with a chunk of 16,
32, 64, ... tokens in the last slot ending at a quarter, half, three quarters and all of the
context, each right after a decode step of the same rows, a few pairs each. For each of those
contexts it keeps the largest chunk whose mixed step took at most MAX_STALL decode steps (the
median of the pairs' ratios: other load on the machine, such as other servers starting, slows
both steps of a pair alike, where it would shift absolute timings). A chunk size that was too
slow at one context is not tried at longer ones (attention only costs more there). The
decode rows are all slots but one, so the bound holds for a full batch; with fewer streams a
decode step is cheaper and the same chunk costs it somewhat more decode steps. With
GENERATE_MIXED_STEPS=false the same is measured for what the engine then runs: a prefill
forward, then the decode.

Where even the smallest chunk's step takes longer than that, shrinking chunks cannot keep the
bound and only costs prefill throughput: on a GPU the decode step replays a CUDA graph while a
mixed step runs eagerly, so its launch overhead alone can be several decode steps. There a
chunk may make the step at most CHUNK_GROWTH times the smallest chunk's step, which keeps the
streams' pause near that unavoidable floor while each step prefills as much as it costs
nothing extra to.
A larger chunk would only give a long prompt its first token sooner; a smaller one spends more
steps on it. At run time a chunk starting at position `start` gets the limit of the first
context it fits under (`chunk_at`): a limit measured with the chunk ending there, where it
costs the most.
"""

from __future__ import annotations

import bisect
import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from batching.generation.model_runner import ModelRunner

MAX_STALL = 1.5  # a mixed step may take this many decode steps
CHUNK_GROWTH = 1.25  # ... or, where the smallest chunk's step is longer, this times that step
SMALLEST_CHUNK, LARGEST_CHUNK = 16, 2048
PAIRS = 3  # (decode, mixed) timings per chunk size
STREAM_CONTEXT = 128  # the decoding rows' length while measuring (short: a conservative base)


@dataclass(frozen=True)
class ChunkLimits:
    """chunks[i]: the most prompt tokens a step prefills when they end by contexts[i]."""

    contexts: tuple[int, ...]
    chunks: tuple[int, ...]
    decode_step_ms: float | None = None  # what the limits were measured against (auto)
    mixed_step_ms: tuple[dict[int, float], ...] = ()  # per context: chunk size -> ms

    @classmethod
    def fixed(cls, tokens: int) -> ChunkLimits:
        return cls((0,), (tokens,))

    @property
    def largest(self) -> int:
        return max(self.chunks)

    def chunk_at(self, start: int) -> int:
        """The limit for a chunk starting at `start`: that of the first measured context the
        chunk fits under, else the last one's."""
        first = bisect.bisect_left(self.contexts, start)
        for context, chunk in zip(self.contexts[first:], self.chunks[first:], strict=True):
            if start + chunk <= context:
                return chunk
        return self.chunks[-1]

    def as_dict(self) -> dict[str, object]:
        measured = self.decode_step_ms is not None
        return {
            "measured": measured,
            "by_context": dict(zip(self.contexts, self.chunks, strict=True)) if measured else {},
            "decode_step_ms": None
            if self.decode_step_ms is None
            else round(self.decode_step_ms, 2),
            "max_stall": MAX_STALL if measured else None,
            "chunk_growth": CHUNK_GROWTH if measured else None,
        }


def measure_chunk_limits(runner: ModelRunner, fallback: int, mixed: bool = True) -> ChunkLimits:
    """Time decode steps against steps that also prefill a chunk over the runner's slots
    (warm-up only: it writes K/V to them): mixed steps, or with `mixed` off what the engine
    then runs, a prefill forward followed by the decode. With one slot nothing ever decodes
    beside a prefill: `fallback` is kept."""
    slots, seq_len = runner.max_rows, runner.cache.max_seq_len
    if slots < 2 or seq_len < SMALLEST_CHUNK:
        return ChunkLimits.fixed(fallback)
    # Rows 0..slots-2 decode; the last row is the one being prefilled.
    lengths = [min(STREAM_CONTEXT, seq_len - 1)] * slots
    tokens, riders = [1] * slots, {slots - 1}
    tables = runner.scratch_tables(slots, seq_len)
    decode = functools.partial(runner.decode_step, tokens, lengths, tables, riders)
    contexts = sorted({max(SMALLEST_CHUNK, seq_len * q // 4) for q in (1, 2, 3, 4)})
    chunks, timings, decode_s = [], [], []
    cap = LARGEST_CHUNK  # a chunk too slow at some context is as slow further on: never retried
    for context in contexts:
        chosen, chunk, measured, bound = SMALLEST_CHUNK, SMALLEST_CHUNK, {}, MAX_STALL
        while chunk <= min(cap, context):
            step = functools.partial(
                _mixed_step if mixed else _separate_steps,
                runner, tokens, lengths, tables, riders, [[1] * chunk], [context - chunk],
            )  # fmt: skip
            pairs = _time_pairs(runner, decode, step)
            decode_s += [d for d, _ in pairs]
            measured[chunk] = round(min(m for _, m in pairs) * 1000, 2)
            stall = statistics.median(m / d for d, m in pairs)  # in decode steps
            if chunk == SMALLEST_CHUNK and stall > MAX_STALL:
                bound = CHUNK_GROWTH * stall  # the bound is out of reach: see the docstring
            if stall > bound:
                cap = chosen
                break
            chosen, chunk = chunk, chunk * 2
        chunks.append(chosen)
        timings.append(measured)
    return ChunkLimits(tuple(contexts), tuple(chunks), min(decode_s) * 1000, tuple(timings))


def _mixed_step(
    runner: ModelRunner, tokens: list[int], lengths: list[int], tables: list[list[int]],
    riders: set[int], chunks: list[list[int]], starts: list[int],
) -> None:  # fmt: skip
    runner.mixed_step(tokens, lengths, tables, riders, len(tokens) - 1, chunks, starts)


def _separate_steps(
    runner: ModelRunner, tokens: list[int], lengths: list[int], tables: list[list[int]],
    riders: set[int], chunks: list[list[int]], starts: list[int],
) -> None:  # fmt: skip
    runner.prefill(tables[-1:], chunks, starts)
    runner.decode_step(tokens, lengths, tables, riders)


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
