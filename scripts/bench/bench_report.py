"""From a results dict to targets (met / not met), markdown tables and PNG plots."""

from __future__ import annotations

import contextlib
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def ceiling(limit: float, floor: float) -> float:
    """What a batched server can reach when the model and the HTTP stack share the CPU:
    each request costs 1/limit of model time plus 1/floor of HTTP time."""
    if limit <= 0 or floor <= 0:
        return math.nan
    return 1.0 / (1.0 / limit + 1.0 / floor)


def ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


@dataclass(frozen=True)
class Target:
    name: str
    measured: float
    threshold: float
    higher_is_better: bool = True
    note: str = ""

    @property
    def met(self) -> bool:
        if math.isnan(self.measured):
            return False
        if self.higher_is_better:
            return self.measured >= self.threshold
        return self.measured <= self.threshold

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "measured": None if math.isnan(self.measured) else round(self.measured, 3),
            "threshold": self.threshold,
            "higher_is_better": self.higher_is_better,
            "met": self.met,
            "note": self.note,
        }


def _run(results: dict[str, Any], task: str, system: str, run: str) -> dict[str, Any]:
    return results.get(task, {}).get("systems", {}).get(system, {}).get(run, {})


def predict_targets(results: dict[str, Any]) -> list[Target]:
    def rps(system: str, run: str) -> float | None:
        return _run(results, "predict", system, run).get("req_per_s")

    def latency(system: str, run: str, q: str) -> float | None:
        return _run(results, "predict", system, run).get("latency_ms", {}).get(q)

    ceiling = results["predict"].get("ceiling")
    targets = [
        Target(
            "/predict c1: ours p50 / naive p50",
            ratio(latency("ours", "c1", "p50"), latency("naive", "c1", "p50")),
            1.1,
            higher_is_better=False,
        ),
        Target(
            "/predict c1: ours / naive req/s", ratio(rps("ours", "c1"), rps("naive", "c1")), 0.9
        ),
    ]
    for run in ("c16", "c64"):
        targets += [
            Target(
                f"/predict {run}: ours / LitServe req/s",
                ratio(rps("ours", run), rps("litserve", run)),
                1.2,
            ),
            Target(
                f"/predict {run}: ours p99 / LitServe p99",
                ratio(latency("ours", run, "p99"), latency("litserve", run, "p99")),
                1.0,
                higher_is_better=False,
            ),
            Target(f"/predict {run}: ours / ceiling", ratio(rps("ours", run), ceiling), 0.9),
        ]
    targets.append(
        Target(
            "/predict c64: ours / naive req/s", ratio(rps("ours", "c64"), rps("naive", "c64")), 1.8
        )
    )
    cached = [r for r in _systems(results, "ours-cache") if r.startswith("repeated")]
    for run in cached:
        targets.append(
            Target(
                f"/predict {run}, half the texts repeated: cache on / off req/s",
                ratio(rps("ours-cache", run), rps("ours", run)),
                1.0,
                note="no threshold in the issue: the cache must at least not cost throughput",
            )
        )
    return targets


def _systems(results: dict[str, Any], system: str) -> list[str]:
    return list(results.get("predict", {}).get("systems", {}).get(system, {}))


def generate_targets(results: dict[str, Any]) -> list[Target]:
    generate = results["generate"]

    def tps(system: str) -> float | None:
        return generate.get("systems", {}).get(system, {}).get("streams", {}).get("tok_per_s")

    ours = tps("ours")
    ttft_p99_s = _run(results, "generate", "ours", "streams").get("ttft_ms", {}).get("p99")
    prefill_s = generate.get("prefill_s")
    return [
        Target("/generate: ours HTTP / static generate() tok/s", ratio(ours, tps("static")), 1.0),
        Target("/generate: ours HTTP / our engine without HTTP", ratio(ours, tps("engine")), 0.8),
        Target(
            "/generate: ours / transformers serve --continuous-batching",
            ratio(ours, tps("transformers-serve")),
            1.5,
        ),
        Target("/generate: ours / naive server tok/s", ratio(ours, tps("naive")), 10.0),
        Target(
            "/generate: ours TTFT p99 / one batched prefill",
            ratio(ttft_p99_s, None if prefill_s is None else prefill_s * 1000),
            2.0,
            higher_is_better=False,
        ),
    ]


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:,.{digits}f}"
    return str(value)


def targets_table(targets: list[Target]) -> str:
    rows = ["| target | measured | needed | |", "|---|---:|---:|---|"]
    for t in targets:
        sign = ">=" if t.higher_is_better else "<="
        verdict = "met" if t.met else "**not met**"
        if math.isnan(t.measured):
            verdict = "not measured"
        rows.append(f"| {t.name} | {_fmt(t.measured, 2)}x | {sign} {t.threshold}x | {verdict} |")
    return "\n".join(rows)


def predict_table(results: dict[str, Any]) -> str:
    rows = [
        "| system | run | req/s | p50 ms | p95 ms | p99 ms | errors | mean batch | cache hits |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for system, runs in results["predict"]["systems"].items():
        for run, s in runs.items():
            lat = s.get("latency_ms", {})
            rows.append(
                f"| {system} | {run} | {_fmt(s.get('req_per_s'))} | {_fmt(lat.get('p50'))} | "
                f"{_fmt(lat.get('p95'))} | {_fmt(lat.get('p99'))} | {_fmt(s.get('errors'))} | "
                f"{_fmt(s.get('mean_batch'))} | {_fmt(s.get('cache_hit_ratio'), 2)} |"
            )
    return "\n".join(rows)


def generate_table(results: dict[str, Any]) -> str:
    rows = [
        "| system | run | out tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | "
        "latency p99 ms | tokens/req | errors | mean batch |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for system, runs in results["generate"]["systems"].items():
        for run, s in runs.items():
            ttft, itl = s.get("ttft_ms", {}), s.get("itl_ms", {})
            rows.append(
                f"| {system} | {run} | {_fmt(s.get('tok_per_s'))} | "
                f"{_fmt(ttft.get('p50'))} / {_fmt(ttft.get('p99'))} | "
                f"{_fmt(itl.get('p50'))} / {_fmt(itl.get('p99'))} | "
                f"{_fmt(s.get('latency_ms', {}).get('p99'))} | "
                f"{s.get('tokens_per_request', '-')} | {_fmt(s.get('errors'))} | "
                f"{_fmt(s.get('mean_batch'))} |"
            )
    return "\n".join(rows)


def write_plots(results: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """predict throughput and p99 vs concurrency (one line per system), generate tok/s bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    systems = results["predict"]["systems"]
    for metric, label, name in (
        ("req_per_s", "requests/s", "throughput"),
        ("p99", "p99 latency (ms)", "p99"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=80)
        for system, runs in systems.items():
            points = sorted((int(run[1:]), s) for run, s in runs.items() if run.startswith("c"))
            ys = [s.get(metric) if metric != "p99" else s["latency_ms"]["p99"] for _, s in points]
            ax.plot([c for c, _ in points], ys, marker="o", label=system)
        if metric == "req_per_s":
            for key in ("limit", "ceiling"):
                value = results["predict"].get(key)
                if value:
                    ax.axhline(value, linestyle="--", linewidth=1, color="grey")
                    ax.annotate(key, (1, value), fontsize=8, color="grey")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # the floor and the naive server are an order of magnitude apart
        concurrencies = sorted(
            {int(r[1:]) for runs in systems.values() for r in runs if r[0] == "c"}
        )
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        ax.set_xlabel("concurrency (closed loop)")
        ax.set_ylabel(label)
        ax.set_title(f"/predict {label}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{stem}-predict-{name}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    gen = {
        k: v.get("streams", {}).get("tok_per_s") for k, v in results["generate"]["systems"].items()
    }
    gen = {k: v for k, v in gen.items() if v}
    fig, ax = plt.subplots(figsize=(6, 4), dpi=80)
    ax.barh(list(gen), list(gen.values()))
    ax.set_xlabel("output tokens/s (32 streams x 64 tokens)")
    ax.set_title("/generate throughput")
    fig.tight_layout()
    path = out_dir / f"{stem}-generate.png"
    fig.savefig(path)
    plt.close(fig)
    return [*paths, path]


def _target(saved: dict[str, Any]) -> Target:
    fields = {k: v for k, v in saved.items() if k != "met"}
    return Target(
        **fields | {"measured": math.nan if saved["measured"] is None else saved["measured"]}
    )


def report(results: dict[str, Any]) -> str:
    """The markdown summary printed at the end of a run (and pasted into BENCHMARKS.md)."""
    p, g = results["predict"], results["generate"]
    lines = [
        f"/predict: model alone {_fmt(p.get('limit'))} req/s in padding groups "
        f"({_fmt(p.get('limit_one_forward'))} as one forward per batch), HTTP floor "
        f"{_fmt(p.get('floor'))} req/s, ceiling {_fmt(p.get('ceiling'))} req/s",
        f"/generate: one batched prefill {_fmt((g.get('prefill_s') or 0) * 1000)} ms, "
        f"HTTP floor {_fmt(g.get('floor'))} tok/s, ceiling {_fmt(g.get('ceiling'))} tok/s",
        "",
        predict_table(results),
        "",
        generate_table(results),
        "",
        targets_table([_target(t) for t in results["targets"]]),
    ]
    return "\n".join(lines)
