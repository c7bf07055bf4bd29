"""Tool calls as OpenAI streams them: `delta.tool_calls[i]` with the id, type and name first,
then pieces of `function.arguments` that the client concatenates (the SDKs' stream helpers
assemble them). One `ToolStream` per choice.

* named tool: the output is the arguments, so every text delta is an arguments piece.
* required: the output is a JSON list of calls; each call is sent whole at the end.
* auto: text streams as content until something that may start a call in the parser's format
  (a marker, or at the very start an opener such as `{`); from there the text is held back and
  parsed at the end: calls if it holds any, else the held text as content after all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from service.openai.schemas import FinishReason
from service.openai.tools.parsers import ParsedCall
from service.openai.tools.plan import ToolPlan, new_call_id

Delta = dict[str, Any]


def call_deltas(plan: ToolPlan, calls: list[ParsedCall]) -> list[Delta]:
    if plan.legacy:
        call = calls[0]
        return [{"function_call": {"name": call.name, "arguments": call.arguments}}]
    return [
        {
            "tool_calls": [
                {
                    "index": i,
                    "id": new_call_id(),
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
            ]
        }
        for i, call in enumerate(calls)
    ]


def calls_reason(plan: ToolPlan) -> FinishReason:
    return "function_call" if plan.legacy else "tool_calls"


def _held_back(text: str, markers: tuple[str, ...]) -> int:
    """How many trailing characters could be the start of a marker."""
    longest = 0
    for marker in markers:
        for size in range(1, min(len(marker), len(text) + 1)):
            if marker.startswith(text[-size:]):
                longest = max(longest, size)
    return longest


@dataclass
class ToolStream:
    plan: ToolPlan
    text: str = ""
    sent: int = 0  # characters of `text` sent as content (auto) or arguments (named)
    holding: bool = False  # auto: a call may have started; the rest is parsed at the end
    _named_id: str = field(default_factory=new_call_id)

    def feed(self, piece: str) -> list[Delta]:
        self.text += piece
        if self.plan.mode == "named":
            return self._named_piece(piece)
        if self.plan.mode == "required" or self.holding:
            return []
        return self._auto_content()

    def finish(self, reason: FinishReason) -> tuple[list[Delta], FinishReason]:
        """The last deltas, and the finish_reason the choice ends with."""
        if self.plan.mode == "named":
            parsed = self.plan.parse(self.text)
            return [], calls_reason(self.plan) if parsed is not None else reason
        parses = self.holding or self.plan.mode == "required"
        parsed = self.plan.parse(self.text) if parses else None
        if parsed is not None:
            return call_deltas(self.plan, parsed.calls), calls_reason(self.plan)
        rest = self.text[self.sent :]
        self.sent = len(self.text)
        return ([{"content": rest}] if rest else []), reason

    def _named_piece(self, piece: str) -> list[Delta]:
        if not piece:
            return []
        first = self.sent == 0
        self.sent += len(piece)
        name = self.plan.named or ""
        if self.plan.legacy:
            head = {"name": name} if first else {}
            return [{"function_call": head | {"arguments": piece}}]
        call: dict[str, Any] = {"index": 0, "function": {"arguments": piece}}
        if first:
            call |= {"id": self._named_id, "type": "function"}
            call["function"] = {"name": name, "arguments": piece}
        return [{"tool_calls": [call]}]

    def _auto_content(self) -> list[Delta]:
        parser = self.plan.parser
        if self.sent == 0:
            stripped = self.text.lstrip()
            if not stripped:
                return []  # only whitespace so far: an opener may still come
            if parser.openers and stripped.startswith(parser.openers):
                self.holding = True
                return []
        starts = [self.text.find(m, self.sent) for m in parser.markers]
        found = [at for at in starts if at >= 0]
        end = min(found) if found else len(self.text) - _held_back(self.text, parser.markers)
        self.holding = bool(found)
        piece = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return [{"content": piece}] if piece else []
