"""GENERATE_PREFILL_CHUNK_TOKENS and GENERATE_MIXED_STEPS as /info shows them."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

from .inprocess import wait_ready


def info_of(demo_models: dict, **settings: object) -> dict:
    config = Settings(generate_model=str(demo_models["llm"]), **settings)  # type: ignore[arg-type]
    with TestClient(create_app(config)) as client:
        wait_ready(client)
        generate: dict = client.get("/info").json()["generate"]
        return generate


def test_auto_is_the_default_and_info_shows_the_limits_warm_up_measured(demo_models) -> None:
    info = info_of(demo_models)
    assert info["prefill_chunk_tokens"] == "auto" and info["mixed_steps"] is True
    limits = info["prefill_chunk_limits"]
    assert limits["measured"] is True and limits["smooth_stall_steps"] == 1.5
    assert info["max_stall_steps"] == limits["max_stall_steps"] == 4.0
    assert limits["decode_step_ms"] > 0
    assert limits["by_context"] and all(16 <= c <= 2048 for c in limits["by_context"].values())
    # while requests wait, a step may prefill at least as much as while nobody does
    smooth, busy = limits["by_context"], limits["busy_by_context"]
    assert all(busy[context] >= chunk for context, chunk in smooth.items())
    assert limits["admit_tokens"] >= busy[min(busy)]


def test_a_fixed_chunk_size_is_used_as_is_and_mixing_can_be_turned_off(demo_models) -> None:
    info = info_of(demo_models, generate_prefill_chunk_tokens=64, generate_mixed_steps=False)
    assert info["prefill_chunk_tokens"] == 64 and info["mixed_steps"] is False
    assert info["prefill_chunk_limits"] == {
        "measured": False, "by_context": {}, "busy_by_context": {}, "admit_tokens": 64,
        "decode_step_ms": None, "max_stall_steps": None, "smooth_stall_steps": None,
        "chunk_growth": None,
    }  # fmt: skip
