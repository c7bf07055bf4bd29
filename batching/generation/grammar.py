"""Structured output: a grammar decides which tokens a row may produce next (llguidance).

A request's grammar is compiled once, before it reaches the engine, under limits
(grammar_compiler.py); each of its choices gets its own matcher, a cheap copy of the compiled
one, when it is admitted. Before each of its tokens is sampled, the matcher's bitmask of
allowed tokens is applied to that row's logits (disallowed tokens get -inf); the sampled token
then advances the matcher, and the request finishes ("stop") when the grammar is complete.
Rows without a grammar are never touched, so they pay nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import llguidance
import torch

from batching.errors import InvalidInputError

GrammarTokenizer = llguidance.LLTokenizer
_BITS = torch.arange(32, dtype=torch.int32)  # bit b of a mask word = token 32 * word + b
_ERROR_CHARS = 300  # llguidance's messages may quote the grammar: a client gets a short head


def error_text(error: object) -> str:
    """llguidance's error as a client sees it: one line, its non-verbose markers dropped,
    at most _ERROR_CHARS characters."""
    return " ".join(str(error).replace("<non-verbose/>", "").split())[:_ERROR_CHARS]


def grammar_tokenizer(hf_tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> Any:
    """llguidance's view of a (fast) Hugging Face tokenizer, sized to the model's logits."""
    import llguidance.hf

    return llguidance.hf.from_tokenizer(
        hf_tokenizer, n_vocab=vocab_size, eos_token=list(eos_token_ids) or None
    )


def json_schema_grammar(schema: dict[str, Any] | None) -> str:
    """A grammar for JSON that validates against `schema` (None: any JSON object), compact
    (no free whitespace, which a model with random weights would otherwise fill forever)."""
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(
            schema if schema is not None else {"type": "object"},
            overrides={"whitespace_flexible": False},
        )
    except ValueError as exc:
        raise InvalidInputError(f"invalid JSON schema: {error_text(exc)}") from exc


class CompiledGrammar:
    """A grammar that built within its limits, ready to hand out matchers. Never mutated:
    every choice of every request that uses it gets its own copy (microseconds)."""

    def __init__(self, tokenizer: Any, grammar: str, limits: Any = None) -> None:
        """Build it in the calling thread (llguidance drops the GIL meanwhile). This is the
        grammar compile: the engine thread never calls it (see grammar_compiler.py)."""
        self._matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=limits)
        if self._matcher.is_error():
            raise InvalidInputError(f"invalid grammar: {error_text(self._matcher.get_error())}")

    def new_matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._matcher.deep_copy())


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher
        self._check()

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing more may be generated."""
        return bool(self._matcher.is_stopped())

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """Bool [V]: which tokens may come next."""
        words = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.int32)
        if self._matcher.is_error():
            # A step limit was hit or nothing can extend the output: allow every token so the
            # step goes on for the neighbours; consume() then fails this row alone.
            return torch.ones(vocab_size, dtype=torch.bool)
        return ((words[:, None] >> _BITS) & 1).bool().flatten()[:vocab_size]

    def consume(self, token_id: int) -> None:
        self._matcher.consume_token(token_id)
        self._check()

    def _check(self) -> None:
        if self._matcher.is_error():
            raise InvalidInputError(f"grammar error: {error_text(self._matcher.get_error())}")


def apply_grammars(logits: torch.Tensor, matchers: Sequence[GrammarMatcher | None]) -> None:
    """Mask, in place, the disallowed tokens of every row that has a grammar. logits: [R, V]."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    vocab = logits.shape[-1]
    allowed = torch.stack([matchers[i].allowed(vocab) for i in rows])  # type: ignore[union-attr]
    index = torch.tensor(rows, device=logits.device)
    masked = logits.index_select(0, index).masked_fill_(~allowed.to(logits.device), -torch.inf)
    logits.index_copy_(0, index, masked)
