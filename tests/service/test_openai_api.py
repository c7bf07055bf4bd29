"""/v1 through the official `openai` SDK against real uvicorn processes with the demo Llama."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from batching.generation.model_runner import ModelRunner
from service.app import create_app
from service.settings import Settings

from .inprocess import wait_ready
from .scrape import largest_decode_step, metric

SLOTS = 8
KEY = "sk-test-key"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the weather today?"},
]


@pytest.fixture(scope="module")
def servers(start_server, demo_models):
    """An open server, and one with an API key and a tiny rate limit; started side by side."""
    common = {
        "GENERATE_MODEL": str(demo_models["llm"]),
        "GENERATE_MAX_SEQ_LEN": "256",
        "GENERATE_MAX_NEW_TOKENS": "64",
        # Every test below also runs over prefix-cache hits and chunked prefills, which must
        # change no output.
        "GENERATE_PREFIX_CACHE_TOKENS": "4096",
        "GENERATE_PREFILL_CHUNK_TOKENS": "32",
    }
    open_server = start_server(
        wait=False, GENERATE_SLOTS=str(SLOTS), RATE_LIMIT="100000/minute", **common
    )
    locked = start_server(
        wait=False, GENERATE_SLOTS="2", API_KEYS=KEY, RATE_LIMIT="3/minute", **common
    )
    open_server.wait_ready()
    locked.wait_ready()
    return {"open": open_server, "locked": locked}


@pytest.fixture(scope="module")
def server(servers):
    return servers["open"]


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(demo_models):
    return AutoTokenizer.from_pretrained(demo_models["llm"])


def generate_text(server, prompt: str, max_new_tokens: int) -> str:
    """What /generate answers greedily for the same prompt: the ground truth here."""
    payload = {"prompt": prompt, "max_new_tokens": max_new_tokens}
    return httpx.post(f"{server.url}/generate", json=payload, timeout=60).json()["text"]


def test_models_list_shows_the_served_model(client, demo_models):
    assert [model.id for model in client.models.list()] == [str(demo_models["llm"])]


def test_chat_completion_renders_the_chat_template_and_counts_usage(
    client, server, tokenizer, demo_models
):
    answer = client.chat.completions.create(
        model="anything", messages=MESSAGES, temperature=0, max_tokens=20, user="u-1"
    )
    templated = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert templated.endswith("<|assistant|>\n")
    prompt_tokens = len(tokenizer.encode(templated, add_special_tokens=False))
    assert answer.object == "chat.completion"
    assert answer.model == str(demo_models["llm"])  # whatever the request's model said
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == generate_text(server, templated, 20)
    assert answer.choices[0].finish_reason in {"stop", "length"}
    usage = answer.usage
    assert usage is not None and usage.prompt_tokens == prompt_tokens
    assert usage.total_tokens == prompt_tokens + usage.completion_tokens


def test_streamed_chat_equals_the_non_streamed_answer(client):
    request = {"model": "m", "messages": MESSAGES, "temperature": 0, "max_tokens": 40}
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True))
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert content == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(chunk.usage is None for chunk in chunks)  # usage only when asked for


def test_include_usage_adds_a_final_usage_chunk_with_no_choices(client):
    request = {"model": "m", "messages": MESSAGES, "temperature": 0, "max_tokens": 12}
    whole = client.chat.completions.create(**request)
    chunks = list(
        client.chat.completions.create(
            **request, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage == whole.usage
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason


def test_completions_stream_and_not_match_generate(client, server):
    prompt = "The quick brown fox jumps over the lazy dog"
    whole = client.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=24)
    assert whole.object == "text_completion"
    assert whole.choices[0].text == generate_text(server, prompt, 24)
    chunks = list(
        client.completions.create(
            model="m", prompt=prompt, temperature=0, max_tokens=24, stream=True
        )
    )
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    text = whole.choices[0].text
    stop = text[3:6]  # likely spans a token boundary
    stopped = client.completions.create(
        model="m", prompt=prompt, temperature=0, max_tokens=24, stop=[stop, "never"]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]


def test_context_overflow_is_a_bad_request_with_the_numbers(client):
    long_messages = [{"role": "user", "content": "word " * 200}]
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="m", messages=long_messages, max_tokens=10)
    error = raised.value
    assert error.status_code == 400
    assert error.code == "context_length_exceeded" and error.param == "messages"
    assert re.search(r"prompt has \d+ tokens and max_new_tokens is 10", error.message)
    assert "context limit of 256 tokens" in error.message
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="m", prompt="word " * 200)  # default max_tokens too
    assert raised.value.code == "context_length_exceeded" and raised.value.param == "prompt"


@pytest.mark.parametrize(
    ("extra", "param", "needle"),
    [
        ({"n": 5}, "n", "n: 5 is above the limit of 4"),
        ({"max_tokens": 65}, "max_tokens", "65 is above the limit of 64"),
        ({"max_completion_tokens": 0}, "max_completion_tokens", "greater than or equal to 1"),
        ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 stop sequences"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
        ({"presence_penalty": 0.5}, "presence_penalty", "is not supported"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
                }
            },
            "response_format",
            "nonsense",
        ),
        ({"messages": []}, "messages", "at least 1 item"),
    ],
)
def test_bad_parameters_raise_bad_request_naming_the_parameter(client, extra, param, needle):
    request = {"model": "m", "messages": MESSAGES, "max_tokens": 4} | extra
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(**request)
    assert raised.value.param == param
    assert needle in raised.value.message
    assert raised.value.type == "invalid_request_error"


def test_unknown_fields_are_ignored_and_other_paths_keep_their_error_shape(client, server):
    answer = client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=3, extra_body={"not_an_openai_field": 1}
    )
    assert answer.choices[0].finish_reason in {"stop", "length"}
    generate = httpx.post(f"{server.url}/generate", json={"prompt": ""}, timeout=30)
    assert generate.status_code == 422
    assert set(generate.json()["error"]) == {"type", "message", "request_id"}


def test_api_keys_and_rate_limits_apply_to_v1(servers):
    url = f"{servers['locked'].url}/v1"
    with openai.OpenAI(base_url=url, api_key="wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as raised:
            wrong.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
        assert raised.value.code == "invalid_api_key"
        assert raised.value.type == "authentication_error"
    with openai.OpenAI(base_url=url, api_key=KEY, max_retries=0) as right:
        answer = right.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
        assert answer.usage is not None and answer.usage.completion_tokens <= 2
        right.models.list()
        right.completions.create(model="m", prompt="hi", max_tokens=2)
        with pytest.raises(openai.RateLimitError) as limited:  # the 4th call in a minute
            right.models.list()
        assert limited.value.type == "rate_limit_error"
        assert 1 <= int(limited.value.response.headers["retry-after"]) <= 60


def test_a_client_that_closes_its_stream_frees_its_slot(client, server):
    cancelled = {"name": "generate_requests_finished_total", "reason": "cancelled"}
    before = metric(httpx.get(f"{server.url}/metrics").text, **cancelled)
    stream = client.chat.completions.create(  # greedily, this runs to the 64-token limit
        model="m", messages=MESSAGES, temperature=0, max_tokens=64, stream=True
    )
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{server.url}/metrics").text
        if metric(metrics, **cancelled) > before:
            break
        time.sleep(0.05)
    assert metric(metrics, **cancelled) == before + 1
    assert metric(metrics, "generate_slots_in_use") == 0


def test_sixteen_concurrent_streaming_chats_share_the_slots(server):
    async def chat(client: openai.AsyncOpenAI, i: int) -> tuple[str, str | None]:
        messages = [{"role": "user", "content": f"Tell me story number {i}"}]
        stream = await client.chat.completions.create(
            model="m", messages=messages, temperature=0, max_tokens=24, stream=True
        )
        pieces, reason = [], None
        async for chunk in stream:
            pieces.append(chunk.choices[0].delta.content or "")
            reason = chunk.choices[0].finish_reason or reason
        return "".join(pieces), reason

    async def run() -> list[tuple[str, str | None]]:
        base_url = f"{server.url}/v1"
        async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0) as client:
            return await asyncio.gather(*(chat(client, i) for i in range(16)))

    with largest_decode_step(server.url) as largest:
        results = asyncio.run(run())
    assert len(results) == 16
    assert all(reason in {"stop", "length"} for _, reason in results)
    assert 1 < largest["rows"] <= SLOTS  # they shared decode steps, never more than the slots


def test_model_failures_are_openai_shaped_before_and_during_a_stream(demo_models, monkeypatch):
    """In-process, to inject a failing decode step: a 500 before the answer starts, an error
    event (which the SDKs raise from) once the stream has started."""
    armed = threading.Event()
    original = ModelRunner.decode_step

    def faulty_decode_step(self, *args, **kwargs):
        if armed.is_set():
            armed.clear()
            raise RuntimeError("injected failure")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "decode_step", faulty_decode_step)
    app = create_app(Settings(generate_model=str(demo_models["llm"])))
    request = {"model": "m", "messages": MESSAGES, "max_tokens": 8}
    with TestClient(app) as http:
        wait_ready(http)
        armed.set()
        failed = http.post("/v1/chat/completions", json=request)
        assert failed.status_code == 500
        assert failed.json()["error"] | {"message": ""} == {
            "message": "",
            "type": "server_error",
            "param": None,
            "code": "model_error",
        }
        armed.set()
        streamed = http.post("/v1/chat/completions", json=request | {"stream": True})
        assert streamed.status_code == 200
        events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "model_error"
        assert "injected" not in streamed.text + failed.text


def test_a_repeated_system_prompt_is_served_from_the_prefix_cache(client, server):
    system = "You answer questions about serving models. " * 6  # well over one block
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hi?"}]
    hits = {"name": "generate_prefix_cache_hits_total"}
    before = metric(httpx.get(f"{server.url}/metrics").text, **hits)
    first = client.chat.completions.create(
        model="m", messages=messages, temperature=0, max_tokens=8
    )
    again = client.chat.completions.create(
        model="m", messages=messages, temperature=0, max_tokens=8
    )
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < again.usage.prompt_tokens
    assert again.choices[0].message.content == first.choices[0].message.content
    assert metric(httpx.get(f"{server.url}/metrics").text, **hits) == before + cached
    info = httpx.get(f"{server.url}/info").json()["generate"]
    assert info["prefix_cache"]["enabled"] and info["prefix_cache"]["bytes"] > 0
    kv = info["kv_cache"]
    assert kv["blocks_cached"] > 0 and kv["blocks_used"] == 0  # cached blocks are free memory
    assert kv["tokens"] == kv["blocks"] * kv["block_size"] and kv["bytes"] > 0
