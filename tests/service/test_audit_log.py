"""The audit log: one valid JSON line per work request, content only when enabled, and a slow
sink never slows a request."""

from __future__ import annotations

import json
import threading
import time
from logging.handlers import RotatingFileHandler

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

from .inprocess import wait_ready

BLOCK_S = 30.0


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for_lines(path, count: int, timeout_s: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return lines(path)
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} audit lines after {timeout_s}s")


def hang_up_after_first_event(url: str) -> None:
    body = {"prompt": "a long story", "max_new_tokens": 120, "stream": True}
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                return  # leaving: the connection closes


@pytest.mark.parametrize("with_content", [False, True], ids=["metadata", "content"])
def test_every_work_request_gets_one_line(with_content, start_server, demo_models, tmp_path):
    path = tmp_path / "audit.jsonl"
    server = start_server(
        PREDICT_MODEL=str(demo_models["classifier"]),
        GENERATE_MODEL=str(demo_models["llm"]),
        AUDIT_LOG=str(path),
        AUDIT_LOG_CONTENT=str(with_content).lower(),
        RATE_LIMIT="6/minute",
    )
    url = server.url
    answers = [
        httpx.post(f"{url}/predict", json={"text": "great"}, headers={"X-Request-ID": "p-1"}),
        httpx.post(f"{url}/generate", json={"prompt": "hi", "max_new_tokens": 5}),
        httpx.post(f"{url}/generate", json={"prompt": ""}),  # 422
        httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        ),
    ]
    hang_up_after_first_event(url)  # 5th: a stream cancelled by its client
    answers.append(httpx.post(f"{url}/predict", json={"text": "six"}))
    answers.append(httpx.post(f"{url}/predict", json={"text": "seven: over the limit"}))  # 429
    assert [a.status_code for a in answers] == [200, 200, 422, 200, 200, 429]
    assert httpx.get(f"{url}/health").status_code == 200  # probes are not work: no line
    records = wait_for_lines(path, 7)
    time.sleep(0.3)  # nothing more should come
    records = lines(path)
    assert len(records) == 7
    by_id = {r["request_id"]: r for r in records}
    assert by_id["p-1"]["route"] == "/predict" and by_id["p-1"]["status"] == 200
    assert by_id["p-1"]["model"].endswith("classifier")
    assert by_id["p-1"]["revision"].startswith("sha256-")  # a local folder's content hash
    assert by_id["p-1"]["items"] == 1 and by_id["p-1"]["prompt_tokens"] > 0
    assert sorted(r["status"] for r in records) == [200, 200, 200, 200, 200, 422, 429]
    cancelled = [r for r in records if r.get("finish_reasons") == ["cancelled"]]
    assert len(cancelled) == 1 and cancelled[0]["route"] == "/generate"
    generated = next(r for r in records if r["route"] == "/generate" and r["status"] == 200
                     and r.get("finish_reasons") != ["cancelled"])  # fmt: skip
    assert generated["prompt_tokens"] > 0 and generated["completion_tokens"] >= 1
    assert all(r["client"] == "ip:127.0.0.1" and r["latency_ms"] >= 0 for r in records)
    has_content = ["input" in r or "output" in r for r in records]
    if not with_content:
        assert not any(has_content)
    else:
        assert by_id["p-1"]["input"] == {"text": "great"}
        assert by_id["p-1"]["output"][0]["label"] == answers[0].json()["label"]
        assert generated["output"]["text"] == answers[1].json()["text"]


def test_a_sink_that_blocks_never_slows_a_request(demo_models, tmp_path, monkeypatch):
    release, blocked = threading.Event(), threading.Event()
    original = RotatingFileHandler.emit

    def slow_emit(self, record):
        blocked.set()
        release.wait(BLOCK_S)
        original(self, record)

    monkeypatch.setattr(RotatingFileHandler, "emit", slow_emit)
    path = tmp_path / "audit.jsonl"
    settings = Settings(predict_model=str(demo_models["classifier"]), audit_log=str(path))
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        for i in range(10):
            assert client.post("/predict", json={"text": f"text {i}"}).status_code == 200
        assert blocked.is_set()  # the writer is stuck on the first line all along...
        assert not release.is_set()  # ...and ten requests were answered meanwhile
        release.set()
    assert len(lines(path)) == 10  # shutdown wrote what was queued
