"""A burst of short prompts: the default prefill budget (GENERATE_PREFILL_CHUNK_TOKENS=auto, the
stall bound GENERATE_MAX_STALL_STEPS) against a fixed 256 and the model alone, interleaved.

    python scripts/bench/bench_admission.py --repeats 3              # ~10 minutes on 2 cores
    python scripts/bench/bench_admission.py --before-dir /tmp/main  # + `auto` from a checkout

bench.py's /generate workload, and only that: 32 prompts of 16-32 tokens x 64 new tokens, all
sent at once and streamed, to `python -m service` with 32 slots, once per configuration.
The servers start one at a time (so each warm-up measurement runs alone), then all but the one
measured are paused, and the runs interleave configuration by configuration, repeat after
repeat, with static generate() (one left-padded batch of the same prompts) and one batched
prefill of them timed in this process in between, so a change in the machine's load hits
every system alike. Reports the median repeat per system and the ratios bench.py's targets
use: ours / static generate() tok/s, and TTFT p99 / one batched prefill.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: shared helpers

import bench_load as load
import bench_offline as offline
import bench_servers as servers
from bench_phases import median_run
from harness import HttpServer
from make_bench_models import build_bench_models, generate_prompts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=Path("bench_models"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--before-dir", type=Path, help="also `auto` from this checkout")
    parser.add_argument(
        "--max-background-cpu",
        type=float,
        default=0.25,
        help="cores other processes may use during a run before it is measured again",
    )
    parser.add_argument("--out", type=Path, default=Path("bench_results"))
    return parser.parse_args(argv)


def server_specs(args: argparse.Namespace, model: str, max_seq_len: int) -> dict[str, Any]:
    def ours(name: str, checkout: Path = servers.REPO, **env: str) -> servers.ServerSpec:
        return servers.ours(
            "", model, max_batch=32, max_wait_ms=5.0, slots=args.prompts,
            max_seq_len=max_seq_len, max_new_tokens=args.new_tokens, checkout=checkout,
            name=name, extra_env=env,
        )  # fmt: skip

    specs = {
        "auto": ours("auto", GENERATE_PREFILL_CHUNK_TOKENS="auto"),
        "chunk-256": ours("chunk-256", GENERATE_PREFILL_CHUNK_TOKENS="256"),
    }
    if args.before_dir:
        before = args.before_dir.resolve()
        specs["auto (before)"] = ours("auto-before", before, GENERATE_PREFILL_CHUNK_TOKENS="auto")
    return specs


async def measure(
    args: argparse.Namespace, systems: servers.Systems, model: str, prompts: list[str]
) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {}
    for repeat in range(args.repeats):
        static = await asyncio.to_thread(offline.generate_limit, model, prompts, args.new_tokens, 1)
        runs.setdefault("static", []).append(static)
        for name, spec in systems.specs.items():
            call = load.generate_call(spec.url, args.new_tokens)
            warm = load.generate_call(spec.url, 4)
            run = await systems.measure(
                name, call, warm, prompts, len(prompts), desc=f"{name} #{repeat + 1}",
                histogram="generate_step_batch_size",
            )  # fmt: skip
            runs.setdefault(name, []).append(run)
        print(f"repeat {repeat + 1} done", flush=True)
    results = {name: median_run(by_repeat, "tok_per_s") for name, by_repeat in runs.items()}
    static_tps = results["static"]["tok_per_s"]
    prefill_ms = statistics.median(r["prefill_s"] for r in runs["static"]) * 1000
    for name in systems.specs:
        result = results[name]
        result["ours_over_static"] = round(result["tok_per_s"] / static_tps, 2)
        result["ttft_p99_over_prefill"] = round(result["ttft_ms"]["p99"] / prefill_ms, 2)
        result["tok_per_s_over_chunk_256"] = round(
            result["tok_per_s"] / results["chunk-256"]["tok_per_s"], 2
        )
    return results | {"one batched prefill ms": round(prefill_ms, 1)}


def chunk_limits(server: HttpServer, url: str) -> dict[str, Any]:
    """What the server's warm-up measured (its /info), read while it is resumed."""
    server.resume()
    try:
        with urllib.request.urlopen(f"{url}/info") as response:
            generate: dict[str, Any] = json.load(response)["generate"]
    finally:
        server.pause()
    return generate["prefill_chunk_limits"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = str(build_bench_models(args.models_dir)["llm"])
    _, tokenizer = offline.load_llm(model)
    prompts = generate_prompts(tokenizer, args.prompts)
    max_seq_len = max(len(tokenizer.encode(p)) for p in prompts) + args.new_tokens
    specs = server_specs(args, model, max_seq_len)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-admission-"))
    systems = servers.Systems({}, log_dir, args.max_background_cpu, retries=2)
    try:
        limits = {}
        for name, spec in specs.items():
            systems.start_alone(name, spec, log_dir, servers.READY_TIMEOUT_S * 3)
            limits[name] = chunk_limits(systems.procs[name], spec.url)
        results = asyncio.run(measure(args, systems, model, prompts))
        results["chunk limits (/info)"] = limits
    finally:
        systems.close()
    for label, result in results.items():
        print(f"{label:16s} {json.dumps(result)}")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"bench-admission-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
