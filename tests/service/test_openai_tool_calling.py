"""Tool calling with the official openai package over a socket, on the random demo model:
`required` and a named tool are constrained to the tools' schemas, so every call parses and
validates; `auto` lets the model choose; calls stream as tool_calls deltas; a tool result goes
back through the chat template."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from transformers import AutoTokenizer

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
        "unit": {"type": "string", "enum": ["c", "f"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "b": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
TOOLS = [
    {"type": "function", "function": {"name": n, "description": f"{n} tool", "parameters": s}}
    for n, s in SCHEMAS.items()
]
MESSAGES = [{"role": "user", "content": "What is the weather in Oslo, and what is 2 + 3?"}]


class Add(BaseModel):
    a: int = Field(ge=0, le=99)
    b: int = Field(ge=0, le=99)


@pytest.fixture(scope="module")
def server(start_server, demo_models):
    return start_server(
        GENERATE_MODEL=str(demo_models["llm"]),
        GENERATE_SLOTS="8",
        GENERATE_MAX_SEQ_LEN="1024",  # the demo tokenizer spends ~550 tokens on the tools
        RATE_LIMIT="100000/minute",
    )


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def assert_valid_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_tool_calls_always_validate_and_parallel_calls_happen(client):
    counts = []
    for seed in range(6):
        answer = client.chat.completions.create(
            model="m", messages=MESSAGES, tools=TOOLS, tool_choice="required",
            seed=seed, n=4,
        )  # fmt: skip
        for choice in answer.choices:
            assert choice.finish_reason == "tool_calls", choice
            assert choice.message.content is None
            assert_valid_calls(choice.message.tool_calls)
            counts.append(len(choice.message.tool_calls))
    assert max(counts) >= 2, counts  # parallel calls, from sampling alone
    assert max(counts) <= 4  # MAX_REQUIRED_CALLS
    single = client.chat.completions.create(
        model="m", messages=MESSAGES, tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, seed=1, n=4, max_tokens=300,
    )  # fmt: skip
    assert [len(c.message.tool_calls) for c in single.choices] == [1, 1, 1, 1]


def test_a_named_tool_is_the_one_called_with_valid_arguments(client):
    for seed in range(4):
        answer = client.chat.completions.create(
            model="m", messages=MESSAGES, tools=TOOLS, seed=seed,
            tool_choice={"type": "function", "function": {"name": "add"}},
        )  # fmt: skip
        (call,) = answer.choices[0].message.tool_calls
        assert call.function.name == "add" and answer.choices[0].finish_reason == "tool_calls"
        assert_valid_calls([call])


def test_auto_lets_the_model_answer_with_the_tools_in_its_prompt(client):
    plain = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=8, seed=0)
    auto = client.chat.completions.create(
        model="m", messages=MESSAGES, tools=TOOLS, max_tokens=8, seed=0
    )
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # the template lists them
    message = auto.choices[0].message
    if message.tool_calls:  # the model chose a tool: then it parsed and validates
        assert_valid_calls(message.tool_calls)
    else:
        assert isinstance(message.content, str) and auto.choices[0].finish_reason == "length"


def streamed_calls(stream) -> tuple[dict[int, dict], list[str], set[str]]:
    """tool_calls deltas assembled by index, the argument pieces, the finish reasons."""
    calls: dict[int, dict] = {}
    pieces, reasons = [], set()
    for chunk in stream:
        for choice in chunk.choices:
            if choice.finish_reason:
                reasons.add(choice.finish_reason)
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = delta.id or call["id"]
                call["name"] += (delta.function.name or "") if delta.function else ""
                piece = (delta.function.arguments or "") if delta.function else ""
                call["arguments"] += piece
                pieces.append(piece)
    return calls, pieces, reasons


def test_streamed_tool_call_deltas_assemble_to_the_calls_of_the_same_request(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    stream = client.chat.completions.create(
        model="m", messages=MESSAGES, tools=TOOLS, tool_choice=named, seed=3, stream=True
    )
    calls, pieces, reasons = streamed_calls(stream)
    assert reasons == {"tool_calls"}
    assert len([p for p in pieces if p]) > 1  # the arguments arrive piece by piece
    (call,) = calls.values()
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["arguments"]), WEATHER)
    whole = client.chat.completions.create(
        model="m", messages=MESSAGES, tools=TOOLS, tool_choice=named, seed=3
    )
    assert call["arguments"] == whole.choices[0].message.tool_calls[0].function.arguments
    stream = client.chat.completions.create(
        model="m", messages=MESSAGES, tools=TOOLS, tool_choice="required", seed=2, stream=True,
        max_tokens=300,
    )  # fmt: skip
    calls, _, reasons = streamed_calls(stream)
    assert reasons == {"tool_calls"}
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_pydantic_function_tool_parses_into_the_model(client):
    parsed = client.chat.completions.parse(
        model="m", messages=MESSAGES, tools=[openai.pydantic_function_tool(Add)],
        tool_choice="required", max_tokens=300, seed=5,
    )  # fmt: skip
    calls = parsed.choices[0].message.tool_calls
    assert calls and all(isinstance(call.function.parsed_arguments, Add) for call in calls)


def test_a_tool_result_goes_back_through_the_template(client, demo_models):
    first = client.chat.completions.create(
        model="m", messages=MESSAGES, tools=TOOLS, seed=0,
        tool_choice={"type": "function", "function": {"name": "add"}},
    )  # fmt: skip
    call = first.choices[0].message.tool_calls[0]
    arguments = json.loads(call.function.arguments)
    conversation = [
        *MESSAGES,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": str(arguments["a"] + arguments["b"])},
    ]
    second = client.chat.completions.create(
        model="m", messages=conversation, tools=TOOLS, tool_choice="none", max_tokens=4
    )
    assert second.choices[0].message.content is not None
    assert second.choices[0].message.tool_calls is None
    tokenizer = AutoTokenizer.from_pretrained(demo_models["llm"])
    template_input = [*MESSAGES, {
        "role": "assistant", "content": "",
        "tool_calls": [{"id": call.id, "type": "function",
                        "function": {"name": "add", "arguments": arguments}}],
    }, conversation[-1]]  # fmt: skip
    prompt = tokenizer.apply_chat_template(
        template_input, tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    assert f'"arguments": {json.dumps(arguments)}' in prompt and "<|tool|>" in prompt
    assert second.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))


def test_legacy_functions_answer_with_function_call(client):
    answer = client.chat.completions.create(
        model="m", messages=MESSAGES, seed=0,
        functions=[{"name": "add", "parameters": ADD}], function_call={"name": "add"},
    )  # fmt: skip
    choice = answer.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.function_call.name == "add"
    jsonschema.validate(json.loads(choice.message.function_call.arguments), ADD)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required", "tools": None}, "tool_choice"),
        ({"functions": [{"name": "add"}]}, "functions"),
        ({"response_format": {"type": "json_object"}, "tool_choice": "required"},
         "response_format"),
    ],
)  # fmt: skip
def test_contradictory_tool_requests_are_a_400_naming_the_field(server, extra, param):
    body = {"model": "m", "messages": MESSAGES, "tools": TOOLS} | extra
    answer = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


def logprob_tokens(choices) -> list[str]:
    return [
        entry.token for choice in choices if choice.logprobs for entry in choice.logprobs.content
    ]


@pytest.mark.parametrize(
    "tool_choice",
    ["required", {"type": "function", "function": {"name": "add"}}, "auto"],
    ids=["required", "named", "auto"],
)
def test_streamed_tool_calls_carry_every_tokens_logprobs_as_the_answer_does(client, tool_choice):
    asked = {"model": "m", "messages": MESSAGES, "tools": TOOLS, "tool_choice": tool_choice,
             "temperature": 0, "max_tokens": 40, "logprobs": True, "top_logprobs": 2}  # fmt: skip
    whole = client.chat.completions.create(**asked)
    expected = logprob_tokens(whole.choices)
    assert len(expected) == whole.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(**asked, stream=True))
    streamed = logprob_tokens(choice for chunk in chunks for choice in chunk.choices)
    assert streamed == expected  # each token once, in order, none dropped by the tool stream
