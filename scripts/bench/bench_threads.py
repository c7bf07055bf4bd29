"""/predict at c16 and c64, ours and LitServe, each with torch's default intra-op threads and
with one (OMP_NUM_THREADS=1), side by side: does giving the model fewer threads leave the HTTP
stack and the client enough of a small box to gain overall?

    python scripts/bench/bench_threads.py                 # 3 interleaved repeats, ~4 minutes

Same classifier, texts and server settings as bench.py's /predict runs (max batch 32, wait
5 ms, padding groups of 64 tokens); the median repeat by req/s is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: shared helpers

import bench_load as load
import bench_servers as servers
from make_bench_models import build_bench_models, predict_texts

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def specs(classifier: str) -> dict[str, servers.ServerSpec]:
    grouping = {"PREDICT_MAX_GROUP_PADDING_TOKENS": "64"}
    ours = {
        name: servers.ours(classifier, "", 32, 5.0, 32, 128, 64, name=name, extra_env=env)
        for name, env in (("ours", grouping), ("ours-1-thread", grouping | ONE_THREAD))
    }
    litserve, other = (servers.peer("litserve", classifier, "", 32, 5.0) for _ in range(2))
    one_thread = dataclasses.replace(other, name="litserve-1-thread", env=ONE_THREAD)
    return ours | {"litserve": litserve, "litserve-1-thread": one_thread}


async def measure(systems: servers.Systems, repeats: int) -> dict[str, Any]:
    texts = predict_texts(512)
    runs: dict[str, list[dict[str, Any]]] = {}
    for repeat in range(repeats):
        for concurrency in (16, 64):
            for name, spec in systems.specs.items():
                call = load.predict_call(spec.url)
                desc = f"{name} c{concurrency} #{repeat + 1}"
                run = await systems.measure(name, call, call, texts, concurrency, desc=desc)
                runs.setdefault(f"{name} c{concurrency}", []).append(run)
    results = {}
    for label, by_repeat in runs.items():
        median = sorted(by_repeat, key=lambda r: r["req_per_s"])[len(by_repeat) // 2]
        results[label] = {
            "req_per_s": median["req_per_s"],
            "p99_ms": median["latency_ms"]["p99"],
            "repeats": [r["req_per_s"] for r in by_repeat],
        }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=Path("bench_models"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench_results"))
    args = parser.parse_args(argv)
    classifier = str(build_bench_models(args.models_dir)["classifier"].resolve())
    log_dir = args.out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(servers.Systems(specs(classifier), log_dir, 0.25, 3)) as systems:
        systems.wait_ready()
        results = asyncio.run(measure(systems, args.repeats))
    for label, result in results.items():
        print(f"{label:28s} {json.dumps(result)}")
    (args.out / "bench-threads.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
