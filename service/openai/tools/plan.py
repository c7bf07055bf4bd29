"""What a chat request asks of tools: the tools its template renders, whether the model may,
must, or must call one named tool, and the JSON the output is then constrained to.

`required` and a named function are constrained with the grammar engine, so the calls always
parse and validate against the tools' schemas, whatever the model (as vLLM does, the output is
then plain JSON: the named tool's arguments, or a list of {"name", "arguments"}). With `auto`
the model writes in its template's format and parsers.py reads the calls back. The legacy
`functions` / `function_call` fields are the same thing under older names, answered in their
own shape (`message.function_call`, finish_reason "function_call").
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from service.generate.grammars import JsonOutput
from service.openai.errors import OpenAIError
from service.openai.schemas import ChatCompletionRequest
from service.openai.tools.parsers import Parsed, ParsedCall, ToolParser
from service.openai.tools.schemas import FunctionDefinition, FunctionName, NamedToolChoice

Mode = Literal["none", "auto", "required", "named"]
# With `required`, at most this many parallel calls: the grammar must let the output end, and
# a model that always prefers another call (random weights do) would otherwise fill the context.
MAX_REQUIRED_CALLS = 4
ANY_OBJECT: dict[str, Any] = {"type": "object"}


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


@dataclass(frozen=True)
class ToolPlan:
    functions: list[FunctionDefinition]
    mode: Mode
    parser: ToolParser
    named: str | None = None
    parallel: bool = True
    legacy: bool = False  # asked with `functions`: answer with `function_call`
    names: frozenset[str] = field(default=frozenset())

    @property
    def calls_tools(self) -> bool:
        return self.mode != "none" and bool(self.functions)

    def for_template(self) -> list[dict[str, Any]] | None:
        """The tools in the shape transformers' apply_chat_template(tools=...) takes."""
        if not self.functions:
            return None
        return [
            {"type": "function", "function": f.model_dump(exclude_none=True)}
            for f in self.functions
        ]

    def json_output(self) -> JsonOutput | None:
        """The constraint for `required` and a named tool; None for auto and none."""
        param = "function_call" if self.legacy else "tool_choice"
        if self.mode == "named":
            return JsonOutput(self._parameters(self.named), param)
        if self.mode != "required":
            return None
        call_schemas = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": f.name},
                    "arguments": f.parameters or ANY_OBJECT,
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for f in self.functions
        ]
        schema: dict[str, Any] = {
            "type": "array",
            "items": {"anyOf": call_schemas},
            "minItems": 1,
            "maxItems": MAX_REQUIRED_CALLS if self.parallel else 1,
        }
        return JsonOutput(schema, param)

    def _parameters(self, name: str | None) -> dict[str, Any]:
        found = next(f for f in self.functions if f.name == name)
        return found.parameters or ANY_OBJECT

    def parse(self, text: str) -> Parsed | None:
        """The calls in a whole output, or None if it holds none (it is then content)."""
        if not self.calls_tools:
            return None
        if self.mode == "named":
            return _named(self.named or "", text)
        if self.mode == "required":
            return _required(text, self.names)
        parsed = self.parser.parse(text, self.names)
        if parsed is not None and not self.parallel:
            parsed = Parsed(parsed.content, parsed.calls[:1])
        return parsed


def _named(name: str, text: str) -> Parsed | None:
    try:
        arguments = json.loads(text)
    except ValueError:
        return None  # cut short by max_tokens: the text is returned as content
    if not isinstance(arguments, dict):
        return None
    return Parsed(None, [ParsedCall(name, text)])


def _required(text: str, names: frozenset[str]) -> Parsed | None:
    try:
        items = json.loads(text)
    except ValueError:
        return None
    if not isinstance(items, list) or not items:
        return None
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        calls.append(ParsedCall(item["name"], json.dumps(item.get("arguments", {}))))
    return Parsed(None, calls)


def tool_plan(body: ChatCompletionRequest, parser: ToolParser) -> ToolPlan:
    """The request's tools and choice, refused with a 400 naming the field where they
    contradict each other."""
    if body.tools and body.functions:
        raise OpenAIError("give tools or the legacy functions, not both", "functions")
    legacy = bool(body.functions) or body.function_call is not None
    functions = [tool.function for tool in body.tools or []] or list(body.functions or [])
    param = "function_call" if legacy else "tool_choice"
    choice: Any = body.function_call if legacy else body.tool_choice
    names = frozenset(f.name for f in functions)
    if len(names) != len(functions):
        raise OpenAIError("tools: two tools share a name", "tools")
    mode: Mode
    named = None
    if choice is None:
        mode = "auto" if functions else "none"
    elif isinstance(choice, NamedToolChoice | FunctionName):
        named = choice.function.name if isinstance(choice, NamedToolChoice) else choice.name
        if named not in names:
            raise OpenAIError(f"{param}: {named!r} is not one of the tools given", param)
        mode = "named"
    else:
        mode = choice
    if mode in ("auto", "required") and not functions:
        raise OpenAIError(f"{param}={mode!r} needs tools", param)
    form = body.response_format
    if mode in ("named", "required") and form is not None and form.type != "text":
        raise OpenAIError(
            f"response_format cannot constrain the output while {param} makes it a tool call",
            "response_format",
        )
    parallel = body.parallel_tool_calls is not False and not legacy
    return ToolPlan(functions, mode, parser, named, parallel, legacy, names)
