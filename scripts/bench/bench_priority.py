"""What priority buys an interactive client while a batch client keeps the queue full.

    python scripts/bench/bench_priority.py [--repeats 3] [--seconds 20]

One process, the bench LLM (22M-parameter Llama, bench_models/), the generation engine without
HTTP (the queue being measured is the engine's; HTTP adds the same to both variants). The
batch client keeps `--batch-backlog` requests waiting beyond the `--slots` running ones
(64 new tokens each, submitting a new one whenever one finishes); the interactive client sends
one request (16 new tokens) every `--interactive-gap-s`, Poisson. Greedy, EOS ignored. Variants,
interleaved repeat after repeat so machine noise hits each alike:

* off: both clients at priority 0 (first come, first served: today's behaviour without keys);
* on: the batch client at priority 10 (API_KEY_PRIORITIES=batch=10), the interactive one at 0.

Reported: the interactive requests' TTFT p50/p99 (all repeats pooled), and the batch client's
output tok/s (what the batch work loses).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: shared helpers

import torch
from engine_settings import build_engine
from make_bench_models import build_bench_models, generate_prompts
from transformers import AutoModelForCausalLM, AutoTokenizer

from batching.generation.engine import GenerationEngine
from batching.generation.sampling import SamplingParams

BATCH_TOKENS, INTERACTIVE_TOKENS = 64, 16


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def batch_client(
    engine: GenerationEngine, prompts: list[list[int]], priority: int, backlog: int, stop_at: float
) -> int:
    """Keep `backlog` requests in flight beyond what runs; the tokens generated before stop_at."""
    params = SamplingParams(BATCH_TOKENS, ignore_eos=True)
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        while time.perf_counter() < stop_at:
            handle = await engine.submit(prompts[i % len(prompts)], params, priority=priority)
            result = await handle.wait()
            if time.perf_counter() < stop_at:
                tokens += result.completion_tokens

    await asyncio.gather(*(one(i) for i in range(backlog)))
    return tokens


async def interactive_client(
    engine: GenerationEngine, prompts: list[list[int]], gap_s: float, stop_at: float, seed: int
) -> list[float]:
    rng = random.Random(seed)
    params = SamplingParams(INTERACTIVE_TOKENS, ignore_eos=True)
    tasks = []
    while time.perf_counter() < stop_at:
        await asyncio.sleep(rng.expovariate(1 / gap_s))
        handle = await engine.submit(rng.choice(prompts), params, priority=0)
        tasks.append(asyncio.ensure_future(handle.wait()))
    return [result.timings.ttft_ms for result in await asyncio.gather(*tasks)]


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    paths = build_bench_models(args.models_dir)
    tokenizer = AutoTokenizer.from_pretrained(paths["llm"])
    model = AutoModelForCausalLM.from_pretrained(paths["llm"]).eval()
    engine = build_engine(
        model, tokenizer, eos_token_ids=[], num_slots=args.slots, max_seq_len=256,
        max_queue=args.slots + args.batch_backlog + 64, timeout_s=600.0,
    )  # fmt: skip
    engine.warm_up()
    engine.start()
    prompts = [tokenizer.encode(p) for p in generate_prompts(tokenizer, 32)]
    ttfts: dict[str, list[float]] = {"off": [], "on": []}
    batch_tok_s: dict[str, list[float]] = {"off": [], "on": []}
    for repeat in range(args.repeats):
        for name, batch_priority in (("off", 0), ("on", 10)):
            stop_at = time.perf_counter() + args.seconds
            backlog = args.slots + args.batch_backlog
            batch = batch_client(engine, prompts, batch_priority, backlog, stop_at)
            interactive = interactive_client(
                engine, prompts, args.interactive_gap_s, stop_at, seed=repeat
            )
            tokens, waits = await asyncio.gather(batch, interactive)
            ttfts[name] += [w for w in waits if w is not None]
            batch_tok_s[name].append(tokens / args.seconds)
        print(f"repeat {repeat + 1} done", flush=True)
    await engine.stop(0.0)
    return {
        name: {
            "interactive_requests": len(ttfts[name]),
            "ttft_p50_ms": round(statistics.median(ttfts[name]), 1),
            "ttft_p99_ms": round(percentile(ttfts[name], 99), 1),
            "batch_tok_s": round(statistics.median(batch_tok_s[name]), 1),
        }
        for name in ttfts
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=Path("bench_models"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0, help="per variant and repeat")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--batch-backlog", type=int, default=24, help="waiting beyond the slots")
    parser.add_argument("--interactive-gap-s", type=float, default=0.5)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = asyncio.run(measure(args))
    print(
        f"{'priority':10s} {'n':>5s} {'TTFT p50 ms':>12s} {'TTFT p99 ms':>12s} {'batch tok/s':>12s}"
    )
    for name, row in results.items():
        print(
            f"{name:10s} {row['interactive_requests']:5d} {row['ttft_p50_ms']:12.1f}"
            f" {row['ttft_p99_ms']:12.1f} {row['batch_tok_s']:12.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
