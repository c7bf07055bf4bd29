"""/predict over a real socket against a real uvicorn process with the demo classifier."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from metrics_text import family_names

from .scrape import metric

CONCURRENT_REQUESTS = 200


@pytest.fixture(scope="module")
def server(start_server, demo_models):
    return start_server(
        PREDICT_MODEL=str(demo_models["classifier"]),
        PREDICT_MAX_BATCH_SIZE="32",
        # Small enough that the equality test below runs many budget-bound batches, each in
        # several padding groups (its texts are 6-40 tokens long).
        PREDICT_MAX_BATCH_TOKENS="400",
        PREDICT_MAX_GROUP_PADDING_TOKENS="8",
        PREDICT_MAX_WAIT_MS="10",
        MAX_INPUT_CHARS="200",
        MAX_BATCH_TEXTS="8",
        RATE_LIMIT="100000/minute",
    )


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def test_predict_answers_with_label_score_and_request_id(server, http):
    response = httpx.post(
        f"{server.url}/predict", json={"text": "great product"}, headers={"X-Request-ID": "abc-1"}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["label"] in {"NEGATIVE", "POSITIVE"}
    assert 0.5 <= body["score"] <= 1.0
    assert set(body["scores"]) == {"NEGATIVE", "POSITIVE"}
    assert body["request_id"] == "abc-1" == response.headers["x-request-id"]
    # A local folder's revision is the content hash of its files (service/model_versions.py).
    assert body["model_revision"] == response.headers["x-model-revision"]
    assert body["model_revision"].startswith("sha256-")
    assert "cached" not in body and "x-cache" not in response.headers  # no cache configured


def test_concurrent_requests_are_batched_and_equal_to_each_text_alone(server, http):
    texts = [f"review number {i}: " + "good " * (i % 17) + "bad " * (i % 5) for i in range(40)]
    alone = {t: http.post("/predict", json={"text": t}).json()["scores"] for t in texts}
    before = http.get("/metrics").text

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=CONCURRENT_REQUESTS)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post(f"{server.url}/predict", json={"text": texts[i % len(texts)]})
                    for i in range(CONCURRENT_REQUESTS)
                )
            )

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * CONCURRENT_REQUESTS
    for i, response in enumerate(responses):
        expected = alone[texts[i % len(texts)]]
        for label, score in response.json()["scores"].items():
            assert score == pytest.approx(expected[label], abs=1e-4)

    after = http.get("/metrics").text
    batches = metric(after, "predict_batch_size_count") - metric(before, "predict_batch_size_count")
    items = metric(after, "predict_batch_size_sum") - metric(before, "predict_batch_size_sum")
    assert items == CONCURRENT_REQUESTS
    assert items / batches > 2, f"mean batch size {items / batches:.2f}: batching did not happen"


def test_batch_endpoint_answers_in_order(server, http):
    texts = ["first text", "a much longer second text " * 3, "third"]
    batch = http.post("/predict/batch", json={"texts": texts}).json()["results"]
    singles = [http.post("/predict", json={"text": t}).json() for t in texts]
    assert [r["label"] for r in batch] == [s["label"] for s in singles]
    for got, want in zip(batch, singles, strict=True):
        assert got["score"] == pytest.approx(want["score"], abs=1e-4)


@pytest.mark.parametrize(
    ("path", "payload", "status", "needle"),
    [
        ("/predict", {"text": ""}, 422, "at least 1 character"),
        ("/predict", {"text": "x" * 201}, 422, "201 characters, more than the limit of 200"),
        ("/predict", {"text": 42}, 422, "text"),
        ("/predict", {"txt": "typo"}, 422, "text"),
        ("/predict", [1, 2], 422, "body"),
        ("/predict/batch", {"texts": []}, 422, "texts"),
        ("/predict/batch", {"texts": ["ok"] * 9}, 422, "9 items, more than the limit of 8"),
        ("/predict/batch", {"texts": ["ok", ""]}, 422, "texts.1"),
    ],
)
def test_bad_input_gets_a_clear_json_error_and_the_server_keeps_serving(
    server, http, path, payload, status, needle
):
    response = http.post(f"{path}", json=payload)
    assert response.status_code == status
    error = response.json()["error"]
    assert needle in error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    assert http.post("/predict", json={"text": "still fine"}).status_code == 200


def test_malformed_json_and_unknown_paths_get_json_errors(server, http):
    response = httpx.post(
        f"{server.url}/predict", content=b"{bad", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["message"] == "body: malformed JSON"
    missing = http.get("/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found"


def test_info_and_metrics_describe_the_loaded_model(server, http):
    info = http.get("/info").json()
    assert info["predict"]["task"] == "classification"
    assert info["predict"]["device"] == "cpu"
    assert info["predict"]["max_batch_size"] == 32
    metrics = http.get("/metrics").text
    model = info["predict"]
    labels = {"task": "classification", "model": model["model"], "revision": model["revision"]}
    assert metric(metrics, "model_info", **labels, quantization="none", device="cpu") == 1
    assert metric(metrics, "predict_queue_depth") >= 0
    assert metric(metrics, "predict_queue_wait_seconds_count", priority="0") >= 0
    assert metric(metrics, "predict_inference_seconds_count") >= 0
    rejected = metric(metrics, "predict_requests_rejected_total", reason="queue_full", priority="0")
    assert rejected >= 0
    assert "http_requests" in family_names(metrics)
