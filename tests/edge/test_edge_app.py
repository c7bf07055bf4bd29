"""The real app behind the real NGINX (nginx/nginx.conf): ids, limits, body size, SSE.

Each test gets a fresh NGINX (fresh rate-limit buckets) in front of one shared app process.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import Callable

import httpx
import openai
import pytest

from tests.edge.processes import App, Nginx, needs_nginx

pytestmark = needs_nginx

NGINX_ID = re.compile(r"^[0-9a-f]{32}$")  # nginx's $request_id
PREDICT_RATE_PER_S, PREDICT_BURST = 20, 40  # nginx/edge.conf, zone=predict


@pytest.fixture
def edge(app: App, nginx: Callable[..., Nginx]) -> Nginx:
    return nginx("nginx.conf", {"app:8000": f"127.0.0.1:{app.port}"})


def test_predict_passes_through_with_the_request_id(edge: Nginx) -> None:
    with httpx.Client(base_url=edge.url, timeout=30) as client:
        sent = client.post(
            "/predict", json={"text": "I love it"}, headers={"X-Request-ID": "edge-predict-1"}
        )
        generated = client.post("/predict", json={"text": "no id from this client"})

    assert sent.status_code == 200, sent.text
    assert "label" in sent.json()
    assert sent.json()["request_id"] == "edge-predict-1"
    assert sent.headers.get_list("X-Request-ID") == ["edge-predict-1"]  # once, not twice
    assert sent.headers["X-Upstream"] == "stable"
    # Without a client id, nginx's own id is the one the app uses and returns.
    assert generated.status_code == 200
    assert NGINX_ID.match(generated.headers["X-Request-ID"])
    assert generated.json()["request_id"] == generated.headers["X-Request-ID"]


async def burst(url: str, path: str, count: int) -> tuple[list[httpx.Response], float]:
    """`count` concurrent requests; the responses and how long sending them all took."""
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        start = time.perf_counter()
        responses = await asyncio.gather(
            *(client.post(path, json={"text": f"burst {i}"}) for i in range(count))
        )
        return list(responses), time.perf_counter() - start


def test_a_burst_above_the_limit_gets_429_json(edge: Nginx) -> None:
    responses, elapsed_s = asyncio.run(burst(edge.url, "/predict", 120))

    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) == {200, 429}, statuses
    # One request plus the burst pass at once, then the rate refills the bucket.
    assert statuses[200] <= 1 + PREDICT_BURST + PREDICT_RATE_PER_S * elapsed_s + 1, statuses
    for response in (r for r in responses if r.status_code == 429):
        error = response.json()["error"]
        assert error["type"] == "rate_limited"
        assert error["request_id"] == response.headers["X-Request-ID"]
        assert response.headers["Retry-After"] == "1"


def test_embeddings_are_limited_like_predict_not_like_generation(edge: Nginx) -> None:
    # 30 at once: within /predict's burst of 40, far over generation's 10 (which /v1/ has).
    responses, _ = asyncio.run(burst(edge.url, "/v1/embeddings", 30))
    assert 429 not in Counter(r.status_code for r in responses)
    generation, _ = asyncio.run(burst(edge.url, "/v1/completions", 30))
    assert 429 in Counter(r.status_code for r in generation)


def test_health_and_ready_are_never_rate_limited(edge: Nginx) -> None:
    with httpx.Client(base_url=edge.url, timeout=30) as client:
        asyncio.run(burst(edge.url, "/predict", 80))  # this client's predict bucket is empty
        statuses = Counter(client.get(path).status_code for path in ["/health", "/ready"] * 100)
    assert statuses == {200: 200}


def test_an_oversized_body_gets_413_json(edge: Nginx) -> None:
    too_big = '{"text": "' + "x" * 2_000_000 + '"}'
    response = httpx.post(
        edge.url + "/predict",
        content=too_big,
        headers={"Content-Type": "application/json", "X-Request-ID": "too-big-1"},
    )
    assert response.status_code == 413
    assert response.json()["error"] == {
        "type": "request_too_large",
        "message": "request body is larger than the 1 MB limit",
        "request_id": "too-big-1",
    }


def test_metrics_are_not_served_through_nginx(app: App, edge: Nginx) -> None:
    for path in ["/metrics", "/metrics/", "/metrics?format=text"]:
        response = httpx.get(edge.url + path)
        assert response.status_code == 404, path
        assert response.json()["error"]["type"] == "not_found"
    assert httpx.get(app.url + "/metrics").status_code == 200  # Prometheus scrapes it directly


def test_streamed_generate_arrives_before_the_generation_ends(edge: Nginx) -> None:
    # No warm-up stream: this is often the app's first since start-up, which is judged too (it
    # used to pause after its first event while anyio loaded: test_first_requests.py).
    # 200 tokens: long enough that the client being descheduled for a moment on a loaded box
    # is a small part of the decode, so only buffering makes the events arrive together.
    body = {"prompt": "hello", "max_new_tokens": 200, "stream": True}
    arrivals_s: list[float] = []  # when each `data:` line reached the client
    lines: list[str] = []
    start = time.perf_counter()
    with httpx.stream("POST", edge.url + "/generate", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data:"):
                arrivals_s.append(time.perf_counter() - start)
                lines.append(line)

    assert lines[-1] == "data: [DONE]"
    assert len(lines) >= 10, f"too few events to judge streaming: {lines}"
    final = json.loads(lines[-2].removeprefix("data:"))
    decode_s = (final["timings"]["total_ms"] - final["timings"]["ttft_ms"]) / 1000
    first_s, done_s = arrivals_s[0], arrivals_s[-1]
    # Streamed, the events are spread over the whole decode: the first one reaches the
    # client about decode_s before [DONE]. Buffered by NGINX, all would arrive together.
    assert done_s - first_s >= 0.5 * decode_s, (
        f"first event at {first_s:.3f}s, [DONE] at {done_s:.3f}s, decode took {decode_s:.3f}s"
    )


def test_the_openai_sdk_streams_through_nginx(edge: Nginx) -> None:
    with openai.OpenAI(base_url=edge.url + "/v1", api_key="unused", max_retries=0) as client:
        [model] = client.models.list().data
        stream = client.chat.completions.create(
            model=model.id,
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=16,
            stream=True,
        )
        chunks = list(stream)
    finish_reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert len(chunks) >= 2
    assert finish_reasons[-1] in {"stop", "length"}


def test_the_openai_sdk_stream_through_nginx_arrives_as_the_tokens_are_made(edge: Nginx) -> None:
    # How long decoding this prompt takes, from the server's own timings (greedy: /generate
    # and /v1/completions produce the same tokens for the same text).
    timed = httpx.post(
        edge.url + "/generate", json={"prompt": "hello", "max_new_tokens": 200}, timeout=60
    ).json()
    decode_s = (timed["timings"]["total_ms"] - timed["timings"]["ttft_ms"]) / 1000
    arrivals_s: list[float] = []  # when each chunk reached the SDK
    with openai.OpenAI(base_url=edge.url + "/v1", api_key="unused", max_retries=0) as client:
        [model] = client.models.list().data
        start = time.perf_counter()
        stream = client.completions.create(
            model=model.id, prompt="hello", max_tokens=200, temperature=0, stream=True
        )
        for _ in stream:
            arrivals_s.append(time.perf_counter() - start)
    assert len(arrivals_s) >= 10, f"too few chunks to judge streaming: {len(arrivals_s)}"
    first_s, done_s = arrivals_s[0], arrivals_s[-1]
    # Streamed, the chunks are spread over the whole decode; buffered by NGINX, they would all
    # arrive together at the end.
    assert done_s - first_s >= 0.5 * decode_s, (
        f"first chunk at {first_s:.3f}s, last at {done_s:.3f}s, decode took {decode_s:.3f}s"
    )
