"""Generated text never carries special tokens or control characters (other than newline and
tab), on every route, streamed or not. The model is steered through a scripted token sequence
(its logits are replaced after each real forward), so the output is known exactly."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch
from fastapi.testclient import TestClient

from batching.generation.model_runner import ModelRunner
from service.app import create_app
from service.settings import Settings
from tests.batching.test_detokenizer import _byte_level_alphabet

from .inprocess import wait_ready

RAW = "ok\x1b[2J<unk>\r\nnext\tline\x00 end"  # what the scripted model "writes"
VISIBLE = "ok[2J\nnext\tline end"  # what a client may see


def scripted_ids(tokenizer) -> list[int]:
    alphabet = _byte_level_alphabet()
    ids = [tokenizer.convert_tokens_to_ids(alphabet[b]) for b in RAW.encode()]
    ids.insert(3, tokenizer.bos_token_id)  # a special token id mid-stream
    return [*ids, tokenizer.eos_token_id]


@pytest.fixture
def client(demo_models, monkeypatch) -> Iterator[TestClient]:
    settings = Settings(generate_model=str(demo_models["llm"]), generate_slots=1)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        tokenizer = client.app.state.runtime.generate.loaded.tokenizer  # type: ignore[attr-defined]
        script = scripted_ids(tokenizer)
        position = {"next": 0}

        def steer(logits: torch.Tensor) -> torch.Tensor:
            token = script[min(position["next"], len(script) - 1)]
            position["next"] += 1
            steered = torch.full_like(logits, -1e4)
            steered[:, token] = 0.0
            return steered

        def restart() -> None:
            position["next"] = 0

        prefill, decode = ModelRunner.prefill, ModelRunner.decode_step
        monkeypatch.setattr(
            ModelRunner, "prefill", lambda self, *a, **k: steer(prefill(self, *a, **k))
        )
        monkeypatch.setattr(
            ModelRunner, "decode_step", lambda self, *a, **k: steer(decode(self, *a, **k))
        )
        client.restart_script = restart  # type: ignore[attr-defined]
        yield client


def streamed_text(client: TestClient, path: str, body: dict, field) -> str:
    pieces = []
    with client.stream("POST", path, json=body | {"stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces.append(field(json.loads(line[6:])))
    return "".join(pieces)


def completion_text(event: dict) -> str:
    return "".join(choice.get("text", "") for choice in event.get("choices", []))


def chat_text(event: dict) -> str:
    choices = event.get("choices", [])
    return "".join(choice["delta"].get("content") or "" for choice in choices)


def test_every_route_returns_only_visible_text(client):
    limit = {"max_new_tokens": 64}
    texts = {}
    client.restart_script()
    texts["generate"] = client.post("/generate", json={"prompt": "x", **limit}).json()["text"]
    client.restart_script()
    texts["generate stream"] = streamed_text(
        client, "/generate", {"prompt": "x", **limit}, lambda event: event.get("text", "")
    )
    client.restart_script()
    completion = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 64})
    texts["completions"] = completion.json()["choices"][0]["text"]
    client.restart_script()
    texts["completions stream"] = streamed_text(
        client, "/v1/completions", {"prompt": "x", "max_tokens": 64}, completion_text
    )
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 64}
    client.restart_script()
    texts["chat"] = client.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"][
        "content"
    ]
    client.restart_script()
    texts["chat stream"] = streamed_text(client, "/v1/chat/completions", chat, chat_text)
    assert texts == dict.fromkeys(texts, VISIBLE)
