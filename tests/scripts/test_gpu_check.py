"""scripts/gpu_check.py's CPU dry run: the GPU check's code runs end to end (a few equality
tests, the in-place attention path's among them; a tiny engine benchmark, in place against
gather) and writes its Markdown and JSON, so it cannot rot while no GPU is at hand. No timing
is asserted."""

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
    assert tests["passed"] and "2 passed" in tests["summary"]  # gather's test and in place's
    assert tests["paged_attention"] == "in_place"
    rows = report["bench"]["rows"]
    assert {(row["concurrency"], row["paged_attention"]) for row in rows} == {
        (n, path) for n in (1, 2) for path in ("gather", "in_place")
    }
    table = (tmp_path / "gpu_check.md").read_text()
    assert "## Equality tests" in table and "## Engine benchmark" in table
