"""The response cache through /predict and /predict/batch of a real server (PREDICT_CACHE_SIZE)."""

from __future__ import annotations

import httpx
import pytest

from .scrape import metric

CACHE_SIZE = 4


@pytest.fixture(scope="module")
def http(start_server, demo_models):
    server = start_server(
        PREDICT_MODEL=str(demo_models["classifier"]),
        PREDICT_CACHE_SIZE=str(CACHE_SIZE),
        RATE_LIMIT="100000/minute",
    )
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def counts(http: httpx.Client) -> tuple[float, float, float]:
    """(cache hits, cache misses, texts computed by the batcher) so far."""
    text = http.get("/metrics").text
    return (
        metric(text, "predict_cache_hits_total"),
        metric(text, "predict_cache_misses_total"),
        metric(text, "predict_batch_size_sum"),
    )


def grown(before: tuple[float, ...], after: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(b - a for a, b in zip(before, after, strict=True))


def test_a_repeated_text_is_a_hit_equal_to_the_fresh_result(http):
    before = counts(http)
    fresh = http.post("/predict", json={"text": "a text seen twice"})
    again = http.post("/predict", json={"text": "a text seen twice"})

    assert (fresh.headers["x-cache"], fresh.json()["cached"]) == ("miss", False)
    assert (again.headers["x-cache"], again.json()["cached"]) == ("hit", True)
    volatile = {"cached", "request_id", "processing_time_ms"}
    assert {k: v for k, v in again.json().items() if k not in volatile} == {
        k: v for k, v in fresh.json().items() if k not in volatile
    }
    assert again.json()["request_id"] != fresh.json()["request_id"]
    assert grown(before, counts(http)) == (1, 1, 1)  # one lookup each; computed once


def test_a_batch_call_computes_only_its_misses(http):
    http.post("/predict", json={"text": "known text"})
    before = counts(http)

    response = http.post("/predict/batch", json={"texts": ["known text", "new text", "new text"]})

    assert response.headers["x-cache"] == "partial"
    results = response.json()["results"]
    assert [r["cached"] for r in results] == [True, False, False]
    assert results[1]["scores"] == results[2]["scores"]
    assert grown(before, counts(http)) == (1, 2, 1)  # "new text" computed once for both
    assert http.post("/predict/batch", json={"texts": ["new text"]}).headers["x-cache"] == "hit"


def test_no_cache_computes_afresh_and_refreshes_the_entry(http):
    first = http.post("/predict", json={"text": "refresh me"})
    before = counts(http)

    fresh = http.post(
        "/predict", json={"text": "refresh me"}, headers={"Cache-Control": "no-cache"}
    )

    assert (fresh.headers["x-cache"], fresh.json()["cached"]) == ("miss", False)
    assert fresh.json()["scores"] == first.json()["scores"]
    assert grown(before, counts(http)) == (0, 0, 1)  # no lookup counted; computed
    assert http.post("/predict", json={"text": "refresh me"}).headers["x-cache"] == "hit"


def test_no_store_keeps_the_result_out_of_the_cache(http):
    kept_out = http.post(
        "/predict", json={"text": "private"}, headers={"Cache-Control": "no-store"}
    )
    assert kept_out.headers["x-cache"] == "miss"
    assert http.post("/predict", json={"text": "private"}).headers["x-cache"] == "miss"


def test_the_cache_keeps_at_most_its_size(http):
    texts = [f"eviction text {i}" for i in range(CACHE_SIZE + 1)]
    for text in texts:
        assert http.post("/predict", json={"text": text}).headers["x-cache"] == "miss"
    # The oldest entry made room for the newest; the most recent ones are still there.
    assert http.post("/predict", json={"text": texts[-1]}).headers["x-cache"] == "hit"
    assert http.post("/predict", json={"text": texts[0]}).headers["x-cache"] == "miss"


def test_bad_input_is_refused_and_never_cached(http):
    before = counts(http)
    assert http.post("/predict", json={"text": ""}).status_code == 422
    assert grown(before, counts(http)) == (0, 0, 0)


def test_with_api_keys_each_key_has_its_own_share_of_the_cache(start_server, demo_models):
    server = start_server(
        PREDICT_MODEL=str(demo_models["classifier"]),
        PREDICT_CACHE_SIZE=str(CACHE_SIZE),
        API_KEYS="key-a,key-b",
        RATE_LIMIT="100000/minute",
    )

    def cached(key: str) -> bool:
        headers = {"Authorization": f"Bearer {key}"}
        answer = httpx.post(f"{server.url}/predict", json={"text": "private"}, headers=headers)
        return answer.json()["cached"]

    assert [cached("key-a"), cached("key-b"), cached("key-a"), cached("key-b")] == [
        False,
        False,
        True,
        True,
    ]
