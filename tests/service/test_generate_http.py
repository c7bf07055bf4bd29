"""/generate over a real socket against a real uvicorn process with the demo Llama."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from batching.generation.detokenizer import strip_control_characters as visible

from .scrape import largest_decode_step, metric

SLOTS = 4
MAX_NEW_TOKENS = 24
PROMPTS = [
    "hello",
    "The quick brown fox jumps over the lazy dog",
    "Serving models in production means",
    "héllo wörld 日本語 😀",
    "a",
    "Continuous batching lets requests join and leave the running batch at every step",
    "Numbers: 1 2 3",
    "user: what is the weather today?",
]


@pytest.fixture(scope="module")
def server(start_server, demo_models):
    return start_server(
        GENERATE_MODEL=str(demo_models["llm"]),
        GENERATE_SLOTS=str(SLOTS),
        GENERATE_MAX_SEQ_LEN="128",
        GENERATE_MAX_NEW_TOKENS="64",
        RATE_LIMIT="100000/minute",
    )


@pytest.fixture(scope="module")
def reference(demo_models):
    """model.generate(do_sample=False), one prompt at a time: the ground truth."""
    tokenizer = AutoTokenizer.from_pretrained(demo_models["llm"])
    model = AutoModelForCausalLM.from_pretrained(demo_models["llm"]).eval()

    def generate(prompt: str, max_new_tokens: int = MAX_NEW_TOKENS) -> list[int]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[0, ids.shape[1] :].tolist()
        return [t for t in new if t != tokenizer.eos_token_id]

    generate.tokenizer = tokenizer  # type: ignore[attr-defined]
    return generate


async def stream_events(client: httpx.AsyncClient, payload: dict) -> list[dict | str]:
    events: list[dict | str] = []
    async with client.stream("POST", "/generate", json=payload | {"stream": True}) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def streamed_token_ids(events: list[dict | str]) -> list[int]:
    return [t for e in events if isinstance(e, dict) for t in e.get("token_ids", [])]


def test_concurrent_greedy_streams_equal_generate_token_for_token(server, reference):
    """More prompts than slots, arriving at different moments: slots are reused mid-flight."""

    async def run() -> list[list[dict | str]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:

            async def one(i: int, prompt: str) -> list[dict | str]:
                await asyncio.sleep(0.01 * i)  # staggered arrivals join a running batch
                payload = {"prompt": prompt, "max_new_tokens": MAX_NEW_TOKENS}
                return await stream_events(client, payload)

            return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))

    for prompt, events in zip(PROMPTS, asyncio.run(run()), strict=True):
        assert events[-1] == "[DONE]"
        final = events[-2]
        assert isinstance(final, dict) and final["finish_reason"] in {"eos", "length"}
        assert streamed_token_ids(events) == reference(prompt), prompt
        assert final["usage"]["completion_tokens"] == len(reference(prompt))


def test_streamed_text_equals_the_json_answer_and_the_reference_decode(server, reference):
    prompt = "héllo wörld 日本語 😀"
    payload = {"prompt": prompt, "max_new_tokens": 40}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        answer = client.post("/generate", json=payload).json()

    async def run() -> list[dict | str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await stream_events(client, payload)

    events = asyncio.run(run())
    pieces = [e["text"] for e in events if isinstance(e, dict)]
    assert "".join(pieces) == answer["text"]
    ids = reference(prompt, 40)
    assert answer["completion_tokens"] == len(ids)
    full = visible(reference.tokenizer.decode(ids, skip_special_tokens=True))  # type: ignore[attr-defined]
    # A random model may emit bytes that never form a character (shown as U+FFFD); what must
    # never happen is a character that *does* complete being sent half-done: every prefix of
    # the stream must be a prefix of the full decode.
    sent = ""
    for piece in pieces:
        sent += piece
        assert full.startswith(sent), f"a character was split at {len(sent)}: {sent!r}"
    assert answer["text"].rstrip("\ufffd") == full.rstrip("\ufffd")
    assert set(answer["timings"]) == {"queue_ms", "ttft_ms", "total_ms"}


def test_a_seeded_sampled_request_is_the_same_alone_and_amid_fifteen_others(server):
    seeded = {
        "prompt": "Serving models",
        "max_new_tokens": 20,
        "temperature": 0.9,
        "top_p": 0.95,
        "top_k": 50,
        "seed": 1234,
    }

    async def run() -> tuple[str, str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            alone = (await client.post("/generate", json=seeded)).json()["text"]
            noise = [
                client.post(
                    "/generate",
                    json={
                        "prompt": f"noise {i}",
                        "max_new_tokens": 20,
                        "temperature": 1.0,
                        "seed": i,
                    },
                )
                for i in range(15)
            ]
            results = await asyncio.gather(client.post("/generate", json=seeded), *noise)
            return alone, results[0].json()["text"]

    alone, amid = asyncio.run(run())
    assert alone == amid


def test_sixty_four_streams_all_complete_within_the_slot_limit(server):
    async def run() -> list[list[dict | str]]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as client:
            return await asyncio.gather(
                *(
                    stream_events(client, {"prompt": f"request {i}", "max_new_tokens": 16})
                    for i in range(64)
                )
            )

    with largest_decode_step(server.url) as largest:
        results = asyncio.run(run())
    assert all(events[-1] == "[DONE]" and "finish_reason" in events[-2] for events in results)
    assert 1 < largest["rows"] <= SLOTS  # they shared decode steps, never more than the slots
    after = httpx.get(f"{server.url}/metrics").text
    assert metric(after, "generate_slots_in_use") == 0
    assert metric(after, "kv_cache_usage_ratio") == 0
    assert metric(after, "generate_kv_blocks_used") == 0  # every block went back
    assert metric(after, "generate_kv_blocks_total") > 0
    assert metric(after, "generate_preemptions_total") == 0  # the pool had room for them all


def test_clients_that_hang_up_free_their_slots_and_count_as_cancelled(server):
    cancelled = {"name": "generate_requests_finished_total", "reason": "cancelled"}
    before = metric(httpx.get(f"{server.url}/metrics").text, **cancelled)

    async def hang_up(client: httpx.AsyncClient, i: int) -> None:
        payload = {"prompt": f"long story {i}", "max_new_tokens": 64, "stream": True}
        async with client.stream("POST", "/generate", json=payload) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    return  # leave after the first event: the connection closes

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            await asyncio.gather(*(hang_up(client, i) for i in range(20)))

    asyncio.run(run())
    deadline = time.monotonic() + 1.0
    while True:
        metrics = httpx.get(f"{server.url}/metrics").text
        freed = metric(metrics, "generate_slots_in_use") == 0
        counted = metric(metrics, **cancelled) - before
        if (freed and counted >= 20) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert freed, "slots still held after the clients left"
    assert counted == 20


def test_a_shadow_keeps_generating_after_its_client_hangs_up(start_server, demo_models):
    shadow = start_server(
        GENERATE_MODEL=str(demo_models["llm"]), GENERATE_CANCEL_ON_DISCONNECT="false"
    )
    payload = {"prompt": "mirrored", "max_new_tokens": 48, "stream": True}
    with httpx.Client(base_url=shadow.url, timeout=60) as client:
        with client.stream("POST", "/generate", json=payload) as response:
            assert response.status_code == 200  # hang up right after the headers, as NGINX does
        finished = "generate_requests_finished_total"
        reasons = ("eos", "length", "cancelled", "error")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until it ended (slots in use may read 0 before
            metrics = client.get("/metrics").text  # the engine has even admitted it)
            if sum(metric(metrics, finished, reason=r) for r in reasons) >= 1:
                break
            time.sleep(0.05)
    assert metric(metrics, finished, reason="cancelled") == 0
    assert metric(metrics, finished, reason="eos") + metric(metrics, finished, reason="length") == 1


def test_stop_strings_end_the_text_before_the_stop_string(server, reference):
    prompt = PROMPTS[1]
    full = visible(reference.tokenizer.decode(reference(prompt, 40), skip_special_tokens=True))  # type: ignore[attr-defined]
    stop = full[5:9]  # a piece that likely spans a token boundary
    answer = httpx.post(
        f"{server.url}/generate",
        json={"prompt": prompt, "max_new_tokens": 40, "stop": [stop]},
        timeout=60,
    ).json()
    assert answer["finish_reason"] == "stop"
    assert answer["text"] == full[: full.index(stop)]


@pytest.mark.parametrize(
    ("payload", "status", "needle"),
    [
        ({"prompt": ""}, 422, "prompt"),
        ({"prompt": "hi", "max_new_tokens": 0}, 422, "max_new_tokens"),
        ({"prompt": "hi", "max_new_tokens": 65}, 422, "above the limit of 64"),
        ({"prompt": "word " * 200, "max_new_tokens": 10}, 422, "context limit of 128 tokens"),
        ({"prompt": "hi", "temperature": -1}, 422, "temperature"),
        ({"prompt": "hi", "top_p": 0}, 422, "top_p"),
        ({"prompt": "hi", "stop": [""]}, 422, "stop"),
        ({"prompt": 3}, 422, "prompt"),
    ],
)
def test_bad_generate_input_gets_a_clear_422(server, payload, status, needle):
    response = httpx.post(f"{server.url}/generate", json=payload, timeout=30)
    assert response.status_code == status
    assert needle in response.json()["error"]["message"]
    assert (
        httpx.post(
            f"{server.url}/generate", json={"prompt": "ok", "max_new_tokens": 2}, timeout=30
        ).status_code
        == 200
    )
