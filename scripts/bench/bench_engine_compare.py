"""Before/after a change to the engine, on one machine: bench_engine.py's measurement, run in
fresh processes alternately against two checkouts' `batching`, so that a change in the
machine's background load hits both alike (ABBA order: before, after, after, before, ...).

    python scripts/bench/bench_engine.py --shape llama-22m --device cpu --dtypes float32 \\
        --concurrency 1 8 32 --before-dir /tmp/base --repeats 3

The measuring code is this checkout's bench_engine.py in both cases; only the engine differs.
generate() does not depend on the engine, so its runs from both sides are pooled. The report
gives the median of the repeats, and the best of them (the run least disturbed by other load).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIDES = ("before", "after")
RowKey = tuple[str, str, int]  # (dtype, system, concurrency)


def worker_argv(args: argparse.Namespace) -> list[str]:
    """bench_engine.py's own arguments, minus the comparison."""
    argv = ["--shape", args.shape, "--device", args.device, "--dtypes", *args.dtypes]
    argv += ["--concurrency", *map(str, args.concurrency), "--cuda-graphs", *args.cuda_graphs]
    argv += ["--static-batch", str(args.static_batch), "--prompt-tokens", str(args.prompt_tokens)]
    argv += ["--new-tokens", str(args.new_tokens), "--bandwidth-gbs", str(args.bandwidth_gbs)]
    argv += ["--threads", str(args.threads)]
    if args.kv_bucket_min is not None:
        argv += ["--kv-bucket-min", str(args.kv_bucket_min)]
    return argv + (["--skip-generate"] if args.skip_generate else [])


def cpu_idle_fraction(window_s: float = 2.0) -> float:
    """Share of CPU time the whole machine spent idle over the next window_s (Linux)."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    idle_0, total_0 = sample()
    time.sleep(window_s)
    idle_1, total_1 = sample()
    return (idle_1 - idle_0) / max(1, total_1 - total_0)


def wait_for_idle_cpu(max_wait_s: float, idle: float = 0.9) -> None:
    """On a shared box, start a run only once others leave the CPU alone (or max_wait_s)."""
    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline:
        if (share := cpu_idle_fraction()) >= idle:
            return
        print(f"    waiting: the CPU is {1 - share:.0%} busy", flush=True)
    print("    the CPU did not go idle; running anyway", flush=True)


def run_worker(script: Path, checkout: Path, argv: list[str]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as scratch:
        rows_json = Path(scratch) / "rows.json"
        env = os.environ | {"PYTHONPATH": str(checkout)}  # this checkout's `batching` wins
        subprocess.run([sys.executable, str(script), *argv, "--rows-json", str(rows_json)],
                       env=env, check=True)  # fmt: skip
        rows: list[dict[str, Any]] = json.loads(rows_json.read_text())
    return rows


def collect(rows: list[dict[str, Any]], into: dict[RowKey, list[dict[str, Any]]]) -> None:
    for row in rows:
        into.setdefault((row["dtype"], row["system"], row["concurrency"]), []).append(row)


def pick(rows: list[dict[str, Any]], field: str, how: str) -> float:
    """The median run, or the best one (least disturbed: fastest step, most tok/s)."""
    values = [float(r[field]) for r in rows]
    if how == "median":
        return statistics.median(values)
    return min(values) if field == "decode_step_ms" else max(values)


def table(
    args: argparse.Namespace, measured: dict[str, dict[RowKey, list[dict[str, Any]]]], how: str
) -> str:
    """how: "median" (of the repeats) or "best" (of the repeats)."""
    before, after = measured["before"], measured["after"]
    lines = [
        f"{args.shape} on {args.device}; {how} of {args.repeats} interleaved repeats "
        f"(each a fresh process); {args.prompt_tokens}-token prompts, {args.new_tokens} new "
        "tokens each.",
        "",
        "| dtype | concurrency | decode step ms before | after | after / before "
        "| engine tok/s before | after | after / before |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dtype in args.dtypes:
        for n in args.concurrency:
            old, new = before[(dtype, "engine", n)], after[(dtype, "engine", n)]
            step_old, step_new = (pick(r, "decode_step_ms", how) for r in (old, new))
            tps_old, tps_new = (pick(r, "tok_per_s", how) for r in (old, new))
            lines.append(f"| {dtype} | {n} | {step_old:.2f} | {step_new:.2f} | "
                         f"{step_new / step_old:.2f}x | {tps_old:,.0f} | {tps_new:,.0f} | "
                         f"{tps_new / tps_old:.2f}x |")  # fmt: skip
    for dtype in [] if args.skip_generate else args.dtypes:
        static = before[(dtype, "generate() static batch", args.static_batch)]
        static = static + after[(dtype, "generate() static batch", args.static_batch)]
        static_tps = pick(static, "tok_per_s", how)
        lines += ["", f"{dtype}: static generate() x{args.static_batch}: {static_tps:,.0f} tok/s "
                  f"({how} of {len(static)} runs)"]  # fmt: skip
        if args.static_batch in args.concurrency:
            for side in SIDES:
                engine_rows = measured[side][(dtype, "engine", args.static_batch)]
                engine = pick(engine_rows, "tok_per_s", how)
                lines.append(f"* engine x{args.static_batch} / static generate(), {side}: "
                             f"{engine / static_tps:.2f}x ({engine:,.0f} tok/s)")  # fmt: skip
                ratios = same_process_ratios(measured[side], dtype, args.static_batch)
                if how == "median" and ratios:  # each process ran both, one after the other
                    lines.append(f"  per process, engine / static generate(): {ratios}")
    return "\n".join(lines)


def same_process_ratios(side: dict[RowKey, list[dict[str, Any]]], dtype: str, n: int) -> str:
    """Engine tok/s at n streams over the static generate() batch of n measured right after it
    in the same process: pairs taken side by side, so background load hits both alike."""
    engine = side[(dtype, "engine", n)]
    static = side[(dtype, "generate() static batch", n)]
    if len(engine) != len(static):
        return ""  # (not one of each per process: nothing to pair)
    pairs = list(zip(engine, static, strict=True))
    wall = ", ".join(f"{e['tok_per_s'] / s['tok_per_s']:.2f}" for e, s in pairs)
    cpu = ", ".join(f"{s['cpu_seconds'] / e['cpu_seconds']:.2f}" for e, s in pairs)
    return f"{wall} in tok/s; {cpu} in output tokens per CPU second"  # (the same tokens)


def cpu_table(
    args: argparse.Namespace, measured: dict[str, dict[RowKey, list[dict[str, Any]]]]
) -> str:
    """CPU time instead of wall time: with --threads 1, hardly moved by other load."""
    lines = [
        f"CPU time, medians of {args.repeats} repeats (torch threads: {args.threads or 'default'})"
        ": the engine thread's per decode step, and output tokens per CPU second of the whole "
        "process (engine and event-loop threads together).",
        "",
        "| dtype | system | concurrency | step CPU ms before | after | tok per CPU s before "
        "| after |",
        "|---|---|---|---|---|---|---|",
    ]
    for (dtype, system, n), after_rows in measured["after"].items():
        before_rows = measured["before"][(dtype, system, n)]
        cells = []
        for field in ("decode_step_cpu_ms", "cpu_seconds"):
            for rows in (before_rows, after_rows):
                values = [float(r[field]) for r in rows if r.get(field) is not None]
                if not values:
                    cells.append("")
                elif field == "cpu_seconds":
                    cells.append(f"{rows[0]['output_tokens'] / statistics.median(values):,.0f}")
                else:
                    cells.append(f"{statistics.median(values):.2f}")
        lines.append(f"| {dtype} | {system} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(args: argparse.Namespace, script: Path) -> None:
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    checkouts = {"before": args.before_dir.resolve(), "after": script.parents[2]}
    measured: dict[str, dict[RowKey, list[dict[str, Any]]]] = {side: {} for side in SIDES}
    raw: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for side in SIDES if repeat % 2 == 0 else SIDES[::-1]:
            print(f"--- repeat {repeat + 1}/{args.repeats}: {side} ({checkouts[side]})", flush=True)
            if args.wait_for_idle_s > 0:
                wait_for_idle_cpu(args.wait_for_idle_s)
            rows = run_worker(script, checkouts[side], worker_argv(args))
            collect(rows, measured[side])
            raw.append({"repeat": repeat, "side": side, "rows": rows})
    report = "\n\n".join(
        [table(args, measured, "median"), table(args, measured, "best"), cpu_table(args, measured)]
    )
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"engine_compare_{args.shape}_{args.device}"
    (args.out / f"{stem}.md").write_text(report + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps({"checkouts": {
        side: str(path) for side, path in checkouts.items()}, "runs": raw}, indent=1))  # fmt: skip
