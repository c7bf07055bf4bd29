"""The systems without HTTP: the model alone, our engine, transformers' continuous batching.

* `predict_limit`: tokenize + forward + softmax at the max batch size, back to back, in the
  service's padding groups (or as one forward per batch, for comparison).
* `generate_limit`: all prompts as one left-padded batch through `model.generate()`, and the
  time of one forward over all of them (the batched prefill, TTFT's yardstick).
* `engine_run`: our GenerationEngine driven directly; TTFT/ITL timed where a caller reads.
* `transformers_cb`: `model.generate_batch()` (transformers' continuous batching, offline).

Each takes model folders, not models, so that bench.py can run it in a fresh process (`isolated`):
torch's OpenMP keeps one worker pool per thread that ever ran a parallel op, and on a 2-core box
a second pool makes every pool's workers sleep between ops instead of spinning (measured: the
same decode step 28 ms alone, 36 ms with a second pool). No system inherits another's pools.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from bench_load import Sample, summarize
from engine_settings import build_engine
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
)

from batching.dynamic.grouping import padding_groups
from batching.generation.engine import GenerationEngine
from batching.generation.sampling import SamplingParams

T = TypeVar("T")


def load_classifier(path: str) -> tuple[Any, Any]:
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    return model, AutoTokenizer.from_pretrained(path)


def load_llm(path: str) -> tuple[Any, Any]:
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@torch.inference_mode()
def predict_limit(
    path: str, texts: list[str], max_batch: int, repeats: int, group_padding_tokens: int | None
) -> dict[str, Any]:
    """Requests/s of the classifier alone, doing the per-batch work of the service: each text
    tokenised once, a batch of `max_batch` sorted by length and run in padding groups
    (batching/dynamic/grouping.py; None = one forward per batch), softmax."""
    model, tokenizer = load_classifier(path)
    batches = [texts[i : i + max_batch] for i in range(0, len(texts), max_batch)]

    def one_pass() -> float:
        started = time.perf_counter()
        for batch in batches:
            encoded = sorted(
                (tokenizer(t, truncation=True, max_length=512) for t in batch),
                key=lambda e: len(e["input_ids"]),
            )
            sizes = [len(e["input_ids"]) for e in encoded]
            for group in padding_groups(sizes, group_padding_tokens):
                padded = tokenizer.pad([encoded[i] for i in group], return_tensors="pt")
                model(**padded).logits.float().softmax(dim=-1).tolist()
        return time.perf_counter() - started

    one_pass()  # warm-up
    wall_s = statistics.median(one_pass() for _ in range(repeats))
    return {
        "req_per_s": round(len(texts) / wall_s, 1),
        "wall_s": round(wall_s, 3),
        "batch_size": max_batch,
        "group_padding_tokens": group_padding_tokens,
    }


def _padded(tokenizer: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
    return dict(tokenizer(prompts, padding=True, return_tensors="pt"))


def isolated(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a fresh process (spawn), so it starts from the same state as the others."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def generate_limit(path: str, prompts: list[str], new_tokens: int, repeats: int) -> dict[str, Any]:
    """Static generate() throughput, with the batched prefill time as `prefill_s`."""
    model, tokenizer = load_llm(path)
    prefill_s = batched_prefill_s(model, tokenizer, prompts)
    return static_generate(model, tokenizer, prompts, new_tokens, repeats) | {
        "prefill_s": round(prefill_s, 4)
    }


@torch.inference_mode()
def static_generate(
    model: Any, tokenizer: Any, prompts: list[str], new_tokens: int, repeats: int
) -> dict[str, Any]:
    """One left-padded batch of every prompt through generate(): output tok/s."""
    inputs = _padded(tokenizer, prompts)
    prompt_len = inputs["input_ids"].shape[1]
    kwargs = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
    }
    model.generate(**inputs, **kwargs)  # warm-up
    walls, produced = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        output = model.generate(**inputs, **kwargs)
        walls.append(time.perf_counter() - started)
        produced = (output.shape[1] - prompt_len) * output.shape[0]
    wall_s = statistics.median(walls)
    return {
        "tok_per_s": round(produced / wall_s, 1),
        "wall_s": round(wall_s, 3),
        "output_tokens": produced,
        "tokens_per_request": [produced // len(prompts)],
    }


@torch.inference_mode()
def batched_prefill_s(model: Any, tokenizer: Any, prompts: list[str], repeats: int = 5) -> float:
    """Seconds for one forward over all prompts (left-padded), next-token logits only."""
    inputs = _padded(tokenizer, prompts)
    model(**inputs, logits_to_keep=1)  # warm-up
    walls = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(**inputs, logits_to_keep=1)
        walls.append(time.perf_counter() - started)
    return statistics.median(walls)


async def _engine_once(
    engine: GenerationEngine, prompt_ids: list[list[int]], params: SamplingParams
) -> tuple[list[Sample], float]:
    async def consume(ids: list[int]) -> Sample:
        started = time.perf_counter()
        handle = await engine.submit(ids, params)
        sample, last_s = Sample(True, 0.0), started
        async for _delta in handle:
            now_s = time.perf_counter()
            if sample.ttft_s is None:
                sample.ttft_s = now_s - started
            else:
                sample.token_gaps_s.append(now_s - last_s)
            last_s = now_s
        sample.latency_s = time.perf_counter() - started
        sample.tokens = handle.result.completion_tokens
        return sample

    started = time.perf_counter()
    samples = await asyncio.gather(*(consume(ids) for ids in prompt_ids))
    return list(samples), time.perf_counter() - started


def _build_engine(path: str, prompts: list[str], new_tokens: int) -> Any:
    model, tokenizer = load_llm(path)
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    max_seq_len = max(len(ids) for ids in prompt_ids) + new_tokens
    engine = build_engine(
        model, tokenizer, eos_token_ids=[], num_slots=len(prompts), max_seq_len=max_seq_len,
        max_queue=len(prompts), timeout_s=600.0,
    )  # fmt: skip
    engine.warm_up()
    return engine, prompt_ids


def engine_run(path: str, prompts: list[str], new_tokens: int, repeats: int) -> dict[str, Any]:
    """Our engine with one slot per prompt, all prompts submitted at once, no HTTP.

    The model is loaded, and the engine built and warmed up, on a thread that then ends, so
    that the engine thread is the only one holding an OpenMP pool (see the module docstring):
    the engine at its best, the yardstick for what HTTP costs.
    """
    with ThreadPoolExecutor(1) as setup:
        engine, prompt_ids = setup.submit(_build_engine, path, prompts, new_tokens).result()
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)

    async def runs() -> list[dict[str, Any]]:
        engine.start()
        try:
            await _engine_once(engine, prompt_ids[:4], params)  # warm-up
            results = []
            for _ in range(repeats):
                results.append(summarize(*await _engine_once(engine, prompt_ids, params)))
            return results
        finally:
            await engine.stop(5.0)

    results = asyncio.run(runs())
    return sorted(results, key=lambda r: r["tok_per_s"])[len(results) // 2]


def transformers_cb(path: str, prompts: list[str], new_tokens: int, repeats: int) -> dict[str, Any]:
    """`generate_batch` (transformers' paged-attention continuous batching), offline."""
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    inputs = [tokenizer.encode(p) for p in prompts]
    model.generate_batch(inputs=inputs[:4], generation_config=config)  # warm-up
    walls, counts, produced = [], set(), 0
    for _ in range(repeats):
        started = time.perf_counter()
        outputs = model.generate_batch(inputs=inputs, generation_config=config)
        walls.append(time.perf_counter() - started)
        counts = {len(o.generated_tokens) for o in outputs.values()}
        produced = sum(len(o.generated_tokens) for o in outputs.values())
        errors = [o.error for o in outputs.values() if o.error]
        if errors or len(outputs) != len(prompts):
            raise RuntimeError(f"generate_batch: {len(outputs)} outputs, errors: {errors[:2]}")
    wall_s = statistics.median(walls)
    return {
        "tok_per_s": round(produced / wall_s, 1),
        "wall_s": round(wall_s, 3),
        "output_tokens": produced,
        "tokens_per_request": sorted(counts),
    }
