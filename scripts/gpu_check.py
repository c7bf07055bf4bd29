"""The GPU check in one command: the engine's equality tests on the device, then the engine
benchmark, into one Markdown table and one JSON file.

    python scripts/gpu_check.py --out gpu_check              # an H100/H200 (not yet timed)
    python scripts/gpu_check.py --dry-run --out /tmp/check   # CPU: tiny shape, a few steps

On CUDA: the equality tests (greedy output equals generate(), mixed steps, padded rows, CUDA
graph replays, paged KV with preemption and shared prefixes, attention over blocks in place)
under TEST_DEVICE=cuda with fp32 and bf16, once with the decode step's attention reading the KV
blocks in place (TEST_PAGED_ATTENTION=in_place: FlexAttention, compiled) and once gathering
them (the quantized test file covers nf4 and int8), then bench_engine on the Qwen2.5-0.5B
shape (bf16, nf4) at batch 1/16/32/64: the gather with CUDA graphs on and off, in place with
graphs on, each step against the bandwidth bound.

The dry run runs the same code on the CPU with a tiny shape and a few tests (in place
included), so the script cannot rot while no GPU is at hand (tests/scripts/test_gpu_check.py
runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EQUALITY_TESTS = [
    "tests/batching/test_engine_matches_generate.py",
    "tests/batching/test_paged_kv.py",
    "tests/batching/test_mixed_step.py",
    "tests/batching/test_decode_padding.py",
    "tests/batching/test_cuda_graphs.py",
    "tests/batching/test_prefix_and_chunked_prefill.py",
    "tests/batching/test_paged_attention.py",
]
PAGED_PATHS = ("in_place", "gather")  # TEST_PAGED_ATTENTION: how decode attention reads blocks
QUANTIZED_TESTS = ["tests/batching/test_quantized_engine_matches_generate.py"]


@dataclass
class TestRun:
    name: str
    device: str
    dtype: str
    paged_attention: str
    passed: bool
    seconds: float
    summary: str  # pytest's last line


def run_tests(
    files: list[str], device: str, dtype: str, extra: list[str], paged: str = "auto"
) -> TestRun:
    env = {**os.environ, "TEST_DEVICE": device, "TEST_DTYPE": dtype}
    env["TEST_PAGED_ATTENTION"] = paged
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, *extra],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    name = ", ".join(Path(f).stem.removeprefix("test_") for f in files)
    return TestRun(
        name, device, dtype, paged, done.returncode == 0, time.perf_counter() - started,
        lines[-1] if lines else done.stderr[-200:],
    )  # fmt: skip


def bench_runs(dry_run: bool) -> list[list[str]]:
    """bench_engine's arguments: the gather with CUDA graphs on and off, then in place with
    graphs on (what `auto` serves on a GPU); on the dry run, both paths in one process on the
    tiny shape (a process costs seconds of imports on the CI box)."""
    if dry_run:
        argv = ["--shape", "tiny", "--device", "cpu", "--dtypes", "float32"]
        argv += ["--concurrency", "1", "2", "--new-tokens", "4", "--cuda-graphs", "off"]
        argv += ["--skip-generate", "--prompt-tokens", "8", "--paged-attention", *PAGED_PATHS]
        return [argv]
    base = ["--shape", "qwen2.5-0.5b", "--device", "cuda", "--dtypes", "bfloat16", "nf4"]
    base += ["--concurrency", "1", "16", "32", "64", "--new-tokens", "64"]
    return [
        [*base, "--cuda-graphs", "on", "off", "--paged-attention", "gather"],
        [*base, "--cuda-graphs", "on", "--paged-attention", "in_place", "--skip-generate"],
    ]


def run_bench(args: argparse.Namespace) -> dict[str, object]:
    tables: list[str] = []
    report: dict[str, object] = {"rows": []}
    for index, argv in enumerate(bench_runs(args.dry_run)):
        out = args.out / f"bench{index}"
        subprocess.run(
            [sys.executable, str(REPO / "scripts/bench/bench_engine.py"), *argv, "--out", str(out)],
            cwd=REPO, check=True, capture_output=True, text=True,
        )  # fmt: skip
        [result] = out.glob("engine_*.json")
        [table] = out.glob("engine_*.md")
        measured = json.loads(result.read_text())
        report["device"] = measured["device"]
        report["rows"] = [*report["rows"], *measured["rows"]]  # type: ignore[misc]
        tables.append(table.read_text())
    return {"table": "\n".join(tables), **report}


def markdown(tests: list[TestRun], bench: dict[str, object]) -> str:
    lines = ["## Equality tests", ""]
    lines.append("| tests | device | dtype | paged attention | result | seconds |")
    lines.append("|---|---|---|---|---|---:|")
    for run in tests:
        verdict = "pass" if run.passed else "FAIL"
        lines.append(
            f"| {run.name} | {run.device} | {run.dtype} | {run.paged_attention} | "
            f"{verdict}: {run.summary} | {run.seconds:.0f} |"
        )
    lines += ["", "## Engine benchmark", "", str(bench["table"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shape, few steps")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        tests = [
            run_tests(
                ["tests/batching/test_paged_kv.py", "tests/batching/test_paged_attention.py"],
                "cpu", "float32", ["-k", "crossing_block_boundaries and 16"], "in_place",
            )
        ]  # fmt: skip
    else:
        tests = [
            run_tests(EQUALITY_TESTS, "cuda", dtype, [], paged)
            for dtype in ("float32", "bfloat16")
            for paged in PAGED_PATHS
        ]
        tests.append(run_tests(QUANTIZED_TESTS, "cuda", "float32", []))
    bench = run_bench(args)
    (args.out / "gpu_check.md").write_text(markdown(tests, bench))
    report = {"tests": [asdict(t) for t in tests], "bench": bench}
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print(markdown(tests, bench))
    return 0 if all(t.passed for t in tests) else 1


if __name__ == "__main__":
    sys.exit(main())
