"""Padded rows of a bucketed decode step never touch live K/V or live logits.

Two runners hold the same five live sequences: one with 8 rows, so 5 rows pad up to the
bucket of 8 (3 padded rows), and one with 5 rows, where 5 is itself a bucket (no padding).
Each row has blocks of its own (`row_tables`); padded rows write only to the spare block.
On CUDA the padded runner replays captured graphs; on CPU it runs the same step eagerly.
"""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from batching.generation.attention import LayerMasks
from batching.generation.model_runner import ModelRunner
from batching.generation.model_support import FULL, AttentionPattern
from batching.generation.static_decode import DecodeBuffers
from tests.batching.conftest import TEST_DTYPE, VOCAB_SIZE, paged_runner, row_tables

PROMPTS = [[5, 9, 11], [7] * 9, [12, 40, 3, 3, 90], [100], [33, 34, 35, 36, 37, 38, 39]]
MAX_SEQ_LEN = 48
TOLERANCE = 2e-2 if TEST_DTYPE in (torch.bfloat16, torch.float16) else 1e-5


def runner(model: LlamaForCausalLM, num_slots: int) -> ModelRunner:
    return paged_runner(model, num_slots, MAX_SEQ_LEN, kv_bucket_min=16)


def snapshot(model_runner: ModelRunner) -> list[torch.Tensor]:
    """Every layer's K and V, by block: [num_blocks + 1, block_size, kv_heads, head_dim]."""
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
        tables = row_tables(padded)[:live]  # the same block ids in both runners
        for model_runner in (padded, exact):
            model_runner.prefill(tables, PROMPTS)
        # Free blocks hold stale data in a server: make it loud, it must not leak anywhere.
        free = 1 + live * padded.cache.max_blocks_per_seq  # blocks of rows live.. and after
        for tensor in (*padded.cache.keys, *padded.cache.values):
            noise = torch.randn(tensor[free:].shape, generator=generator) * 100
            tensor[free:] = noise.to(tensor.device, tensor.dtype)
            noise = torch.randn(tensor[0].shape, generator=generator) * 100
            tensor[0] = noise.to(tensor.device, tensor.dtype)  # the spare block too
        before = snapshot(padded)
        lengths = [len(p) for p in PROMPTS]
        tokens = [p[-1] for p in PROMPTS]
        for _ in range(3):  # KV length 9 -> 12: inside the first bucket of 16
            padded_logits = padded.decode_step(tokens, lengths, tables).clone()
            exact_logits = exact.decode_step(tokens, lengths, tables)
            assert padded_logits.shape == (live, VOCAB_SIZE)
            torch.testing.assert_close(padded_logits, exact_logits, rtol=TOLERANCE, atol=TOLERANCE)
            tokens = exact_logits.argmax(dim=-1).tolist()
            lengths = [n + 1 for n in lengths]
    spare = padded.cache.spare_block
    for after, old, reference in zip(snapshot(padded), before, snapshot(exact), strict=True):
        torch.testing.assert_close(
            after[1:free], reference[1:free], rtol=TOLERANCE, atol=TOLERANCE
        )  # the live rows' blocks
        assert torch.equal(after[free:], old[free:])  # free blocks: untouched
        assert torch.equal(after[spare, 1:], old[spare, 1:])  # spare: only position 0
        assert not torch.equal(after[spare, 0], old[spare, 0])  # ...which padding wrote


def test_padded_rows_attend_one_column_and_read_and_write_only_the_spare_block() -> None:
    buffers = DecodeBuffers(
        max_rows=4,
        max_seq_len=8,
        max_blocks=2,
        vocab_size=16,
        spare_block=0,
        device=torch.device("cpu"),
    )
    buffers.load([7, 8], [3, 5], [[4], [2, 6]])
    assert buffers.tokens.tolist() == [7, 8, 0, 0]
    assert buffers.positions.tolist() == [3, 5, 0, 0]
    assert buffers.tables.tolist() == [[4, 0], [2, 6], [0, 0], [0, 0]]
    masks = LayerMasks(AttentionPattern((FULL,)), 8, torch.float32, torch.device("cpu"))
    allowed = masks.allowed(FULL, buffers.positions[:, None], kv_len=8)[:, 0]  # [4, 8]
    assert allowed.sum(dim=-1).tolist() == [4, 6, 1, 1]
    assert allowed[2:, 0].all()  # padded rows: column 0 only, so softmax has a finite row


def test_loading_fewer_rows_pads_what_a_bigger_step_left_behind() -> None:
    buffers = DecodeBuffers(
        max_rows=3,
        max_seq_len=8,
        max_blocks=2,
        vocab_size=16,
        spare_block=0,
        device=torch.device("cpu"),
    )
    buffers.load([1, 2, 3], [4, 5, 6], [[1, 2], [3, 4], [5, 6]])
    buffers.load([9], [2], [[7]])
    assert buffers.tokens.tolist() == [9, 0, 0]
    assert buffers.positions.tolist() == [2, 0, 0]
    assert buffers.tables.tolist() == [[7, 0], [0, 0], [0, 0]]


def test_a_row_still_prefilling_rides_as_padding_and_does_not_size_the_step(
    tiny_llama: LlamaForCausalLM,
) -> None:
    """A long prompt half prefilled in chunks sits among the decoding rows (row 1 here): its
    K/V must stay as its chunks wrote it, its length must not widen every row's attention,
    and the decoding rows' logits must be those of a batch without it."""
    with_rider, alone = runner(tiny_llama, num_slots=3), runner(tiny_llama, num_slots=3)
    long_prompt = list(range(3, 43))  # 40 tokens: a KV bucket of 48, where the others need 16
    tables = row_tables(with_rider)
    alone_tables = [tables[0], tables[2]]
    with torch.inference_mode():
        with_rider.prefill(tables, [PROMPTS[0], long_prompt, PROMPTS[2]])
        alone.prefill(alone_tables, [PROMPTS[0], PROMPTS[2]])
        before = snapshot(with_rider)
        widths: list[int] = []
        original = with_rider._decode_bucket
        with_rider._decode_bucket = lambda rows, kv: (widths.append(kv), original(rows, kv))[1]
        lengths = [len(PROMPTS[0]), len(long_prompt), len(PROMPTS[2])]
        tokens = [PROMPTS[0][-1], 0, PROMPTS[2][-1]]
        logits = with_rider.decode_step(tokens, lengths, tables, riders={1}).clone()
        reference = alone.decode_step(
            [tokens[0], tokens[2]], [lengths[0], lengths[2]], alone_tables
        )
    assert widths == [16]  # sized by the decoding rows (5 + 1 tokens), not the rider's 40
    torch.testing.assert_close(logits[[0, 2]], reference, rtol=TOLERANCE, atol=TOLERANCE)
    for after, old in zip(snapshot(with_rider), before, strict=True):
        assert torch.equal(after[tables[1]], old[tables[1]])  # the rider's blocks: untouched
