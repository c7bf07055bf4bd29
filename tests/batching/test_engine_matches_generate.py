"""The key property: greedy engine output equals model.generate() run one prompt at a time.

Requests of different lengths arrive at different engine steps, there are fewer slots than
requests (so slots are reused and rows are moved to keep the batch packed), and they stop
at different times. Any error in positions, masks, padding or the KV cache shows up here.
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
    engine = make_engine(model=model, num_slots=3, max_seq_len=64, **engine_options)
    batch = prompts()
    results = await run_staggered(engine, batch)
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
    await assert_matches_generate(build_tiny_llama(), make_engine, prefill_token_budget=8)


def tiny_qwen2() -> Qwen2ForCausalLM:
    """Qwen2 shape: biases on q/k/v."""
    torch.manual_seed(1)
    config = decoder_config("qwen2", vocab_size=VOCAB_SIZE, eos_token_id=EOS_ID)
    return Qwen2ForCausalLM(config).to(TEST_DEVICE, TEST_DTYPE).eval()


def tiny_mistral() -> MistralForCausalLM:
    """Mistral shape: a (large) sliding window, head_dim set explicitly."""
    torch.manual_seed(2)
    config = decoder_config(
        "mistral",
        vocab_size=VOCAB_SIZE,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=128,
        eos_token_id=EOS_ID,
    )
    return MistralForCausalLM(config).to(TEST_DEVICE, TEST_DTYPE).eval()


@pytest.mark.parametrize("build", [tiny_qwen2, tiny_mistral], ids=["qwen2", "mistral"])
async def test_greedy_qwen2_and_mistral_shapes_equal_generate(
    build: type[PreTrainedModel], make_engine: EngineFactory
) -> None:
    await assert_matches_generate(build(), make_engine)


def test_a_context_longer_than_the_sliding_window_is_refused(tokenizer: object) -> None:
    with pytest.raises(ValueError, match="sliding window"):
        GenerationEngine(
            tiny_mistral(),
            tokenizer,  # type: ignore[arg-type]
            eos_token_ids=[EOS_ID],
            num_slots=2,
            max_seq_len=256,
            max_queue=4,
            timeout_s=1.0,
        )
