"""Reading tool calls out of a model's text, in the formats popular chat templates teach.

* hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call
  (Hermes 2/3, Qwen 2/2.5/3, and this project's demo model), text before them is content.
* llama3_json: the whole output is `{"name": ..., "parameters": {...}}` (calls separated by
  `;`), optionally after `<|python_tag|>` (Llama 3.1/3.2/3.3).
* mistral: `[TOOL_CALLS]` then a JSON list of `{"name", "arguments"}` (Mistral 7B v0.3,
  Mixtral 8x22B, Nemo) or `name[ARGS]{...}` per call (tokenizer v11+).

Special tokens are stripped from generated text, so `[TOOL_CALLS]` and `<|python_tag|>` may
be gone: a mistral output that starts with `[` and a llama output that starts with `{` are
read as calls too. A call that names no offered tool, or whose arguments are not a JSON
object, means the text was not a tool call: it stays content.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

ParserName = Literal["hermes", "llama3_json", "mistral"]


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object


@dataclass(frozen=True)
class Parsed:
    content: str | None
    calls: list[ParsedCall]


def call_from(obj: Any, names: Iterable[str]) -> ParsedCall | None:
    """{"name", "arguments" | "parameters"} -> a call, if it names an offered tool."""
    if not isinstance(obj, dict) or obj.get("name") not in set(names):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


def _json_values(text: str, separators: str) -> list[Any] | None:
    """Consecutive JSON values in `text` (separated by whitespace or `separators`)."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    at = 0
    while True:
        while at < len(text) and (text[at].isspace() or text[at] in separators):
            at += 1
        if at == len(text):
            return values
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        values.append(value)


def _calls(objects: list[Any] | None, names: Iterable[str]) -> list[ParsedCall] | None:
    if not objects:
        return None
    calls = [call_from(obj, names) for obj in objects]
    return None if any(call is None for call in calls) else calls  # type: ignore[return-value]


HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


def parse_hermes(text: str, names: Iterable[str]) -> Parsed | None:
    start = text.find("<tool_call>")
    if start < 0:
        return None
    objects = [_json_values(block, "") for block in HERMES_BLOCK.findall(text[start:])]
    flat = [obj for found in objects if found is not None for obj in found]
    calls = _calls(flat if all(found for found in objects) else None, names)
    if calls is None:
        return None
    return Parsed(text[:start].strip() or None, calls)


def parse_llama3_json(text: str, names: Iterable[str]) -> Parsed | None:
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return None
    calls = _calls(_json_values(body, ";"), names)
    return None if calls is None else Parsed(None, calls)


MISTRAL_NAMED = re.compile(r"([A-Za-z0-9_.-]+)(?:\[ARGS\])?\s*(?=\{)")


def parse_mistral(text: str, names: Iterable[str]) -> Parsed | None:
    start = text.find("[TOOL_CALLS]")
    head, rest = (text[:start], text[start + len("[TOOL_CALLS]") :]) if start >= 0 else ("", text)
    rest = rest.strip()
    if rest.startswith("["):
        values = _json_values(rest, "")
        objects = values[0] if values and len(values) == 1 and isinstance(values[0], list) else None
        calls = _calls(objects, names)
    elif start >= 0:
        calls = _mistral_named_calls(rest, names)
    else:
        return None
    return None if calls is None else Parsed(head.strip() or None, calls)


def _mistral_named_calls(text: str, names: Iterable[str]) -> list[ParsedCall] | None:
    decoder, at = json.JSONDecoder(), 0
    objects: list[dict[str, Any]] = []
    while at < len(text):
        match = MISTRAL_NAMED.match(text, at)
        if match is None:
            return None
        try:
            arguments, at = decoder.raw_decode(text, match.end())
        except ValueError:
            return None
        objects.append({"name": match.group(1), "arguments": arguments})
        at = len(text) - len(text[at:].lstrip().removeprefix("[TOOL_CALLS]").lstrip())
    return _calls(objects, names)


@dataclass(frozen=True)
class ToolParser:
    """One format: how to parse a whole output, and what in a stream may start a call."""

    name: ParserName
    parse: Callable[[str, Iterable[str]], Parsed | None]
    markers: tuple[str, ...]  # text that starts a call wherever it appears
    openers: tuple[str, ...]  # text that starts a call only at the start of the output


PARSERS: dict[ParserName, ToolParser] = {
    "hermes": ToolParser("hermes", parse_hermes, ("<tool_call>",), ()),
    "llama3_json": ToolParser("llama3_json", parse_llama3_json, ("<|python_tag|>",), ("{",)),
    "mistral": ToolParser("mistral", parse_mistral, ("[TOOL_CALLS]",), ("[",)),
}


def parser_for_template(template: str | None) -> ToolParser:
    """The format a chat template teaches its model (hermes when it says nothing)."""
    text = template or ""
    if "[TOOL_CALLS]" in text:
        return PARSERS["mistral"]
    if "<|python_tag|>" in text or "ipython" in text:
        return PARSERS["llama3_json"]
    return PARSERS["hermes"]


def choose_parser(setting: str, template: str | None) -> ToolParser:
    """GENERATE_TOOL_PARSER, or with `auto` the chat template's format."""
    if setting == "auto":
        return parser_for_template(template)
    return PARSERS[setting]  # type: ignore[index]
