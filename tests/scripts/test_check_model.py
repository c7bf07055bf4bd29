"""scripts/check_model.py prints what the server will do with a model, as its exit code too."""

from __future__ import annotations

from pathlib import Path

import check_model
import pytest
import torch
from model_families import FAMILIES
from tiny_models import save_causal_lm

from tests.batching.conftest import build_tokenizer


def check(model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple:
    """Run the script's main() in this process (what `python scripts/check_model.py` runs)."""
    monkeypatch.chdir(model.parent)  # no .env from the repo
    monkeypatch.setenv("DEVICE", "cpu")
    argv = ["check_model.py", str(model), "--max-seq-len", "128", "--max-new-tokens", "8"]
    monkeypatch.setattr("sys.argv", argv)
    code = check_model.main()
    return code, capsys.readouterr().out


def test_the_demo_model_is_served_equal_to_generate(
    demo_models: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    code, out = check(demo_models["llm"], monkeypatch, capsys)
    assert code == 0, out
    assert "SERVED" in out and "equal to generate() on 4 prompts" in out
    assert "attention sdpa, layers full, mixed steps on" in out


def test_a_refused_family_is_reported_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    family = next(f for f in FAMILIES if f.name == "Qwen3-Next")
    torch.manual_seed(0)
    save_causal_lm(family.config(), build_tokenizer(), tmp_path / "model")
    code, out = check(tmp_path / "model", monkeypatch, capsys)
    assert code == 1, out
    assert out.startswith("REFUSED")
    assert "linear-attention (Gated DeltaNet) layers, not only attention" in out
