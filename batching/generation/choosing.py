"""One step's token for each row: grammar masks, then sampling, and the logprobs rows asked for.

Logprobs come from the raw logits, taken before any grammar mask (see logprobs.py). Rows that
only ride along in a decode step (still prefilling, or waiting to copy their leader's prompt)
get an ignored greedy token: no mask, and no random number drawn from their stream.
"""

from __future__ import annotations

import torch

from batching.generation.grammar import apply_grammars
from batching.generation.logprobs import TokenLogprob, chosen_logprobs, prompt_logprobs
from batching.generation.request import Request
from batching.generation.sampling import SamplingParams, sample_next_tokens

_IGNORED = SamplingParams(max_new_tokens=1)  # greedy: draws no random number


def choose_tokens(
    logits: torch.Tensor,
    requests: list[Request],
    riders: frozenset[int] = frozenset(),
    eos_token_ids: frozenset[int] = frozenset(),
) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [R, V], one row per request (masked in place: pass a copy you can spare)."""
    if not requests:
        return [], []
    asked = [i for i, r in enumerate(requests) if r.params.logprobs is not None and i not in riders]
    raw = logits[asked] if asked else None  # a copy, before any bias or grammar mask
    adjust_logits(logits, requests, riders, eos_token_ids)
    apply_grammars(logits, [None if i in riders else r.matcher for i, r in enumerate(requests)])
    params = [_IGNORED if i in riders else r.params for i, r in enumerate(requests)]
    generators = [None if i in riders else r.generator for i, r in enumerate(requests)]
    tokens = sample_next_tokens(logits, params, generators)
    logprobs: list[TokenLogprob | None] = [None] * len(requests)
    if raw is not None:
        tops = [requests[i].params.logprobs or 0 for i in asked]
        chosen = chosen_logprobs(raw, [tokens[i] for i in asked], tops)
        for i, logprob in zip(asked, chosen, strict=True):
            logprobs[i] = logprob
    return tokens, logprobs


def adjust_logits(
    logits: torch.Tensor,
    requests: list[Request],
    riders: frozenset[int],
    eos_token_ids: frozenset[int],
) -> None:
    """Per row, in place: its logit_bias added, and before min_tokens its ending tokens (EOS
    unless ignored, stop_token_ids) made impossible. logits: [R, V]. Rows asking neither
    cost nothing."""
    vocab = logits.shape[-1]
    for i, request in enumerate(requests):
        params = request.params
        if i in riders or not (params.logit_bias or params.min_tokens):
            continue
        biased = [(t, b) for t, b in params.logit_bias if t < vocab]
        if biased:
            ids = torch.tensor([t for t, _ in biased], device=logits.device)  # [K]
            biases = torch.tensor([b for _, b in biased], device=logits.device)  # [K]
            logits[i, ids] += biases.to(logits.dtype)
        if len(request.output_ids) < params.min_tokens:
            ending = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_token_ids)
            banned = [t for t in ending if t < vocab]
            if banned:
                logits[i, banned] = -torch.inf


def record_prompt_logprobs(request: Request, start: int, logits: torch.Tensor) -> None:
    """logits [q, V] at prompt positions start..: each predicts the next prompt token."""
    following = request.prompt_ids[start + 1 : start + 1 + logits.shape[0]]
    top = request.params.prompt_logprobs or 0
    request.prompt_logprobs += prompt_logprobs(logits[: len(following)], following, top)
