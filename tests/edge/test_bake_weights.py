"""scripts/bake_weights.py: what it skips and what it would not download (no network used)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from tests.edge.processes import REPO

SCRIPT = REPO / "scripts" / "bake_weights.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bake_weights", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_empty_and_local_models_are_skipped_without_downloading(tmp_path: Path) -> None:
    local = tmp_path / "local-model"
    local.mkdir()
    manifest = tmp_path / "hf" / "baked-models.json"
    args = [sys.executable, str(SCRIPT), "--predict-model", "", "--generate-model", str(local)]
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr  # any download attempt would have failed
    assert "predict: no model configured, skipped" in result.stdout
    assert f"generate: {local} is a local directory, nothing to download" in result.stdout
    # The manifest (in HF_HOME by default) records what was baked, here only why nothing was.
    predict, generate = json.loads(manifest.read_text())["models"]
    assert predict == {
        "role": "predict",
        "name": "",
        "revision": "main",
        "skipped": "no model configured",
    }
    assert generate == {
        "role": "generate",
        "name": str(local),
        "revision": "main",
        "skipped": "a local directory",
    }


def test_pickled_weights_are_skipped_only_when_safetensors_exist() -> None:
    ignore_patterns = load_script().ignore_patterns
    with_safetensors = ignore_patterns(["config.json", "model.safetensors", "pytorch_model.bin"])
    pickled_only = ignore_patterns(["config.json", "pytorch_model.bin"])
    assert "*.bin" in with_safetensors
    assert "*.bin" not in pickled_only
    assert "*.h5" in pickled_only and "*.onnx" in pickled_only
