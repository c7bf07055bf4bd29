"""Structured output: a request's JSON schema compiled into the grammar its choices follow,
once per request, off the event loop and the engine thread, under the GRAMMAR_* limits
(batching/generation/grammar.py).

`compile_json_grammar` is the one entry: /generate's json_schema, /v1's response_format and
the tool-call constraints all come through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batching.errors import InvalidInputError
from batching.generation.grammar import CompiledGrammar, json_schema_grammar
from service.generate.limits import FieldError
from service.generate.service import GenerationService


@dataclass(frozen=True)
class JsonOutput:
    """The output must be JSON valid against `schema` (None: any JSON object)."""

    schema: dict[str, Any] | None
    param: str  # the request field it came from, named in a refusal


async def compile_json_grammar(service: GenerationService, output: JsonOutput) -> CompiledGrammar:
    """The compiled grammar for `output`; a FieldError naming its field if it is refused
    (invalid, or over a GRAMMAR_* limit). Other engine errors (a busy compiler) propagate."""
    if service.grammars is None:
        raise FieldError(output.param, "structured output is not available for this model")
    try:
        return await service.grammars.compile(json_schema_grammar(output.schema))
    except InvalidInputError as exc:
        raise FieldError(output.param, str(exc)) from exc
