"""Small edges of the API, each answered as the README's error table says."""

from __future__ import annotations

import jsonschema
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

from .inprocess import wait_ready


@pytest.fixture(scope="module")
def client(demo_models):
    settings = Settings(generate_model=str(demo_models["llm"]), generate_max_prompt_chars=100)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client


def test_a_405_keeps_its_allow_header(client) -> None:
    answer = client.get("/generate")
    assert answer.status_code == 405
    assert answer.headers["Allow"] == "POST"
    assert answer.json()["error"]["type"] == "method_not_allowed"


@pytest.mark.parametrize("body", [b"\xff\xfe not utf-8", b"plain words"])
def test_a_body_that_is_not_json_or_not_utf8_is_a_422(client, body: bytes) -> None:
    answer = client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["type"] == "invalid_request"


def test_tokenize_answers_422_for_an_overlong_prompt_like_its_other_errors(client) -> None:
    answer = client.post("/tokenize", json={"prompt": "x" * 101})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["type"] == "invalid_request"


def test_a_trailing_slash_is_not_redirected_with_the_clients_host(client) -> None:
    answer = client.post(
        "/generate/",
        json={"prompt": "hi"},
        headers={"Host": "evil.example"},
        follow_redirects=False,
    )
    assert answer.status_code == 404
    assert "location" not in answer.headers


def test_stream_must_be_a_real_boolean(client) -> None:
    answer = client.post("/generate", json={"prompt": "hi", "stream": "yes"})
    assert answer.status_code == 422, answer.text


def test_booleans_are_not_token_ids(client) -> None:
    answer = client.post("/v1/completions", json={"model": "m", "prompt": [True, False]})
    assert answer.status_code == 400, answer.text


def test_detokenize_takes_every_id_a_prompt_may_hold(client) -> None:
    service = client.app.state.runtime.generate
    rows = service.loaded.model.get_input_embeddings().num_embeddings
    assert rows > len(service.loaded.tokenizer)  # the demo model pads its vocabulary
    assert client.post("/detokenize", json={"tokens": [rows - 1]}).status_code == 200
    assert client.post("/detokenize", json={"tokens": [rows]}).status_code == 422
    completion = {"model": "m", "prompt": [rows - 1], "max_tokens": 1}
    assert client.post("/v1/completions", json=completion).status_code == 200


@pytest.mark.parametrize(
    ("path", "bad_body"),
    [("/generate", {"prompt": ""}), ("/tokenize", {"prompt": "x" * 101}), ("/predict", {})],
)
def test_the_openapi_schema_documents_the_error_body_the_routes_send(
    client, path: str, bad_body: dict
) -> None:
    schema = client.get("/openapi.json").json()
    responses = schema["paths"][path]["post"]["responses"]
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for status in ("401", "422", "429", "503"):
        assert responses[status]["content"]["application/json"]["schema"] == error_ref, status
    answer = client.post(path, json=bad_body)  # a real error of that route
    assert answer.status_code in (404, 422), answer.text
    jsonschema.validate(answer.json(), error_ref | {"components": schema["components"]})
