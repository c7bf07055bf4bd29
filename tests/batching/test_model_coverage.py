"""Every decoder family in scripts/model_families.py gets the verdict listed there: served with
greedy output equal to generate() token for token, or refused with its reason.

Served families run four staggered prompts through an engine with chunked prefill (8-token
chunks), mixed steps (where the family allows them) and a prefix cache (a fifth prompt hits it),
then through one with mixed steps off. The windowed families' windows and chunks are 8 tokens,
and their sequences reach more than 4x that, so every sliding and chunked layer really slides.
The README's "Supported models" table is printed from the same list (test_supported_models.py).
"""

from __future__ import annotations

import pytest
import torch
from model_families import FAMILIES, WINDOW, Family
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from batching.generation.engine import DEFAULT_KV_BLOCK_SIZE as PREFIX_BLOCK_TOKENS
from batching.generation.engine import GenerationEngine
from batching.generation.handle import GenerationHandle
from batching.generation.model_support import UnsupportedModelError
from batching.generation.sampling import SamplingParams
from tests.batching.conftest import (
    EOS_ID,
    TEST_DEVICE,
    TEST_DTYPE,
    EngineFactory,
    MixedSteps,
    RecordingObserver,
)
from tests.batching.test_engine_matches_generate import reference

PROMPT_LENGTHS = [23, 5, 17, 11]
NEW_TOKENS = [14, 8, 6, 6]
SERVED = [f for f in FAMILIES if f.verdict != "refused"]
REFUSED = [f for f in FAMILIES if f.verdict == "refused"]


def build(family: Family) -> PreTrainedModel:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family.config())
    return model.to(TEST_DEVICE, TEST_DTYPE).eval()


def prompts(vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    return [
        torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS
    ]


async def run_staggered(engine: GenerationEngine, batch: list[list[int]]) -> list[list[int]]:
    """Two waves of two: the second joins while the first decodes (a mixed step)."""
    handles: list[GenerationHandle] = []
    for start in (0, 2):
        for prompt, new in zip(
            batch[start : start + 2], NEW_TOKENS[start : start + 2], strict=True
        ):
            handles.append(await engine.submit(prompt, SamplingParams(max_new_tokens=new)))
        await anext(handles[-1], None)  # a first token (or the end, if it was EOS)
    return [list((await handle.wait()).token_ids) for handle in handles]


@pytest.mark.parametrize("family", SERVED, ids=[f.test_id for f in SERVED])
async def test_a_served_family_equals_generate(family: Family, make_engine: EngineFactory) -> None:
    model = build(family)
    batch = prompts(model.config.get_text_config().vocab_size)
    expected = [reference(model, p, n) for p, n in zip(batch, NEW_TOKENS, strict=True)]
    observer = RecordingObserver()
    engine = make_engine(
        model=model,
        warm_up=True,
        num_slots=3,
        max_seq_len=family.max_seq_len,
        kv_bucket_min=16,
        prefill_chunk_tokens=8,  # the 23-token prompt is prefilled in three chunks
        prefix_cache_tokens=8 * PREFIX_BLOCK_TOKENS,
        observer=observer,
        timeout_s=3600.0,  # a slow, busy machine must not make the chunks catch up (one chunk)
    )
    mixed = MixedSteps(engine)
    assert await run_staggered(engine, batch) == expected
    assert observer.prefill_chunks  # the long prompt was prefilled in chunks
    mixes = family.verdict == "served"
    assert engine.mixed_steps == mixes
    assert (mixed.count > 0) == mixes
    if not mixes:
        assert family.why.split(";")[0] in str(engine.mixed_steps_off_reason)

    again = batch[0][:PREFIX_BLOCK_TOKENS] + batch[2]  # the first prompt's cached block: a hit
    handle = await engine.submit(again, SamplingParams(max_new_tokens=6))
    assert list((await handle.wait()).token_ids) == reference(model, again, 6)
    assert observer.prefix_queries[-1] == (len(again), PREFIX_BLOCK_TOKENS)

    if mixes:  # and the same without mixed steps
        unmixed = make_engine(
            model=model,
            warm_up=True,
            num_slots=3,
            max_seq_len=family.max_seq_len,
            mixed_steps=False,
        )
        assert await run_staggered(unmixed, batch) == expected
    if engine.attention_layout != "full":  # windowed: the sequences ran far past the window
        longest = max(len(p) + len(out) for p, out in zip(batch, expected, strict=True))
        assert longest >= 4 * WINDOW


@pytest.mark.parametrize("family", REFUSED, ids=[f.test_id for f in REFUSED])
def test_a_refused_family_is_refused_with_its_reason(
    family: Family, tokenizer: PreTrainedTokenizerFast
) -> None:
    with pytest.raises(UnsupportedModelError, match=family.why):
        GenerationEngine(
            build(family),
            tokenizer,
            eos_token_ids=[EOS_ID],
            num_slots=2,
            max_seq_len=family.max_seq_len,
            max_queue=4,
            timeout_s=5.0,
        )
