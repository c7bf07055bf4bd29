"""KV memory: how many sequences run at once, and how fast, for the same KV bytes, with a slot
of GENERATE_MAX_SEQ_LEN per row (the engine before paged memory) against blocks.

    python scripts/bench/bench_kv.py --before-dir /tmp/base --before-time-limit 300  # 256 requests
    python scripts/bench/bench_kv.py --before-dir /tmp/base --before-time-limit 180 --shape tiny

The KV bytes are today's default (GENERATE_SLOTS=16 x GENERATE_MAX_SEQ_LEN=512 tokens, plus the
spare slot) at GENERATE_MAX_SEQ_LEN=4096: contiguous slots then fit (bytes / 4096 tokens) - 1
sequences, blocks as many as their tokens allow (up to --rows). `--requests` prompts of 32-480
tokens with max_new_tokens of 64-256 (seeded) all arrive together. Reported per engine: peak
and mean running sequences (decode rows per step), tok/s, TTFT p50/p99, and for blocks the KV
waste at steady state (allocated block positions holding no token, over the steps with at
least half the peak rows), and preemptions.

Method. Every request's stream is read as it arrives: tok/s is the tokens delivered over the
measured window, TTFT a request's first token minus its submit time. Without a time limit the
window ends when the last request has finished. The slot engine fits a single 4,096-token
sequence in these bytes and would need hours for 256 requests on a CPU, so
`--before-time-limit S` measures it over a fixed window of S seconds from the first submit
instead: tokens delivered in the window / S, peak and mean running over the steps taken in
the window, TTFT over the requests that got their first token in the window (`started`: how
many did; the others would wait longer, so this TTFT flatters the slot engine), and
`all_done_s`, the time all the requests would take at the window's rate (their new tokens /
tok/s); then the engine is stopped and the rest are interrupted. The blocks engine always runs
every request to its end.

`--before-dir` runs the slot engine from that checkout (before this change) in a fresh
process; this checkout's engine runs the blocks. Random weights, greedy, ignore_eos.
"""

from __future__ import annotations

import argparse
import asyncio
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
from engine_settings import accepted_settings, build_engine

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


class Stream:
    """One request as its client sees it: tokens delivered, and when the first one came."""

    def __init__(self, handle: Any) -> None:
        self.submitted_s = time.perf_counter()
        self.first_token_s: float | None = None
        self.tokens = 0
        self.finished = False
        self.reading = asyncio.create_task(self._read(handle))

    async def _read(self, handle: Any) -> None:
        async for delta in handle:
            if delta.token_ids and self.first_token_s is None:
                self.first_token_s = time.perf_counter()
            self.tokens += len(delta.token_ids)
        self.finished = True

    def started_by(self, when_s: float) -> bool:
        return self.first_token_s is not None and self.first_token_s <= when_s

    @property
    def ttft_s(self) -> float:
        return (self.first_token_s or self.submitted_s) - self.submitted_s


def percentile(sorted_values: list[float], share: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * share))]


async def serve(args: argparse.Namespace) -> dict[str, Any]:
    from batching.generation.sampling import SamplingParams

    model = build(args.shape, args.dtype, torch.device(args.device), Path("/tmp"))
    per_token = kv_bytes_per_token(model)
    kv_bytes = (TODAY_SLOTS + 1) * TODAY_MAX_SEQ_LEN * per_token
    paged = "kv_cache_blocks" in accepted_settings()
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
        engine = build_engine(
            model, _NoText(), eos_token_ids=[], num_slots=rows, max_seq_len=args.max_seq_len,
            max_queue=args.requests, timeout_s=36000.0, observer=recorder, **options,
        )  # fmt: skip
        engine.warm_up()
        return engine

    engine = on_fresh_thread(make)
    recorder.engine = engine
    engine.start()
    work = workload(args.requests, vocab)
    started = time.perf_counter()
    streams = []
    for prompt, new_tokens in work:
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        streams.append(Stream(await engine.submit(prompt, params)))
    await asyncio.wait([s.reading for s in streams], timeout=args.time_limit_s)
    seconds = time.perf_counter() - started
    steps = list(recorder.rows)  # the window's steps
    tokens = sum(s.tokens for s in streams)
    finished = sum(s.finished for s in streams)
    await engine.stop(0.0)  # a windowed run: the rest are interrupted
    await asyncio.gather(*(s.reading for s in streams), return_exceptions=True)
    window_end = started + seconds
    first = [s.ttft_s for s in streams if s.started_by(window_end)]
    ttfts = sorted(first) or [float("nan")]  # (nobody started within the window)
    peak = max(steps)
    steady = [w for rows_now, w in recorder.waste[: len(steps)] if rows_now >= peak / 2]
    tok_s = tokens / seconds
    all_done_s = seconds if finished == len(streams) else sum(n for _, n in work) / tok_s
    return {
        "engine": "blocks" if paged else "slots",
        "rows": rows,
        "kv_mib": round(engine.kv_cache_bytes / 2**20, 1),
        "window_s": round(seconds, 1) if args.time_limit_s else "all",
        "started": len(first),
        "finished": finished,
        "peak_running": peak,
        "mean_running": round(statistics.fmean(steps), 1),
        "tok_s": round(tok_s, 1),
        "ttft_p50_s": round(percentile(ttfts, 0.5), 2),
        "ttft_p99_s": round(percentile(ttfts, 0.99), 2),
        "waste": f"{statistics.fmean(steady):.1%}" if steady else "-",
        "preemptions": recorder.preemptions,
        "all_done_s": round(all_done_s, 1),
    }


def run_side(
    args: argparse.Namespace, code_dir: Path, time_limit_s: float | None
) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--worker", "--shape", args.shape, "--dtype", args.dtype]
    argv += ["--device", args.device, "--requests", str(args.requests)]
    argv += ["--rows", str(args.rows), "--max-seq-len", str(args.max_seq_len)]
    if time_limit_s is not None:
        argv += ["--time-limit-s", str(time_limit_s)]
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
    parser.add_argument(
        "--before-time-limit", type=float, default=None, metavar="S",
        help="measure the --before-dir engine over S seconds instead of to the end",
    )  # fmt: skip
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--time-limit-s", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(asyncio.run(serve(args))), flush=True)
        return
    here = Path(__file__).resolve().parents[2]
    results = []
    if args.before_dir:
        results.append(run_side(args, args.before_dir.resolve(), args.before_time_limit))
    results.append(run_side(args, here, None))
    print(markdown(results))


if __name__ == "__main__":
    main()
