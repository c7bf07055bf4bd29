"""Compare a shadow deployment with the primary from their audit logs.

    python scripts/compare_shadow.py PRIMARY.jsonl SHADOW.jsonl [--plot shadow.png] [--top 5]

Both sides write AUDIT_LOG with AUDIT_LOG_CONTENT=true; NGINX's mirror passes the request id
through, so a request has the same id on both sides. Requests are joined by id and the report
says what a person deciding on a rollout needs: coverage (how many of the primary's requests
the shadow answered too), label agreement and score shift for classifiers, embedding cosine
for embedding models, exact match and first divergence for greedy generations, latency and
error rate per side, and the most different examples. Markdown to stdout, a plot to --plot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quant_report import first_divergence


def read_log(path: Path) -> dict[str, dict[str, Any]]:
    """request id -> its line (the last one, should a request id repeat)."""
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[record["request_id"]] = record
    return records


def side_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = sorted(r["latency_ms"] for r in records)
    errors = sum(r["status"] >= 400 or "generation_error" in r for r in records)
    return {
        "requests": len(records),
        "error_rate": errors / len(records) if records else 0.0,
        "latency_p50_ms": statistics.median(latencies) if latencies else None,
        "latency_p95_ms": latencies[int(0.95 * (len(latencies) - 1))] if latencies else None,
    }


def _outputs(record: dict[str, Any]) -> list[dict[str, Any]]:
    output = record.get("output")
    if output is None:
        return []
    return output if isinstance(output, list) else [output]


def compare_pair(primary: dict[str, Any], shadow: dict[str, Any]) -> dict[str, Any]:
    """What differs between one request's two answers (an empty dict if nothing to compare)."""
    pairs = list(zip(_outputs(primary), _outputs(shadow), strict=False))
    if not pairs or primary["status"] != 200 or shadow["status"] != 200:
        return {}
    a, b = pairs[0]
    if "label" in a:
        return {
            "kind": "classification",
            "agree": all(x["label"] == y["label"] for x, y in pairs),
            "score_shift": statistics.fmean(
                abs(x["scores"][x["label"]] - y["scores"][x["label"]]) for x, y in pairs
            ),
        }
    if "embedding" in a:
        return {"kind": "embedding", "cosine": min(_cosine(x, y) for x, y in pairs)}
    if "token_ids" in a:
        divergence = first_divergence(a["token_ids"], b["token_ids"])
        return {"kind": "generation", "exact": divergence is None, "divergence": divergence}
    return {}


def _cosine(x: dict[str, Any], y: dict[str, Any]) -> float:
    u, v = x["embedding"], y["embedding"]
    dot = sum(p * q for p, q in zip(u, v, strict=True))
    norms = (sum(p * p for p in u) * sum(q * q for q in v)) ** 0.5
    return dot / norms if norms else 0.0


def compare(
    primary: dict[str, dict[str, Any]], shadow: dict[str, dict[str, Any]], top: int = 5
) -> dict[str, Any]:
    joined = [request_id for request_id in primary if request_id in shadow]
    report: dict[str, Any] = {
        "coverage": len(joined) / len(primary) if primary else 0.0,
        "joined": len(joined),
        "primary": side_figures(list(primary.values())),
        "shadow": side_figures(list(shadow.values())),
    }
    diffs = {rid: compare_pair(primary[rid], shadow[rid]) for rid in joined}
    by_kind: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for request_id, diff in diffs.items():
        if diff:
            by_kind.setdefault(diff["kind"], []).append((request_id, diff))
    for kind, items in by_kind.items():
        values = [d for _, d in items]
        if kind == "classification":
            report[kind] = {
                "compared": len(values),
                "label_agreement": sum(d["agree"] for d in values) / len(values),
                "score_shift_mean": statistics.fmean(d["score_shift"] for d in values),
            }
            ranked = sorted(items, key=lambda item: -item[1]["score_shift"])
        elif kind == "embedding":
            cosines = [d["cosine"] for d in values]
            report[kind] = {"compared": len(values), "cosine_mean": statistics.fmean(cosines),
                            "cosine_min": min(cosines)}  # fmt: skip
            ranked = sorted(items, key=lambda item: item[1]["cosine"])
        else:
            diverged = [d["divergence"] for d in values if d["divergence"] is not None]
            report[kind] = {
                "compared": len(values),
                "exact_match": sum(d["exact"] for d in values) / len(values),
                "first_divergence_mean": statistics.fmean(diverged) if diverged else None,
            }
            ranked = sorted(items, key=lambda item: _divergence_rank(item[1]))
        report[kind]["most_different"] = [
            {"request_id": request_id, "input": primary[request_id].get("input"), **diff}
            for request_id, diff in ranked[:top]
        ]
    return report


def _divergence_rank(diff: dict[str, Any]) -> float:
    return float("inf") if diff["divergence"] is None else diff["divergence"]


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Shadow comparison: {report['joined']} requests answered by both sides "
        f"(coverage {report['coverage']:.1%})",
        "",
        "| | primary | shadow |",
        "|---|---|---|",
    ]
    for key in ("requests", "error_rate", "latency_p50_ms", "latency_p95_ms"):
        p, s = report["primary"][key], report["shadow"][key]
        lines.append(f"| {key} | {_cell(p)} | {_cell(s)} |")
    for kind in ("classification", "embedding", "generation"):
        if kind not in report:
            continue
        figures = {k: v for k, v in report[kind].items() if k != "most_different"}
        lines += ["", f"**{kind}**: " + ", ".join(f"{k} {_cell(v)}" for k, v in figures.items())]
        for example in report[kind]["most_different"]:
            lines.append(f"- {example['request_id']}: {json.dumps(example)[:200]}")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def plot(primary: dict, shadow: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name, records in (("primary", primary), ("shadow", shadow)):
        axis.hist([r["latency_ms"] for r in records.values()], bins=30, alpha=0.6, label=name)
    axis.set_xlabel("latency (ms)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("primary", type=Path)
    parser.add_argument("shadow", type=Path)
    parser.add_argument("--plot", type=Path, default=Path("shadow.png"))
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    parser.add_argument("--top", type=int, default=5, help="most different examples shown")
    args = parser.parse_args(argv)
    primary, shadow = read_log(args.primary), read_log(args.shadow)
    report = compare(primary, shadow, args.top)
    print(markdown(report))
    plot(primary, shadow, args.plot)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
