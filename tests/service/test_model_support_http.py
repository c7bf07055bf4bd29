"""What the server does with models the engine serves differently or not at all, over a real
socket against a real `python -m service` process: ATTN_IMPLEMENTATION=auto serves models that
have no sdpa (Gemma2, gpt-oss) with eager attention, past their sliding window, equal to
generate(); a model the engine cannot serve stops start-up with one line saying why."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from model_families import FAMILIES, WINDOW
from tiny_models import save_causal_lm
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.app import create_app
from service.settings import Settings
from tests.batching.conftest import build_tokenizer

from .inprocess import wait_ready

PROMPT = "The quick brown fox jumps over the lazy dog, and the dog"  # > 4 windows of tokens
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A family's tiny model saved with a tokenizer, as a hub model would be."""

    def save(name: str) -> Path:
        family = next(f for f in FAMILIES if f.name == name)
        folder = tmp_path_factory.mktemp(family.test_id)
        torch.manual_seed(0)
        save_causal_lm(family.config(), build_tokenizer(), folder)
        return folder

    return save


def streamed_ids(url: str, prompt: str) -> list[int]:
    payload = {"prompt": prompt, "max_new_tokens": NEW_TOKENS, "temperature": 0, "stream": True}
    ids: list[int] = []
    with httpx.stream("POST", url + "/generate", json=payload, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            data = line.removeprefix("data: ")
            if line.startswith("data: ") and data != "[DONE]":
                ids.extend(json.loads(data).get("token_ids", []))
    return ids


def reference(folder: Path, prompt: str) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer.encode(prompt)
    assert len(ids) + NEW_TOKENS > 4 * WINDOW
    with torch.inference_mode():
        output = model.generate(
            torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
        )
    new: list[int] = output[0, len(ids) :].tolist()
    return [t for t in new if t != tokenizer.eos_token_id]


def assert_served_with_eager_past_the_window(url: str, folder: Path) -> None:
    info = httpx.get(url + "/info").json()["generate"]
    assert info["attn_implementation"] == "eager"  # chosen by auto: the model has no sdpa
    assert info["attention_layers"] == f"sliding {WINDOW} + full"
    assert info["mixed_steps"] is True and info["mixed_steps_off_reason"] is None
    assert streamed_ids(url, PROMPT) == reference(folder, PROMPT)


def test_auto_attention_serves_gemma2_past_its_window_equal_to_generate(
    saved: Callable[[str], Path], start_server: Callable
) -> None:
    """A real `python -m service` process, what ./scripts/serve starts."""
    folder = saved("Gemma2")
    server = start_server(GENERATE_MODEL=str(folder), GENERATE_MAX_SEQ_LEN="64")
    assert_served_with_eager_past_the_window(server.url, folder)


def test_auto_attention_serves_gpt_oss_past_its_window_equal_to_generate(
    saved: Callable[[str], Path],
) -> None:
    """The same app in this process (a second server start would only cost time)."""
    folder = saved("gpt-oss")
    settings = Settings(generate_model=str(folder), generate_max_seq_len=64, predict_model="")
    with TestClient(create_app(settings), base_url="http://testserver") as client:
        wait_ready(client)
        info = client.get("/info").json()["generate"]
        assert info["attn_implementation"] == "eager"
        assert info["attention_layers"] == f"sliding {WINDOW} + full"
        payload = {"prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "temperature": 0, "stream": True}
        ids: list[int] = []
        with client.stream("POST", "/generate", json=payload) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                data = line.removeprefix("data: ")
                if line.startswith("data: ") and data != "[DONE]":
                    ids.extend(json.loads(data).get("token_ids", []))
        assert ids == reference(folder, PROMPT)


def test_a_model_the_engine_cannot_serve_stops_start_up_with_the_reason(
    saved: Callable[[str], Path], start_server: Callable
) -> None:
    server = start_server(wait=False, GENERATE_MODEL=str(saved("Bloom")))
    assert server.proc.wait(timeout=120) == 1
    log = server.log()
    assert "startup failed: model not supported: BloomForCausalLM adds ALiBi" in log
    assert "Traceback" not in log
