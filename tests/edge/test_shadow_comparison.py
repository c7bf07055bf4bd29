"""A primary and a shadow behind the real NGINX mirror config, both writing audit logs with
content; scripts/compare_shadow.py joins them and reports coverage and agreement."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import compare_shadow
import httpx
import pytest
from harness import start_service
from make_demo_models import build_demo_models

from tests.edge.processes import Nginx, needs_nginx

pytestmark = needs_nginx

NO_RATE_LIMIT = {"rate=20r/s": "rate=100000r/s", "rate=5r/s": "rate=100000r/s"}
TEXTS = [f"review number {i}: {'great' if i % 2 else 'awful'} stuff" for i in range(10)]
PROMPTS = [f"Story {i}:" for i in range(6)]


def app(log: Path, models: dict[str, Path], **extra: str):
    env = {
        "PREDICT_MODEL": str(models["classifier"]),
        "GENERATE_MODEL": str(models["llm"]),
        "AUDIT_LOG": str(log),
        "AUDIT_LOG_CONTENT": "true",
        "RATE_LIMIT": "100000/minute",
        "LOG_LEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1",
    } | extra
    return start_service(log.with_suffix(".server.log"), env)


def wait_for_lines(path: Path, count: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"{path.name}: fewer than {count} lines after {timeout_s}s")


@pytest.mark.parametrize("shadow_models", ["same", "other-seed"])
def test_compare_shadow_reports_coverage_and_agreement(
    shadow_models: str,
    demo_models: dict[str, Path],
    nginx: Callable[..., Nginx],
    tmp_path: Path,
) -> None:
    other = build_demo_models(tmp_path / "other", seed=7) if shadow_models != "same" else None
    primary = app(tmp_path / "primary.jsonl", demo_models)
    # The mirror hangs up on the shadow: it must still finish its work (and log it).
    shadow = app(
        tmp_path / "shadow.jsonl", other or demo_models, GENERATE_CANCEL_ON_DISCONNECT="false"
    )
    try:
        primary.wait_ready(120)
        shadow.wait_ready(120)
        edge = nginx(
            "nginx.shadow.conf",
            {
                "app:8000": f"127.0.0.1:{primary.port}",
                "app-shadow:8000": f"127.0.0.1:{shadow.port}",
            },
            NO_RATE_LIMIT,
        )
        with httpx.Client(base_url=edge.url, timeout=60) as client:
            for i, text in enumerate(TEXTS):
                headers = {"X-Request-ID": f"predict-{i}"}
                assert (
                    client.post("/predict", json={"text": text}, headers=headers).status_code == 200
                )
            for i, prompt in enumerate(PROMPTS):
                body = {"prompt": prompt, "max_new_tokens": 12}
                headers = {"X-Request-ID": f"generate-{i}"}
                assert client.post("/generate", json=body, headers=headers).status_code == 200
        total = len(TEXTS) + len(PROMPTS)
        wait_for_lines(tmp_path / "primary.jsonl", total)
        wait_for_lines(tmp_path / "shadow.jsonl", total)
    finally:
        primary.stop()
        shadow.stop()
    report = compare_shadow.compare(
        compare_shadow.read_log(tmp_path / "primary.jsonl"),
        compare_shadow.read_log(tmp_path / "shadow.jsonl"),
    )
    assert report["coverage"] == 1.0 and report["joined"] == total
    assert report["classification"]["compared"] == len(TEXTS)
    assert report["generation"]["compared"] == len(PROMPTS)
    assert report["primary"]["error_rate"] == report["shadow"]["error_rate"] == 0.0
    if shadow_models == "same":
        assert report["classification"]["label_agreement"] == 1.0
        assert report["classification"]["score_shift_mean"] < 1e-4
        assert report["generation"]["exact_match"] == 1.0
    else:
        assert report["generation"]["exact_match"] < 1.0
        assert report["classification"]["score_shift_mean"] > 1e-4
        assert report["generation"]["most_different"][0]["divergence"] is not None
    assert "coverage 100.0%" in compare_shadow.markdown(report)
