"""A mixed step (decode rows and prefill chunks in one forward) computes what a prefill forward
followed by a decode forward computes: the same logits and the same K/V in every sequence.

Two runners on the same model hold the same sequences, each row in blocks of its own. Row 2
holds the first 24 tokens of a long prompt (an earlier chunk); row 3 is a new prompt. Rows 0
and 1 decode. One runner runs
`mixed_step`; the other runs the two forwards of the unmixed engine.
"""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedModel

from batching.generation.attention import PREFIX
from batching.generation.model_runner import ModelRunner
from tests.batching.conftest import (
    TEST_DTYPE,
    build_tiny_llama,
    paged_runner,
    row_kv,
    row_tables,
)
from tests.batching.test_engine_matches_generate import tiny_mistral, tiny_qwen2

MAX_SEQ_LEN = 64
TOLERANCE = 2e-2 if TEST_DTYPE in (torch.bfloat16, torch.float16) else 1e-5
STREAMS = [[5, 9, 11, 40], [7] * 9]  # rows 0 and 1: decoding
LONG_PROMPT = list(range(3, 43))  # row 2: 24 tokens already in, a chunk of 16 to go
SHORT_PROMPT = [50, 51, 52, 53, 54]  # row 3: a new prompt, prefilled whole


def build(shape: str, attn_implementation: str) -> PreTrainedModel:
    model = {"llama": build_tiny_llama, "qwen2": tiny_qwen2, "mistral": tiny_mistral}[shape]()
    model.set_attn_implementation(attn_implementation)
    return model


def runner(model: PreTrainedModel) -> ModelRunner:
    return paged_runner(model, 4, MAX_SEQ_LEN, kv_bucket_min=16)


def with_streams_and_a_first_chunk(model: PreTrainedModel) -> ModelRunner:
    each = runner(model)
    each.prefill(row_tables(each)[:3], [*STREAMS, LONG_PROMPT[:24]])
    return each


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("shape", ["llama", "qwen2", "mistral"])
def test_a_mixed_step_equals_a_prefill_then_a_decode(shape: str, attn_implementation: str) -> None:
    model = build(shape, attn_implementation)
    with torch.inference_mode():
        mixed, separate = (with_streams_and_a_first_chunk(model) for _ in range(2))
        tokens = [STREAMS[0][-1], STREAMS[1][-1], 0, 0]
        lengths = [len(STREAMS[0]), len(STREAMS[1]), 24, 0]
        chunks, starts = [LONG_PROMPT[24:], SHORT_PROMPT], [24, 0]
        tables = row_tables(mixed)
        decode_logits, prefill_logits = mixed.mixed_step(
            tokens, lengths, tables, {2, 3}, first_row=2, chunks=chunks, starts=starts
        )
        expected_prefill = separate.prefill(tables[2:], chunks, starts)
        expected_decode = separate.decode_step(tokens, lengths, tables, riders={2, 3})
    assert model.config._attn_implementation == PREFIX + attn_implementation
    assert decode_logits.shape == (4, expected_decode.shape[1])
    close = {"rtol": TOLERANCE, "atol": TOLERANCE}
    torch.testing.assert_close(decode_logits[:2], expected_decode[:2], **close)
    torch.testing.assert_close(prefill_logits, expected_prefill, **close)
    filled = [len(STREAMS[0]) + 1, len(STREAMS[1]) + 1, len(LONG_PROMPT), len(SHORT_PROMPT)]
    for row, length in enumerate(filled):
        for got, want in zip(
            row_kv(mixed, row, length), row_kv(separate, row, length), strict=True
        ):
            torch.testing.assert_close(got, want, **close)


def test_the_model_keeps_its_own_attention_outside_mixed_steps() -> None:
    """Installing the dispatcher changes nothing for generate() and plain forwards."""
    model = build_tiny_llama()
    prompt = torch.tensor([[5, 9, 11, 40, 7, 7]])
    with torch.inference_mode():
        before = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        runner(model)
        runner(model)  # a second runner on the same model: installing twice is harmless
        after = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert model.config._attn_implementation == PREFIX + "sdpa"
    assert torch.equal(before, after)
