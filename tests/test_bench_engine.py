"""The engine benchmark's own logic: arguments, options for older engines, the comparison table.

No timing is asserted (timing claims live in BENCHMARKS.md); the rows below are made up.
"""

from __future__ import annotations

from typing import Any

import bench_engine
import bench_engine_compare as compare


def test_the_gpu_run_can_measure_cuda_graphs_on_and_off() -> None:
    args = bench_engine.parse_args(
        ["--device", "cuda", "--dtypes", "bfloat16", "nf4", "--cuda-graphs", "on", "off"]
    )
    assert (args.dtypes, args.cuda_graphs, args.concurrency) == (
        ["bfloat16", "nf4"],
        ["on", "off"],
        [1, 16, 32, 64],
    )
    assert args.before_dir is None


def test_a_before_after_worker_gets_the_same_workload() -> None:
    args = bench_engine.parse_args(
        ["--shape", "llama-22m", "--device", "cpu", "--dtypes", "float32", "--concurrency", "1",
         "8", "--before-dir", "/tmp/base", "--threads", "1", "--kv-bucket-min", "16"]
    )  # fmt: skip
    argv = compare.worker_argv(args)
    assert argv[:6] == ["--shape", "llama-22m", "--device", "cpu", "--dtypes", "float32"]
    assert "--before-dir" not in argv and "--repeats" not in argv
    assert argv[argv.index("--concurrency") + 1 : argv.index("--cuda-graphs")] == ["1", "8"]
    assert argv[argv.index("--threads") + 1] == "1"
    assert argv[argv.index("--kv-bucket-min") + 1] == "16"


def test_engine_options_are_only_those_this_engine_accepts() -> None:
    assert bench_engine.engine_options("on", None) == {"cuda_graphs": "on"}
    assert bench_engine.engine_options("off", 16) == {"cuda_graphs": "off", "kv_bucket_min": 16}
    assert bench_engine.engine_options("off", None, 4096)["prefill_chunk_tokens"] == 4096
    assert "prefill_token_budget" not in bench_engine.engine_options("off", None, 4096)


def row(system: str, concurrency: int, tok_per_s: float, step_ms: float | None) -> dict[str, Any]:
    return {
        "dtype": "float32",
        "system": system,
        "concurrency": concurrency,
        "output_tokens": 1000,
        "tok_per_s": tok_per_s,
        "decode_step_ms": step_ms,
        "cpu_seconds": 1000 / tok_per_s,
        "decode_step_cpu_ms": step_ms,
    }


def test_the_comparison_reports_medians_best_runs_and_ratios() -> None:
    args = bench_engine.parse_args(
        ["--dtypes", "float32", "--concurrency", "32", "--before-dir", "x", "--repeats", "3"]
    )
    measured: dict[str, dict[compare.RowKey, list[dict[str, Any]]]] = {"before": {}, "after": {}}
    for side, steps in (("before", (30.0, 20.0, 25.0)), ("after", (15.0, 10.0, 12.5))):
        rows = [row("engine", 32, 32_000 / step, step) for step in steps]
        rows += [row("generate() static batch", 32, 1000.0, None)]
        compare.collect(rows, measured[side])
    median = compare.table(args, measured, "median")
    assert "| float32 | 32 | 25.00 | 12.50 | 0.50x | 1,280 | 2,560 | 2.00x |" in median
    assert "* engine x32 / static generate(), after: 2.56x (2,560 tok/s)" in median
    best = compare.table(args, measured, "best")
    assert "| float32 | 32 | 20.00 | 10.00 | 0.50x | 1,600 | 3,200 | 2.00x |" in best
    cpu = compare.cpu_table(args, measured)
    assert "| float32 | engine | 32 | 25.00 | 12.50 | 1,280 | 2,560 |" in cpu


def test_the_comparison_pairs_each_process_engine_with_its_static_batch() -> None:
    side: dict[compare.RowKey, list[dict[str, Any]]] = {}
    engine = [row("engine", 32, 1200.0, 25.0), row("engine", 32, 900.0, 30.0)]
    compare.collect(engine + [row("generate() static batch", 32, 1000.0, None)] * 2, side)
    assert compare.same_process_ratios(side, "float32", 32) == (
        "1.20, 0.90 in tok/s; 1.20, 0.90 in output tokens per CPU second"
    )
