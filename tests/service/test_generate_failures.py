"""Failures on the generation path: a bad step, a dead loop, a full queue, a stale request."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient

from batching.generation.engine import GenerationEngine
from batching.generation.model_runner import ModelRunner
from service.app import create_app
from service.settings import Settings

from .inprocess import wait_ready
from .scrape import metric

GATE_TIMEOUT_S = 30


def client_for(demo_models, **settings) -> TestClient:
    return TestClient(create_app(Settings(generate_model=str(demo_models["llm"]), **settings)))


def test_a_failing_step_fails_only_its_requests_and_the_engine_keeps_serving(
    demo_models, monkeypatch
):
    armed = threading.Event()
    original = ModelRunner.decode_step

    def faulty_decode_step(self, *args, **kwargs):
        if armed.is_set():
            armed.clear()  # one fault only
            raise RuntimeError("injected CUDA-style failure")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "decode_step", faulty_decode_step)
    with client_for(demo_models) as client:
        wait_ready(client)
        armed.set()
        failed = client.post("/generate", json={"prompt": "boom", "max_new_tokens": 8})
        assert failed.status_code == 500
        assert failed.json()["error"]["type"] == "model_error"
        assert "injected" not in failed.text  # no internals leak to the client
        assert client.get("/health").status_code == 200
        after = client.post("/generate", json={"prompt": "fine", "max_new_tokens": 8})
        assert after.status_code == 200
        assert after.json()["completion_tokens"] >= 1
        metrics = client.get("/metrics").text
        assert metric(metrics, "generate_requests_finished_total", reason="error") == 1


def test_health_turns_503_when_the_engine_loop_dies(demo_models, monkeypatch):
    def broken_step(self):
        raise RuntimeError("a bug in the loop itself")

    monkeypatch.setattr(GenerationEngine, "_step", broken_step)
    with client_for(demo_models) as client:
        wait_ready(client)
        lost = client.post("/generate", json={"prompt": "x", "max_new_tokens": 4})
        assert lost.status_code == 503
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json()["error"]["message"] == "an engine loop has died"
        refused = client.post("/generate", json={"prompt": "y", "max_new_tokens": 4})
        assert refused.status_code == 503


def test_full_queue_gets_503_and_stale_requests_get_504(demo_models, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    original = ModelRunner.prefill

    def stuck_prefill(self, *args, **kwargs):
        entered.set()
        release.wait(GATE_TIMEOUT_S)
        return original(self, *args, **kwargs)

    with client_for(
        demo_models, generate_slots=1, generate_max_queue=1, request_timeout_s=0.5
    ) as client:
        wait_ready(client)
        monkeypatch.setattr(ModelRunner, "prefill", stuck_prefill)
        answers: dict[str, int] = {}

        def post(name: str) -> None:
            response = client.post("/generate", json={"prompt": name, "max_new_tokens": 2})
            answers[name] = response.status_code

        first = threading.Thread(target=post, args=("first",))
        first.start()
        assert entered.wait(GATE_TIMEOUT_S)  # the engine is stuck in the first prefill
        waiting = threading.Thread(target=post, args=("waiting",))
        waiting.start()
        engine = client.app.state.runtime.generate.engine  # type: ignore[attr-defined]
        deadline = time.monotonic() + GATE_TIMEOUT_S
        while engine.waiting_requests < 1:
            assert time.monotonic() < deadline, "the second request never reached the queue"
            time.sleep(0.01)
        full = client.post("/generate", json={"prompt": "third", "max_new_tokens": 2})
        assert full.status_code == 503
        assert full.headers["retry-after"] == "1"
        assert full.json()["error"]["type"] == "queue_full"
        threading.Event().wait(0.6)  # the waiting request is now older than the timeout
        release.set()
        first.join(GATE_TIMEOUT_S)
        waiting.join(GATE_TIMEOUT_S)
        assert answers == {"first": 200, "waiting": 504}


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_quantized_generation_serves_on_cpu(demo_models, quantization):
    with client_for(demo_models, quantization=quantization, device="cpu") as client:
        wait_ready(client)
        answer = client.post("/generate", json={"prompt": "hello", "max_new_tokens": 6})
        assert answer.status_code == 200
        assert answer.json()["completion_tokens"] >= 1
        assert client.get("/info").json()["generate"]["quantization"] == quantization
