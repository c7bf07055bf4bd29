"""scripts/gpu_check.py's CPU dry run: the GPU check's code runs end to end (a few equality
tests, a tiny engine benchmark) and writes its Markdown and JSON, so it cannot rot while no
GPU is at hand. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_gpu_check_dry_run_writes_a_table_and_json(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts/gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    [tests] = report["tests"]
    assert tests["passed"] and "passed" in tests["summary"]
    assert {row["concurrency"] for row in report["bench"]["rows"]} == {1, 2}
    table = (tmp_path / "gpu_check.md").read_text()
    assert "## Equality tests" in table and "## Engine benchmark" in table
