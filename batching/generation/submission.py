"""What submit() refuses at once, before anything is queued: the checks a request must pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from batching.errors import InvalidInputError, PromptTooLongError
from batching.generation.grammar import CompiledGrammar
from batching.generation.sampling import SamplingParams
from batching.generation.slots import SlotTable
from batching.priority import PRIORITY_MAX, PRIORITY_MIN


@dataclass(frozen=True)
class SubmissionRules:
    slots: SlotTable[Any]
    vocab_size: int
    grammar_tokenizer: object  # None: no structured output

    def check(
        self, prompt_ids: Sequence[int], choices: Sequence[SamplingParams], priority: int
    ) -> None:
        """InvalidInputError or PromptTooLongError, with the numbers, for a request that could
        never be served: it must fail now, not after waiting in the queue."""
        if not 1 <= len(choices) <= self.slots.num_slots:
            raise InvalidInputError(
                f"{len(choices)} choices, but 1 to {self.slots.num_slots} (the slots) are possible"
            )
        if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
            raise InvalidInputError(
                f"priority must be in [{PRIORITY_MIN}, {PRIORITY_MAX}], got {priority}"
            )
        if not prompt_ids:
            raise InvalidInputError("the prompt has no tokens")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size:
            raise InvalidInputError(f"token ids must be in [0, {self.vocab_size})")
        for params in choices:
            # max_seq_len is the model's context capped by the KV pool, so a request within it
            # can always run, alone if need be (others are preempted to make room).
            if len(prompt_ids) + params.max_new_tokens > self.slots.max_seq_len:
                raise PromptTooLongError(
                    len(prompt_ids), params.max_new_tokens, self.slots.max_seq_len
                )
            if params.grammar is not None and not isinstance(params.grammar, CompiledGrammar):
                # The engine thread never compiles: grammar_compiler.py does, under limits.
                raise InvalidInputError("a grammar must be compiled before it is submitted")
