"""bitsandbytes int8 and nf4 models (CPU or TEST_DEVICE) through the engine vs generate().

nf4 dequantises weights and multiplies in float, row by row: batched output equals generate().

int8 (LLM.int8) is different. bitsandbytes picks "outlier" input columns (any |x| above
llm_int8_threshold, default 6.0) over the *whole batch* and computes those columns in fp16, the
rest in int8. So one row's result depends on its batch neighbours' activations, and batched
greedy tokens can drift from generate() run alone. With llm_int8_threshold=0 there is no
outlier split (only per-row int8 quantisation and exact int32 sums), and batched output equals
generate() again; with the default threshold the engine equals generate() when it runs one
request at a time (num_slots=1). Both are asserted below.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import bitsandbytes  # noqa: F401  (a dependency: a missing install must fail, not skip)
import pytest
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from batching.generation.sampling import SamplingParams
from tests.batching.conftest import TEST_DEVICE, TEST_DTYPE, EngineFactory, build_tiny_llama
from tests.batching.test_engine_matches_generate import (
    MAX_NEW_TOKENS,
    assert_matches_generate,
    prompts,
    reference,
)


@pytest.fixture(autouse=True)
def quiet_bitsandbytes() -> Iterator[None]:
    """bitsandbytes logs a warning per int8 matmul on float32 input (it casts to fp16)."""
    bnb_logger = logging.getLogger("bitsandbytes")
    level = bnb_logger.level
    bnb_logger.setLevel(logging.ERROR)
    yield
    bnb_logger.setLevel(level)


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    build_tiny_llama().save_pretrained(path)
    return path


def load_quantized(path: Path, config: BitsAndBytesConfig) -> PreTrainedModel:
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map=str(TEST_DEVICE), dtype=TEST_DTYPE
    )
    return model.eval()


async def test_nf4_engine_equals_generate(saved_llama: Path, make_engine: EngineFactory) -> None:
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=TEST_DTYPE
    )
    await assert_matches_generate(load_quantized(saved_llama, config), make_engine)


async def test_int8_without_outlier_split_equals_generate(
    saved_llama: Path, make_engine: EngineFactory
) -> None:
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
    await assert_matches_generate(load_quantized(saved_llama, config), make_engine)


async def test_int8_default_threshold_one_at_a_time_equals_generate(
    saved_llama: Path, make_engine: EngineFactory
) -> None:
    model = load_quantized(saved_llama, BitsAndBytesConfig(load_in_8bit=True))
    engine = make_engine(model=model, num_slots=1, max_seq_len=64)
    for prompt, new in list(zip(prompts(), MAX_NEW_TOKENS, strict=True))[:4]:
        handle = await engine.submit(prompt, SamplingParams(max_new_tokens=new))
        result = await handle.wait()
        assert list(result.token_ids) == reference(model, prompt, new)
