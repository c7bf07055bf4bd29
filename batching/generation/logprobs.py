"""Log-probabilities of tokens, for the requests that ask: sampled tokens and prompt tokens.

They come from the raw model logits of the step, log-softmaxed over the whole vocabulary:
before temperature, top-k, top-p or a grammar mask, as vLLM reports them by default. So a
logprob says how likely the *model* found the token, whatever the sampler then did. Only the
rows that asked are computed, so nobody else pays for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


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
