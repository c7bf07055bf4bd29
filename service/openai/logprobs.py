"""The engine's TokenLogprob entries in OpenAI's two shapes: chat (`content` entries with
bytes) and the legacy completions one (`tokens`, `token_logprobs`, `top_logprobs`,
`text_offset`) that lm-evaluation-harness reads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from batching.generation.sampling import TokenLogprob
from service.openai.schemas import (
    ChatLogprobs,
    CompletionLogprobs,
    TokenLogprobEntry,
    TopLogprob,
)


class TokenTexts:
    """Each token's own bytes and text. llguidance's tokenizer gives exact bytes (a byte-level
    token can be half a UTF-8 character); without it, the tokenizer's decode of the one id."""

    def __init__(self, grammar_tokenizer: Any, tokenizer: Any) -> None:
        self._exact = grammar_tokenizer
        self._tokenizer = tokenizer

    def bytes_of(self, token_id: int) -> bytes:
        if self._exact is not None:
            return bytes(self._exact.decode_bytes([token_id]))
        return str(self._tokenizer.decode([token_id])).encode()

    def text_of(self, token_id: int) -> str:
        return self.bytes_of(token_id).decode("utf-8", errors="replace")


def chat_logprobs(entries: Sequence[TokenLogprob], texts: TokenTexts) -> ChatLogprobs:
    def top(token_id: int, logprob: float) -> TopLogprob:
        raw = texts.bytes_of(token_id)
        return TopLogprob(
            token=raw.decode("utf-8", errors="replace"), logprob=logprob, bytes=list(raw)
        )

    content = [
        TokenLogprobEntry(
            **top(e.token_id, e.logprob).model_dump(),
            top_logprobs=[top(t, lp) for t, lp in e.top],
        )
        for e in entries
    ]
    return ChatLogprobs(content=content)


def completion_logprobs(
    entries: Sequence[TokenLogprob | None],
    token_ids: Sequence[int],
    texts: TokenTexts,
    text_offset: int = 0,
) -> CompletionLogprobs:
    """One position per token id; an entry is None where nothing predicts the token (the
    first prompt token). `text_offset` is where the first token's text starts."""
    tokens = [texts.text_of(t) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[None if e is None else e.logprob for e in entries],
        top_logprobs=[
            None if e is None else {texts.text_of(t): lp for t, lp in e.top} for e in entries
        ],
        text_offset=offsets,
    )
