"""SIGTERM drains: running streams finish, new work gets 503, the process exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx

# Far above the streams' own time even on a loaded box: at the deadline the rest are cut
# (with an error event), and this test is about streams that finish.
DRAIN_TIMEOUT_S = 120
STREAMS = 10


async def stream_data(
    client: httpx.AsyncClient, path: str, body: dict, started: asyncio.Event
) -> list[str]:
    """The `data:` payloads of one SSE answer; `started` is set at the first."""
    lines: list[str] = []
    async with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                lines.append(line.removeprefix("data: "))
                started.set()
    return lines


def test_sigterm_lets_running_streams_finish_refuses_new_work_and_exits_zero(
    start_server, demo_models
):
    server = start_server(
        GENERATE_MODEL=str(demo_models["llm"]),
        GENERATE_SLOTS=str(STREAMS),
        GENERATE_MAX_SEQ_LEN="512",
        GENERATE_MAX_NEW_TOKENS="400",
        DRAIN_TIMEOUT_S=str(DRAIN_TIMEOUT_S),
        RATE_LIMIT="100000/minute",
        LOG_LEVEL="INFO",
    )

    async def run() -> tuple[list[list[str]], httpx.Response, httpx.Response, float]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            events = [asyncio.Event() for _ in range(STREAMS)]
            tasks = [
                asyncio.create_task(
                    stream_data(
                        client,
                        "/generate",
                        {"prompt": f"story {i}", "max_new_tokens": 400, "stream": True},
                        events[i],
                    )
                )
                for i in range(STREAMS)
            ]
            await asyncio.gather(*(e.wait() for e in events))
            signalled_at = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            ready = await client.get("/ready")
            late = await client.post("/generate", json={"prompt": "late", "max_new_tokens": 2})
            return await asyncio.gather(*tasks), ready, late, signalled_at

    results, ready, late, signalled_at = asyncio.run(run())
    assert ready.status_code == 503
    assert late.status_code == 503
    assert late.json()["error"]["message"] == "the server is shutting down"
    for lines in results:
        assert lines[-1] == "[DONE]"
        final = json.loads(lines[-2])
        assert final["finish_reason"] in {"eos", "length"}, final
    assert server.proc.wait(timeout=DRAIN_TIMEOUT_S) == 0
    assert time.monotonic() - signalled_at < DRAIN_TIMEOUT_S
    assert "draining" in server.log()


def test_a_drain_lasts_until_requests_stop_arriving(start_server, demo_models):
    """NGINX stops sending work to a draining replica only after its first 503: the process
    keeps its connections open while requests still arrive, and exits once they stop."""
    server = start_server(
        PREDICT_MODEL=str(demo_models["classifier"]),
        DRAIN_QUIET_S="3",
        RATE_LIMIT="100000/minute",
        LOG_LEVEL="INFO",
    )
    with httpx.Client(base_url=server.url, timeout=10) as client:
        server.proc.send_signal(signal.SIGTERM)
        statuses = []
        for _ in range(10):  # nothing is in flight, but work keeps arriving for ~1 s
            statuses.append(client.post("/predict", json={"text": "late"}).status_code)
            assert server.proc.poll() is None, "exited while requests were still arriving"
            time.sleep(0.1)
    assert set(statuses) == {503}
    assert server.proc.wait(timeout=30) == 0
    assert "drain finished with 0 still in flight" in server.log()


def test_a_stream_cut_at_the_drain_deadline_ends_with_an_error_event_and_done(
    start_server, demo_models
):
    server = start_server(
        GENERATE_MODEL=str(demo_models["llm"]),
        GENERATE_MAX_SEQ_LEN="2048",
        GENERATE_MAX_NEW_TOKENS="2000",
        DRAIN_TIMEOUT_S="0",  # the deadline is the signal: every running stream is cut
        DRAIN_QUIET_S="0",
        RATE_LIMIT="100000/minute",
    )
    long = {"max_new_tokens": 2000, "temperature": 0, "stream": True}

    async def run() -> list[list[str]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            started = [asyncio.Event(), asyncio.Event()]
            tasks = [
                asyncio.create_task(
                    stream_data(client, "/generate", long | {"prompt": "a"}, started[0])
                ),
                asyncio.create_task(
                    stream_data(
                        client,
                        "/v1/completions",
                        {"model": "m", "prompt": "b", "max_tokens": 2000, "temperature": 0,
                         "stream": True},
                        started[1],
                    )
                ),
            ]  # fmt: skip
            await asyncio.gather(*(e.wait() for e in started))
            server.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks)

    generate, completions = asyncio.run(run())
    assert generate[-1] == "[DONE]"
    assert json.loads(generate[-2])["error"]["type"] == "interrupted", generate[-2]
    assert completions[-1] == "[DONE]"
    assert "error" in json.loads(completions[-2]), completions[-2]
    assert server.proc.wait(timeout=60) == 0
