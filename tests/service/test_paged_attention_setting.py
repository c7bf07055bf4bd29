"""GENERATE_PAGED_ATTENTION: the decode step's path over the KV blocks is in /info and the
start-up log with its reason, and in_place forced on a CPU serves (flex_attention's unfused
reference runs there)."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.app import create_app
from service.settings import Settings

from .inprocess import wait_ready


def test_in_place_forced_is_checked_at_warm_up_shown_in_info_and_logged(demo_models, caplog):
    caplog.set_level(logging.INFO)
    settings = Settings(
        generate_model=str(demo_models["llm"]),
        generate_paged_attention="in_place",
        # in place on a CPU is flex_attention's unfused reference: a small engine keeps the
        # warm-up short (no chunk measurement, few rows, a short context)
        generate_slots=2,
        generate_max_seq_len=128,
        generate_prefill_chunk_tokens=64,
    )
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        paged = client.get("/info").json()["generate"]["paged_attention"]
        assert paged == {
            "requested": "in_place",
            "path": "in_place",
            "reason": "its decode logits matched the gather's on probe rows at warm-up",
        }
        answer = client.post("/generate", json={"prompt": "hello", "max_new_tokens": 6})
        assert answer.status_code == 200
        assert answer.json()["completion_tokens"] >= 1
    assert any(
        "paged attention: in_place (its decode logits matched" in r.getMessage()
        for r in caplog.records
        if r.name == "service.runtime"
    )


def test_an_unknown_paged_attention_mode_is_refused():
    with pytest.raises(ValidationError):
        Settings(generate_paged_attention="sometimes")
