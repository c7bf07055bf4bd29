"""Priority over HTTP: an urgent request overtakes a queue of batch work; a key's configured
priority is the most urgent its requests can be."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from metrics_text import parse_metrics

BATCH_KEY, CHAT_KEY = "batch-key", "chat-key"


@pytest.fixture(scope="module")
def server(start_server, demo_models):
    return start_server(
        GENERATE_MODEL=str(demo_models["llm"]),
        PREDICT_MODEL=str(demo_models["classifier"]),
        GENERATE_SLOTS="1",
        API_KEYS=f"{BATCH_KEY},{CHAT_KEY}",
        API_KEY_PRIORITIES=f"{BATCH_KEY}=10",
        RATE_LIMIT="100000/minute",
        GENERATE_MAX_NEW_TOKENS="900",
        GENERATE_MAX_SEQ_LEN="1024",
        # The batch jobs queue behind a 900-token job, longer than 30 s on a busy box; the
        # queue timeout holds while the slot is busy, so it must not be the default here.
        REQUEST_TIMEOUT_S="600",
    )


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_an_urgent_request_waits_less_than_the_batch_requests_queued_before_it(server):
    """Ordering, not timing: the batch jobs are all queued (the gauge says so) while a long
    job holds the only slot, then the urgent one arrives; it must be admitted before every batch
    job that was already waiting, so its queue time is the shortest of them."""

    async def run() -> tuple[dict, list[dict], dict]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:

            async def post(key: str, prompt: str, max_new_tokens: int = 8) -> dict:
                body = {"prompt": prompt, "max_new_tokens": max_new_tokens}
                answer = await http.post("/generate", json=body, headers=bearer(key))
                assert answer.status_code == 200, answer.text
                return answer.json()

            async def until(name: str, count: int) -> None:
                for _ in range(2000):
                    metrics = parse_metrics((await http.get("/metrics")).text)
                    if metrics.get(name, 0.0) >= count:
                        return
                    await asyncio.sleep(0.002)
                raise AssertionError(f"{name} never reached {count}")

            blocker = asyncio.ensure_future(post(BATCH_KEY, "a long batch job", 900))
            await until("generate_slots_in_use", 1)
            batch = [asyncio.ensure_future(post(BATCH_KEY, f"batch job {i}")) for i in range(4)]
            await until("generate_waiting_requests", 4)
            urgent = asyncio.ensure_future(post(CHAT_KEY, "a user is waiting"))
            return await blocker, list(await asyncio.gather(*batch)), await urgent

    blocker, batch, urgent = asyncio.run(run())
    # The blocker really held the slot while the urgent request arrived (no early EOS).
    assert blocker["completion_tokens"] == 900, blocker
    queued_before = [b["timings"]["queue_ms"] for b in batch]
    assert urgent["timings"]["queue_ms"] < min(queued_before), (urgent["timings"], queued_before)


def counts_by_priority(url: str, name: str, priorities: tuple[str, ...]) -> dict[str, float]:
    samples = parse_metrics(httpx.get(f"{url}/metrics").text)
    return {p: samples.get(f'{name}{{priority="{p}"}}', 0.0) for p in priorities}


def test_a_keys_priority_is_a_floor_that_an_explicit_field_cannot_go_below(server):
    def ttft_counts() -> dict[str, float]:
        name = "generate_time_to_first_token_seconds_count"
        return counts_by_priority(server.url, name, ("0", "10", "20"))

    before = ttft_counts()
    for key, asked in ((BATCH_KEY, 0), (BATCH_KEY, 20), (CHAT_KEY, None)):
        body = {"prompt": "p", "max_new_tokens": 2, "priority": asked}
        assert (
            httpx.post(f"{server.url}/generate", json=body, headers=bearer(key)).status_code == 200
        )
    after = ttft_counts()
    # batch-key asking for 0 got its floor, 10; asking for 20 (less urgent) got 20; chat: 0.
    assert {p: after[p] - before[p] for p in after} == {"0": 1, "10": 1, "20": 1}
    out_of_range = httpx.post(
        f"{server.url}/generate", json={"prompt": "p", "priority": 101}, headers=bearer(CHAT_KEY)
    )
    assert out_of_range.status_code == 422
    assert "priority" in out_of_range.json()["error"]["message"]
    assert "100" in out_of_range.json()["error"]["message"]


def test_predict_requests_queue_at_their_keys_priority(server):
    def wait_counts() -> dict[str, float]:
        return counts_by_priority(server.url, "predict_queue_wait_seconds_count", ("0", "10", "30"))

    before = wait_counts()
    for key, asked in ((BATCH_KEY, None), (BATCH_KEY, 30), (CHAT_KEY, None)):
        body = {"texts": ["one", "two"], "priority": asked}
        answer = httpx.post(f"{server.url}/predict/batch", json=body, headers=bearer(key))
        assert answer.status_code == 200, answer.text
    after = wait_counts()
    assert {p: after[p] - before[p] for p in after} == {"0": 2, "10": 2, "30": 2}
