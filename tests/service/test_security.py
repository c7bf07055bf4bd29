"""API keys, rate limits, which routes are open, and bounds on input, on the real app."""

from __future__ import annotations

import secrets

from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

from .inprocess import wait_ready

MESSAGE = {"role": "user", "content": "hi"}


def make_client(demo_models, **settings: object) -> TestClient:
    return TestClient(
        create_app(
            Settings(
                predict_model=str(demo_models["classifier"]),
                generate_model=str(demo_models["llm"]),
                **settings,  # type: ignore[arg-type]
            )
        )
    )


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


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
        wrong = client.post("/predict", json={"text": "hi"}, headers=bearer("nope"))
        assert wrong.status_code == 401
        assert wrong.json()["error"]["message"] == "invalid API key"
        right = client.post("/predict", json={"text": "hi"}, headers=bearer("key-two"))
        assert right.status_code == 200


def test_with_keys_only_the_probes_answer_without_one(demo_models):
    with make_client(demo_models, api_keys="key-one") as client:
        wait_ready(client)
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
        for path in ("/info", "/openapi.json"):
            refused = client.get(path)
            assert refused.status_code == 401, path
            assert "generate" not in refused.text  # nothing about the models leaks
            assert client.get(path, headers=bearer("key-one")).status_code == 200
        assert client.get("/docs").status_code == 404  # a browser page cannot send the key
        assert client.get("/v1/models").status_code == 401


def test_an_open_api_serves_info_and_the_docs(demo_models):
    with make_client(demo_models) as client:
        wait_ready(client)
        assert client.get("/info").json()["limits"]["auth"] == "open"
        assert client.get("/openapi.json").json()["info"]["title"] == "Model serving template"
        assert client.get("/docs").status_code == 200


def test_rate_limit_answers_429_with_retry_after_per_configured_key(demo_models):
    with make_client(demo_models, api_keys="alice,bob", rate_limit="3/minute") as client:
        wait_ready(client)
        post = lambda key: client.post("/predict", json={"text": "x"}, headers=bearer(key))  # noqa: E731
        assert [post("alice").status_code for _ in range(4)] == [200, 200, 200, 429]
        limited = post("alice")
        assert limited.json()["error"]["type"] == "rate_limited"
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        # Another key has its own budget, and probes are never limited.
        assert post("bob").status_code == 200
        assert all(client.get("/health").status_code == 200 for _ in range(10))


def test_random_tokens_on_an_open_api_all_count_against_the_client_ip(demo_models):
    """A fresh made-up token per request must not buy a fresh budget."""
    with make_client(demo_models, rate_limit="5/minute") as client:
        wait_ready(client)
        statuses = [
            client.post(
                "/predict", json={"text": "x"}, headers=bearer(secrets.token_hex(8))
            ).status_code
            for _ in range(8)
        ]
        assert statuses == [200] * 5 + [429] * 3
        assert client.post("/predict", json={"text": "x"}).status_code == 429  # same IP


def test_a_body_over_the_limit_gets_413_json_from_the_app_itself(demo_models):
    with make_client(demo_models, max_request_bytes=4096) as client:
        wait_ready(client)
        declared = client.post("/predict", json={"text": "x" * 5000})
        assert declared.status_code == 413
        assert declared.json()["error"]["type"] == "request_too_large"
        assert declared.json()["error"]["request_id"] == declared.headers["x-request-id"]

        def chunks():  # no Content-Length: the app must count what arrives
            yield b'{"text": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}'

        chunked = client.post(
            "/predict", content=chunks(), headers={"content-type": "application/json"}
        )
        assert chunked.status_code == 413
        assert chunked.json()["error"]["type"] == "request_too_large"
        openai = client.post(
            "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert openai.status_code == 413
        assert "limit of 4096 bytes" in openai.json()["error"]["message"]  # OpenAI's shape
        assert client.post("/predict", json={"text": "small"}).status_code == 200


def test_long_stop_strings_are_refused_before_they_reach_the_engine(demo_models):
    with make_client(demo_models) as client:
        wait_ready(client)
        long_stop = "s" * 65
        generate = client.post("/generate", json={"prompt": "p", "stop": [long_stop]})
        assert generate.status_code == 422
        assert "stop.0" in generate.json()["error"]["message"]
        for stop in (long_stop, [long_stop]):
            completion = client.post("/v1/completions", json={"prompt": "p", "stop": stop})
            assert completion.status_code == 400
            assert completion.json()["error"]["param"] == "stop"
        fine = client.post(
            "/generate", json={"prompt": "p", "stop": ["s" * 64], "max_new_tokens": 2}
        )
        assert fine.status_code == 200


def test_too_many_or_too_long_chat_messages_are_refused_before_the_template_runs(demo_models):
    with make_client(demo_models, generate_max_messages=4, generate_max_prompt_chars=100) as client:
        wait_ready(client)
        many = client.post("/v1/chat/completions", json={"messages": [MESSAGE] * 5})
        assert many.status_code == 400
        assert many.json()["error"]["param"] == "messages"
        assert "5 messages, more than the limit of 4" in many.json()["error"]["message"]
        long = [{"role": "user", "content": "z" * 60}] * 2
        too_long = client.post("/v1/chat/completions", json={"messages": long})
        assert too_long.status_code == 400
        assert "120 characters" in too_long.json()["error"]["message"]
        ok = client.post("/v1/chat/completions", json={"messages": [MESSAGE] * 4, "max_tokens": 2})
        assert ok.status_code == 200
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "z" * 200}}
        in_arguments = [MESSAGE, {"role": "assistant", "content": None, "tool_calls": [call]}]
        too_long = client.post("/v1/chat/completions", json={"messages": in_arguments})
        assert too_long.status_code == 400
        assert "characters of content" in too_long.json()["error"]["message"]
