"""Choosing each row's next token: SamplingParams, the batched sampler, logprobs, one step.

Read top to bottom:

* `SamplingParams` says what one request asks of the sampler and of the stopping rules.
* `sample_next_tokens`: greedy rows (temperature 0) take the argmax. Sampled rows apply
  temperature, then top-k, then top-p (both over one sort of the row), and draw with their own
  `torch.Generator`: a request's random stream is never shared with its batch neighbours, so a
  seeded request yields the same tokens whatever else is running.
* Logprobs, for the requests that ask (sampled tokens and prompt tokens): they come from the
  raw model logits of the step, log-softmaxed over the whole vocabulary, before temperature,
  top-k, top-p or a grammar mask, as vLLM reports them by default. So a logprob says how likely
  the *model* found the token, whatever the sampler then did. Only the rows that asked are
  computed, so nobody else pays for them.
* `choose_tokens`, one step's token for each row: logit bias and min_tokens, grammar masks,
  then sampling, and the logprobs rows asked for. Rows that only ride along in a decode step
  (still prefilling, or waiting to copy their leader's prompt) get an ignored greedy token: no
  mask, and no random number drawn from their stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from batching.errors import InvalidInputError
from batching.generation.grammar import CompiledGrammar, GrammarMatcher

if TYPE_CHECKING:  # request.py imports SamplingParams from here
    from batching.generation.request import Request

# Temperatures below this are greedy: dividing logits by a tiny (or subnormal) temperature
# overflows them to inf, and softmax of inf - inf is NaN, i.e. garbage tokens. Greedy decoding
# is what such a temperature means anyway.
GREEDY_BELOW_TEMPERATURE = 1e-5
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
_BITS = torch.arange(32, dtype=torch.int32)  # bit b of a grammar mask word = token 32 * word + b


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the sampler and of the stopping rules."""

    max_new_tokens: int
    temperature: float = 0.0  # 0 (or below GREEDY_BELOW_TEMPERATURE) = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None = a fresh random seed per request
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings
    ignore_eos: bool = False  # keep going past EOS (benchmarks want fixed lengths)
    logprobs: int | None = None  # None: off; k: each token's logprob and the k most likely
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    # The grammar the output must follow, compiled once per request (grammar.py)
    # and shared by its choices.
    grammar: CompiledGrammar | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    min_tokens: int = 0  # EOS and stop_token_ids cannot be chosen before this many tokens
    stop_token_ids: tuple[int, ...] = ()  # generation ends ("stop") after one of these tokens

    def __post_init__(self) -> None:
        least = 0 if self.prompt_logprobs is not None else 1  # 0: score the prompt only
        if self.max_new_tokens < least:
            raise InvalidInputError(f"max_new_tokens must be >= {least}, got {self.max_new_tokens}")
        for name, k in (("logprobs", self.logprobs), ("prompt_logprobs", self.prompt_logprobs)):
            if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
                raise InvalidInputError(f"{name} must be in [0, {MAX_TOP_LOGPROBS}], got {k}")
        if self.temperature < 0:
            raise InvalidInputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidInputError(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise InvalidInputError("stop strings must not be empty")
        if self.min_tokens < 0:
            raise InvalidInputError(f"min_tokens must be >= 0, got {self.min_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """The request's own random stream (CPU, so a seed means the same on every device)."""
    if params.greedy:
        return None
    generator = torch.Generator()
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def sample_next_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """One token per row. logits: [B, V]; params and generators: one per row.

    An all-greedy batch costs one argmax and one copy of B token ids back to the host.
    """
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    tokens = logits.argmax(dim=-1)  # [B]; the answer for every greedy row
    if sampled_rows:
        rows = torch.tensor(sampled_rows, device=logits.device)  # [S]
        chosen = _sample_rows(
            logits.index_select(0, rows).float(),
            [params[i] for i in sampled_rows],
            [generators[i] for i in sampled_rows],
        )
        tokens.index_copy_(0, rows, chosen)
    chosen_ids: list[int] = tokens.tolist()
    return chosen_ids


def _sample_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Temperature, top-k, top-p, then one draw per row. logits: [S, V] float32 -> [S]."""
    device = logits.device
    temperatures = torch.tensor([p.temperature for p in params], device=device)  # [S]
    logits = logits / temperatures[:, None]
    # One uniform number per row from that row's own generator: inverse-CDF sampling keeps
    # each request's random stream independent of how many rows share the batch.
    uniforms = torch.stack([torch.rand((), generator=g) for g in generators]).to(device)  # [S]
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        # One sort serves both filters. The draw stays in vocabulary order, so a row without
        # filters draws exactly as it would in a batch where nobody filters.
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [S, V] each
        sorted_logits = _keep_top_k(sorted_logits, [p.top_k for p in params])
        sorted_logits = _keep_top_p(sorted_logits, [p.top_p for p in params])
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)  # [S, V]
    return _draw(logits, uniforms)


def _draw(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling, one draw per row. logits: [S, V]; uniforms: [S] in [0, 1)."""
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)  # [S, V]
    targets = uniforms[:, None] * cdf[:, -1:]  # [S, 1]; scaled by the total against rounding
    chosen = torch.searchsorted(cdf, targets, right=True)[:, 0]  # first index with cdf > u
    return chosen.clamp_(max=logits.shape[-1] - 1)


def _keep_top_k(sorted_logits: torch.Tensor, top_ks: list[int]) -> torch.Tensor:
    """Keep each row's k first (largest) logits; k = 0 keeps all. sorted_logits: [S, V]."""
    vocab = sorted_logits.shape[-1]
    if all(k == 0 or k >= vocab for k in top_ks):
        return sorted_logits
    ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_ks], device=sorted_logits.device)
    ranks = torch.arange(vocab, device=sorted_logits.device)  # [V]
    return sorted_logits.masked_fill(ranks[None, :] >= ks[:, None], float("-inf"))


def _keep_top_p(sorted_logits: torch.Tensor, top_ps: list[float]) -> torch.Tensor:
    """Keep each row's smallest set of first tokens whose probability reaches p. [S, V]."""
    if all(p == 1.0 for p in top_ps):
        return sorted_logits
    # p = 1 means off: rounding could push the running mass to 1.0 before the tail ends.
    ps = torch.tensor([p if p < 1.0 else 2.0 for p in top_ps], device=sorted_logits.device)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)  # [S, V]
    # A token is dropped when the tokens ranked above it already reach p; the top one never is.
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
    return sorted_logits.masked_fill(mass_above >= ps[:, None], float("-inf"))


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the `k` most likely tokens, most likely first


def chosen_logprobs(
    logits: torch.Tensor, tokens: Sequence[int], tops: Sequence[int]
) -> list[TokenLogprob]:
    """logits [R, V] (raw), the token chosen for each row, and how many alternatives each
    row wants -> one TokenLogprob per row."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
    index = torch.tensor(list(tokens), device=logits.device)[:, None]  # [R, 1]
    chosen = logprobs.gather(1, index)[:, 0].tolist()  # [R]
    return _with_tops(logprobs, list(tokens), chosen, tops)


def prompt_logprobs(
    logits: torch.Tensor, next_tokens: Sequence[int], top: int
) -> list[TokenLogprob]:
    """One row's logits [q, V] at q prompt positions, and the prompt token that follows each
    position -> how likely each of those tokens was (computed in slices: V can be 150k)."""
    results: list[TokenLogprob] = []
    for start in range(0, len(next_tokens), PROMPT_SLICE):
        part = torch.log_softmax(logits[start : start + PROMPT_SLICE].float(), dim=-1)
        tokens = list(next_tokens[start : start + PROMPT_SLICE])
        index = torch.tensor(tokens, device=logits.device)[:, None]
        chosen = part.gather(1, index)[:, 0].tolist()
        results += _with_tops(part, tokens, chosen, [top] * len(tokens))
    return results


PROMPT_SLICE = 64  # prompt positions log-softmaxed at once: [64, V] float32 at a time


def _with_tops(
    logprobs: torch.Tensor, tokens: list[int], chosen: list[float], tops: Sequence[int]
) -> list[TokenLogprob]:
    k = max(tops, default=0)
    if k == 0:
        return [TokenLogprob(t, lp) for t, lp in zip(tokens, chosen, strict=True)]
    values, ids = logprobs.topk(k, dim=-1)  # [R, k] each
    rows = zip(tokens, chosen, values.tolist(), ids.tolist(), tops, strict=True)
    return [TokenLogprob(t, lp, tuple(zip(i[:n], v[:n], strict=True))) for t, lp, v, i, n in rows]


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


def apply_grammars(logits: torch.Tensor, matchers: Sequence[GrammarMatcher | None]) -> None:
    """Mask, in place, the disallowed tokens of every row that has a grammar. logits: [R, V]."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    vocab = logits.shape[-1]
    allowed = torch.stack([_allowed(matchers[i], vocab) for i in rows])  # type: ignore[arg-type]
    index = torch.tensor(rows, device=logits.device)
    masked = logits.index_select(0, index).masked_fill_(~allowed.to(logits.device), -torch.inf)
    logits.index_copy_(0, index, masked)


def _allowed(matcher: GrammarMatcher, vocab_size: int) -> torch.Tensor:
    """Bool [V]: the tokens the row's grammar allows next."""
    bitmask = matcher.bitmask()
    if bitmask is None:
        return torch.ones(vocab_size, dtype=torch.bool)
    words = torch.frombuffer(bytearray(bitmask), dtype=torch.int32)  # [ceil(V_tok / 32)]
    return ((words[:, None] >> _BITS) & 1).bool().flatten()[:vocab_size]


def record_prompt_logprobs(request: Request, start: int, logits: torch.Tensor) -> None:
    """logits [q, V] at prompt positions start..: each predicts the next prompt token."""
    following = request.prompt_ids[start + 1 : start + 1 + logits.shape[0]]
    top = request.params.prompt_logprobs or 0
    request.prompt_logprobs += prompt_logprobs(logits[: len(following)], following, top)
