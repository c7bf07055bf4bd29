"""GENERATE_PREFILL_CHUNK_TOKENS=auto: chunk limits measured at warm-up, used per position."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from batching.generation import chunk_sizing
from batching.generation.chunk_sizing import MAX_STALL, ChunkLimits, measure_chunk_limits
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
        chunk, end = len(chunks[0]), starts[0] + len(chunks[0])
        self.now_s += 0.010 + chunk * 2e-5 + chunk * end * 8e-8


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
    assert limits.mixed_step_ms[0] == {16: 10.65, 32: 11.3, 64: 12.59, 128: 15.18}
    assert limits.decode_step_ms == pytest.approx(10.0)
    assert limits.as_dict()["max_stall"] == MAX_STALL


def test_a_chunk_gets_the_limit_of_the_first_context_it_fits_under() -> None:
    limits = ChunkLimits((256, 512, 1024), (128, 64, 16))
    assert limits.chunk_at(0) == 128
    assert limits.chunk_at(128) == 128  # 128..255 ends by 256
    assert limits.chunk_at(129) == 64  # would end past 256: measured up to 512
    assert limits.chunk_at(500) == 16
    assert limits.chunk_at(2000) == 16  # beyond every context: the last limit
    assert ChunkLimits.fixed(256).chunk_at(5000) == 256


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
        self.now_s += 0.012 + len(chunks[0]) * 5e-6


def test_where_no_chunk_meets_the_stall_bound_chunks_grow_while_they_cost_little(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runner = GraphedRunner()
    monkeypatch.setattr(chunk_sizing.time, "perf_counter", lambda: runner.now_s)
    limits = measure_chunk_limits(runner, fallback=256)  # type: ignore[arg-type]
    # 16 tokens: 12.08 ms, 6x the decode step; up to 1.25x that (15.1 ms): 512 tokens take
    # 14.56 ms, 1,024 would take 17.12. At context 256 the chunk cannot pass the context.
    assert limits.chunks == (256, 512, 512, 512)


def test_with_mixed_steps_off_auto_times_a_prefill_and_a_decode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the engine runs then: the same bound, measured on the two forwards."""
    runner = ScriptedRunner()
    called: list[str] = []

    def prefill(tables: list[list[int]], chunks: list[list[int]], starts: list[int]) -> None:
        called.append("prefill")
        runner.now_s += 0.001 + len(chunks[0]) * 2e-5  # a decode step plus this: 1.1 + ...

    def no_mixed_step(*args: Any) -> None:
        raise AssertionError("mixed steps are off")

    runner.prefill, runner.mixed_step = prefill, no_mixed_step  # type: ignore[method-assign]
    monkeypatch.setattr(chunk_sizing.time, "perf_counter", lambda: runner.now_s)
    limits = measure_chunk_limits(runner, fallback=256, mixed=False)  # type: ignore[arg-type]
    assert "prefill" in called
    # 10 ms decode + 1 ms + 20 us per token within 15 ms: up to 200 tokens, so 128.
    assert limits.chunks == (128, 128, 128, 128)
