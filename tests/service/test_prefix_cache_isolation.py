"""The prefix cache is per API key: cached_tokens never tells one key about another's prompt."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

from .inprocess import wait_ready

KEY_A, KEY_B = "key-a-0123456789", "key-b-0123456789"
# Long enough for several 16-token blocks with the demo tokenizer.
SECRET_PROMPT = "The confidential system prompt of tenant A: " + "classified words " * 12


def generate(client: TestClient, key: str) -> dict:
    answer = client.post(
        "/generate",
        json={"prompt": SECRET_PROMPT, "max_new_tokens": 2, "temperature": 0},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def make_client(demo_models, **settings: object) -> TestClient:
    return TestClient(
        create_app(
            Settings(
                generate_model=str(demo_models["llm"]),
                api_keys=f"{KEY_A},{KEY_B}",
                generate_prefix_cache_tokens=512,
                **settings,  # type: ignore[arg-type]
            )
        )
    )


def test_key_b_sees_no_cached_tokens_for_key_a_prefix(demo_models) -> None:
    with make_client(demo_models) as client:
        wait_ready(client)
        assert generate(client, KEY_A)["cached_tokens"] == 0
        assert generate(client, KEY_A)["cached_tokens"] > 0  # A's own prefix is reused
        assert generate(client, KEY_B)["cached_tokens"] == 0


def test_a_shared_prefix_cache_serves_every_key_when_asked(demo_models) -> None:
    with make_client(demo_models, generate_prefix_cache_shared=True) as client:
        wait_ready(client)
        generate(client, KEY_A)
        assert generate(client, KEY_B)["cached_tokens"] > 0
