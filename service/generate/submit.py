"""The one way into the GenerationEngine, for /generate and every /v1 dialect.

A route decodes its request into a `GenerationCall` (prompt token ids, sampling, how many
choices, what JSON the output must be); `submit_generation` checks the limits (limits.py),
compiles the grammar once for the whole request (grammars.py), submits every prompt's choices
together so they batch in the engine (in the caller's prefix-cache namespace), and maps engine
errors with `as_api_error`, the one mapping. The route then encodes the handles' deltas and
results in its own shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from fastapi import Request

from batching.errors import EngineError
from batching.generation.grammar import CompiledGrammar
from batching.generation.handle import GenerationHandle
from batching.generation.sampling import SamplingParams
from service.audit import audit_generations
from service.deps import cache_share, resolve_priority
from service.errors import as_api_error
from service.generate.grammars import JsonOutput, compile_json_grammar
from service.generate.limits import (
    checked_choices,
    checked_prompt_count,
    max_new_tokens_for,
    with_field,
)
from service.generate.service import GenerationService
from service.request_id import request_id_of


@dataclass(frozen=True)
class GenerationCall:
    """What a route asks of the engine. `sampling` holds everything but the output length
    and the grammar, which the path sets per prompt."""

    prompts: Sequence[list[int]]
    sampling: SamplingParams
    max_new_tokens: int | None = None  # None: all that fits after the prompt (up to the cap)
    json_output: JsonOutput | None = None
    choices: int = 1
    priority: int | None = None
    allow_zero_tokens: bool = False  # echo: score the prompt, generate nothing
    max_tokens_param: str = "max_new_tokens"
    prompt_param: str = "prompt"


def choice_params(params: SamplingParams, choices: int) -> list[SamplingParams]:
    """One SamplingParams per choice: with a seed, choice i draws from seed + i, so the
    choices differ from each other and each is reproducible."""
    if params.seed is None:
        return [params] * choices
    return [replace(params, seed=params.seed + i) for i in range(choices)]


def _plans(
    call: GenerationCall, grammar: CompiledGrammar | None, service: GenerationService
) -> list[list[SamplingParams]]:
    plans = []
    for prompt_ids in call.prompts:
        max_new_tokens = max_new_tokens_for(
            call.max_new_tokens,
            len(prompt_ids),
            service.engine.max_seq_len,
            service.settings,
            call.max_tokens_param,
            call.allow_zero_tokens,
        )
        params = replace(call.sampling, max_new_tokens=max_new_tokens, grammar=grammar)
        plans.append(choice_params(params, call.choices))
    return plans


async def submit_generation(
    service: GenerationService, request: Request, call: GenerationCall
) -> list[list[GenerationHandle]]:
    """Per prompt, its choices' handles. All prompts are queued, or none (an ApiError)."""
    request_id = request_id_of(request)
    checked_prompt_count(len(call.prompts), service.settings, call.prompt_param)
    checked_choices(call.choices, service.settings)
    priority = resolve_priority(request, service.settings, call.priority)
    namespace = cache_share(
        request, service.settings, service.settings.generate_prefix_cache_shared
    )
    submitted: list[list[GenerationHandle]] = []
    try:
        grammar = None
        if call.json_output is not None:
            grammar = await compile_json_grammar(service, call.json_output)
        plans = _plans(call, grammar, service)
        for prompt_ids, choices in zip(call.prompts, plans, strict=True):
            submitted.append(
                await service.engine.submit_choices(
                    prompt_ids,
                    choices,
                    request_id=request_id,
                    priority=priority,
                    cache_namespace=namespace,
                )
            )
    except EngineError as exc:
        for handles in submitted:  # all or none: the ones already queued leave the queue
            for handle in handles:
                handle.cancel()
        raise with_field(as_api_error(exc, request_id), call.prompt_param) from exc
    audit_generations(request, [handle for handles in submitted for handle in handles])
    return submitted
