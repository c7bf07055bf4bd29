"""Running one step's plan (scheduler.py's `StepPlan`) and applying its results.

`RunningBatch.run(plan)` is the step after the plan: answer the rows the plan retired, give
the admitted requests their detokenizer and grammar matcher, then run the forwards and apply
what they return:

* prefill (`_prefill`, then `_after_prefill`): the chunks go into the cache; a row whose whole
  prompt is now there registers its blocks in the prefix cache, hands its followers the prompt
  blocks (whole blocks shared, a partial last block copied), and samples its first token;
* decode (`_decode`, then `_after_decode`): one token for every row past its prefill;
* a mixed step (`_prefill_and_decode`): while rows decode, the step's prefill tokens are
  packed after the decode rows' tokens into a single forward (attention.py), so the
  running streams wait for one forward per step, not a prefill forward and then a decode
  forward. Rows that complete their prompt in it sample their first token from it and decode
  from the next step on. Without it, the prefill's first tokens go out before the decode runs,
  and the rows it completed decode in the same step.

A prompt prefilled in chunks rides along in decode steps as a padding row until its last
chunk (it writes no K/V of its own and its length does not size the step's attention), and its
logits are ignored (its random stream is untouched), which keeps the decode batch a view over
packed rows. Rows end (finished, failed, cancelled) as their tokens are accepted and are
retired at once, so their rows and blocks serve the next request in the very next step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from batching.errors import EngineError, InvalidInputError, ModelExecutionError
from batching.generation.config import EngineConfig
from batching.generation.detokenizer import Tokenizer
from batching.generation.handle import GenerationDelta, Outbox
from batching.generation.model_runner import ModelRunner
from batching.generation.observer import EngineObserver
from batching.generation.request import Request
from batching.generation.sampling import TokenLogprob, choose_tokens, record_prompt_logprobs
from batching.generation.scheduler import PrefillWork, StepPlan, StepPlanner, split_off

logger = logging.getLogger(__name__)


class RunningBatch:
    """Runs the planner's plans on the model (engine thread only). `planner` owns the row and
    block bookkeeping (retire, release, preempt); this class advances rows by what the forwards
    wrote and hands followers their leader's prompt blocks."""

    def __init__(
        self,
        runner: ModelRunner,
        planner: StepPlanner,
        outbox: Outbox,
        observer: EngineObserver,
        config: EngineConfig,
        *,
        tokenizer: Tokenizer,
    ) -> None:
        self._runner = runner
        self._planner = planner
        self._slots = planner.slots
        self.blocks = planner.blocks
        self._outbox = outbox
        self._observer = observer
        self._eos_token_ids = frozenset(config.eos_token_ids)
        self._tokenizer = tokenizer  # the engine thread's own copy
        self._special_tokens = config.special_tokens  # their text never reaches a client

    def run(self, plan: StepPlan) -> None:
        """Answer the retired rows, set up the admitted requests, run the plan's forward(s)
        and apply their results (tokens to the outbox, ended rows retired)."""
        for request in plan.retired:
            self._answer(request, time.perf_counter())
        self._prepare_output(plan.admitted)
        work = plan.prefill
        if work is not None and plan.mixed:
            self._prefill_and_decode(work)  # one forward for both
            return
        if work is not None:
            self._prefill(work)
            self._outbox.flush()  # first tokens go out before this step's decode
        self._decode()

    def _prepare_output(self, admitted: list[Request]) -> None:
        """Detokenizer and grammar matcher for each newly admitted request (a resumed one keeps
        its own). One that cannot be set up fails alone, with its followers: it keeps its row
        for this step (its prefill is harmless) and is answered when the step retires it."""
        for request in admitted:
            if request.started or request.ended:
                continue
            try:
                request.prepare_output(self._tokenizer, self._special_tokens)
            except Exception as exc:
                logger.exception("admission failed (request_id=%s)", request.handle.request_id)
                request.error = model_error(exc)
                for follower in request.followers:
                    follower.error = follower.error or request.error

    # ---- prefill ----

    def _prefill(self, work: PrefillWork) -> None:
        every_position = work.requests[0].prefill_alone  # then it is the only row
        try:
            logits = self._runner.prefill(
                work.tables, work.chunks, work.starts, every_position
            )  # [k, V], or [1, q, V] with every_position
            if every_position:
                record_prompt_logprobs(work.requests[0], work.starts[0], logits[0])
                logits = logits[:, -1].float()  # [1, V]
        except Exception as exc:
            logger.exception("prefill failed for %d requests", len(work.requests))
            self._fail(work.requests, exc)
            return
        self._after_prefill(work, logits)
        self.retire_ended()

    def _after_prefill(self, work: PrefillWork, logits: torch.Tensor) -> None:
        """The chunks are in the cache: advance the rows; each completed prompt registers its
        blocks in the prefix cache and samples its first token, and so does each of its
        followers, from the same logits row [k, V] (each with its own params and random
        stream). A resumed request (preempted after it sampled) samples nothing: its next
        token is the one it had, fed in the next decode step."""
        completes = [
            r.prefilled + len(chunk) == len(r.prefill_ids)
            for r, chunk in zip(work.requests, work.chunks, strict=True)
        ]
        choosers = [
            (i, r)
            for i, leader in enumerate(work.requests)
            if completes[i] and not leader.started
            for r in (leader, *leader.followers)
            if r.params.max_new_tokens > 0 and not r.ended
        ]
        try:
            tokens, logprobs = choose_tokens(
                logits[[i for i, _ in choosers]],
                [r for _, r in choosers],
                eos_token_ids=self._eos_token_ids,
            )
        except Exception as exc:
            logger.exception("sampling after prefill failed for %d requests", len(work.requests))
            self._fail(work.requests, exc)
            return
        for offset, (request, chunk) in enumerate(zip(work.requests, work.chunks, strict=True)):
            self._slots.advance(work.first_slot + offset, len(chunk))
            request.prefilled += len(chunk)
            request.prefill_chunks += 1
        now_s = time.perf_counter()
        sampled = {
            id(r): (token, logprob)
            for (_, r), token, logprob in zip(choosers, tokens, logprobs, strict=True)
        }
        for index, leader in enumerate(work.requests):
            if not completes[index]:
                continue
            if leader.prefill_chunks > 1:
                self._observer.on_prefill_chunks(leader.prefill_chunks)
            if leader.started:
                continue  # resumed: it decodes on from the next step
            self.blocks.register(leader.prompt_ids, leader.blocks, leader.cache_namespace)
            self._fork(leader)
            for request in (leader, *leader.followers):
                self._first_output(request, sampled.get(id(request)), now_s)

    def _fork(self, leader: Request) -> None:
        """Give each follower the leader's prompt blocks: whole blocks shared, a partial last
        block copied (each choice writes its own next tokens into it)."""
        size = self.blocks.block_size
        whole = leader.prompt_tokens // size
        for follower in list(leader.followers):
            if follower.ended or follower not in self._slots.owners:
                continue
            blocks = self.blocks.share(leader.blocks[:whole])
            if leader.prompt_tokens % size:
                if not self.blocks.can_allocate(1):  # (blocks were set aside for this)
                    self.blocks.free(blocks)
                    split_off(follower)
                    self._planner.requeue_group(follower)  # it prefills on its own later
                    continue
                (copy,) = self.blocks.allocate(1)
                self._runner.cache.copy_block(leader.blocks[whole], copy)
                blocks.append(copy)
            follower.blocks = blocks
            self._slots.advance(self._slots.owners.index(follower), leader.prompt_tokens)
            follower.prefilled = leader.prompt_tokens
            follower.cached_tokens = leader.cached_tokens
            follower.prompt_logprobs = list(leader.prompt_logprobs)

    def _first_output(
        self, request: Request, sampled: tuple[int, TokenLogprob | None] | None, now_s: float
    ) -> None:
        if request.ended or not request.decoding:
            return
        if request.prompt_logprobs:  # they go out before the first token
            prompt = tuple(request.prompt_logprobs)
            self._outbox.token(request, GenerationDelta("", (), prompt_logprobs=prompt))
        if sampled is None:
            request.finish_without_tokens()
        else:
            self._accept(request, *sampled, now_s)

    # ---- decode ----

    def _decode(self) -> None:
        self._planner.reserve_decode_blocks()  # rows whose prompt this step's prefill completed
        rows = list(self._slots.owners)
        riders = frozenset(i for i, r in enumerate(rows) if not r.decoding)
        if len(riders) == len(rows):
            return
        try:
            tokens_in = [r.next_token if r.decoding else 0 for r in rows]
            tables = [r.blocks for r in rows]
            logits = self._runner.decode_step(tokens_in, list(self._slots.lengths), tables, riders)
        except Exception as exc:
            logger.exception("decode step failed for %d requests", len(rows))
            self._fail(rows, exc)
            return
        self._after_decode(rows, riders, logits)
        self.retire_ended()

    def _after_decode(
        self, rows: list[Request], riders: frozenset[int], logits: torch.Tensor
    ) -> bool:
        """One token for each row that is not a rider, from its logits row [B, V]. False if
        sampling failed (then every row has failed, and slots may have moved)."""
        live = [i for i in range(len(rows)) if i not in riders]
        self._observer.on_step(len(live))
        try:
            # may mask logits in place
            tokens, logprobs = choose_tokens(logits, rows, riders, self._eos_token_ids)
        except Exception as exc:
            logger.exception("sampling failed for %d requests", len(rows))
            self._fail(rows, exc)
            return False
        now_s = time.perf_counter()
        self._observer.on_token_gaps([now_s - (rows[i].last_token_s or now_s) for i in live])
        for slot in live:
            self._slots.advance(slot)
            self._accept(rows[slot], tokens[slot], logprobs[slot], now_s)
        return True

    # ---- a mixed step: prefill and decode in one forward ----

    def _prefill_and_decode(self, work: PrefillWork) -> None:
        """_prefill(work) then _decode(), as one forward. If it fails, the step runs again as the
        two separate forwards (which rewrite every position the failed one may have written):
        a failure of the packed forward itself (memory for the larger batch, say) costs
        nobody their request, and a prompt that fails on its own fails alone there."""
        rows = list(self._slots.owners)
        riders = frozenset(i for i, r in enumerate(rows) if not r.decoding)
        try:
            decode_logits, prefill_logits = self._runner.mixed_step(
                [r.next_token if r.decoding else 0 for r in rows],
                list(self._slots.lengths),
                [r.blocks for r in rows],
                riders,
                work.first_slot,
                work.chunks,
                work.starts,
            )
        except Exception:
            logger.exception("a mixed step failed; running it as a prefill and a decode")
            self._prefill(work)
            self._decode()
            return
        if self._after_decode(rows, riders, decode_logits):
            self._after_prefill(work, prefill_logits)
        self.retire_ended()

    def _accept(
        self, request: Request, token: int, logprob: TokenLogprob | None, now_s: float
    ) -> None:
        """Hand one sampled token to its request; if that raises (detokenizer, stop strings,
        grammar), only this row fails: it is retired with its error, its neighbours go on."""
        try:
            delta = request.accept(token, self._eos_token_ids, now_s, logprob)
        except InvalidInputError as exc:  # the client's grammar ran into a limit: its fault
            logger.warning("a grammar stopped its row (request_id=%s)", request.handle.request_id)
            request.error = exc
            return
        except Exception as exc:
            logger.exception("accepting a token failed (request_id=%s)", request.handle.request_id)
            request.error = model_error(exc)
            return
        self._outbox.token(request, delta)

    # ---- ending rows ----

    def retire_ended(self) -> None:
        """Free the rows of requests that ended (scheduler.py) and answer them."""
        now_s = time.perf_counter()
        for request in self._planner.retire_ended(now_s):
            self._answer(request, now_s)

    def _answer(self, request: Request, now_s: float) -> None:
        if request.error is not None:
            self._outbox.fail(request, request.error)
        else:
            self._outbox.finish(request, now_s)

    def _fail(self, requests: list[Request], cause: Exception) -> None:
        """The model failed on a forward these rows shared: each fails with its own error."""
        for request in requests:
            request.error = model_error(cause)
        self.retire_ended()

    def fail_all(self, make_error: Callable[[], EngineError]) -> None:
        for request in self._slots.owners:
            request.error = request.error or make_error()
        self.retire_ended()


def model_error(cause: Exception) -> ModelExecutionError:
    """A ModelExecutionError chained to the model's own exception (its text stays in logs)."""
    error = ModelExecutionError(f"the model failed: {cause!r}")
    error.__cause__ = cause
    return error
