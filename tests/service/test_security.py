"""API keys and per-client rate limits, on the real app."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

from .inprocess import wait_ready


def make_client(demo_models, **settings: str) -> TestClient:
    return TestClient(
        create_app(Settings(predict_model=str(demo_models["classifier"]), **settings))
    )


def test_api_key_is_required_when_keys_are_configured(demo_models):
    with make_client(demo_models, api_keys="key-one, key-two") as client:
        wait_ready(client)
        missing = client.post("/predict", json={"text": "hi"})
        assert missing.status_code == 401
        assert missing.json()["error"] == {
            "type": "unauthorized",
            "message": "missing API key",
            "request_id": missing.headers["x-request-id"],
        }
        wrong = client.post(
            "/predict", json={"text": "hi"}, headers={"Authorization": "Bearer nope"}
        )
        assert wrong.status_code == 401
        assert wrong.json()["error"]["message"] == "invalid API key"
        right = client.post(
            "/predict", json={"text": "hi"}, headers={"Authorization": "Bearer key-two"}
        )
        assert right.status_code == 200
        assert client.get("/health").status_code == 200  # probes never need a key


def test_rate_limit_answers_429_with_retry_after_per_key(demo_models):
    with make_client(demo_models, rate_limit="3/minute") as client:
        wait_ready(client)
        alice = {"Authorization": "Bearer alice"}
        statuses = [
            client.post("/predict", json={"text": "x"}, headers=alice).status_code for _ in range(4)
        ]
        assert statuses == [200, 200, 200, 429]
        limited = client.post("/predict", json={"text": "x"}, headers=alice)
        assert limited.json()["error"]["type"] == "rate_limited"
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        # Another key has its own budget, and probes are never limited.
        bob = {"Authorization": "Bearer bob"}
        assert client.post("/predict", json={"text": "x"}, headers=bob).status_code == 200
        assert all(client.get("/health").status_code == 200 for _ in range(10))
