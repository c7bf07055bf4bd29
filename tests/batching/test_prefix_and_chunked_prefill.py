"""Prefill that continues a sequence: prefix-cache hits and chunked prefill change nothing in
the output, token for token, and leave nothing half-written behind."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator

import pytest
import torch
from transformers import PreTrainedModel

from batching.errors import ModelExecutionError, QueueTimeoutError
from batching.generation.config import DEFAULT_KV_BLOCK_SIZE as PREFIX_BLOCK_TOKENS
from batching.generation.sampling import SamplingParams
from tests.batching.conftest import (
    VOCAB_SIZE,
    WAIT_S,
    EngineFactory,
    MixedSteps,
    RecordingObserver,
    build_tiny_llama,
)
from tests.batching.test_engine_matches_generate import reference, tiny_qwen2

MAX_SEQ_LEN = 128


def tokens(count: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB_SIZE, (count,), generator=generator).tolist()


async def generate_all(engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """One after another, so each prompt can hit what the ones before it cached."""
    outputs = []
    for prompt in prompts:
        handle = await engine.submit(prompt, SamplingParams(new_tokens))
        outputs.append(list((await asyncio.wait_for(handle.wait(), WAIT_S)).token_ids))
    return outputs


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("shape", ["llama", "qwen2"])
async def test_greedy_output_with_prefix_hits_equals_generate(
    shape: str, attn_implementation: str, make_engine: EngineFactory
) -> None:
    model: PreTrainedModel = (
        build_tiny_llama(attn_implementation) if shape == "llama" else tiny_qwen2()
    )
    if shape == "qwen2":
        model.config._attn_implementation = attn_implementation
    observer = RecordingObserver()
    engine = make_engine(
        model=model,
        num_slots=2,  # fewer slots than prompts: hits land in reused slots
        max_seq_len=MAX_SEQ_LEN,
        prefix_cache_tokens=512,
        observer=observer,
        kv_bucket_min=16,
    )
    system = tokens(2 * PREFIX_BLOCK_TOKENS + 5, seed=1)  # 37 tokens: 2 whole blocks + 5
    prompts = [
        system + tokens(7, seed=2),  # a miss: fills the cache
        system + tokens(3, seed=3),  # hit of 32 (block-aligned)
        system[:PREFIX_BLOCK_TOKENS] + tokens(9, seed=4),  # hit of 16
        system + tokens(7, seed=2),  # the same prompt again: hit of 32 + its own tail block
        system[: 2 * PREFIX_BLOCK_TOKENS],  # the whole prompt is cached: hit leaves 1 token
    ]
    outputs = await generate_all(engine, prompts, new_tokens=12)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output == reference(model, prompt, 12)
    hits = [hit for _, hit in observer.prefix_queries]
    assert hits == [0, 32, 16, 32, 16]
    assert engine.slots_in_use == 0


async def test_a_prompt_prefilled_in_chunks_equals_generate(make_engine: EngineFactory) -> None:
    model = build_tiny_llama()
    observer = RecordingObserver()
    engine = make_engine(
        model=model, num_slots=3, max_seq_len=MAX_SEQ_LEN, prefill_chunk_tokens=16,
        observer=observer, kv_bucket_min=16,
    )  # fmt: skip
    mixed = MixedSteps(engine)
    runner_up = await engine.submit(tokens(5, seed=5), SamplingParams(40, ignore_eos=True))
    await anext(runner_up)  # a stream is decoding, so the long prompt is chunked
    long_prompts = [tokens(70, seed=6), tokens(41, seed=7)]
    handles = [await engine.submit(p, SamplingParams(10)) for p in long_prompts]
    for prompt, handle in zip(long_prompts, handles, strict=True):
        result = await asyncio.wait_for(handle.wait(), WAIT_S)
        assert list(result.token_ids) == reference(model, prompt, 10)
    assert sorted(observer.prefill_chunks) == [3, 5]  # ceil(41 / 16), ceil(70 / 16)
    assert mixed.count == 8  # every chunk ran in the stream's decode forward
    assert (await runner_up.wait()).completion_tokens == 40


async def test_a_seeded_sampled_request_is_the_same_with_or_without_its_prefix_cached(
    make_engine: EngineFactory,
) -> None:
    prompt = tokens(3 * PREFIX_BLOCK_TOKENS + 2, seed=8)
    params = SamplingParams(16, temperature=0.9, top_k=40, seed=1234, ignore_eos=True)
    cached = make_engine(max_seq_len=MAX_SEQ_LEN, prefix_cache_tokens=256, kv_bucket_min=16)
    plain = make_engine(max_seq_len=MAX_SEQ_LEN, prefill_chunk_tokens=16, kv_bucket_min=16)
    miss = await (await cached.submit(prompt, params)).wait()
    hit = await (await cached.submit(prompt, params)).wait()
    chunked = await (await plain.submit(prompt, params)).wait()
    assert hit.cached_tokens == 48 and miss.cached_tokens == 0
    assert hit.token_ids == miss.token_ids == chunked.token_ids


async def test_eviction_drops_the_least_recently_used_prefix_when_blocks_are_needed(
    make_engine: EngineFactory,
) -> None:
    model = build_tiny_llama()
    observer = RecordingObserver()
    engine = make_engine(  # a pool of 5 blocks: a request takes 3, a cached prefix keeps 2
        model=model, max_seq_len=MAX_SEQ_LEN, prefix_cache_tokens=1, kv_cache_blocks=5,
        observer=observer, kv_bucket_min=16,
    )  # fmt: skip
    kv_bytes = engine.kv_cache_bytes
    a, b, c = (tokens(2 * PREFIX_BLOCK_TOKENS + 1, seed=s) for s in (10, 11, 12))
    outputs = await generate_all(engine, [a, b, a, c, b, a], new_tokens=6)
    # a's and b's prefixes stay in free blocks; a hits and becomes the more recent; so c,
    # needing blocks, evicts b, not a; b then misses and evicts a, which misses at the end.
    hits = [hit for _, hit in observer.prefix_queries]
    assert hits == [0, 0, 32, 0, 0, 0]
    assert engine.kv_blocks_cached == 4 and engine.kv_blocks_used == 0
    assert engine.kv_cache_bytes == kv_bytes  # preallocated, never grows
    for prompt, output in zip([a, b, a, c, b, a], outputs, strict=True):
        assert output == reference(model, prompt, 6)  # misses after eviction are correct


@contextlib.contextmanager
def forward_pre_hook(model: PreTrainedModel, hook: Callable[..., None]) -> Iterator[None]:
    """`hook(module, args, kwargs)` runs before each of the model's forwards, inside the block."""
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class ChunkTrap:
    """Holds the engine inside its `nth` forward of more than one token (a prefill, a prefill
    chunk or a mixed step) until released; optionally makes that forward and the next one (a
    failed mixed step is run again as a prefill and a decode) raise."""

    def __init__(self, model: PreTrainedModel, nth: int, fail: bool = False) -> None:
        self.seen, self.nth, self.fail = 0, nth, fail
        self.entered, self.release = threading.Event(), threading.Event()
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: object, args: object, kwargs: dict) -> None:
        if kwargs["input_ids"].shape[1] == 1:
            return  # a decode step
        self.seen += 1
        if self.fail and self.seen == self.nth + 1:
            raise RuntimeError("injected failure in the prefill run again after a mixed step")
        if self.seen != self.nth:
            return
        self.entered.set()
        if not self.release.wait(WAIT_S):
            raise RuntimeError("the test never released the trap")
        if self.fail:
            raise RuntimeError("injected failure in a prefill chunk")

    async def wait_until_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, WAIT_S)

    def remove(self) -> None:
        self.release.set()
        self._handle.remove()


@pytest.mark.parametrize("outcome", ["cancelled", "failed"])
async def test_a_chunked_prefill_cancelled_or_failed_midway_frees_its_slot_and_caches_nothing(
    outcome: str, make_engine: EngineFactory
) -> None:
    model = build_tiny_llama()
    engine = make_engine(
        model=model, num_slots=2, max_seq_len=MAX_SEQ_LEN, prefill_chunk_tokens=16,
        prefix_cache_tokens=512, kv_bucket_min=16,
    )  # fmt: skip
    # Forward 1 prefills the stream; 2 and 3 are the long prompt's first two chunks of five,
    # each in a mixed step with the stream's decode. A prompt whose chunk fails there and
    # again on its own (forward 4) fails alone; the stream goes on.
    trap = ChunkTrap(model, nth=3, fail=outcome == "failed")
    mixed = MixedSteps(engine)
    try:
        stream = await engine.submit(tokens(4, seed=13), SamplingParams(60, ignore_eos=True))
        await anext(stream)
        long_prompt = tokens(80, seed=14)
        doomed = await engine.submit(long_prompt, SamplingParams(4))
        await trap.wait_until_entered()
        assert mixed.count == 2  # the trapped forward is the second chunk's mixed step
        if outcome == "cancelled":
            doomed.cancel()
        trap.release.set()
        if outcome == "cancelled":
            assert (await asyncio.wait_for(doomed.wait(), WAIT_S)).finish_reason == "cancelled"
        else:
            with pytest.raises(ModelExecutionError):
                await asyncio.wait_for(doomed.wait(), WAIT_S)
        assert engine.slots_in_use == 1  # only the stream is left
        assert engine.prefix_cache_usage_ratio == 0.0  # the stream's 4 tokens: no whole block
    finally:
        trap.remove()
    assert (await asyncio.wait_for(stream.wait(), WAIT_S)).completion_tokens == 60
    whole = await (await engine.submit(long_prompt, SamplingParams(4))).wait()
    assert whole.cached_tokens == 0  # nothing of the interrupted prefill was indexed
    assert list(whole.token_ids) == reference(model, long_prompt, 4)


async def test_a_chunked_prefill_past_the_request_timeout_fails_with_504(
    make_engine: EngineFactory,
) -> None:
    model = build_tiny_llama()
    # A late prompt's chunks grow to finish it within its time left (RunningBatch._catch_up),
    # judged from the measured step time: with a timeout of many steps even on a loaded box,
    # 100 tokens at 16 a chunk are still unfinished after the trapped third chunk.
    engine = make_engine(
        model=model, num_slots=2, max_seq_len=MAX_SEQ_LEN, prefill_chunk_tokens=16,
        timeout_s=2.0, kv_bucket_min=16,
    )  # fmt: skip
    trap = ChunkTrap(model, nth=3)
    try:
        stream = await engine.submit(tokens(4, seed=15), SamplingParams(30, ignore_eos=True))
        await anext(stream)
        slow = await engine.submit(tokens(100, seed=16), SamplingParams(4))
        await trap.wait_until_entered()
        await asyncio.sleep(2.2)  # past timeout_s while its prefill is unfinished
        trap.release.set()
        with pytest.raises(QueueTimeoutError):
            await asyncio.wait_for(slow.wait(), WAIT_S)
        assert engine.slots_in_use == 1
    finally:
        trap.remove()


async def test_decode_steps_with_padded_rows_never_write_to_cached_prefixes(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(
        num_slots=8, max_seq_len=MAX_SEQ_LEN, prefix_cache_tokens=256, kv_bucket_min=16
    )
    prompt = tokens(3 * PREFIX_BLOCK_TOKENS, seed=20)
    await (await engine.submit(prompt, SamplingParams(2))).wait()  # caches 3 blocks
    cached = sorted(engine._blocks._cached)
    assert len(cached) == 3
    storage = engine._runner.cache.storage
    before = storage[:, :, cached].clone()
    # 3 live rows pad up to the bucket of 4: the padded row writes to the spare block.
    handles = [await engine.submit(tokens(5, seed=s), SamplingParams(20)) for s in (21, 22, 23)]
    for handle in handles:
        await asyncio.wait_for(handle.wait(), WAIT_S)
    assert torch.equal(storage[:, :, cached], before)


async def test_a_mixed_step_that_fails_is_run_again_as_a_prefill_and_a_decode(
    make_engine: EngineFactory,
) -> None:
    """A failure of the packed forward itself (not of a prompt) costs nobody their request."""
    model = build_tiny_llama()
    engine = make_engine(
        model=model, num_slots=2, max_seq_len=MAX_SEQ_LEN, prefill_chunk_tokens=16,
        kv_bucket_min=16,
    )  # fmt: skip
    failures = []

    def fail_the_first_mixed_forward(module: object, args: object, kwargs: dict) -> None:
        if "mixed_layout" in kwargs and not failures:
            failures.append(1)
            raise RuntimeError("injected failure of a mixed forward")

    with forward_pre_hook(model, fail_the_first_mixed_forward):
        short_prompt = tokens(4, seed=17)
        stream = await engine.submit(short_prompt, SamplingParams(30))
        await anext(stream)
        long_prompt = tokens(50, seed=18)
        result = await asyncio.wait_for(
            (await engine.submit(long_prompt, SamplingParams(6))).wait(), WAIT_S
        )
        streamed = await asyncio.wait_for(stream.wait(), WAIT_S)
    assert failures == [1]
    assert list(result.token_ids) == reference(model, long_prompt, 6)
    assert streamed.completion_tokens == 30  # still decoding when the mixed step failed
    assert list(streamed.token_ids) == reference(model, short_prompt, 30)


async def test_a_model_that_cannot_mix_is_found_at_warm_up_and_served_unmixed(
    make_engine: EngineFactory,
) -> None:
    model = build_tiny_llama()

    def refuse_mixed_forwards(module: object, args: object, kwargs: dict) -> None:
        if "mixed_layout" in kwargs:
            raise TypeError("this model's attention takes no extra keywords")

    with forward_pre_hook(model, refuse_mixed_forwards):
        engine = make_engine(model=model, num_slots=2, max_seq_len=MAX_SEQ_LEN, warm_up=True)
        assert engine.mixed_steps is False
        mixed = MixedSteps(engine)
        stream = await engine.submit(tokens(4, seed=19), SamplingParams(20, ignore_eos=True))
        await anext(stream)
        prompt = tokens(30, seed=20)
        result = await asyncio.wait_for(
            (await engine.submit(prompt, SamplingParams(5))).wait(), WAIT_S
        )
        await asyncio.wait_for(stream.wait(), WAIT_S)
    assert mixed.count == 0
    assert list(result.token_ids) == reference(model, prompt, 5)


async def test_a_long_prompt_that_would_time_out_at_the_chunk_limit_gets_bigger_chunks(
    make_engine: EngineFactory,
) -> None:
    """Every forward takes 100 ms here: 16-token chunks would need 7 steps (0.7 s) for this
    112-token prompt, past its 0.6 s timeout; catching up, its chunks grow to finish in time."""
    model = build_tiny_llama()
    engine = make_engine(
        model=model, num_slots=2, max_seq_len=MAX_SEQ_LEN, prefill_chunk_tokens=16,
        timeout_s=0.6, kv_bucket_min=16,
    )  # fmt: skip
    chunks: list[int] = []

    def slow_forward(module: object, args: object, kwargs: dict) -> None:
        if "mixed_layout" in kwargs:
            chunks.append(kwargs["input_ids"].shape[1] - kwargs["mixed_layout"].decode_rows)
        threading.Event().wait(0.1)

    with forward_pre_hook(model, slow_forward):
        stream = await engine.submit(tokens(4, seed=21), SamplingParams(12, ignore_eos=True))
        await anext(stream)
        prompt = tokens(112, seed=22)
        result = await asyncio.wait_for(
            (await engine.submit(prompt, SamplingParams(3))).wait(), WAIT_S
        )
        await asyncio.wait_for(stream.wait(), WAIT_S)
    assert sum(chunks) >= 112 and max(chunks) > 16
    assert len(chunks) < 7
    assert list(result.token_ids) == reference(model, prompt, 3)
