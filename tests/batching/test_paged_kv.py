"""Paged KV memory: greedy output still equals generate() token for token when sequences cross
block boundaries, when the pool is so small that sequences are preempted and resumed, when
requests share one cached prefix's blocks, and when a 4,000-token prompt is served beside
short streams."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from tiny_models import decoder_config
from transformers import LlamaForCausalLM

from batching.generation import model_runner
from batching.generation.handle import GenerationHandle
from batching.generation.sampling import SamplingParams
from tests.batching.conftest import (
    EOS_ID,
    TEST_DEVICE,
    TEST_DTYPE,
    VOCAB_SIZE,
    WAIT_S,
    EngineFactory,
    MixedSteps,
    RecordingObserver,
    build_tiny_llama,
    paged_runner,
    row_tables,
)
from tests.batching.test_engine_matches_generate import reference


def tokens(count: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB_SIZE, (count,), generator=generator).tolist()


async def streamed(handle: GenerationHandle) -> tuple[list[int], Any]:
    """Every token id the stream delivered, in order, and the final result."""
    ids: list[int] = []
    async for delta in handle:
        ids += delta.token_ids
    return ids, await asyncio.wait_for(handle.wait(), WAIT_S)


@pytest.mark.parametrize("block_size", [4, 16])
async def test_sequences_crossing_block_boundaries_equal_generate(
    block_size: int, tiny_llama: LlamaForCausalLM, make_engine: EngineFactory
) -> None:
    engine = make_engine(num_slots=3, max_seq_len=96, kv_block_size=block_size, warm_up=True)
    lengths = [block_size - 1, block_size, block_size + 1, 2 * block_size + 3, 1]
    prompts = [tokens(n, seed=n) for n in lengths]
    handles = [await engine.submit(p, SamplingParams(2 * block_size + 5)) for p in prompts]
    for prompt, handle in zip(prompts, handles, strict=True):
        result = await asyncio.wait_for(handle.wait(), WAIT_S)
        assert list(result.token_ids) == reference(tiny_llama, prompt, 2 * block_size + 5)
    assert engine.kv_blocks_used == 0  # every block went back at the end


async def test_choices_share_the_prompt_blocks_and_copy_only_a_partial_last_one(
    tiny_llama: LlamaForCausalLM, make_engine: EngineFactory
) -> None:
    engine = make_engine(num_slots=4, max_seq_len=96, kv_block_size=4)
    prompt = tokens(10, seed=3)  # 2 whole blocks shared, a partial third copied per choice
    handles = await engine.submit_choices(prompt, [SamplingParams(12, ignore_eos=True)] * 3)
    results = [await asyncio.wait_for(h.wait(), WAIT_S) for h in handles]
    expected = reference(tiny_llama, prompt, 12)
    assert all(list(r.token_ids) == expected for r in results)


async def test_a_pool_too_small_for_every_stream_preempts_and_every_output_stays_equal(
    tiny_llama: LlamaForCausalLM, make_engine: EngineFactory
) -> None:
    """6 requests of up to 60 tokens in a pool of 8 blocks x 16 = 128 positions: they cannot
    all hold their tokens at once, so some are preempted and resumed; each still gets exactly
    the tokens of generate(), streamed once each, and one answer."""
    observer = RecordingObserver()
    engine = make_engine(
        num_slots=6, max_seq_len=96, kv_cache_blocks=8, prefix_cache_tokens=1,
        observer=observer, kv_bucket_min=16,
    )  # fmt: skip
    prompts = [tokens(14 + 3 * i, seed=30 + i) for i in range(6)]
    new_tokens = 40
    handles = [
        await engine.submit(p, SamplingParams(new_tokens, ignore_eos=True), priority=i % 2)
        for i, p in enumerate(prompts)
    ]
    outcomes = await asyncio.gather(*(streamed(h) for h in handles))
    assert observer.preemptions > 0 and engine.preemptions_total == observer.preemptions
    for prompt, (ids, result) in zip(prompts, outcomes, strict=True):
        expected = reference_ignoring_eos(tiny_llama, prompt, new_tokens)
        assert ids == list(result.token_ids) == expected  # no token repeated or lost
    assert len(observer.finished) == len(prompts)  # one answer each
    assert engine.kv_blocks_used == 0


async def test_a_seeded_request_gives_the_same_tokens_when_it_is_preempted(
    make_engine: EngineFactory,
) -> None:
    params = SamplingParams(40, temperature=0.9, top_k=50, seed=77, ignore_eos=True)
    roomy = make_engine(num_slots=6, max_seq_len=96, kv_bucket_min=16)
    alone = await (await roomy.submit(tokens(20, seed=40), params)).wait()
    tight = make_engine(num_slots=6, max_seq_len=96, kv_cache_blocks=8, kv_bucket_min=16)
    others = [
        await tight.submit(tokens(18, seed=41 + i), SamplingParams(40, ignore_eos=True))
        for i in range(4)
    ]
    # The least urgent request: the first to be preempted when the pool runs short.
    seeded = await tight.submit(tokens(20, seed=40), params, priority=5)
    result = await asyncio.wait_for(seeded.wait(), WAIT_S)
    await asyncio.gather(*(asyncio.wait_for(h.wait(), WAIT_S) for h in others))
    assert tight.preemptions_total > 0
    assert result.token_ids == alone.token_ids


async def test_concurrent_requests_on_one_cached_prefix_hold_its_blocks_once(
    make_engine: EngineFactory,
) -> None:
    model = build_tiny_llama()
    engine = make_engine(
        model=model, num_slots=8, max_seq_len=96, prefix_cache_tokens=1, kv_bucket_min=16
    )
    prefix = tokens(64, seed=50)  # 4 whole blocks
    first = await engine.submit(prefix + tokens(5, seed=51), SamplingParams(8))
    await asyncio.wait_for(first.wait(), WAIT_S)
    assert engine.kv_blocks_cached == 4 and engine.kv_blocks_used == 0
    seen: list[tuple[int, int]] = []  # (rows, blocks in use) before each forward

    def record(module: object, args: object) -> None:
        seen.append((engine.slots_in_use, engine.kv_blocks_used))

    hook = model.register_forward_pre_hook(record)
    try:
        prompts = [prefix + tokens(5, seed=60 + i) for i in range(8)]
        handles = [await engine.submit(p, SamplingParams(8, ignore_eos=True)) for p in prompts]
        results = [await asyncio.wait_for(h.wait(), WAIT_S) for h in handles]
    finally:
        hook.remove()
    assert all(r.cached_tokens == 64 for r in results)
    # 64 + 5 prompt tokens + 8 new ones: 5 blocks each unshared (40); shared, the 4 prefix
    # blocks count once and each request holds its own fifth block: 12.
    assert max(used for rows, used in seen if rows == 8) == 4 + 8
    for prompt, result in zip(prompts, results, strict=True):
        assert list(result.token_ids) == reference_ignoring_eos(model, prompt, 8)


def long_context_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = decoder_config(
        "llama",
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=EOS_ID,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).to(TEST_DEVICE, TEST_DTYPE).eval()


async def test_a_4000_token_prompt_is_served_while_short_requests_run(
    make_engine: EngineFactory,
) -> None:
    model = long_context_llama()
    observer = RecordingObserver()
    engine = make_engine(
        model=model, num_slots=4, max_seq_len=4096, kv_cache_blocks=4 * 4096 // 16,
        prefill_chunk_tokens=512, observer=observer,
    )  # fmt: skip
    mixed = MixedSteps(engine)
    shorts = [tokens(6 + i, seed=70 + i) for i in range(3)]
    short_handles = [await engine.submit(p, SamplingParams(48, ignore_eos=True)) for p in shorts]
    await anext(aiter(short_handles[0]))  # the streams are decoding
    long_prompt = tokens(4000, seed=80)
    long_handle = await engine.submit(long_prompt, SamplingParams(6, ignore_eos=True))
    long_result = await asyncio.wait_for(long_handle.wait(), 6 * WAIT_S)
    short_results = [await asyncio.wait_for(h.wait(), WAIT_S) for h in short_handles]
    assert list(long_result.token_ids) == reference_ignoring_eos(model, long_prompt, 6)
    for prompt, result in zip(shorts, short_results, strict=True):
        assert list(result.token_ids) == reference_ignoring_eos(model, prompt, 48)
    assert observer.prefill_chunks and max(observer.prefill_chunks) >= 8  # chunked
    assert mixed.count > 0  # some chunks ran in the streams' decode forward


def test_a_decode_step_with_one_long_row_among_short_ones_gives_the_logits_of_one_step(
    tiny_llama: LlamaForCausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU such a step is decoded as two (short rows, the long row), so the short rows do
    not gather and attend over the long row's length; the logits must not change."""
    prompts = [tokens(80, seed=90), *(tokens(4, seed=91 + i) for i in range(3))]
    logits = {}
    for share in (0.0, model_runner.SPLIT_DECODE_SHARE):  # 0.0: never split
        monkeypatch.setattr(model_runner, "SPLIT_DECODE_SHARE", share)
        runner = paged_runner(tiny_llama, 4, 96)
        tables = row_tables(runner)
        lengths = [len(p) for p in prompts]
        split = runner._length_groups(lengths, ())
        assert (split is not None) == (share > 0 and runner.device.type == "cpu")
        with torch.inference_mode():
            runner.prefill(tables, prompts)
            step = runner.decode_step([p[-1] for p in prompts], lengths, tables)
        logits[share] = step.clone()
    whole, apart = logits.values()
    torch.testing.assert_close(apart, whole, rtol=1e-4, atol=1e-4)


def reference_ignoring_eos(model: Any, prompt: list[int], new_tokens: int) -> list[int]:
    """generate() on this prompt alone, running past EOS like ignore_eos."""
    with torch.inference_mode():
        output = model.generate(
            torch.tensor([prompt], device=model.device),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    return output[0, len(prompt) :].tolist()  # type: ignore[no-any-return]
