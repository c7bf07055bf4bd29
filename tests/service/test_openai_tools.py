"""What tools built on the OpenAI API need, with the official openai package over a socket:
logprobs, echo for loglikelihood scoring, structured output, n > 1, tokenize."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest
import torch
from pydantic import BaseModel, Field
from transformers import AutoModelForCausalLM, AutoTokenizer

MESSAGES = [{"role": "user", "content": "Describe a gadget."}]


class Gadget(BaseModel):
    name: str = Field(max_length=6)
    count: int = Field(ge=0, le=99)
    ok: bool


@pytest.fixture(scope="module")
def server(start_server, demo_models):
    return start_server(
        GENERATE_MODEL=str(demo_models["llm"]),
        GENERATE_SLOTS="8",
        GENERATE_MAX_SEQ_LEN="512",
        GENERATE_MAX_NEW_TOKENS="256",
        RATE_LIMIT="100000/minute",
    )


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def model_and_tokenizer(demo_models):
    model = AutoModelForCausalLM.from_pretrained(demo_models["llm"]).eval()
    return model, AutoTokenizer.from_pretrained(demo_models["llm"])


def test_chat_logprobs_come_with_every_token_streamed_or_not(client):
    answer = client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=12, logprobs=True, top_logprobs=3, temperature=0
    )
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 3 and entry.logprob <= 0 for entry in content)
    assert all(entry.top_logprobs[0].logprob >= entry.logprob - 1e-6 for entry in content)
    streamed = client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=12, logprobs=True, top_logprobs=3,
        temperature=0, stream=True,
    )  # fmt: skip
    entries = [e for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
               for e in chunk.choices[0].logprobs.content]  # fmt: skip
    assert [e.token for e in entries] == [e.token for e in content]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in content], abs=1e-5)


def test_the_lm_eval_loglikelihood_request_scores_the_prompt_like_the_model_does(
    server, model_and_tokenizer
):
    model, tokenizer = model_and_tokenizer
    context = tokenizer.encode("The quick brown fox", add_special_tokens=False)
    continuation = tokenizer.encode(" jumps over the lazy dog", add_special_tokens=False)
    prompt = context + continuation
    for max_tokens in (1, 0):
        body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "logprobs": 1}
        body |= {"echo": True, "temperature": 0}
        answer = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
        logprobs = answer["choices"][0]["logprobs"]
        assert len(logprobs["token_logprobs"]) == len(prompt) + max_tokens
        assert logprobs["token_logprobs"][0] is None
        assert len(logprobs["top_logprobs"][1]) == 1
        with torch.inference_mode():
            direct = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
        expected = sum(float(direct[i - 1, prompt[i]]) for i in range(len(context), len(prompt)))
        served = sum(logprobs["token_logprobs"][len(context) : len(prompt)])
        assert served == pytest.approx(expected, abs=1e-3)
    assert answer["choices"][0]["text"] == tokenizer.decode(prompt)


def test_parse_with_a_pydantic_model_returns_a_valid_object_from_random_weights(client):
    for _ in range(3):  # sampled (temperature 1): the constraint alone makes it valid
        parsed = client.beta.chat.completions.parse(
            model="m", messages=MESSAGES, response_format=Gadget, max_tokens=200
        )
        gadget = parsed.choices[0].message.parsed
        assert isinstance(gadget, Gadget)
    loose = client.chat.completions.create(
        model="m", messages=MESSAGES, response_format={"type": "json_object"}, max_tokens=200,
        temperature=0,
    )  # fmt: skip
    assert isinstance(json.loads(loose.choices[0].message.content), dict)


def test_sampled_generate_outputs_with_a_schema_all_validate(server):
    schema = Gadget.model_json_schema() | {"additionalProperties": False}  # a closed object

    async def run() -> list[dict]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            bodies = [
                {"prompt": f"gadget {i}", "temperature": 1.0, "seed": i, "max_new_tokens": 200,
                 "json_schema": schema}
                for i in range(16)
            ]  # fmt: skip
            answers = await asyncio.gather(*(http.post("/generate", json=b) for b in bodies))
            return [a.json() for a in answers]

    for answer in asyncio.run(run()):
        assert answer["finish_reason"] in ("stop", "eos"), answer
        jsonschema.validate(json.loads(answer["text"]), schema)


def test_n_choices_come_back_as_n_choices_streamed_or_not(client):
    answer = client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=8, n=3, seed=5, temperature=1.0
    )
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert len({c.message.content for c in answer.choices}) > 1  # seeds 5, 6, 7: they differ
    again = client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=8, n=3, seed=5, temperature=1.0
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in answer.choices]
    streamed = client.completions.create(
        model="m", prompt="Hello", max_tokens=6, n=3, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    texts: dict[int, str] = {0: "", 1: "", 2: ""}
    finished = set()
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finished.add(choice.index)
        if chunk.usage:
            usage = chunk.usage
    assert finished == {0, 1, 2}
    assert texts[0] == texts[1] == texts[2]  # greedy: the same three times
    plain = client.completions.create(model="m", prompt="Hello", max_tokens=6, temperature=0)
    assert texts[0] == plain.choices[0].text
    assert usage.prompt_tokens == plain.usage.prompt_tokens
    assert usage.completion_tokens == 3 * plain.usage.completion_tokens


@pytest.mark.parametrize(
    ("prompt", "needle"),
    [([], "give at least one prompt"), ([5, 10**6], "token ids must be in")],
    ids=["empty", "out-of-range"],
)
def test_bad_prompts_are_bad_requests_and_the_server_goes_on(client, prompt, needle):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="m", prompt=prompt, max_tokens=2)
    assert needle in raised.value.message
    assert client.completions.create(model="m", prompt="ok", max_tokens=2).choices


def test_tokenize_and_detokenize_use_the_servers_tokenizer(server, model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": "héllo wörld"}).json()
    assert tokens["tokens"] == tokenizer.encode("héllo wörld")
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 512
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text["prompt"] == tokenizer.decode(tokens["tokens"])
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": MESSAGES}).json()
    assert chat["count"] > 0
    bad = httpx.post(f"{server.url}/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 422
