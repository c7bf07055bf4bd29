"""A client's schema cannot take the server down or hold anyone else up: grammars compile in
a worker process under a memory limit and a deadline, off the event loop and the engine thread."""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

import httpx
from fastapi.testclient import TestClient
from harness import start_service

from service.app import create_app
from service.settings import Settings
from tests.batching.test_grammar_compiler import ALL_OF_PATTERNS, PATTERN_PROPERTIES

from .inprocess import wait_ready

REPO = Path(__file__).resolve().parents[2]
SERVER_MEMORY_BYTES = 6 << 30  # the whole server: torch, two models, the grammar workers
CHEAP = {"prompt": "hello", "max_new_tokens": 4, "temperature": 0}
CLIENT_TIMEOUT_S = 120.0


def test_an_exploding_schema_gets_a_4xx_and_the_server_lives_under_a_memory_limit(
    demo_models, tmp_path: Path
) -> None:
    env = {
        "GENERATE_MODEL": str(demo_models["llm"]),
        "DEVICE": "cpu",
        "LOG_LEVEL": "INFO",
        "GRAMMAR_COMPILE_MEMORY_MB": "512",
        "GRAMMAR_COMPILE_TIMEOUT_S": "60",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }
    command = ("prlimit", f"--as={SERVER_MEMORY_BYTES}", sys.executable, "-m", "service")
    server = start_service(tmp_path / "server.log", env, cwd=tmp_path, command=command)
    try:
        server.wait_ready(120)
        answers: dict[str, httpx.Response] = {}

        def send(name: str, path: str, body: dict) -> None:
            answers[name] = httpx.post(server.url + path, json=body, timeout=CLIENT_TIMEOUT_S)

        attacks = [
            threading.Thread(
                target=send,
                args=("generate", "/generate", CHEAP | {"json_schema": ALL_OF_PATTERNS}),
            ),
            threading.Thread(
                target=send,
                args=(
                    "chat",
                    "/v1/chat/completions",
                    {
                        "model": "m",
                        "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 4,
                        "n": 4,
                        "response_format": {
                            "type": "json_schema",
                            "json_schema": {"name": "x", "schema": ALL_OF_PATTERNS},
                        },
                    },
                ),
            ),
        ]
        for attack in attacks:
            attack.start()
        cheap = httpx.post(server.url + "/generate", json=CHEAP, timeout=CLIENT_TIMEOUT_S)
        assert cheap.status_code == 200, cheap.text
        assert httpx.get(server.url + "/health", timeout=CLIENT_TIMEOUT_S).status_code == 200
        for attack in attacks:
            attack.join(CLIENT_TIMEOUT_S)
        assert set(answers) == {"generate", "chat"}, server.log_tail()
        assert answers["generate"].status_code == 422, answers["generate"].text
        assert answers["generate"].json()["error"]["message"].startswith("json_schema: ")
        assert answers["chat"].status_code == 400, answers["chat"].text
        assert answers["chat"].json()["error"]["param"] == "response_format"
        assert server.running
        assert httpx.post(server.url + "/generate", json=CHEAP, timeout=30).status_code == 200
    finally:
        server.stop()


def test_a_slow_schema_does_not_hold_up_a_concurrent_request(demo_models) -> None:
    settings = Settings(
        generate_model=str(demo_models["llm"]), grammar_compile_timeout_s=30, log_level="WARNING"
    )
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        slow: dict[str, httpx.Response] = {}
        body = CHEAP | {"json_schema": PATTERN_PROPERTIES}
        schema_sender = threading.Thread(
            target=lambda: slow.setdefault("answer", client.post("/generate", json=body))
        )
        schema_sender.start()
        # Both answer while the schema compiles (600 patterns: minutes, until its deadline).
        assert client.post("/generate", json=CHEAP).status_code == 200
        assert client.get("/health").status_code == 200
        assert schema_sender.is_alive()
        schema_sender.join(CLIENT_TIMEOUT_S)
        assert slow["answer"].status_code == 422
        assert "took over 30s" in slow["answer"].json()["error"]["message"]


def test_an_unsatisfiable_schema_is_a_4xx_logged_below_error_without_its_text(
    demo_models, caplog
) -> None:
    recursive = {
        "$ref": "#/$defs/loop_secret",
        "$defs": {"loop_secret": {"$ref": "#/$defs/loop_secret"}},
    }
    with TestClient(create_app(Settings(generate_model=str(demo_models["llm"])))) as client:
        wait_ready(client)
        with caplog.at_level(logging.INFO):
            answer = client.post("/generate", json=CHEAP | {"json_schema": recursive})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["type"] == "invalid_request"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [r for r in caplog.records if "loop_secret" in r.getMessage()]
