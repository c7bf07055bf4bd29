"""GENERATE_PREFILL_CHUNK_TOKENS=auto: chunk limits measured at warm-up, used per position."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from batching.generation import chunk_sizing
from batching.generation.chunk_sizing import (
    DEFAULT_MAX_STALL_STEPS,
    MAX_STALL,
    ChunkLimits,
    measure_chunk_limits,
)
from batching.generation.sampling import SamplingParams
from tests.batching.conftest import WAIT_S, EngineFactory, MixedSteps
from tests.batching.test_engine_matches_generate import reference
from tests.batching.test_prefix_and_chunked_prefill import tokens


class ScriptedRunner:
    """Steps that take scripted times on a fake clock: a decode step 10 ms; a mixed step
    10 ms + 20 us per chunk token + 80 ns per chunk token per position it attends up to."""

    class _Cache:
        max_seq_len = 1024

    max_rows = 4

    class _Device:
        type = "cpu"

    def __init__(self) -> None:
        self.cache, self.device, self.now_s = self._Cache(), self._Device(), 0.0

    def decode_step(self, *args: Any) -> None:
        self.now_s += 0.010

    def scratch_tables(self, rows: int, tokens: int) -> list[list[int]]:
        return [[1]] * rows

    def mixed_step(self, tokens, lengths, tables, riders, row, chunks, starts) -> None:  # type: ignore[no-untyped-def]
        self.now_s += 0.010
        for chunk, start in zip(chunks, starts, strict=True):
            self.now_s += len(chunk) * 2e-5 + len(chunk) * (start + len(chunk)) * 8e-8


def test_auto_keeps_per_context_the_largest_chunk_within_the_stall_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runner = ScriptedRunner()
    monkeypatch.setattr(chunk_sizing.time, "perf_counter", lambda: runner.now_s)
    limits = measure_chunk_limits(runner, fallback=256)  # type: ignore[arg-type]
    assert limits.contexts == (256, 512, 768, 1024)
    # The bound is 15 ms, 5 ms for the chunk: at context 256, 64 tokens cost 1.28 + 1.31 ms
    # and 128 cost 2.56 + 2.62; at 768, 64 tokens cost 1.28 + 3.93 ms, so 32 is kept.
    assert limits.chunks == (64, 64, 32, 32)
    # While requests wait the bound is 4 decode steps, 30 ms for the chunk: at context 1,024,
    # 256 tokens cost 5.12 + 20.97 ms and 512 would cost 10.24 + 41.94.
    assert limits.busy_chunks == (256, 256, 256, 256)
    # A burst as short prompts over the 3 free rows: 512 tokens (3 x 171) cost 17.3 ms, 1,024
    # would cost 48.6.
    assert limits.admit_tokens == 512
    assert limits.mixed_step_ms[0] == {16: 10.65, 32: 11.3, 64: 12.59, 128: 15.18, 256: 20.36}
    assert limits.decode_step_ms == pytest.approx(10.0)
    assert limits.as_dict()["smooth_stall_steps"] == MAX_STALL
    assert limits.as_dict()["max_stall_steps"] == DEFAULT_MAX_STALL_STEPS


def test_a_stall_bound_below_the_smooth_one_bounds_every_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runner = ScriptedRunner()
    monkeypatch.setattr(chunk_sizing.time, "perf_counter", lambda: runner.now_s)
    limits = measure_chunk_limits(runner, fallback=256, max_stall_steps=1.2)  # type: ignore[arg-type]
    # 2 ms for the chunk: 64 tokens cost 1.28 + 1.31 ms at context 256, 32 cost 0.64 + 0.66.
    assert limits.chunks == limits.busy_chunks == (32, 32, 16, 16)
    assert limits.admit_tokens == 64  # 2 rows of 32: 2 x (0.64 + 0.08) ms


def test_a_chunk_gets_the_limit_of_the_first_context_it_fits_under() -> None:
    limits = ChunkLimits((256, 512, 1024), (128, 64, 16))
    assert limits.chunk_at(0) == 128
    assert limits.chunk_at(128) == 128  # 128..255 ends by 256
    assert limits.chunk_at(129) == 64  # would end past 256: measured up to 512
    assert limits.chunk_at(500) == 16
    assert limits.chunk_at(2000) == 16  # beyond every context: the last limit
    assert ChunkLimits.fixed(256).chunk_at(5000) == 256
    busy = ChunkLimits((256, 512), (64, 16), busy_chunks=(256, 64))
    assert busy.chunk_at(0, busy=True) == 256 and busy.chunk_at(100, busy=True) == 64
    assert busy.admit_tokens == 64  # none measured: the first limit


def test_one_slot_keeps_the_fallback_nothing_decodes_beside_a_prefill(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(num_slots=1, prefill_chunk_tokens="auto", warm_up=True)
    assert engine.prefill_chunk_limits == ChunkLimits.fixed(256)


async def test_auto_measures_at_warm_up_and_chunked_output_still_equals_generate(
    make_engine: EngineFactory, tiny_llama: Any
) -> None:
    engine = make_engine(
        num_slots=3, max_seq_len=128, prefill_chunk_tokens="auto", kv_bucket_min=16,
        warm_up=True,
    )  # fmt: skip
    limits = engine.prefill_chunk_limits
    assert limits.as_dict()["measured"] is True
    assert limits.contexts == (32, 64, 96, 128)
    assert all(16 <= c <= n for c, n in zip(limits.chunks, limits.contexts, strict=True))
    mixed = MixedSteps(engine)
    stream = await engine.submit(tokens(5, seed=30), SamplingParams(40, ignore_eos=True))
    await anext(stream)
    prompt = tokens(100, seed=31)
    result = await asyncio.wait_for((await engine.submit(prompt, SamplingParams(8))).wait(), WAIT_S)
    assert list(result.token_ids) == reference(tiny_llama, prompt, 8)
    assert mixed.count >= 100 // limits.largest  # prefilled in chunks inside decode steps


class GraphedRunner(ScriptedRunner):
    """A GPU-like machine: the decode step replays a graph in 2 ms, a mixed step runs eagerly
    in 12 ms + 5 us per chunk token."""

    def decode_step(self, *args: Any) -> None:
        self.now_s += 0.002

    def mixed_step(self, tokens, lengths, tables, riders, row, chunks, starts) -> None:  # type: ignore[no-untyped-def]
        self.now_s += 0.012 + sum(map(len, chunks)) * 5e-6


def test_where_no_chunk_meets_the_stall_bound_chunks_grow_while_they_cost_little(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runner = GraphedRunner()
    monkeypatch.setattr(chunk_sizing.time, "perf_counter", lambda: runner.now_s)
    limits = measure_chunk_limits(runner, fallback=256)  # type: ignore[arg-type]
    # 16 tokens: 12.08 ms, 6x the decode step; up to 1.25x that (15.1 ms): 512 tokens take
    # 14.56 ms, 1,024 would take 17.12. At context 256 the chunk cannot pass the context.
    assert limits.chunks == (256, 512, 512, 512)
    # Both bounds are out of reach there, so admission is not throttled below that either:
    # a burst rides as far as a single chunk does.
    assert limits.busy_chunks == limits.chunks and limits.admit_tokens == 512


def test_with_mixed_steps_off_auto_times_a_prefill_and_a_decode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the engine runs then: the same bound, measured on the two forwards."""
    runner = ScriptedRunner()
    called: list[str] = []

    def prefill(tables: list[list[int]], chunks: list[list[int]], starts: list[int]) -> None:
        called.append("prefill")
        runner.now_s += 0.001 + sum(map(len, chunks)) * 2e-5  # a decode step plus: 1.1 + ...

    def no_mixed_step(*args: Any) -> None:
        raise AssertionError("mixed steps are off")

    runner.prefill, runner.mixed_step = prefill, no_mixed_step  # type: ignore[method-assign]
    monkeypatch.setattr(chunk_sizing.time, "perf_counter", lambda: runner.now_s)
    limits = measure_chunk_limits(runner, fallback=256, mixed=False)  # type: ignore[arg-type]
    assert "prefill" in called
    # 10 ms decode + 1 ms + 20 us per token within 15 ms: up to 200 tokens, so 128.
    assert limits.chunks == (128, 128, 128, 128)


class PrefillRows:
    """The prompt tokens each mixed step of an engine prefilled, one list per step."""

    def __init__(self, engine: Any) -> None:
        self.steps: list[list[int]] = []
        runner = engine._runner
        original = runner.mixed_step

        def recorded(tokens, lengths, tables, riders, row, chunks, starts):  # type: ignore[no-untyped-def]
            self.steps.append([len(chunk) for chunk in chunks])
            return original(tokens, lengths, tables, riders, row, chunks, starts)

        runner.mixed_step = recorded


# Measured limits, set by hand: 16-token chunks while nobody waits, 32 while someone does, and
# up to 64 padded prompt tokens of waiting requests admitted together.
LIMITS = ChunkLimits((128,), (16,), busy_chunks=(32,), admit_tokens=64)


async def start_stream(engine: Any) -> Any:
    """A stream that decodes while the test runs: every prefill then rides in its steps."""
    stream = await engine.submit(tokens(5, seed=40), SamplingParams(80, ignore_eos=True))
    await anext(stream)
    return stream


async def test_a_burst_of_short_prompts_is_admitted_together_while_a_long_one_is_chunked(
    make_engine: EngineFactory, gated_llama: Any
) -> None:
    model, gate = gated_llama
    engine = make_engine(
        model=model, num_slots=12, max_seq_len=128, prefill_chunk_tokens=LIMITS,
        kv_bucket_min=16,
    )  # fmt: skip
    rows = PrefillRows(engine)
    stream = await start_stream(engine)
    gate.close()
    await gate.wait_until_entered()  # the engine is held in a step: the burst arrives at once
    burst = [tokens(8, seed=41 + i) for i in range(10)]
    handles = [await engine.submit(prompt, SamplingParams(4)) for prompt in burst]
    gate.open()
    for prompt, handle in zip(burst, handles, strict=True):
        result = await asyncio.wait_for(handle.wait(), WAIT_S)
        assert list(result.token_ids) == reference(model, prompt, 4)
    # 64 padded tokens a step: 8 of the 10 prompts in one mixed step, the other 2 in the next.
    assert rows.steps == [[8] * 8, [8] * 2]
    await asyncio.wait_for(stream.wait(), WAIT_S)
    rows.steps.clear()
    stream = await start_stream(engine)
    gate.close()
    await gate.wait_until_entered()  # so the stream has most of its tokens left to decode
    long_prompt = tokens(100, seed=60)
    handle = await engine.submit(long_prompt, SamplingParams(4))
    gate.open()
    result = await asyncio.wait_for(handle.wait(), WAIT_S)
    assert list(result.token_ids) == reference(model, long_prompt, 4)
    assert rows.steps == [[16]] * 6 + [[4]]  # nobody waits: the smooth chunks
    await asyncio.wait_for(stream.wait(), WAIT_S)


async def test_short_prompts_behind_a_long_one_join_its_first_chunk(
    make_engine: EngineFactory, gated_llama: Any
) -> None:
    model, gate = gated_llama
    engine = make_engine(
        model=model, num_slots=4, max_seq_len=128, prefill_chunk_tokens=LIMITS,
        kv_bucket_min=16,
    )  # fmt: skip
    rows = PrefillRows(engine)
    stream = await start_stream(engine)
    gate.close()
    await gate.wait_until_entered()
    prompts = [tokens(100, seed=61), tokens(6, seed=62), tokens(7, seed=63)]
    handles = [await engine.submit(prompt, SamplingParams(4)) for prompt in prompts]
    gate.open()
    for prompt, handle in zip(prompts, handles, strict=True):
        result = await asyncio.wait_for(handle.wait(), WAIT_S)
        assert list(result.token_ids) == reference(model, prompt, 4)
    # Two short ones wait behind it: they join its first chunk (13 of the 64 padded tokens
    # leave it 32 x 51/64 = 25), then nobody waits: the smooth chunks.
    assert rows.steps == [[25, 6, 7], [16], [16], [16], [16], [11]]
    await asyncio.wait_for(stream.wait(), WAIT_S)
