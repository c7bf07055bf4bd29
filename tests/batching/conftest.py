"""Tiny models and a real byte-level BPE tokenizer, built offline in well under a second."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import pytest
import torch
from tiny_models import decoder_config, train_byte_bpe
from transformers import LlamaForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

from batching.generation.config import DEFAULT_KV_BLOCK_SIZE, EngineConfig
from batching.generation.engine import GenerationEngine
from batching.generation.kv_cache import gather_kv
from batching.generation.model_runner import ModelRunner, build_paged_cache
from batching.generation.observer import FinishLabel
from tests.batching.collector_fakes import make_collector  # noqa: F401 (the collector tests' fixture)

# The same tests run on a GPU box with TEST_DEVICE=cuda (and TEST_DTYPE=bfloat16 if wanted).
TEST_DEVICE = torch.device(os.environ.get("TEST_DEVICE", "cpu"))
TEST_DTYPE: torch.dtype = getattr(torch, os.environ.get("TEST_DTYPE", "float32"))
# How engines' decode attention reads KV blocks unless a test says (GENERATE_PAGED_ATTENTION):
# scripts/gpu_check.py runs the equality tests with in_place and with gather on a GPU.
TEST_PAGED_ATTENTION = os.environ.get("TEST_PAGED_ATTENTION", "auto")
WAIT_S = 10.0  # bound for anything that should happen promptly; never reached when all is well
VOCAB_SIZE = 384  # a multiple of 32 (bitsandbytes nf4 needs it), small enough to be fast
EOS_ID = 2
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Continuous batching lets requests join and leave the batch at every step.",
    "héllo wörld ✓ 日本語 😀 café naïve smørrebrød 中文 한국어 Ελληνικά русский",
    "stop here. END of the line. STOP STOP stop! numbers 0 1 2 3 42 3.14",
]


def tiny_llama_config(attn_implementation: str = "sdpa") -> PretrainedConfig:
    """2 layers, 4 query heads sharing 2 KV heads (GQA); a wide init so greedy tokens vary."""
    return decoder_config(
        "llama",
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=EOS_ID,
        pad_token_id=0,
        attn_implementation=attn_implementation,
    )


def build_tiny_llama(attn_implementation: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(attn_implementation))
    return model.to(TEST_DEVICE, TEST_DTYPE).eval()


@pytest.fixture(scope="session")
def tiny_llama() -> LlamaForCausalLM:
    return build_tiny_llama()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few lines that include multi-byte text."""
    return train_byte_bpe(
        CORPUS * 4,
        vocab_size=VOCAB_SIZE,
        special_tokens=["<pad>", "<s>", "</s>"],
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


EngineFactory = Callable[..., GenerationEngine]


@pytest.fixture
async def make_engine(
    tiny_llama: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast
) -> AsyncIterator[EngineFactory]:
    """Build and start engines (tiny Llama by default); all are stopped after the test.

    `warm_up=True` warms the engine up first, as the service does: on CUDA that captures the
    decode step's graphs, so the test then runs on replays.
    """
    engines: list[GenerationEngine] = []

    def make(*, warm_up: bool = False, **overrides: object) -> GenerationEngine:
        options: dict[str, object] = {
            "eos_token_ids": (EOS_ID,),
            "num_slots": 4,
            "max_seq_len": 96,
            "max_queue": 64,
            "timeout_s": 30.0,
            "paged_attention": TEST_PAGED_ATTENTION,
        }
        options.update(overrides)
        model = options.pop("model", tiny_llama)
        engine_tokenizer = options.pop("tokenizer", tokenizer)
        observer = options.pop("observer", None)
        grammar_tokenizer = options.pop("grammar_tokenizer", None)
        for listed in ("eos_token_ids", "special_tokens"):
            if listed in options:
                options[listed] = tuple(options[listed])  # type: ignore[call-overload]
        engine = GenerationEngine(
            model,  # type: ignore[arg-type]
            engine_tokenizer,  # type: ignore[arg-type]
            EngineConfig(**options),  # type: ignore[arg-type]
            observer=observer,  # type: ignore[arg-type]
            grammar_tokenizer=grammar_tokenizer,
        )
        if warm_up:
            engine.warm_up()
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.stop(drain_timeout_s=0.0)


class Gate:
    """A forward pre-hook that can hold the engine inside a model step, or make one raise."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.is_open = threading.Event()
        self.is_open.set()
        self.entered = threading.Event()
        self.failures_left = 0
        self._handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any) -> None:
        self.entered.set()
        if self.failures_left > 0:
            self.failures_left -= 1
            raise RuntimeError("injected model failure")
        if not self.is_open.wait(timeout=WAIT_S):
            raise RuntimeError("the test never opened the gate")

    def close(self) -> None:
        self.entered.clear()
        self.is_open.clear()

    def open(self) -> None:
        self.is_open.set()

    async def wait_until_entered(self) -> None:
        """Wait (bounded) until the engine thread is inside a forward pass."""
        if not await asyncio.to_thread(self.entered.wait, WAIT_S):
            raise TimeoutError("the engine never ran a forward pass")

    def remove(self) -> None:
        self.open()
        self._handle.remove()


@pytest.fixture
def gated_llama() -> Iterator[tuple[LlamaForCausalLM, Gate]]:
    """A fresh tiny Llama whose forward passes a test can hold or fail."""
    model = build_tiny_llama()
    gate = Gate(model)
    yield model, gate
    gate.remove()


class RecordingObserver:
    """An EngineObserver that keeps everything it is told."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.ttfts_s: list[float] = []
        self.gaps_s: list[float] = []
        self.finished: list[tuple[FinishLabel, int, int, float]] = []
        self.prefix_queries: list[tuple[int, int]] = []  # (prompt tokens, hit tokens)
        self.prefill_chunks: list[int] = []
        self.first_token_priorities: list[int] = []
        self.rejected: list[tuple[str, int]] = []
        self.preemptions = 0

    def on_step(self, batch_size: int) -> None:
        self.steps.append(batch_size)

    def on_first_token(self, ttft_s: float, priority: int) -> None:
        self.ttfts_s.append(ttft_s)
        self.first_token_priorities.append(priority)

    def on_rejected(self, reason: str, priority: int) -> None:
        self.rejected.append((reason, priority))

    def on_token_gaps(self, gaps_s: Sequence[float]) -> None:
        self.gaps_s.extend(gaps_s)

    def on_prefix_cache_query(self, prompt_tokens: int, hit_tokens: int) -> None:
        self.prefix_queries.append((prompt_tokens, hit_tokens))

    def on_prefill_chunks(self, chunks: int) -> None:
        self.prefill_chunks.append(chunks)

    def on_preemption(self) -> None:
        self.preemptions += 1

    def on_finish(
        self, reason: FinishLabel, prompt_tokens: int, output_tokens: int, e2e_s: float
    ) -> None:
        self.finished.append((reason, prompt_tokens, output_tokens, e2e_s))


class MixedSteps:
    """Counts an engine's mixed steps (prefill and decode in one forward, attention.py),
    so a test can show that the path it checks was really taken."""

    def __init__(self, engine: GenerationEngine) -> None:
        self.count = 0
        runner = engine._runner
        original = runner.mixed_step

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return original(*args, **kwargs)

        runner.mixed_step = counted  # type: ignore[method-assign]


def paged_runner(
    model: torch.nn.Module, rows: int, max_seq_len: int, **options: Any
) -> ModelRunner:
    """A runner whose pool gives each of `rows` rows max_seq_len positions of blocks of its
    own (`row_tables`): what a slot per row used to be."""
    blocks_per_row = -(-max_seq_len // DEFAULT_KV_BLOCK_SIZE)
    cache = build_paged_cache(model, rows * blocks_per_row, DEFAULT_KV_BLOCK_SIZE, max_seq_len)
    return ModelRunner(model, cache, max_rows=rows, **options)


def row_tables(runner: ModelRunner) -> list[list[int]]:
    """Row r's blocks in a paged_runner: blocks_per_row consecutive blocks from 1."""
    per_row = runner.cache.max_blocks_per_seq
    return [list(range(1 + r * per_row, 1 + (r + 1) * per_row)) for r in range(runner.max_rows)]


def row_kv(runner: ModelRunner, row: int, length: int) -> list[torch.Tensor]:
    """Every layer's K and V of row r's positions 0..length-1: [kv_heads, length, head_dim]."""
    table = torch.tensor([row_tables(runner)[row]], device=runner.device)
    cache = runner.cache
    return [gather_kv(t, table, length)[0] for t in (*cache.keys, *cache.values)]
