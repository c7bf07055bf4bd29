"""The key property: greedy engine output equals model.generate() run one prompt at a time.

Requests of different lengths arrive at different engine steps, there are fewer slots than
requests (so slots are reused and rows are moved to keep the batch packed), and they stop
at different times. Decode steps run at bucketed shapes: batch sizes that are not buckets are
padded up (padded rows write to the spare slot), and with a smallest KV bucket of 16 the
sequences cross KV buckets mid-generation. Any error in positions, masks, padding, buckets
or the KV cache shows up here. The engines are warmed up as in the service, so on CUDA the
decode steps replay captured graphs.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import decoder_config
from transformers import LlamaForCausalLM, MistralForCausalLM, PreTrainedModel, Qwen2ForCausalLM

from batching.generation.engine import GenerationEngine
from batching.generation.handle import GenerationHandle, GenerationResult
from batching.generation.sampling import SamplingParams
from tests.batching.conftest import (
    EOS_ID,
    TEST_DEVICE,
    TEST_DTYPE,
    VOCAB_SIZE,
    EngineFactory,
    MixedSteps,
    build_tiny_llama,
)

PROMPT_LENGTHS = [7, 1, 19, 4, 12, 3, 23, 9]
MAX_NEW_TOKENS = [12, 20, 6, 16, 9, 24, 5, 14]


def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(42)
    return [
        torch.randint(3, VOCAB_SIZE, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS
    ]


def reference(model: PreTrainedModel, prompt: list[int], max_new_tokens: int) -> list[int]:
    """generate() on this prompt alone; EOS is not part of the engine's output."""
    with torch.inference_mode():
        output = model.generate(  # type: ignore[operator]
            torch.tensor([prompt], device=model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=EOS_ID,
            pad_token_id=0,
        )
    tokens: list[int] = output[0, len(prompt) :].tolist()
    return tokens[:-1] if tokens and tokens[-1] == EOS_ID else tokens


async def run_staggered(engine: GenerationEngine, batch: list[list[int]]) -> list[GenerationResult]:
    """Submit in waves of three; each wave waits until the previous one has produced tokens."""
    handles: list[GenerationHandle] = []
    for start in range(0, len(batch), 3):
        for prompt, new in zip(
            batch[start : start + 3], MAX_NEW_TOKENS[start : start + 3], strict=True
        ):
            handles.append(await engine.submit(prompt, SamplingParams(max_new_tokens=new)))
        await anext(handles[-1])  # the wave got its first token; the next joins a running batch
    return [await handle.wait() for handle in handles]


async def assert_matches_generate(
    model: PreTrainedModel, make_engine: EngineFactory, **engine_options: object
) -> None:
    options: dict[str, object] = {"num_slots": 3, "max_seq_len": 64, "kv_bucket_min": 16}
    engine = make_engine(model=model, warm_up=True, **(options | engine_options))
    mixed = MixedSteps(engine)
    batch = prompts()
    results = await run_staggered(engine, batch)
    assert mixed.count > 0  # later waves were prefilled in the running rows' decode forward
    for prompt, new, result in zip(batch, MAX_NEW_TOKENS, results, strict=True):
        assert list(result.token_ids) == reference(model, prompt, new)
        assert result.finish_reason in ("eos", "length")
    assert engine.slots_in_use == 0


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
async def test_greedy_llama_equals_generate_one_prompt_at_a_time(
    attn_implementation: str, make_engine: EngineFactory
) -> None:
    model: LlamaForCausalLM = build_tiny_llama(attn_implementation)
    await assert_matches_generate(model, make_engine)


async def test_a_small_prefill_budget_still_equals_generate(make_engine: EngineFactory) -> None:
    """Prompts are then prefilled one per step, in between other rows' decode steps."""
    await assert_matches_generate(build_tiny_llama(), make_engine, prefill_chunk_tokens=8)


def tiny_qwen2() -> Qwen2ForCausalLM:
    """Qwen2 shape: biases on q/k/v."""
    torch.manual_seed(1)
    config = decoder_config("qwen2", vocab_size=VOCAB_SIZE, eos_token_id=EOS_ID)
    return Qwen2ForCausalLM(config).to(TEST_DEVICE, TEST_DTYPE).eval()


def tiny_mistral(sliding_window: int = 128) -> MistralForCausalLM:
    """Mistral shape: a sliding window on every layer, head_dim set explicitly."""
    torch.manual_seed(2)
    config = decoder_config(
        "mistral",
        vocab_size=VOCAB_SIZE,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=sliding_window,
        eos_token_id=EOS_ID,
    )
    return MistralForCausalLM(config).to(TEST_DEVICE, TEST_DTYPE).eval()


@pytest.mark.parametrize("build", [tiny_qwen2, tiny_mistral], ids=["qwen2", "mistral"])
async def test_greedy_qwen2_and_mistral_shapes_equal_generate(
    build: type[PreTrainedModel], make_engine: EngineFactory
) -> None:
    await assert_matches_generate(build(), make_engine)


async def test_a_context_longer_than_the_sliding_window_equals_generate(
    make_engine: EngineFactory,
) -> None:
    """An 8-token window under 64-token slots: prompts and outputs run far past it, so every
    prefill, decode and mixed step must mask each row's own window (attention.py)."""
    await assert_matches_generate(tiny_mistral(sliding_window=8), make_engine)


# 13 requests; prompt + new tokens reach past 64, so rows cross the KV buckets 16 -> 32 -> 64 -> 96.
WIDE_PROMPT_LENGTHS = [7, 1, 19, 4, 12, 3, 23, 9, 15, 2, 30, 6, 11]
WIDE_NEW_TOKENS = [60, 20, 40, 70, 9, 50, 30, 14, 45, 80, 25, 66, 33]


async def assert_concurrent_matches_generate(
    model: PreTrainedModel, make_engine: EngineFactory, requests: int, num_slots: int
) -> None:
    """`requests` submitted at once to `num_slots` slots (kv buckets 16, 32, 64, 96)."""
    engine = make_engine(
        model=model, warm_up=True, num_slots=num_slots, max_seq_len=96, kv_bucket_min=16
    )
    generator = torch.Generator().manual_seed(7)
    batch = [
        torch.randint(3, VOCAB_SIZE, (n,), generator=generator).tolist()
        for n in WIDE_PROMPT_LENGTHS[:requests]
    ]
    new_tokens = WIDE_NEW_TOKENS[:requests]
    mixed = MixedSteps(engine)
    handles = [
        await engine.submit(prompt, SamplingParams(max_new_tokens=new))
        for prompt, new in zip(batch, new_tokens, strict=True)
    ]
    results = [await handle.wait() for handle in handles]
    for prompt, new, result in zip(batch, new_tokens, results, strict=True):
        assert list(result.token_ids) == reference(model, prompt, new)
    longest = max(len(p) + r.completion_tokens for p, r in zip(batch, results, strict=True))
    assert longest > 64  # some row really crossed into the last KV bucket
    assert (mixed.count > 0) == (requests > num_slots)  # admitted into freed slots: mixed


@pytest.mark.parametrize("requests", [3, 5, 7, 13])
async def test_greedy_equals_generate_at_batch_sizes_that_are_not_buckets(
    requests: int, tiny_llama: LlamaForCausalLM, make_engine: EngineFactory
) -> None:
    """16 slots (buckets 1, 2, 4, 8, 16): 3 rows pad to 4, 5 and 7 to 8, 13 to 16; as rows
    finish, the batch shrinks through other sizes that are not buckets either."""
    await assert_concurrent_matches_generate(tiny_llama, make_engine, requests, num_slots=16)


@pytest.mark.parametrize(
    "build",
    [build_tiny_llama, lambda: build_tiny_llama("eager"), tiny_qwen2, tiny_mistral],
    ids=["llama-sdpa", "llama-eager", "qwen2", "mistral"],
)
async def test_greedy_equals_generate_across_kv_buckets_with_slot_reuse(
    build: type[PreTrainedModel], make_engine: EngineFactory
) -> None:
    """13 requests share 6 slots (buckets 1, 2, 4, 6): slots are reused, rows move, and
    sequences cross KV buckets mid-generation."""
    await assert_concurrent_matches_generate(build(), make_engine, 13, num_slots=6)
