"""KV memory: how many sequences run at once, and how fast, for the same KV bytes, with a slot
of GENERATE_MAX_SEQ_LEN per row (the engine before paged memory) against blocks.

    python scripts/bench/bench_kv.py --before-dir /tmp/base                 # the issue's setup
    python scripts/bench/bench_kv.py --before-dir /tmp/base --shape tiny --requests 64  # CPU

The KV bytes are today's default (GENERATE_SLOTS=16 x GENERATE_MAX_SEQ_LEN=512 tokens, plus the
spare slot) at GENERATE_MAX_SEQ_LEN=4096: contiguous slots then fit (bytes / 4096 tokens) - 1
sequences, blocks as many as their tokens allow (up to --rows). `--requests` prompts of 32-480
tokens with max_new_tokens of 64-256 (seeded) all arrive together. Reported per engine: peak
and mean running sequences (decode rows per step), tok/s, TTFT p50/p99, and for blocks the KV
waste at steady state (allocated block positions holding no token, over the steps with at
least half the peak rows), and preemptions.

`--before-dir` runs the slot engine from that checkout (before this change) in a fresh
process; this checkout's engine runs the blocks. Random weights, greedy, ignore_eos.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_engine's shapes and build()

from bench_engine import SHAPES, _NoText, build, kv_bytes_per_token, on_fresh_thread

TODAY_SLOTS, TODAY_MAX_SEQ_LEN = 16, 512  # the defaults before paged memory


def workload(count: int, vocab: int, seed: int = 7) -> list[tuple[list[int], int]]:
    """(prompt, max_new_tokens) pairs: prompts of 32-480 tokens, 64-256 new tokens."""
    rng = random.Random(seed)
    return [
        ([rng.randrange(3, vocab) for _ in range(rng.randint(32, 480))], rng.randint(64, 256))
        for _ in range(count)
    ]


class Recorder:
    """Decode rows per step, and the KV waste of the blocks engine at each step."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.waste: list[tuple[int, float]] = []  # (rows, wasted share of allocated positions)
        self.preemptions = 0
        self.engine: Any = None

    def on_step(self, batch_size: int) -> None:
        self.rows.append(batch_size)
        blocks = getattr(self.engine, "_blocks", None)
        if blocks is not None and blocks.used_blocks:
            allocated = blocks.used_blocks * blocks.block_size
            held = sum(self.engine._slots.lengths)
            self.waste.append((batch_size, max(0.0, 1 - held / allocated)))

    def on_preemption(self) -> None:
        self.preemptions += 1

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None  # the other EngineObserver hooks


async def serve(args: argparse.Namespace) -> dict[str, Any]:
    from batching.generation.engine import GenerationEngine
    from batching.generation.sampling import SamplingParams

    model = build(args.shape, args.dtype, torch.device(args.device), Path("/tmp"))
    per_token = kv_bytes_per_token(model)
    kv_bytes = (TODAY_SLOTS + 1) * TODAY_MAX_SEQ_LEN * per_token
    paged = "kv_cache_blocks" in inspect.signature(GenerationEngine).parameters
    options: dict[str, Any] = {}
    if paged:
        rows = args.rows
        options["kv_cache_blocks"] = kv_bytes // (per_token * 16) - 1  # + the spare block
        options["prefix_cache_tokens"] = 0
    else:
        rows = kv_bytes // (args.max_seq_len * per_token) - 1  # + the spare slot
    recorder = Recorder()
    vocab = model.get_input_embeddings().num_embeddings

    def make() -> Any:
        engine = GenerationEngine(
            model, _NoText(), eos_token_ids=[], num_slots=rows, max_seq_len=args.max_seq_len,
            max_queue=args.requests, timeout_s=3600.0, observer=recorder, **options,
        )  # fmt: skip
        engine.warm_up()
        return engine

    engine = on_fresh_thread(make)
    recorder.engine = engine
    engine.start()
    work = workload(args.requests, vocab)
    started = time.perf_counter()
    handles = [
        await engine.submit(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p, n in work
    ]
    results = [await h.wait() for h in handles]
    seconds = time.perf_counter() - started
    await engine.stop(1.0)
    ttfts = sorted(r.timings.ttft_ms for r in results)
    peak = max(recorder.rows)
    steady = [w for rows_now, w in recorder.waste if rows_now >= peak / 2]
    return {
        "engine": "blocks" if paged else "slots",
        "rows": rows,
        "kv_mib": round(engine.kv_cache_bytes / 2**20, 1),
        "peak_running": peak,
        "mean_running": round(statistics.fmean(recorder.rows), 1),
        "tok_s": round(sum(r.completion_tokens for r in results) / seconds, 1),
        "ttft_p50_s": round(ttfts[len(ttfts) // 2] / 1000, 2),
        "ttft_p99_s": round(ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))] / 1000, 2),
        "waste": round(statistics.fmean(steady), 4) if steady else None,
        "preemptions": recorder.preemptions,
        "seconds": round(seconds, 1),
    }


def run_side(args: argparse.Namespace, code_dir: Path) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--worker", "--shape", args.shape, "--dtype", args.dtype]
    argv += ["--device", args.device, "--requests", str(args.requests)]
    argv += ["--rows", str(args.rows), "--max-seq-len", str(args.max_seq_len)]
    env = {**os.environ, "PYTHONPATH": str(code_dir)}
    out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def markdown(results: list[dict[str, Any]]) -> str:
    keys = list(results[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in results]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-22m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--rows", type=int, default=256, help="GENERATE_SLOTS of the blocks")
    parser.add_argument("--max-seq-len", type=int, default=4096)
    parser.add_argument("--before-dir", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(asyncio.run(serve(args))), flush=True)
        return
    here = Path(__file__).resolve().parents[2]
    sides = ([args.before_dir.resolve()] if args.before_dir else []) + [here]
    results = [run_side(args, side) for side in sides]
    print(markdown(results))


if __name__ == "__main__":
    main()
