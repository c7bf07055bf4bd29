"""Slots, cancellation, seeded sampling and metrics hooks of the running engine."""

from __future__ import annotations

import asyncio

import torch
from transformers import LlamaForCausalLM

from batching.generation.sampling import SamplingParams
from tests.batching.conftest import (
    VOCAB_SIZE,
    WAIT_S,
    EngineFactory,
    Gate,
    RecordingObserver,
)


def random_prompt(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB_SIZE, (length,), generator=generator).tolist()


async def test_slots_never_exceed_num_slots_and_are_all_free_afterwards(
    make_engine: EngineFactory,
) -> None:
    observer = RecordingObserver()
    engine = make_engine(num_slots=3, observer=observer)
    params = [SamplingParams(max_new_tokens=4 + 3 * i, ignore_eos=True) for i in range(10)]
    handles = [await engine.submit(random_prompt(5 + i, i), p) for i, p in enumerate(params)]
    results = await asyncio.wait_for(asyncio.gather(*(h.wait() for h in handles)), WAIT_S)
    assert [r.completion_tokens for r in results] == [p.max_new_tokens for p in params]
    assert all(r.finish_reason == "length" for r in results)
    assert max(observer.steps) == 3
    assert (engine.slots_in_use, engine.waiting_requests, engine.kv_cache_usage_ratio) == (0, 0, 0)


async def test_cancel_frees_the_slot_within_one_step(make_engine: EngineFactory) -> None:
    observer = RecordingObserver()
    engine = make_engine(num_slots=2, observer=observer)
    handle = await engine.submit(random_prompt(6, 0), SamplingParams(80, ignore_eos=True))
    await anext(handle)
    steps_before = len(observer.steps)
    handle.cancel()
    result = await asyncio.wait_for(handle.wait(), WAIT_S)
    assert result.finish_reason == "cancelled"
    assert len(observer.steps) - steps_before <= 1  # the step in flight, then it is gone
    assert result.completion_tokens < 80
    assert engine.slots_in_use == 0
    assert observer.finished[-1][0] == "cancelled"


async def test_a_cancelled_waiting_request_costs_no_compute(
    gated_llama: tuple[LlamaForCausalLM, Gate], make_engine: EngineFactory
) -> None:
    model, gate = gated_llama
    observer = RecordingObserver()
    engine = make_engine(model=model, num_slots=1, observer=observer)
    gate.close()
    running = await engine.submit(random_prompt(4, 1), SamplingParams(5, ignore_eos=True))
    await gate.wait_until_entered()
    waiting = await engine.submit(random_prompt(4, 2), SamplingParams(5))
    waiting.cancel()
    gate.open()
    result = await asyncio.wait_for(waiting.wait(), WAIT_S)
    assert (result.finish_reason, result.completion_tokens, result.timings.ttft_ms) == (
        "cancelled",
        0,
        None,
    )
    assert (await running.wait()).finish_reason == "length"
    assert len(observer.ttfts_s) == 1  # only the running request was ever prefilled


async def test_a_finished_slot_is_reused_in_the_next_step(make_engine: EngineFactory) -> None:
    observer = RecordingObserver()
    engine = make_engine(num_slots=1, observer=observer)
    first = await engine.submit(random_prompt(3, 3), SamplingParams(3, ignore_eos=True))
    second = await engine.submit(random_prompt(3, 4), SamplingParams(3, ignore_eos=True))
    await asyncio.wait_for(asyncio.gather(first.wait(), second.wait()), WAIT_S)
    # Each request: its first token comes from prefill, the other two from decode steps.
    assert observer.steps == [1, 1, 1, 1]


async def test_a_seeded_request_samples_the_same_alone_and_in_a_crowd(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(num_slots=16, max_seq_len=64)
    seeded = SamplingParams(24, temperature=0.9, top_p=0.95, top_k=50, seed=7, ignore_eos=True)
    prompt = random_prompt(9, 5)
    alone = await (await engine.submit(prompt, seeded)).wait()

    crowd = []
    for i in range(15):
        params = SamplingParams(
            10 + i, temperature=0.0 if i % 3 == 0 else 1.0 + i / 10, seed=None if i % 2 else i
        )
        crowd.append(await engine.submit(random_prompt(2 + i, 100 + i), params))
        if i == 7:
            mine = await engine.submit(prompt, seeded)
    results = await asyncio.wait_for(
        asyncio.gather(mine.wait(), *(h.wait() for h in crowd)), WAIT_S
    )
    assert results[0].token_ids == alone.token_ids
    assert len(alone.token_ids) == 24


async def test_observer_sees_ttft_gaps_and_finish_reasons(make_engine: EngineFactory) -> None:
    observer = RecordingObserver()
    engine = make_engine(num_slots=2, observer=observer)
    handles = [
        await engine.submit(random_prompt(4, i), SamplingParams(6, ignore_eos=True))
        for i in range(3)
    ]
    await asyncio.wait_for(asyncio.gather(*(h.wait() for h in handles)), WAIT_S)
    assert len(observer.ttfts_s) == 3
    assert len(observer.gaps_s) == 3 * 5  # every token after the first has a gap
    assert [(reason, p, n) for reason, p, n, _ in observer.finished] == [("length", 4, 6)] * 3
    assert all(e2e > 0 for *_, e2e in observer.finished)


async def test_result_reports_counts_text_and_timings(make_engine: EngineFactory) -> None:
    engine = make_engine()
    handle = await engine.submit(random_prompt(5, 9), SamplingParams(8, ignore_eos=True))
    deltas = [delta async for delta in handle]
    result = handle.result
    assert (result.prompt_tokens, result.completion_tokens) == (5, 8)
    assert "".join(d.text for d in deltas) == result.text
    assert tuple(t for d in deltas for t in d.token_ids) == result.token_ids
    timings = result.timings
    assert timings.ttft_ms is not None
    assert 0 <= timings.queue_ms <= timings.ttft_ms <= timings.total_ms
