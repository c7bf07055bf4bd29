"""Tool calls read from the text of each format popular templates teach, and streamed as
OpenAI deltas: content until a call may start, then the calls."""

from __future__ import annotations

import json

import pytest

from service.openai.schemas import ChatCompletionRequest
from service.openai.tools.parsers import PARSERS, ParsedCall, parser_for_template
from service.openai.tools.plan import tool_plan
from service.openai.tools.stream import ToolStream

NAMES = ["get_weather", "add"]
WEATHER = ParsedCall("get_weather", '{"city": "Oslo"}')
ADD = ParsedCall("add", '{"a": 1, "b": 2}')


@pytest.mark.parametrize(
    ("parser", "text", "content", "calls"),
    [
        ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
         "</tool_call>", None, [WEATHER]),
        ("hermes", 'Let me see. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}'
         '</tool_call>\n<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}'
         "</tool_call>", "Let me see.", [WEATHER, ADD]),
        ("hermes", '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}', None, [ADD]),
        ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}',
         None, [WEATHER]),
        ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
         '{"name": "add", "parameters": {"a": 1, "b": 2}}', None, [WEATHER, ADD]),
        ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
         '{"name": "add", "arguments": {"a": 1, "b": 2}}]', None, [WEATHER, ADD]),
        ("mistral", '[{"name": "add", "arguments": {"a": 1, "b": 2}}]', None, [ADD]),
        ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}[TOOL_CALLS]add[ARGS]'
         '{"a": 1, "b": 2}', None, [WEATHER, ADD]),
    ],
)  # fmt: skip
def test_each_format_gives_its_calls_and_the_text_before_them(parser, text, content, calls):
    parsed = PARSERS[parser].parse(text, NAMES)
    assert parsed is not None
    assert parsed.content == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [
        (c.name, json.loads(c.arguments)) for c in calls
    ]


@pytest.mark.parametrize(
    ("parser", "text"),
    [
        ("hermes", "Just an answer."),
        ("hermes", '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>'),
        ("hermes", "<tool_call>{not json</tool_call>"),
        ("llama3_json", '{"name": "add", "parameters": [1, 2]}'),
        ("llama3_json", "Sure: {}"),
        ("mistral", "[1, 2, 3]"),
    ],
)
def test_text_that_is_not_a_call_of_an_offered_tool_stays_content(parser, text):
    assert PARSERS[parser].parse(text, NAMES) is None


def test_the_format_is_read_from_the_chat_template():
    assert parser_for_template("{{ '[TOOL_CALLS]' }}").name == "mistral"
    assert parser_for_template("{{ '<|python_tag|>' }} ipython").name == "llama3_json"
    assert parser_for_template("<tool_call>").name == "hermes"
    assert parser_for_template(None).name == "hermes"


def plan(**fields):
    body = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}],
         "tools": [{"type": "function", "function": {"name": n}} for n in NAMES]} | fields
    )  # fmt: skip
    return tool_plan(body, PARSERS["hermes"])


def test_auto_streams_content_and_holds_back_what_may_start_a_call():
    stream = ToolStream(plan())
    sent = []
    for piece in ["Let me ", "check.<tool", "_call>", '{"name": "add", ', '"arguments": {"a": 1}}']:
        sent += stream.feed(piece)
    assert sent == [{"content": "Let me "}, {"content": "check."}]
    last, reason = stream.finish("stop")
    assert reason == "tool_calls"
    (delta,) = last
    (call,) = delta["tool_calls"]
    assert call["function"] == {"name": "add", "arguments": '{"a": 1}'} and call["index"] == 0


def test_auto_text_that_only_looked_like_a_call_ends_as_content():
    stream = ToolStream(plan())
    sent = stream.feed("a <tool") + stream.feed("box> b")
    assert sent == [{"content": "a "}, {"content": "<toolbox> b"}]
    assert stream.finish("length") == ([], "length")
    broken = ToolStream(plan())
    assert broken.feed("<tool_call>{oops") == []
    assert broken.finish("stop") == ([{"content": "<tool_call>{oops"}], "stop")


def test_a_named_tool_streams_its_arguments_as_they_come():
    stream = ToolStream(plan(tool_choice={"type": "function", "function": {"name": "add"}}))
    first, second = stream.feed('{"a": '), stream.feed("1}")
    (head,) = first[0]["tool_calls"]
    assert head["function"] == {"name": "add", "arguments": '{"a": '} and head["id"]
    assert second == [{"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}]
    assert stream.finish("stop") == ([], "tool_calls")
