"""Per-request state on the engine side: what submit() refuses at once (`SubmissionRules`),
and one request's prompt, params, outputs so far and timings (`Request`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from batching.errors import EngineError, InvalidInputError, PromptTooLongError
from batching.generation.detokenizer import IncrementalDetokenizer, Tokenizer
from batching.generation.grammar import CompiledGrammar, GrammarMatcher
from batching.generation.handle import (
    FinishReason,
    GenerationDelta,
    GenerationHandle,
    GenerationResult,
    GenerationTimings,
)
from batching.generation.sampling import SamplingParams, TokenLogprob, make_generator
from batching.priority import PRIORITY_MAX, PRIORITY_MIN


@dataclass(frozen=True)
class SubmissionRules:
    """What submit() refuses at once, before anything is queued."""

    num_slots: int  # the most choices one request may ask for (each takes a row)
    max_seq_len: int  # the model's context, capped by the KV pool
    vocab_size: int
    grammar_tokenizer: object  # None: no structured output

    def check(
        self, prompt_ids: Sequence[int], choices: Sequence[SamplingParams], priority: int
    ) -> None:
        """InvalidInputError or PromptTooLongError, with the numbers, for a request that could
        never be served: it must fail now, not after waiting in the queue."""
        if not 1 <= len(choices) <= self.num_slots:
            raise InvalidInputError(
                f"{len(choices)} choices, but 1 to {self.num_slots} (the slots) are possible"
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
            if len(prompt_ids) + params.max_new_tokens > self.max_seq_len:
                raise PromptTooLongError(len(prompt_ids), params.max_new_tokens, self.max_seq_len)
            if params.grammar is not None and not isinstance(params.grammar, CompiledGrammar):
                # The engine thread never compiles: GrammarCompiler does, under limits.
                raise InvalidInputError("a grammar must be compiled before it is submitted")


class Request:
    """One request from submit() to its end. Only the engine thread mutates it after submit."""

    def __init__(
        self,
        handle: GenerationHandle,
        prompt_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        cache_namespace: str = "",
    ) -> None:
        self.handle = handle
        self.cache_namespace = cache_namespace  # whose prefix-cache entries it may use
        self.prompt_ids = prompt_ids
        self.params = params
        self.priority = priority  # lower is admitted sooner (batching/priority.py)
        self.arrival_s = time.perf_counter()
        self.admitted_s: float | None = None
        self.first_token_s: float | None = None
        self.last_token_s: float | None = None
        self.generator: torch.Generator | None = make_generator(params)
        self.detokenizer: IncrementalDetokenizer | None = None  # made on admission
        self.output_ids: list[int] = []
        self.next_token = -1  # the last sampled token, fed to the model in the next decode
        self.finish_reason: FinishReason | None = None
        # The tokens whose K/V must be written before it decodes: its prompt, or after a
        # preemption its prompt and all but the last of its output tokens (recomputed).
        self.prefill_ids = prompt_ids
        self.prefilled = 0  # of prefill_ids, those whose K/V is written (cached prefix included)
        self.cached_tokens = 0  # of the prompt, found in the prefix cache at admission
        self.blocks: list[int] = []  # its block table: K/V of position p in blocks[p // size]
        self.preemptions = 0
        self.prefill_chunks = 0  # prefill forwards this prompt took
        self.leader: Request | None = None  # set for choices 2..n of one prompt (follow())
        self.followers: list[Request] = []
        self.matcher: GrammarMatcher | None = None  # made on admission, if it has a grammar
        self.logprobs: list[TokenLogprob] = []  # one per output token, if asked
        self.prompt_logprobs: list[TokenLogprob | None] = []  # filled as the prompt prefills
        self.error: EngineError | None = None  # this request alone failed (see engine._accept)
        self.tokens_sampled = 0  # EOS included

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def cancelled(self) -> bool:
        return self.handle.cancel_requested

    @property
    def prefilling(self) -> bool:
        """Admitted, but part of its prompt is still to be prefilled (chunked prefill).
        A follower (see `leader`) never prefills: it shares its leader's prompt blocks."""
        return self.leader is None and self.admitted_s is not None and not self.decoding

    @property
    def decoding(self) -> bool:
        """Its whole prompt is in the cache: it takes part in decode steps."""
        return self.admitted_s is not None and self.prefilled >= len(self.prefill_ids)

    @property
    def started(self) -> bool:
        """It has sampled a token: if preempted, it resumes where it was (never restarts)."""
        return self.tokens_sampled > 0

    @property
    def written_ids(self) -> list[int]:
        """The tokens whose K/V a running sequence holds once prefilled: its prompt and all
        its output but the last token (fed in the next decode step)."""
        return self.prompt_ids + self.output_ids[:-1]

    @property
    def group(self) -> tuple[Request, ...]:
        """It and its followers: what is answered together while it waits in the queue."""
        return (self, *self.followers)

    @property
    def slots_needed(self) -> int:
        """Slots it takes at admission: its own and one per follower."""
        return 1 + len(self.followers)

    def follow(self, leader: Request) -> None:
        """One of n choices of the same prompt: it shares the leader's prompt blocks once the
        leader has prefilled them, and samples its own tokens from then on."""
        self.leader = leader
        leader.followers.append(self)

    @property
    def ended(self) -> bool:
        """Finished (finish_reason set) or failed (error set): its slot can be released."""
        return self.finish_reason is not None or self.error is not None

    @property
    def prefill_alone(self) -> bool:
        """Prompt logprobs need the logits of every prompt position: prefilled on its own
        (not when it resumes after a preemption: they went out before its first token)."""
        return self.params.prompt_logprobs is not None and not self.started

    def preempt(self) -> None:
        """Its blocks were taken back (the caller freed them): it goes back to the queue, to
        prefill again everything it had written. One that has sampled no token yet starts
        over (admit() again); one that has keeps its detokenizer, grammar and random stream,
        and continues with its next token once that prefill is done."""
        self.preemptions += 1
        self.prefilled = 0
        self.prefill_chunks = 0
        if self.started:
            self.prefill_ids = self.written_ids
        else:
            self.admitted_s = None

    def admit(self, now_s: float) -> None:
        """It got a row (the scheduler); a resumed request keeps its first admission time."""
        if not self.started:
            self.admitted_s = now_s

    def prepare_output(self, tokenizer: Tokenizer, special_tokens: Sequence[str]) -> None:
        """Its detokenizer, grammar matcher and prompt logprobs, made fresh on admission
        (engine thread: the only user of its tokenizer copy). A resumed request (preempted
        after it sampled) keeps its own: the engine calls this only for one that has not."""
        self.detokenizer = IncrementalDetokenizer(
            tokenizer, self.prompt_ids, self.params.stop, special_tokens
        )
        if self.params.grammar is not None:
            self.matcher = self.params.grammar.new_matcher()  # compiled before submit
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # the first prompt token has no context

    def finish_without_tokens(self) -> None:
        """max_new_tokens = 0: the prompt was all that was asked for (its logprobs)."""
        self.finish_reason = "length"

    def accept(
        self,
        token_id: int,
        eos_token_ids: frozenset[int],
        now_s: float,
        logprob: TokenLogprob | None = None,
    ) -> GenerationDelta:
        """Take one sampled token; sets finish_reason when this token ends the request."""
        if self.detokenizer is None:
            raise RuntimeError("accept() before prepare_output()")
        self.tokens_sampled += 1
        if self.first_token_s is None:
            self.first_token_s = now_s
        self.last_token_s = now_s
        if token_id in eos_token_ids and not self.params.ignore_eos:
            self.finish_reason = "eos"
            return GenerationDelta(self.detokenizer.finish(), ())
        if token_id in self.params.stop_token_ids:  # like EOS: ends it, is not part of the text
            self.finish_reason = "stop"
            return GenerationDelta(self.detokenizer.finish(), ())
        self.output_ids.append(token_id)
        self.next_token = token_id
        logprobs = (logprob,) if logprob is not None else ()
        self.logprobs += logprobs
        text = self.detokenizer.add(token_id)
        if self.matcher is not None:
            self.matcher.consume(token_id)
        if self.detokenizer.stopped:
            self.finish_reason = "stop"
        elif self.matcher is not None and self.matcher.done:
            self.finish_reason = "stop"  # the grammar is complete
            text += self.detokenizer.finish()
        elif len(self.output_ids) >= self.params.max_new_tokens:
            self.finish_reason = "length"
            text += self.detokenizer.finish()
        return GenerationDelta(text, (token_id,), logprobs)

    def result(self, now_s: float) -> GenerationResult:
        if self.finish_reason is None:
            raise RuntimeError("the request has not finished")

        admitted_s = self.admitted_s if self.admitted_s is not None else now_s
        return GenerationResult(
            finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens,
            completion_tokens=len(self.output_ids),
            text=self.detokenizer.text if self.detokenizer is not None else "",
            token_ids=tuple(self.output_ids),
            timings=GenerationTimings(
                queue_ms=(admitted_s - self.arrival_s) * 1000.0,
                ttft_ms=None
                if self.first_token_s is None
                else (self.first_token_s - self.arrival_s) * 1000.0,
                total_ms=(now_s - self.arrival_s) * 1000.0,
            ),
            logprobs=tuple(self.logprobs),
            prompt_logprobs=tuple(self.prompt_logprobs),
        )
