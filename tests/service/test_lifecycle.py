"""Readiness, liveness and startup failure: the process is either serving or clearly not."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from batching.generation.model_runner import ModelRunner
from service.app import create_app
from service.metrics import ServiceMetrics
from service.predict.predictor import Predictor
from service.runtime import Runtime
from service.settings import Settings

from .inprocess import wait_ready

GATE_TIMEOUT_S = 30


def test_ready_is_503_until_warm_up_has_finished(demo_models, monkeypatch):
    release = threading.Event()
    original = Runtime._warm_up_predictor

    def gated_warm_up(self: Runtime, predictor: Predictor) -> float:
        release.wait(GATE_TIMEOUT_S)
        return original(self, predictor)

    monkeypatch.setattr(Runtime, "_warm_up_predictor", gated_warm_up)
    settings = Settings(predict_model=str(demo_models["classifier"]))
    with TestClient(create_app(settings)) as client:
        assert client.get("/health").status_code == 200
        not_ready = client.get("/ready")
        assert not_ready.status_code == 503
        assert not_ready.headers["retry-after"] == "1"
        refused = client.post("/predict", json={"text": "too early"})
        assert refused.status_code == 503
        assert refused.json()["error"]["message"] == "the models are still loading"
        release.set()
        wait_ready(client)
        assert client.post("/predict", json={"text": "now"}).status_code == 200


def test_health_answers_while_the_model_is_busy(demo_models, monkeypatch):
    """The event loop never runs model compute: /health answers while a batch is stuck."""
    armed, entered, release = threading.Event(), threading.Event(), threading.Event()
    original = Predictor.run_batch

    def stuck_run_batch(self: Predictor, texts: list[str]) -> list:
        if armed.is_set():
            entered.set()
            release.wait(GATE_TIMEOUT_S)
        return original(self, texts)

    monkeypatch.setattr(Predictor, "run_batch", stuck_run_batch)
    settings = Settings(predict_model=str(demo_models["classifier"]))
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        armed.set()
        answers: list[httpx.Response] = []
        busy = threading.Thread(
            target=lambda: answers.append(client.post("/predict", json={"text": "slow"}))
        )
        busy.start()
        assert entered.wait(GATE_TIMEOUT_S)
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
        assert client.get("/metrics").status_code == 200
        assert not answers, "the predict call should still be computing"
        release.set()
        busy.join(GATE_TIMEOUT_S)
        assert answers[0].status_code == 200


def test_a_model_that_fails_to_load_stops_the_process_with_a_clear_message(start_server):
    server = start_server(wait=False, PREDICT_MODEL="/nonexistent/model-folder")
    returncode = server.proc.wait(timeout=120)
    assert returncode == 1
    log = server.log()
    assert "startup failed" in log
    assert "/nonexistent/model-folder" in log


def test_health_shows_no_internal_text_when_startup_failed(demo_models):
    runtime = Runtime(Settings(), ServiceMetrics(4, 4))
    runtime.fatal_error = "startup failed: could not load '/srv/secret-weights': disk error"
    assert runtime.health_problem() == "startup failed; see the server log"


@pytest.mark.parametrize("engine", ["predict", "generate"])
def test_health_turns_503_while_a_model_step_hangs_past_the_step_timeout(
    engine, demo_models, monkeypatch
):
    armed, entered, release = threading.Event(), threading.Event(), threading.Event()
    patched = (Predictor, "run_batch") if engine == "predict" else (ModelRunner, "prefill")
    original = getattr(*patched)

    def hanging(self, *args, **kwargs):
        if armed.is_set():
            entered.set()
            release.wait(GATE_TIMEOUT_S)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(*patched, hanging)
    model = {"predict_model": str(demo_models["classifier"])}
    if engine == "generate":
        model = {"generate_model": str(demo_models["llm"])}
    settings = Settings(**model, engine_step_timeout_s=0.3)  # type: ignore[arg-type]
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        assert client.get("/health").status_code == 200
        armed.set()
        payload = (
            {"text": "hang"} if engine == "predict" else {"prompt": "hang", "max_new_tokens": 2}
        )
        path = "/predict" if engine == "predict" else "/generate"
        answers: list[httpx.Response] = []
        busy = threading.Thread(target=lambda: answers.append(client.post(path, json=payload)))
        busy.start()
        assert entered.wait(GATE_TIMEOUT_S)
        deadline = time.monotonic() + GATE_TIMEOUT_S
        while (health := client.get("/health")).status_code == 200:
            assert time.monotonic() < deadline, "/health never noticed the hung step"
            time.sleep(0.05)
        assert health.status_code == 503
        assert "longer than the 0.3s ENGINE_STEP_TIMEOUT_S" in health.json()["error"]["message"]
        armed.clear()
        release.set()
        busy.join(GATE_TIMEOUT_S)
        assert answers[0].status_code == 200
        assert client.get("/health").status_code == 200
