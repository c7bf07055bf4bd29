"""The README's quick start stays true: ./scripts/serve starts, and its curl lines answer."""

from __future__ import annotations

import json
import os
import re
import subprocess

from harness import start_service

from tests.conftest import REPO

README = REPO / "README.md"


def quick_start_section() -> str:
    text = README.read_text()
    return text[
        text.index("## Quick start") : text.index("\n## ", text.index("## Quick start") + 1)
    ]


def test_readme_starts_with_the_serve_and_test_commands():
    first_block = re.search(r"```bash\n(.*?)```", quick_start_section(), re.DOTALL)
    assert first_block
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["./scripts/serve", "./scripts/test"]
    assert os.access(REPO / "scripts" / "serve", os.X_OK)
    assert os.access(REPO / "scripts" / "test", os.X_OK)


def test_quick_start_curl_commands_answer_from_scripts_serve(tmp_path, monkeypatch):
    # ./scripts/serve itself, with no model configured: it must build the demo models.
    monkeypatch.delenv("PREDICT_MODEL", raising=False)
    monkeypatch.delenv("GENERATE_MODEL", raising=False)
    server = start_service(
        tmp_path / "serve.log",
        {"LOG_LEVEL": "WARNING"},
        cwd=REPO,
        command=[str(REPO / "scripts" / "serve")],
    )
    try:
        server.wait_ready(timeout_s=300)
        curl_lines = [
            line for line in quick_start_section().splitlines() if line.startswith("curl ")
        ]
        assert len(curl_lines) == 3
        outputs = []
        for line in curl_lines:
            command = line.replace("localhost:8000", f"127.0.0.1:{server.port}")
            done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            outputs.append(done.stdout)
        predict, generate, stream = outputs
        assert json.loads(predict)["label"] in {"NEGATIVE", "POSITIVE"}
        assert json.loads(generate)["finish_reason"] in {"eos", "length"}
        assert stream.rstrip().endswith("data: [DONE]")
        assert "random-weight demo models" in server.log()
    finally:
        server.stop()
