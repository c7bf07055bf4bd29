"""What mainstream clients send to /v1, over a socket: lm-evaluation-harness's
local-completions payloads (nested token lists, batched, max_tokens 256, echo + logprobs),
LangChain-style batched prompts, limits taken from the context, the vLLM sampling extras
(logit_bias, min_tokens, ignore_eos, stop_token_ids), /tokenizer_info, and a 400 naming every
field this server does not implement."""

from __future__ import annotations

import ast
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.generate.limits import FieldError, max_new_tokens_for
from service.settings import Settings

SERVICE = Path(__file__).resolve().parents[2] / "service"
TEXTS = ["The quick brown fox", "Serving models in production", "Numbers: 0 1 2", "café"]


@pytest.fixture(scope="module")
def server(start_server, demo_models):
    return start_server(
        GENERATE_MODEL=str(demo_models["llm"]),
        GENERATE_SLOTS="8",
        GENERATE_MAX_SEQ_LEN="512",
        RATE_LIMIT="100000/minute",
    )


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(demo_models):
    return AutoTokenizer.from_pretrained(demo_models["llm"])


def post(server, body: dict, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120)


def test_lm_eval_loglikelihood_batch_scores_each_prompt_as_alone(server, tokenizer, demo_models):
    prompts = [tokenizer.encode(text) for text in TEXTS]  # batch_size 4: nested token lists
    body = {"model": "m", "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1}
    body |= {"seed": 1234, "echo": True}  # exactly what local-completions sends
    batched = post(server, body).json()
    assert [c["index"] for c in batched["choices"]] == [0, 1, 2, 3]
    model = AutoModelForCausalLM.from_pretrained(demo_models["llm"]).eval()
    for prompt, choice in zip(prompts, batched["choices"], strict=True):
        alone = post(server, body | {"prompt": [prompt]}).json()["choices"][0]
        logprobs = choice["logprobs"]
        assert len(logprobs["token_logprobs"]) == len(prompt) + 1
        assert logprobs["token_logprobs"] == pytest.approx(
            alone["logprobs"]["token_logprobs"], abs=1e-4
        )
        with torch.inference_mode():
            direct = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
        expected = [float(direct[i - 1, prompt[i]]) for i in range(1, len(prompt))]
        assert logprobs["token_logprobs"][1 : len(prompt)] == pytest.approx(expected, abs=1e-3)
        assert all(isinstance(top, dict) and len(top) == 1 for top in logprobs["top_logprobs"][1:])
    usage = batched["usage"]
    assert usage["prompt_tokens"] == sum(len(p) for p in prompts)


def test_lm_eval_generate_until_batch_at_256_tokens_equals_each_prompt_alone(server, tokenizer):
    prompts = [tokenizer.encode(text) for text in TEXTS]
    body = {"model": "m", "prompt": prompts, "max_tokens": 256, "temperature": 0}
    body |= {"stop": ["\n\n", "</s>"], "seed": 1234}
    batched = post(server, body).json()
    texts = [c["text"] for c in sorted(batched["choices"], key=lambda c: c["index"])]
    for prompt, text in zip(prompts, texts, strict=True):
        assert post(server, body | {"prompt": [prompt]}).json()["choices"][0]["text"] == text


def test_batched_string_prompts_get_one_choice_each_in_order_and_n_per_prompt(client):
    batched = client.completions.create(model="m", prompt=TEXTS, max_tokens=6, temperature=0)
    assert [c.index for c in batched.choices] == [0, 1, 2, 3]
    for text, choice in zip(TEXTS, batched.choices, strict=True):
        alone = client.completions.create(model="m", prompt=text, max_tokens=6, temperature=0)
        assert choice.text == alone.choices[0].text
    assert batched.usage.prompt_tokens == sum(
        client.completions.create(model="m", prompt=t, max_tokens=1).usage.prompt_tokens
        for t in TEXTS
    )
    two_each = client.completions.create(
        model="m", prompt=TEXTS[:2], n=2, max_tokens=4, temperature=0, echo=True
    )
    assert [c.index for c in two_each.choices] == [0, 1, 2, 3]
    assert [c.text.startswith(TEXTS[c.index // 2]) for c in two_each.choices] == [True] * 4
    streamed = client.completions.create(
        model="m", prompt=TEXTS, max_tokens=6, temperature=0, stream=True
    )
    pieces = {i: "" for i in range(4)}
    for chunk in streamed:
        for choice in chunk.choices:
            pieces[choice.index] += choice.text
    assert [pieces[i] for i in range(4)] == [c.text for c in batched.choices]


def test_too_many_prompts_are_refused_whole(server):
    answer = post(server, {"model": "m", "prompt": ["x"] * 65, "max_tokens": 1})
    assert answer.status_code == 400 and "GENERATE_MAX_PROMPTS" in answer.json()["error"]["message"]
    assert answer.json()["error"]["param"] == "prompt"


def test_max_tokens_may_be_anything_that_fits_the_context(client, server):
    long = client.completions.create(
        model="m", prompt="hi", max_tokens=400, temperature=0, extra_body={"ignore_eos": True}
    )
    assert long.usage.completion_tokens == 400 and long.choices[0].finish_reason == "length"
    refused = post(server, {"model": "m", "prompt": "hi", "max_tokens": 600})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "context_length_exceeded" and "512" in error["message"], error


def test_the_operator_cap_and_the_default_output_length():
    settings = Settings(generate_max_new_tokens=300)
    assert max_new_tokens_for(None, 12, 512, settings) == 300
    assert max_new_tokens_for(None, 500, 512, settings) == 12
    assert max_new_tokens_for(250, 12, 512, settings) == 250
    with pytest.raises(FieldError, match="GENERATE_MAX_NEW_TOKENS"):
        max_new_tokens_for(301, 12, 512, settings, "max_tokens")


def greedy(client, **extra):
    return client.completions.create(
        model="m", prompt="hello", max_tokens=5, temperature=0, extra_body=extra
    )


def test_logit_bias_of_100_makes_greedy_emit_the_token(client, tokenizer):
    token = tokenizer.encode(" fox", add_special_tokens=False)[0]
    plain = greedy(client).choices[0].text
    biased = client.completions.create(
        model="m", prompt="hello", max_tokens=5, temperature=0, logit_bias={str(token): 100}
    )
    assert biased.choices[0].text == tokenizer.decode([token] * 5) != plain


def test_min_tokens_ignore_eos_and_stop_token_ids_are_honoured(client, tokenizer):
    eos = tokenizer.eos_token_id
    to_eos = {"logit_bias": {str(eos): 100}}
    assert greedy(client, **to_eos).usage.completion_tokens == 0
    at_least = greedy(client, **to_eos, min_tokens=3)
    assert at_least.usage.completion_tokens == 3 and at_least.choices[0].finish_reason == "stop"
    ignored = greedy(client, **to_eos, ignore_eos=True)
    assert ignored.usage.completion_tokens == 5 and ignored.choices[0].finish_reason == "length"
    token = tokenizer.encode(" fox", add_special_tokens=False)[0]
    stopped = greedy(client, logit_bias={str(token): 100}, stop_token_ids=[token], min_tokens=2)
    assert stopped.usage.completion_tokens == 2 and stopped.choices[0].finish_reason == "stop"
    assert str(token) not in stopped.choices[0].text


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/completions", "presence_penalty", 0.5),
        ("/v1/completions", "frequency_penalty", 1.0),
        ("/v1/completions", "suffix", "tail"),
        ("/v1/completions", "best_of", 3),
        ("/v1/completions", "repetition_penalty", 1.2),
        ("/v1/chat/completions", "audio", {"voice": "alloy", "format": "wav"}),
        ("/v1/chat/completions", "modalities", ["text", "audio"]),
        ("/v1/chat/completions", "prediction", {"type": "content", "content": "x"}),
        ("/v1/chat/completions", "web_search_options", {}),
        ("/v1/chat/completions", "store", True),
    ],
)
def test_an_unimplemented_field_is_a_400_naming_it(server, path, field, value):
    body = {"model": "m", "max_tokens": 2, field: value}
    body |= (
        {"prompt": "hi"}
        if path == "/v1/completions"
        else {"messages": [{"role": "user", "content": "hi"}]}
    )
    answer = post(server, body, path)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == field and field in answer.json()["error"]["message"]


def test_no_op_values_of_unimplemented_fields_are_accepted(server):
    body = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    body |= {"presence_penalty": 0, "modalities": ["text"], "store": False, "user": "u"}
    assert post(server, body, "/v1/chat/completions").status_code == 200


def test_tokenizer_info_is_in_vllms_shape(server, tokenizer):
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["tokenizer_class"] == type(tokenizer).__name__
    assert info["eos_token"] == tokenizer.eos_token and info["model_max_length"] == 512
    assert "tool_call" in info["chat_template"]


def _names_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}


def test_v1_never_calls_the_engine_and_limits_are_checked_in_one_place():
    submitters = {
        path.relative_to(SERVICE).as_posix()
        for path in SERVICE.rglob("*.py")
        if {"submit", "submit_choices"} & _names_in(path) and "engine" in _names_in(path)
    }
    assert submitters == {"generate/submit.py"}
    limits = {"generate_max_new_tokens", "generate_max_prompt_chars", "generate_max_choices",
              "generate_max_prompts", "generate_max_messages"}  # fmt: skip
    checkers = {
        path.relative_to(SERVICE).as_posix()
        for path in SERVICE.rglob("*.py")
        if limits & _names_in(path)
    }
    assert checkers <= {"generate/limits.py", "generate/service.py"}  # service.py: /info
