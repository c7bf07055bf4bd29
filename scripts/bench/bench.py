"""Benchmark our service against the model alone, the HTTP floor, a naive server and peers.

    python scripts/bench/bench.py --quick          # ~2 minutes on a 2-core box, prints the ratios
    python scripts/bench/bench.py                  # ~8 minutes: the full run in BENCHMARKS.md

One run, the same models and the same inputs for every system:
  /predict   512 single-text requests (8-40 words), closed loop at concurrency 1, 16, 64 and
             open loop (Poisson) at fractions of the ceiling: ours, LitServe, naive, HTTP floor;
             then texts of which half repeat an earlier one: ours with and without its cache.
  /generate  32 prompts (16-32 tokens) x 64 new tokens, all sent at once, streamed: ours over
             HTTP, our engine without HTTP, static generate(), transformers' continuous batching
             (offline and `transformers serve --continuous-batching`), naive, HTTP floor.
Offline measurements run first, each in a fresh process. Then every server starts; all but
the one being measured are paused (SIGSTOP: LitServe polls even when idle), and the runs
interleave the systems, repeat after repeat, so that a change in the machine's background
load hits every system alike. The median repeat is reported.
Results: bench_results/bench-<time>.json and PNG plots. See BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import importlib.util
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: shared helpers

import bench_offline as offline
import bench_phases as phases
import bench_report
import bench_servers as servers
from make_bench_models import build_bench_models, generate_prompts, predict_texts


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, one repeat")
    parser.add_argument("--predict-model", default="", help="a model folder (default: bench)")
    parser.add_argument("--generate-model", default="", help="a model folder (default: bench)")
    parser.add_argument("--models-dir", type=Path, default=Path("bench_models"))
    parser.add_argument("--out", type=Path, default=Path("bench_results"))
    parser.add_argument("--concurrency", type=_ints, default=[1, 16, 64])
    parser.add_argument("--predict-requests", type=int, default=None, help="512; quick: 256")
    parser.add_argument(
        "--open-rates",
        type=_floats,
        default=None,
        help="open-loop rates as fractions of the ceiling (0.5,0.8; quick 0.6)",
    )
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument(
        "--group-padding-tokens",
        type=int,
        default=64,
        help="ours: PREDICT_MAX_GROUP_PADDING_TOKENS; the model-alone limit groups the same way",
    )
    parser.add_argument(
        "--repeat-share", type=float, default=0.5, help="cache workload: share of repeated texts"
    )
    parser.add_argument("--cache-concurrency", type=_ints, default=[1, 64])
    parser.add_argument("--cache-size", type=int, default=4096, help="ours-cache: entries")
    parser.add_argument(
        "--max-background-cpu",
        type=float,
        default=0.25,
        help="cores other processes may use during a run before it is measured again",
    )
    parser.add_argument("--retries", type=int, default=3, help="re-measurements per run")
    parser.add_argument("--repeats", type=int, default=None, help="3; quick: 1")
    parser.add_argument(
        "--naive-streams",
        type=int,
        default=None,
        help="streams sent to the naive /generate (0 = all; quick: 8, it makes ~50 tok/s)",
    )
    parser.add_argument(
        "--ours-dir",
        type=Path,
        default=servers.REPO,
        help="run `python -m service` from this checkout (before/after comparisons)",
    )
    parser.add_argument(
        "--skip",
        type=_names,
        default=[],
        help="systems to leave out, e.g. naive,transformers-serve",
    )
    args = parser.parse_args(argv)
    defaults = {"predict_requests": 512, "open_rates": [0.5, 0.8], "repeats": 3, "naive_streams": 0}
    if args.quick:  # 512 -> 256 requests, no open loop, naive /generate on 8 of the 32 streams
        defaults = {"predict_requests": 256, "open_rates": [], "repeats": 1, "naive_streams": 8}
        args.skip = [*args.skip, "transformers-cb"]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.repeats < 1 or args.predict_requests < 1 or min(args.concurrency) < 1:
        parser.error("--repeats, --predict-requests and --concurrency must be >= 1")
    return args


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def server_specs(args: argparse.Namespace, prompts_max_tokens: int) -> dict[str, Any]:
    p, g, n = args.predict_model, args.generate_model, args.new_tokens
    ours = functools.partial(
        servers.ours, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
        slots=args.prompts, max_seq_len=prompts_max_tokens + n, max_new_tokens=n,
        checkout=args.ours_dir.resolve(),
    )  # fmt: skip
    grouping = {"PREDICT_MAX_GROUP_PADDING_TOKENS": str(args.group_padding_tokens)}
    cache = grouping | {"PREDICT_CACHE_SIZE": str(args.cache_size)}
    specs = {
        "ours": ours(p, "", extra_env=grouping),
        "ours-cache": ours(p, "", name="ours-cache", extra_env=cache),
        "ours-generate": ours("", g),
        "floor": servers.peer("floor"),
        "naive": servers.peer("naive", p, g),
        "litserve": servers.peer("litserve", p, "", args.max_batch, args.max_wait_ms),
        "transformers-serve": servers.transformers_serve(g),
    }
    skipped = {
        *args.skip,
        *(f"ours-{kind}" for x in args.skip if x == "ours" for kind in ("generate", "cache")),
    }
    if "litserve" not in skipped and importlib.util.find_spec("litserve") is None:
        print("litserve is not installed (pip install --no-deps litserve pyzmq): skipped")
        skipped.add("litserve")
    return {name: spec for name, spec in specs.items() if name not in skipped}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.predict_model and args.generate_model):
        built = build_bench_models(args.models_dir)
        args.predict_model = args.predict_model or str(built["classifier"].resolve())
        args.generate_model = args.generate_model or str(built["llm"].resolve())
    _, tokenizer = offline.load_llm(args.generate_model)
    texts = predict_texts(args.predict_requests)
    prompts = generate_prompts(tokenizer, args.prompts)
    prompt_tokens = [len(tokenizer.encode(p)) for p in prompts]
    results: dict[str, Any] = {
        "meta": bench_report.machine()
        | {
            "command": " ".join(sys.argv),
            "args": _jsonable(vars(args)),
            "started": dt.datetime.now().isoformat(timespec="seconds"),
            "prompt_tokens": [min(prompt_tokens), max(prompt_tokens)],
        },
        "predict": {},
        "generate": {"systems": {}},
    }
    clock = _Clock(results["meta"])
    phases.offline_phase(args, texts, prompts, results)
    clock.lap("offline")
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = args.out / "logs"
    log_dir.mkdir(exist_ok=True)
    specs = server_specs(args, max(prompt_tokens))
    print(f"starting {', '.join(specs)} (logs in {log_dir}) ...")
    systems_started = servers.Systems(specs, log_dir, args.max_background_cpu, args.retries)
    with contextlib.closing(systems_started) as systems:
        systems.wait_ready()
        results["meta"]["idle_cpu_percent"] = systems.idle_cpu_percent
        clock.lap("servers ready")
        asyncio.run(phases.predict_phase(args, systems, texts, results))
        clock.lap("/predict runs")
        asyncio.run(phases.generate_phase(args, systems, prompts, results))
        clock.lap("/generate runs")
    targets = bench_report.predict_targets(results) + bench_report.generate_targets(results)
    results["targets"] = [t.as_dict() for t in targets]
    stem = "bench-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = args.out / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=2))
    plots = bench_report.write_plots(results, args.out, stem)
    print(bench_report.report(results))
    print(f"\nwrote {json_path} and {', '.join(str(p) for p in plots)}")
    return 0


class _Clock:
    """Seconds per phase, printed as it goes and kept in the results."""

    def __init__(self, meta: dict[str, Any]) -> None:
        self.phases_s: dict[str, float] = meta.setdefault("phases_s", {})
        self.last_s = time.perf_counter()

    def lap(self, phase: str) -> None:
        now_s = time.perf_counter()
        self.phases_s[phase] = round(now_s - self.last_s, 1)
        self.last_s = now_s
        print(f"{phase}: {self.phases_s[phase]:.0f} s", flush=True)


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


if __name__ == "__main__":
    sys.exit(main())
