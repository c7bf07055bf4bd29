"""GENERATE_CUDA_GRAPHS: never a reason not to start, always visible in /info and the log."""

from __future__ import annotations

import logging

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.app import create_app
from service.settings import Settings

from .inprocess import wait_ready

GRAPHS_LOGGER = "batching.generation.static_decode"


@pytest.mark.skipif(torch.cuda.is_available(), reason="about a machine without CUDA")
def test_cuda_graphs_on_without_cuda_starts_logs_why_and_serves_eagerly(demo_models, caplog):
    caplog.set_level(logging.INFO)
    settings = Settings(generate_model=str(demo_models["llm"]), generate_cuda_graphs="on")
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        graphs = client.get("/info").json()["generate"]["cuda_graphs"]
        assert graphs == {
            "enabled": False,
            "reason": "no CUDA device: the model runs on cpu",
            "batch_buckets": [],
            "kv_buckets": [],
        }
        answer = client.post("/generate", json={"prompt": "hello", "max_new_tokens": 6})
        assert answer.status_code == 200
        assert answer.json()["completion_tokens"] >= 1
    [record] = [r for r in caplog.records if r.name == GRAPHS_LOGGER]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "CUDA graphs unavailable, the decode step runs eagerly: "
        "no CUDA device: the model runs on cpu"
    )
    assert any("CUDA graphs: off (no CUDA device" in r.getMessage() for r in caplog.records)


def test_an_unknown_cuda_graphs_mode_is_refused():
    with pytest.raises(ValidationError):
        Settings(generate_cuda_graphs="sometimes")
