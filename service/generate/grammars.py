"""Structured output: a request's JSON schema compiled into the grammar its choices follow,
once per request and off the event loop (a schema can take long to compile).

`compile_json_grammar` is the one entry: /generate's json_schema, /v1's response_format and
the tool-call constraints all come through it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from batching.errors import InvalidInputError
from batching.generation.grammar import check_grammar, json_schema_grammar
from service.generate.limits import FieldError
from service.generate.service import GenerationService


@dataclass(frozen=True)
class JsonOutput:
    """The output must be JSON valid against `schema` (None: any JSON object)."""

    schema: dict[str, Any] | None
    param: str  # the request field it came from, named in a refusal


def _compiled(output: JsonOutput, tokenizer: object) -> str:
    grammar = json_schema_grammar(output.schema)
    check_grammar(grammar, tokenizer)
    return grammar


async def compile_json_grammar(service: GenerationService, output: JsonOutput) -> str:
    """The grammar for `output`, or a FieldError naming its field if it cannot be used."""
    if service.grammar_tokenizer is None:
        raise FieldError(output.param, "structured output is not available for this model")
    try:
        return await asyncio.to_thread(_compiled, output, service.grammar_tokenizer)
    except InvalidInputError as exc:
        raise FieldError(output.param, str(exc)) from exc
