"""Attention that reads the KV blocks in place (GENERATE_PAGED_ATTENTION=in_place,
FlexAttention; attention.py): greedy output equals generate() token for token across block
boundaries, with mixed steps on and off, with a sliding window, and with n > 1 choices sharing
blocks; the in-place attention equals the gather's over a shuffled pool for every layer kind
(and softcaps as Gemma2 does); the path is chosen at warm-up, never assumed, and a step that
cannot be graphed in place is graphed with the gather. On a CPU flex_attention runs its unfused
reference, which is what these tests check; on a GPU the engines' tests run it compiled
(scripts/gpu_check.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import pytest
import torch
from model_families import FAMILIES
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from batching.generation import model_runner
from batching.generation.attention import (
    GATHER,
    IN_PLACE,
    InPlaceAttention,
    LayerMasks,
    PagedLayout,
)
from batching.generation.kv_cache import gather_kv
from batching.generation.model_support import (
    CHUNKED,
    FULL,
    SLIDING,
    AttentionPattern,
    check_prefill_and_decode,
    make_probe,
)
from batching.generation.sampling import SamplingParams
from batching.generation.static_decode import DecodeShape
from tests.batching.conftest import (
    TEST_DEVICE,
    WAIT_S,
    EngineFactory,
    MixedSteps,
    paged_runner,
)
from tests.batching.test_cuda_graphs import StandInGraphs, stand_in  # noqa: F401 (a fixture)
from tests.batching.test_engine_matches_generate import (
    MAX_NEW_TOKENS,
    prompts,
    reference,
    run_staggered,
    tiny_mistral,
)
from tests.batching.test_paged_kv import tokens


@pytest.mark.parametrize("block_size", [4, 16])
async def test_in_place_output_crossing_block_boundaries_equals_generate(
    block_size: int, tiny_llama: LlamaForCausalLM, make_engine: EngineFactory
) -> None:
    engine = make_engine(
        num_slots=3, max_seq_len=96, kv_block_size=block_size, warm_up=True,
        paged_attention=IN_PLACE,
    )  # fmt: skip
    assert engine.paged_attention.path == IN_PLACE  # warm-up checked it and kept it
    lengths = [block_size - 1, block_size, block_size + 1, 2 * block_size + 3, 1]
    batch = [tokens(n, seed=n) for n in lengths]
    handles = [await engine.submit(p, SamplingParams(2 * block_size + 5)) for p in batch]
    for prompt, handle in zip(batch, handles, strict=True):
        result = await asyncio.wait_for(handle.wait(), WAIT_S)
        assert list(result.token_ids) == reference(tiny_llama, prompt, 2 * block_size + 5)
    assert engine.kv_blocks_used == 0


@pytest.mark.parametrize("mixed_steps", [True, False], ids=["mixed", "separate"])
async def test_in_place_staggered_arrivals_equal_generate_with_mixed_steps_on_and_off(
    mixed_steps: bool, tiny_llama: LlamaForCausalLM, make_engine: EngineFactory
) -> None:
    """Later waves join running rows: with mixed steps their prefill shares the decode
    forward (whose attention gathers), without they run apart; the decode steps read in
    place either way."""
    engine = make_engine(
        num_slots=3, max_seq_len=64, kv_bucket_min=16, mixed_steps=mixed_steps,
        paged_attention=IN_PLACE,
    )  # fmt: skip
    mixed = MixedSteps(engine)
    batch = prompts()
    results = await run_staggered(engine, batch)
    assert (mixed.count > 0) is mixed_steps
    for prompt, new, result in zip(batch, MAX_NEW_TOKENS, results, strict=True):
        assert list(result.token_ids) == reference(tiny_llama, prompt, new)
    assert engine.paged_attention.path == IN_PLACE


async def test_in_place_past_a_small_sliding_window_equals_generate(
    make_engine: EngineFactory,
) -> None:
    """Mistral shape, an 8-token window, one K/V head for four query heads: rows run far past
    the window, so each decode step must mask its own window over its own blocks."""
    model = tiny_mistral(sliding_window=8)
    engine = make_engine(
        model=model, num_slots=3, max_seq_len=64, kv_block_size=4, warm_up=True,
        paged_attention=IN_PLACE,
    )  # fmt: skip
    assert engine.paged_attention.path == IN_PLACE
    batch = prompts()
    results = await run_staggered(engine, batch)
    for prompt, new, result in zip(batch, MAX_NEW_TOKENS, results, strict=True):
        assert list(result.token_ids) == reference(model, prompt, new)


async def test_in_place_choices_sharing_prompt_blocks_equal_generate(
    tiny_llama: LlamaForCausalLM, make_engine: EngineFactory
) -> None:
    """n = 3 choices read their prompt's shared blocks (and a copied partial last one)."""
    engine = make_engine(num_slots=4, max_seq_len=96, kv_block_size=4, paged_attention=IN_PLACE)
    prompt = tokens(10, seed=3)
    handles = await engine.submit_choices(prompt, [SamplingParams(12, ignore_eos=True)] * 3)
    results = [await asyncio.wait_for(h.wait(), WAIT_S) for h in handles]
    assert all(list(r.token_ids) == reference(tiny_llama, prompt, 12) for r in results)


async def test_in_place_decode_steps_replay_one_graph_per_batch_bucket(
    stand_in: Callable[..., StandInGraphs],  # noqa: F811 (the fixture)
    tiny_llama: LlamaForCausalLM,
    make_engine: EngineFactory,
) -> None:
    """Each row reads its own length in place, so one KV bucket (max_seq_len) is enough: the
    graphs are captured per batch bucket, block tables and positions come from the static
    buffers, and replayed steps give the tokens of generate()."""
    graphs = stand_in()
    engine = make_engine(
        warm_up=True, num_slots=3, max_seq_len=48, kv_bucket_min=16, paged_attention=IN_PLACE
    )
    assert engine.cuda_graphs.enabled and engine.paged_attention.path == IN_PLACE
    assert engine.cuda_graphs.kv_buckets == (48,)
    replays_at_warm_up = graphs.replays
    batch = [[5, 6, 7, 8], [9], [10, 11]]
    handles = [await engine.submit(p, SamplingParams(max_new_tokens=30)) for p in batch]
    for prompt, handle in zip(batch, handles, strict=True):
        result = await asyncio.wait_for(handle.wait(), WAIT_S)
        assert list(result.token_ids) == reference(tiny_llama, prompt, 30)
    assert graphs.replays > replays_at_warm_up  # the decode steps were replays


PATTERNS = {
    "full": AttentionPattern((FULL,)),
    "sliding": AttentionPattern((SLIDING,), sliding_window=5),
    "chunked": AttentionPattern((CHUNKED,), chunk_size=6),
}


@pytest.mark.parametrize("kind", sorted(PATTERNS))
def test_in_place_attention_equals_sdpa_over_the_gathered_blocks(kind: str) -> None:
    """Rows at different lengths whose blocks are scattered over the pool (shuffled, one block
    shared by two rows, a padding row of spare blocks), 6 query heads on 2 K/V heads: each
    real row's output equals sdpa over its gathered K/V with the additive mask of its kind."""
    pattern, block_size, kv_heads, heads, dim = PATTERNS[kind], 4, 2, 6, 8
    pool_blocks = 12  # block 0 is the spare
    generator = torch.Generator().manual_seed(0)
    keys, values = (
        torch.randn((pool_blocks, block_size, kv_heads, dim), generator=generator) for _ in range(2)
    )  # [P, size, kv_heads, D]
    order = torch.randperm(pool_blocks - 1, generator=generator) + 1
    tables = torch.tensor([
        [*order[:4].tolist()],
        [order[0].item(), *order[4:7].tolist()],  # shares its first block with row 0
        [*order[7:9].tolist(), 0, 0],
        [0, 0, 0, 0],  # a padding row
    ])  # fmt: skip
    positions = torch.tensor([[15], [13], [6], [0]])  # each row's query position
    query = torch.randn((4, heads, 1, dim), generator=generator)
    in_place = InPlaceAttention(
        pattern, num_blocks=pool_blocks, block_size=block_size, spare_block=0,
        query_groups=heads // kv_heads, device=torch.device("cpu"),
    )  # fmt: skip
    layout: PagedLayout = in_place.layout(positions, tables)
    module = torch.nn.Module()
    out = layout.attend(module, query, keys, values, {"scaling": 0.3})  # [b, 1, heads, D]
    masks = LayerMasks(pattern, 16, torch.float32, torch.device("cpu")).build(positions, 16)
    assert isinstance(masks, torch.Tensor)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, gather_kv(keys, tables, 16), gather_kv(values, tables, 16), attn_mask=masks,
        scale=0.3, enable_gqa=True,
    ).transpose(1, 2)  # fmt: skip
    torch.testing.assert_close(out[:3], expected[:3], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out[3]).all()  # the padding row attends to nothing, without NaN


async def test_auto_on_a_cpu_gathers_and_says_why(make_engine: EngineFactory) -> None:
    engine = make_engine(warm_up=True, paged_attention="auto")
    report = engine.paged_attention.as_dict()
    if TEST_DEVICE.type == "cpu":
        assert report["path"] == GATHER
        assert report["reason"].startswith("auto on cpu: FlexAttention has no fused kernel")
    else:  # on CUDA auto reads in place once warm-up found it equal
        assert report["path"] == IN_PLACE, report


async def test_gather_is_used_when_asked_for(make_engine: EngineFactory) -> None:
    engine = make_engine(warm_up=True, paged_attention=GATHER)
    assert engine.paged_attention.as_dict() == {
        "requested": GATHER, "path": GATHER, "reason": "GENERATE_PAGED_ATTENTION=gather",
    }  # fmt: skip


async def test_in_place_that_differs_at_warm_up_falls_back_to_gather_with_a_warning(
    make_engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """GPT-J's attention does not go through ours: pretending it does leaves only the
    warm-up check to find that in place cannot run it. The server then gathers, says why,
    and still serves the model's own tokens."""
    family = next(f for f in FAMILIES if f.name == "GPT-J")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family.config()).eval()
    model._supports_attention_backend = True  # pretend: only the warm-up check can tell
    with caplog.at_level(logging.WARNING, "batching.generation.attention"):
        engine = make_engine(
            model=model, warm_up=True, num_slots=3, max_seq_len=64, paged_attention=IN_PLACE
        )
    report = engine.paged_attention
    assert report.path == GATHER
    assert report.reason.startswith("in place was checked and not used: it failed")
    assert "paged attention: gather (in place was checked" in caplog.text
    prompt = tokens(7, seed=5)
    result = await asyncio.wait_for((await engine.submit(prompt, SamplingParams(6))).wait(), WAIT_S)
    assert list(result.token_ids) == reference(model, prompt, 6)


def test_a_chunked_attention_model_passes_the_warm_up_checks_in_place() -> None:
    """Llama-4's chunked layers beside full ones (a dict of block masks, one per layer kind):
    prefill and in-place decode steps equal the model's own forward past two chunks."""
    family = next(f for f in FAMILIES if f.name == "Llama-4")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family.config()).eval()
    with torch.inference_mode():
        runner = paged_runner(model, 2, 64, paged_attention=IN_PLACE)
        assert runner.paged_attention.path == IN_PLACE
        assert "chunked" in runner.masks.pattern.describe()
        check_prefill_and_decode(runner, make_probe(runner))  # raises if any logits differ


def test_in_place_attention_softcaps_the_scores_as_gemma2_does() -> None:
    """A small cap (real ones are 50, barely reached by a tiny model's scores): the output
    equals eager attention's cap * tanh(scores / cap) before the mask and softmax."""
    pattern, block_size, heads, dim, cap = AttentionPattern((FULL,)), 4, 2, 8, 0.5
    generator = torch.Generator().manual_seed(1)
    keys, values = (torch.randn((5, block_size, 1, dim), generator=generator) for _ in range(2))
    tables = torch.tensor([[3, 1, 4]])  # 10 positions in three scattered blocks
    positions = torch.tensor([[9]])
    query = torch.randn((1, heads, 1, dim), generator=generator)
    in_place = InPlaceAttention(
        pattern, num_blocks=5, block_size=block_size, spare_block=0, query_groups=heads,
        device=torch.device("cpu"),
    )  # fmt: skip
    out = in_place.layout(positions, tables).attend(
        torch.nn.Module(), query, keys, values, {"scaling": 1.0, "softcap": cap}
    )
    k, v = gather_kv(keys, tables, 10), gather_kv(values, tables, 10)  # [1, 1, 10, D]
    scores = cap * torch.tanh(query @ k.transpose(-1, -2) / cap)  # [1, heads, 1, 10]
    expected = (scores.softmax(-1) @ v).transpose(1, 2)  # [1, 1, heads, D]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


class FailsInPlace(StandInGraphs):
    """A capture that fails while the step's attention reads in place (as a kernel that
    cannot be graphed would), and succeeds with the gather."""

    def capture(self, run_step: Callable[[int, int], None], shapes: Sequence[DecodeShape]) -> None:
        runner = run_step.__self__  # type: ignore[attr-defined]  # the runner's _decode_bucket
        self.fail_capture = runner.paged_attention.path == IN_PLACE
        super().capture(run_step, shapes)


async def test_a_step_that_cannot_be_graphed_in_place_is_graphed_with_the_gather(
    monkeypatch: pytest.MonkeyPatch, tiny_llama: LlamaForCausalLM, make_engine: EngineFactory
) -> None:
    """Graphs save more than in place does (a launch-bound step): the server keeps them."""
    graphs = FailsInPlace()
    monkeypatch.setattr(model_runner, "DecodeGraphs", lambda: graphs)
    monkeypatch.setattr(model_runner, "unavailable_reason", lambda mode, device: None)
    engine = make_engine(warm_up=True, num_slots=2, max_seq_len=48, paged_attention=IN_PLACE)
    assert engine.cuda_graphs.enabled
    report = engine.paged_attention
    assert report.path == GATHER
    assert report.reason.startswith("CUDA graphs failed with in place: capture failed")
    prompt = tokens(9, seed=7)
    result = await asyncio.wait_for((await engine.submit(prompt, SamplingParams(8))).wait(), WAIT_S)
    assert list(result.token_ids) == reference(tiny_llama, prompt, 8)


def test_in_place_attention_applies_sinks_as_gpt_oss_does() -> None:
    """gpt-oss's sinks: one more logit per head in the softmax, with no value (eager attention
    concatenates it to the scores); 4 query heads on 2 K/V heads, each head its own sink."""
    pattern, block_size, heads, kv_heads, dim = AttentionPattern((FULL,)), 4, 4, 2, 8
    generator = torch.Generator().manual_seed(2)
    keys, values = (
        torch.randn((5, block_size, kv_heads, dim), generator=generator) for _ in range(2)
    )  # fmt: skip
    tables = torch.tensor([[2, 4, 1], [3, 0, 0]])
    positions = torch.tensor([[10], [2]])
    query = torch.randn((2, heads, 1, dim), generator=generator)
    sinks = torch.tensor([2.0, -1.0, 0.5, 3.0])
    in_place = InPlaceAttention(
        pattern, num_blocks=5, block_size=block_size, spare_block=0,
        query_groups=heads // kv_heads, device=torch.device("cpu"),
    )  # fmt: skip
    out = in_place.layout(positions, tables).attend(
        torch.nn.Module(), query, keys, values, {"scaling": 0.5, "s_aux": sinks}
    )
    k, v = (gather_kv(t, tables, 11).repeat_interleave(2, dim=1) for t in (keys, values))
    mask = LayerMasks(pattern, 11, torch.float32, torch.device("cpu")).build(positions, 11)
    assert isinstance(mask, torch.Tensor)
    scores = query @ k.transpose(-1, -2) * 0.5 + mask  # [2, heads, 1, 11]
    with_sink = torch.cat([scores, sinks.view(1, -1, 1, 1).expand(2, -1, 1, 1)], dim=-1)
    expected = (with_sink.softmax(-1)[..., :-1] @ v).transpose(1, 2)  # [2, 1, heads, D]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
