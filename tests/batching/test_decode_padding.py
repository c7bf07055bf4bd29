"""Padded rows of a bucketed decode step never touch live K/V or live logits.

Two runners hold the same five live sequences: one with 8 slots, so 5 rows pad up to the
bucket of 8 (3 padded rows), and one with 5 slots, where 5 is itself a bucket (no padding).
On CUDA the padded runner replays captured graphs; on CPU it runs the same step eagerly.
"""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from batching.generation.decode_buffers import DecodeBuffers
from batching.generation.layer_masks import LayerMasks
from batching.generation.model_runner import ModelRunner, build_slot_cache
from batching.generation.model_support import FULL, AttentionPattern
from tests.batching.conftest import TEST_DTYPE, VOCAB_SIZE

PROMPTS = [[5, 9, 11], [7] * 9, [12, 40, 3, 3, 90], [100], [33, 34, 35, 36, 37, 38, 39]]
MAX_SEQ_LEN = 48
TOLERANCE = 2e-2 if TEST_DTYPE in (torch.bfloat16, torch.float16) else 1e-5


def runner(model: LlamaForCausalLM, num_slots: int) -> ModelRunner:
    cache = build_slot_cache(model, num_slots, MAX_SEQ_LEN)
    return ModelRunner(model, cache, kv_bucket_min=16)


def snapshot(model_runner: ModelRunner) -> list[torch.Tensor]:
    cache = model_runner.cache
    return [t.clone() for t in (*cache.keys, *cache.values)]


def test_padded_rows_never_change_live_kv_or_logits(tiny_llama: LlamaForCausalLM) -> None:
    padded, exact = runner(tiny_llama, num_slots=8), runner(tiny_llama, num_slots=5)
    live = len(PROMPTS)
    assert (padded.batch_buckets, exact.batch_buckets) == ([1, 2, 4, 8], [1, 2, 4, 5])
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        padded.capture_cuda_graphs()  # on CUDA: graphs replay below; on CPU: eager
        for tensor in (*padded.cache.keys, *padded.cache.values):
            tensor.zero_()  # what the capture's probe rows wrote; the graphs keep the address
        for model_runner in (padded, exact):
            model_runner.prefill(0, PROMPTS)
        # Free slots hold stale data in a server: make it loud, it must not leak anywhere.
        for tensor in (*padded.cache.keys, *padded.cache.values):
            noise = torch.randn(tensor[live:].shape, generator=generator) * 100
            tensor[live:] = noise.to(tensor.device, tensor.dtype)
        before = snapshot(padded)
        lengths = [len(p) for p in PROMPTS]
        tokens = [p[-1] for p in PROMPTS]
        for _ in range(3):  # KV length 9 -> 12: inside the first bucket of 16
            padded_logits = padded.decode_step(tokens, lengths).clone()
            exact_logits = exact.decode_step(tokens, lengths)
            assert padded_logits.shape == (live, VOCAB_SIZE)
            torch.testing.assert_close(padded_logits, exact_logits, rtol=TOLERANCE, atol=TOLERANCE)
            tokens = exact_logits.argmax(dim=-1).tolist()
            lengths = [n + 1 for n in lengths]
    spare = padded.cache.spare_slot
    for after, old, reference in zip(snapshot(padded), before, snapshot(exact), strict=True):
        torch.testing.assert_close(after[:live], reference[:live], rtol=TOLERANCE, atol=TOLERANCE)
        assert torch.equal(after[live:spare], old[live:spare])  # free slots: untouched
        assert torch.equal(after[spare, :, 1:], old[spare, :, 1:])  # spare: only position 0
        assert not torch.equal(after[spare, :, 0], old[spare, :, 0])  # ...which padding wrote


def test_padded_rows_attend_one_column_and_write_to_the_spare_slot() -> None:
    buffers = DecodeBuffers(
        max_rows=4,
        max_seq_len=8,
        vocab_size=16,
        spare_slot=4,
        device=torch.device("cpu"),
    )
    buffers.load([7, 8], [3, 5])
    assert buffers.tokens.tolist() == [7, 8, 0, 0]
    assert buffers.positions.tolist() == [3, 5, 0, 0]
    assert buffers.write_slots.tolist() == [0, 1, 4, 4]
    masks = LayerMasks(AttentionPattern((FULL,)), 8, torch.float32, torch.device("cpu"))
    allowed = masks.allowed(FULL, buffers.positions[:, None], kv_len=8)[:, 0]  # [4, 8]
    assert allowed.sum(dim=-1).tolist() == [4, 6, 1, 1]
    assert allowed[2:, 0].all()  # padded rows: column 0 only, so softmax has a finite row


def test_loading_fewer_rows_pads_what_a_bigger_step_left_behind() -> None:
    buffers = DecodeBuffers(
        max_rows=3,
        max_seq_len=8,
        vocab_size=16,
        spare_slot=3,
        device=torch.device("cpu"),
    )
    buffers.load([1, 2, 3], [4, 5, 6])
    buffers.load([9], [2])
    assert buffers.tokens.tolist() == [9, 0, 0]
    assert buffers.positions.tolist() == [2, 0, 0]
    assert buffers.write_slots.tolist() == [0, 3, 3]


def test_a_row_still_prefilling_rides_as_padding_and_does_not_size_the_step(
    tiny_llama: LlamaForCausalLM,
) -> None:
    """A long prompt half prefilled in chunks sits among the decoding rows (slot 1 here): its
    K/V must stay as its chunks wrote it, its length must not widen every row's attention,
    and the decoding rows' logits must be those of a batch without it."""
    with_rider, alone = runner(tiny_llama, num_slots=3), runner(tiny_llama, num_slots=3)
    long_prompt = list(range(3, 43))  # 40 tokens: a KV bucket of 48, where the others need 16
    with torch.inference_mode():
        with_rider.prefill(0, [PROMPTS[0], long_prompt, PROMPTS[2]])
        alone.prefill(0, [PROMPTS[0], PROMPTS[2]])
        before = snapshot(with_rider)
        widths: list[int] = []
        original = with_rider._decode_bucket
        with_rider._decode_bucket = lambda rows, kv: (widths.append(kv), original(rows, kv))[1]
        lengths = [len(PROMPTS[0]), len(long_prompt), len(PROMPTS[2])]
        tokens = [PROMPTS[0][-1], 0, PROMPTS[2][-1]]
        logits = with_rider.decode_step(tokens, lengths, riders={1}).clone()
        reference = alone.decode_step([tokens[0], tokens[2]], [lengths[0], lengths[2]])
    assert widths == [16]  # sized by the decoding rows (5 + 1 tokens), not the rider's 40
    torch.testing.assert_close(logits[[0, 2]], reference, rtol=TOLERANCE, atol=TOLERANCE)
    for after, old in zip(snapshot(with_rider), before, strict=True):
        assert torch.equal(after[1], old[1])  # the rider's slot: untouched
