"""Before you quantise: how much does int8 or nf4 change *your* model on *your* inputs?

    python scripts/quant_report.py MODEL INPUTS [--device cpu|cuda] [--settings none,int8,nf4]
        [--out report.json] [--plot report.png] [--max-new-tokens 32]

MODEL is a hub id or a folder; INPUTS has one text per line, or JSONL objects with "text" and
optionally "label" (classifiers: accuracy) or "reference" (generation: the reference text's
per-token loss). The model is loaded with the service's own loading code at each setting, and
compared with the unquantised one ("none", which is also compared with itself as a check):

* classifier: label agreement with none, accuracy when labels are given, |score - score of
  none| for the label none chose;
* embedding model: cosine between each embedding and none's, and how many inputs' nearest
  neighbour (among the inputs) changes;
* generation model: greedy token agreement (exact matches, first divergence position) and,
  with references, the mean per-token loss of the references;

plus weight memory and throughput. A Markdown table goes to stdout, JSON to --out, a plot to
--plot. The demo and bench models have random weights: use your own model and data.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo: service/

from service.models import LoadedModel, load_generate_model, load_predict_model
from service.predict.predictor import Classification, Predictor
from service.settings import Settings


def read_inputs(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = line
        rows.append(row if isinstance(row, dict) else {"text": str(row)})
    return rows


def is_generation(model: str) -> bool:
    from transformers import AutoConfig

    architectures = AutoConfig.from_pretrained(model).architectures or []
    return any(a.endswith("ForCausalLM") for a in architectures)


def load(model: str, quantization: str, device: str, generation: bool) -> LoadedModel:
    settings = Settings(
        predict_model="" if generation else model,
        generate_model=model if generation else "",
        quantization=quantization,  # type: ignore[arg-type]
        device=device,  # type: ignore[arg-type]
    )
    return load_generate_model(settings) if generation else load_predict_model(settings)


def predict_all(loaded: LoadedModel, texts: list[str], batch: int = 16) -> tuple[list[Any], float]:
    predictor = Predictor(loaded)
    started = time.perf_counter()
    outputs: list[Any] = []
    for start in tqdm(range(0, len(texts), batch), desc=f"{loaded.quantization:>4}", leave=False):
        chunk = [predictor.encode(text) for text in texts[start : start + batch]]
        outputs += predictor.run_batch(chunk)
    return outputs, time.perf_counter() - started


def generate_all(
    loaded: LoadedModel, rows: list[dict[str, Any]], new_tokens: int
) -> tuple[list[list[int]], list[float | None], float]:
    tokenizer, model = loaded.tokenizer, loaded.model
    outputs: list[list[int]] = []
    losses: list[float | None] = []
    started = time.perf_counter()
    with torch.inference_mode():
        for row in tqdm(rows, desc=f"{loaded.quantization:>4}", leave=False):
            prompt = tokenizer(row["text"], return_tensors="pt").to(loaded.device)
            generated = model.generate(
                **prompt, max_new_tokens=new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
            outputs.append(generated[0, prompt["input_ids"].shape[1] :].tolist())
            losses.append(reference_loss(loaded, row["text"], row.get("reference")))
    return outputs, losses, time.perf_counter() - started


def reference_loss(loaded: LoadedModel, prompt: str, reference: str | None) -> float | None:
    """Mean negative log-likelihood per token of `reference` after `prompt`."""
    if not reference:
        return None
    tokenizer = loaded.tokenizer
    prompt_ids = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + reference, return_tensors="pt")["input_ids"].to(loaded.device)
    logits = loaded.model(full).logits[0, :-1].float()
    targets = full[0, 1:]
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    return float(nll[len(prompt_ids) - 1 :].mean())


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first position where two token sequences differ (None: identical)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_predictions(base: list[Any], other: list[Any], rows: list[dict[str, Any]]) -> dict:
    if isinstance(base[0], Classification):
        agree = [b.label == o.label for b, o in zip(base, other, strict=True)]
        shifts = [abs(o.scores[b.label] - b.score) for b, o in zip(base, other, strict=True)]
        figures: dict[str, Any] = {
            "label_agreement": sum(agree) / len(agree),
            "score_shift_mean": statistics.fmean(shifts),
            "score_shift_max": max(shifts),
            "score_shifts": shifts,
        }
        labelled = [(r["label"], o.label) for r, o in zip(rows, other, strict=True) if "label" in r]
        if labelled:
            figures["accuracy"] = sum(str(t) == p for t, p in labelled) / len(labelled)
        return figures
    base_vecs = torch.tensor([b.embedding for b in base])
    other_vecs = torch.tensor([o.embedding for o in other])
    cosines = torch.nn.functional.cosine_similarity(base_vecs, other_vecs).tolist()
    return {
        "cosine_mean": statistics.fmean(cosines),
        "cosine_min": min(cosines),
        "neighbour_changes": neighbour_changes(base_vecs, other_vecs),
        "cosines": cosines,
    }


def neighbour_changes(base: torch.Tensor, other: torch.Tensor) -> int:
    """Inputs whose nearest other input (by cosine) is not the same under both settings."""
    if len(base) < 3:
        return 0

    def nearest(vectors: torch.Tensor) -> list[int]:
        normed = torch.nn.functional.normalize(vectors, dim=-1)
        similarity = normed @ normed.T
        similarity.fill_diagonal_(-2.0)
        return similarity.argmax(dim=-1).tolist()

    return sum(a != b for a, b in zip(nearest(base), nearest(other), strict=True))


def compare_generations(base: list[list[int]], other: list[list[int]]) -> dict[str, Any]:
    divergences = [first_divergence(b, o) for b, o in zip(base, other, strict=True)]
    diverged = [d for d in divergences if d is not None]
    return {
        "exact_match": divergences.count(None) / len(divergences),
        "first_divergence_mean": statistics.fmean(diverged) if diverged else None,
        "first_divergence_min": min(diverged) if diverged else None,
        "divergences": divergences,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = read_inputs(args.inputs)
    texts = [r["text"] for r in rows]
    generation = is_generation(args.model)
    report: dict[str, Any] = {"model": args.model, "inputs": len(rows), "settings": {}}
    baseline: Any = None
    for quantization in ["none", *[s for s in args.settings if s != "none"]]:
        loaded = load(args.model, quantization, args.device, generation)
        memory_bytes = loaded.model.get_memory_footprint()
        if generation:
            outputs, losses, seconds = generate_all(loaded, rows, args.max_new_tokens)
            tokens = sum(len(o) for o in outputs)
            figures = {"tokens_per_s": tokens / seconds}
            known = [loss for loss in losses if loss is not None]
            if known:
                figures["reference_loss"] = statistics.fmean(known)
        else:
            outputs, seconds = predict_all(loaded, texts)
            figures = {"inputs_per_s": len(texts) / seconds}
        baseline = outputs if baseline is None else baseline
        if generation:
            figures |= compare_generations(baseline, outputs)
        else:
            figures |= compare_predictions(baseline, outputs, rows)
        report["settings"][quantization] = {"weight_bytes": memory_bytes, **figures}
        del loaded
    return report


SHOWN = [
    ("label_agreement", "label agreement", "{:.3f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("score_shift_mean", "mean abs score shift", "{:.4f}"),
    ("cosine_mean", "mean cosine", "{:.4f}"),
    ("cosine_min", "min cosine", "{:.4f}"),
    ("neighbour_changes", "nearest-neighbour changes", "{}"),
    ("exact_match", "greedy exact match", "{:.3f}"),
    ("first_divergence_mean", "mean first divergence", "{:.1f}"),
    ("reference_loss", "reference loss / token", "{:.4f}"),
    ("weight_bytes", "weights (MiB)", "MIB"),
    ("inputs_per_s", "inputs/s", "{:.1f}"),
    ("tokens_per_s", "tokens/s", "{:.1f}"),
]


def markdown(report: dict[str, Any]) -> str:
    settings = report["settings"]
    lines = [
        f"Quantization report: {report['model']} on {report['inputs']} inputs (vs none)",
        "",
        "| | " + " | ".join(settings) + " |",
        "|---|" + "---|" * len(settings),
    ]
    for key, label, form in SHOWN:
        values = [figures.get(key) for figures in settings.values()]
        if all(v is None for v in values):
            continue
        cells = ["-" if v is None else _format(v, form) for v in values]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _format(value: Any, form: str) -> str:
    return f"{value / 2**20:.1f}" if form == "MIB" else form.format(value)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name, figures in report["settings"].items():
        if name == "none":
            continue
        values = figures.get("score_shifts") or figures.get("cosines")
        if values is None:
            values = [d for d in figures.get("divergences", []) if d is not None]
        axis.hist(values, bins=30, alpha=0.6, label=name)
    axis.set_title("Distance from the unquantised model, per input")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("inputs", type=Path)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--settings", type=lambda s: s.split(","), default=["none", "int8", "nf4"])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("quant_report.json"))
    parser.add_argument("--plot", type=Path, default=Path("quant_report.png"))
    args = parser.parse_args(argv)
    report = run(args)
    print(markdown(report))
    args.out.write_text(json.dumps(report, indent=2))
    plot(report, args.plot)
    print(f"\nwrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
