"""How many prompt tokens one engine step may prefill: what bounds a running stream's pause.

A step that prefills while other rows decode delays each of their next tokens by the time the
prefill takes. With a fixed `chunk_tokens` that pause depends on the hardware: 256 tokens cost
about one decode step on a GPU (both are bound by launches and weight reads) but ~5 decode
steps on a 2-core CPU, where prefill time grows with the tokens. With `adaptive`, the budget is
also cut to about as many tokens as one decode step costs, measured as the engine runs
(moving averages of the decode step and of the prefill time per token), so a stream's gap
during a long prefill stays near twice its usual gap on any device: the idea behind
Sarathi-Serve's token budget, sized by time instead of by hand. The price is a later first
token for the long prompt (more, smaller chunks). With nothing decoding nobody waits: the
budget is then at least `idle_tokens`.
"""

from __future__ import annotations

MIN_CHUNK_TOKENS = 16  # one prefix-cache block: always make real progress
SMOOTHING = 0.2  # weight of the newest measurement in the moving averages


class PrefillBudget:
    def __init__(self, chunk_tokens: int, idle_tokens: int, adaptive: bool = False) -> None:
        if chunk_tokens < 1:
            raise ValueError("chunk_tokens must be >= 1")
        self.chunk_tokens = chunk_tokens
        self.idle_tokens = idle_tokens
        self.adaptive = adaptive
        self._decode_s: float | None = None
        self._prefill_s_per_token: float | None = None

    def tokens(self, rows_decoding: bool) -> int:
        """This step's budget (prompt tokens, padded)."""
        if not rows_decoding:
            return max(self.chunk_tokens, self.idle_tokens)
        if not self.adaptive or self._decode_s is None or self._prefill_s_per_token is None:
            return self.chunk_tokens
        fits = int(self._decode_s / self._prefill_s_per_token)
        return max(min(MIN_CHUNK_TOKENS, self.chunk_tokens), min(self.chunk_tokens, fits))

    def on_decode(self, seconds: float) -> None:
        self._decode_s = _smoothed(self._decode_s, seconds)

    def on_prefill(self, tokens: int, seconds: float) -> None:
        if tokens > 0:
            self._prefill_s_per_token = _smoothed(self._prefill_s_per_token, seconds / tokens)


def _smoothed(average: float | None, sample: float) -> float:
    return sample if average is None else (1 - SMOOTHING) * average + SMOOTHING * sample
