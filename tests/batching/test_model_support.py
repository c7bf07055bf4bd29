"""Reading a model's attention layout from its config, the masks built from it, and the warm-up
checks that keep a model the engine cannot run exactly from being served wrong."""

from __future__ import annotations

import logging

import pytest
import torch
from model_families import FAMILIES, Family
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from batching.generation.attention import LayerMasks
from batching.generation.model_support import (
    CHUNKED,
    FULL,
    SLIDING,
    AttentionPattern,
    UnsupportedModelError,
    attention_pattern,
    check_mixed_step,
    check_prefill_and_decode,
    make_probe,
    refusal_reason,
)
from tests.batching.conftest import EngineFactory, paged_runner


def family(name: str) -> Family:
    return next(f for f in FAMILIES if f.name == name)


def tiny(name: str) -> PreTrainedModel:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(family(name).config()).eval()


@pytest.mark.parametrize(
    ("model_type", "fields", "expected"),
    [
        ("mistral", {"sliding_window": 4096}, ((SLIDING,) * 2, 4096, None)),
        ("mistral", {"sliding_window": None}, ((FULL,) * 2, None, None)),
        ("qwen2_moe", {"use_sliding_window": False}, ((FULL,) * 2, None, None)),  # window 0
        ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
         ((FULL, SLIDING), 16, None)),
        ("gemma2", {"sliding_window": 512}, ((SLIDING, FULL), 512, None)),
        ("llama4_text", {"attention_chunk_size": 32, "no_rope_layers": [1, 0]},
         ((CHUNKED, FULL), None, 32)),
        ("gpt_neo", {"num_layers": 2, "attention_types": [[["global", "local"], 1]]},
         ((FULL,) * 2, None, None)),  # its own attention applies window_size (or is refused)
    ],
)  # fmt: skip
def test_the_window_is_read_from_every_config_spelling(
    model_type: str, fields: dict, expected: tuple
) -> None:
    config = AutoConfig.for_model(model_type, num_hidden_layers=2, **fields)
    pattern = attention_pattern(config)
    assert (pattern.layer_types, pattern.sliding_window, pattern.chunk_size) == expected


def test_qwen2_moe_with_a_window_of_zero_is_served_at_any_length() -> None:
    config = AutoConfig.for_model("qwen2_moe", num_hidden_layers=2)
    assert config.sliding_window == 0  # what every released checkpoint's config loads as
    model = AutoModelForCausalLM.from_config(family("Qwen2-MoE").config())
    paged_runner(model, 2, 4096)  # no refusal


def test_sliding_and_chunked_masks_follow_each_query_position() -> None:
    pattern = AttentionPattern((SLIDING, CHUNKED, FULL), sliding_window=3, chunk_size=4)
    masks = LayerMasks(pattern, 16, torch.float32, torch.device("cpu"))
    positions = torch.tensor([[5, 9]])  # [1, 2]
    visible = {
        rule: [row.nonzero().flatten().tolist() for row in masks.allowed(rule, positions, 10)[0]]
        for rule in (FULL, SLIDING, CHUNKED)
    }
    assert visible[FULL] == [list(range(6)), list(range(10))]
    assert visible[SLIDING] == [[3, 4, 5], [7, 8, 9]]
    assert visible[CHUNKED] == [[4, 5], [8, 9]]
    built = masks.build(positions, 10)
    assert isinstance(built, dict) and set(built) == {SLIDING, CHUNKED, FULL}
    assert built[SLIDING].shape == (1, 1, 2, 10)


def test_a_model_of_one_layer_kind_gets_one_mask_tensor() -> None:
    masks = LayerMasks(AttentionPattern((SLIDING,) * 3, 4), 8, torch.float32, torch.device("cpu"))
    assert isinstance(masks.build(torch.tensor([[6]]), 7), torch.Tensor)


def test_a_runner_whose_masks_miss_the_window_is_refused_at_the_check() -> None:
    """The safety net: had the window not been read, the warm-up check would refuse the model
    instead of serving it wrong."""
    model = tiny("Mistral")
    with torch.inference_mode():
        runner = paged_runner(model, 3, 64)
        runner.masks = LayerMasks(AttentionPattern((FULL,) * 2), 64, torch.float32, runner.device)
        with pytest.raises(UnsupportedModelError, match="a prefill's logits differ"):
            check_prefill_and_decode(runner, make_probe(runner))


def test_a_mixed_step_through_an_attention_that_bypasses_ours_is_caught() -> None:
    """GPT-J's attention ignores the mixed layout: it attends over what the cache view hands
    back in a mixed step (the whole block pool, which our attention gathers per part), so the
    mixed step fails there, and the check reports it instead of raising."""
    model = tiny("GPT-J")
    with torch.inference_mode():
        runner = paged_runner(model, 3, 64)
        probe = make_probe(runner)
        check_prefill_and_decode(runner, probe)  # prefill and decode are exact
        assert "a mixed step fails on this model" in str(check_mixed_step(runner, probe))


async def test_warm_up_turns_mixed_steps_off_when_they_differ(
    make_engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny("GPT-J")
    model._supports_attention_backend = True  # pretend: only the warm-up check can tell
    with caplog.at_level(logging.WARNING, "batching.generation.engine"):
        engine = make_engine(model=model, warm_up=True, num_slots=3, max_seq_len=64)
    assert engine.mixed_steps is False
    assert "a mixed step fails on this model" in str(engine.mixed_steps_off_reason)
    assert "mixed steps are off" in caplog.text


def test_a_model_naming_layers_other_than_attention_is_refused() -> None:
    """A hybrid this module has no name for is still found from its layer list."""
    config = AutoConfig.for_model("llama", num_hidden_layers=2)
    config.layers_block_type = ["mamba", "attention"]
    assert "LlamaForCausalLM has mamba layers, not only attention" in str(
        refusal_reason(config, 64, "LlamaForCausalLM")
    )


def test_dynamic_rope_scaling_is_refused_past_the_length_where_it_rescales() -> None:
    """Past max_position_embeddings, dynamic NTK scaling recomputes the rotary frequencies from
    the largest position in the forward: a batch neighbour would change a row's output."""
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    config = AutoConfig.for_model("llama", max_position_embeddings=32, rope_parameters=rope)
    assert refusal_reason(config, 32) is None
    assert "set GENERATE_MAX_SEQ_LEN to at most 32 (it is 64)" in str(refusal_reason(config, 64))


def test_gpt_neo_past_its_window_fails_the_check_even_without_its_refusal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its local layers cut their window by the batch's padded length: the refusal says so from
    the config, and the warm-up check would have caught it from the logits anyway."""
    model = tiny("GPT-Neo (past its window)")
    monkeypatch.setattr(
        "batching.generation.model_runner.check_supported",
        lambda model, max_seq_len: attention_pattern(model.config),
    )
    with torch.inference_mode():
        runner = paged_runner(model, 3, 64)
        with pytest.raises(UnsupportedModelError, match="logits differ"):
            check_prefill_and_decode(runner, make_probe(runner))
