"""The batch rows, the requests that hold them, and what one engine step does to them.

A row is a place in the decode batch, not memory: GENERATE_SLOTS rows are the most sequences
decoded together, and a row's K/V lives in the blocks of its request's block table
(block_manager.py), wherever they are in the pool. `SlotTable` is the bookkeeping, in plain
Python: active rows are kept packed at 0..in_use-1, so a decode step's batch is rows 0..B-1:
`allocate` takes row `in_use`, and `release` moves the last row into the hole it leaves (only
bookkeeping moves: the K/V stays in its blocks).

`RunningBatch` is used by the engine thread only. Per step the engine asks it to:

1. `retire_ended()`: free the slots of rows that finished, failed or were cancelled;
2. `next_prefill(admit, waiting)`: pick this step's prefill work: the next chunk of a prompt
   that is being prefilled over several steps, or else the requests `admit` takes from the
   queue within `admission_budget()`, placed in free slots (a cached prefix is copied in first);
3. `prefill(work)`: run it, and for rows whose whole prompt is now in the cache, save its
   blocks to the prefix cache and sample the first token;
4. `decode()`: one token for every row that is past its prefill.

3 and 4 in one forward (`prefill_and_decode`, when `mixes(work)`): while rows decode, the
step's prefill tokens are packed after the decode rows' tokens into a single forward
(mixed_attention.py), so the running streams wait for one forward per step, not a prefill
forward and then a decode forward. Rows that complete their prompt in it sample their first
token from it and decode from the next step on.

Chunked prefill: while other rows decode, a step prefills at most what `chunk_limits` allow
(a fixed number, or measured at warm-up against the stall bound: chunk_sizing.py). Waiting
requests are admitted together up to `admit_tokens`, so a burst of short prompts starts at
prefill speed; a prompt longer than that is admitted alone and prefilled in chunks over
several steps, one chunk per step (the smooth limit while nobody else waits, the stall bound's
while someone does), so it costs the running streams one short pause per step instead of one
long freeze; its first token is sampled after its last chunk. A prompt that would not be
through at that pace before REQUEST_TIMEOUT_S gets bigger chunks (`_catch_up`). At most one
prompt is being chunked at a time (it was admitted alone, see Scheduler.admit). While it is,
its row rides along in decode steps as a padding row (it writes no K/V of its own and its
length does not size the step's attention), and its logits are ignored (its random stream is
untouched), which keeps the decode batch a view over packed slots; in a mixed step its chunk
is the prefill part of the same forward.
With nothing decoding there is nobody to stall: the budget is then at least
IDLE_PREFILL_TOKENS.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from batching.errors import EngineError, InvalidInputError, ModelExecutionError, QueueTimeoutError
from batching.generation.block_manager import BlockManager
from batching.generation.chunk_sizing import ChunkLimits
from batching.generation.config import EngineConfig
from batching.generation.detokenizer import Tokenizer
from batching.generation.handle import GenerationDelta, Outbox
from batching.generation.model_runner import ModelRunner
from batching.generation.observer import EngineObserver
from batching.generation.request import Request
from batching.generation.sampling import TokenLogprob, choose_tokens, record_prompt_logprobs

logger = logging.getLogger(__name__)

IDLE_PREFILL_TOKENS = 2048  # the prefill budget of a step with no row decoding
CATCH_UP_MARGIN = 2.0  # a late prompt's chunks finish it in its time left at this x step time
PROMPT_LOGPROBS_CHUNK_TOKENS = 256  # every position's logits: [256, V] at a time

OwnerT = TypeVar("OwnerT")


class SlotTable(Generic[OwnerT]):
    """Rows 0..in_use-1 are held, each by one owner with a length (K/V entries written)."""

    def __init__(self, num_slots: int, max_seq_len: int) -> None:
        if num_slots < 1 or max_seq_len < 1:
            raise ValueError("num_slots and max_seq_len must be >= 1")
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self.owners: list[OwnerT] = []  # owners[row]; len(owners) == in_use
        self.lengths: list[int] = []  # tokens already written to the K/V cache, per row

    @property
    def in_use(self) -> int:
        return len(self.owners)

    @property
    def free(self) -> int:
        return self.num_slots - len(self.owners)

    def allocate(self, owner: OwnerT) -> int:
        """Give `owner` the next free row (length 0); returns the row."""
        if self.free == 0:
            raise RuntimeError("no free row")
        self.owners.append(owner)
        self.lengths.append(0)
        return len(self.owners) - 1

    def advance(self, row: int, tokens: int = 1) -> None:
        """`tokens` more K/V entries were written for the sequence in `row`."""
        new_length = self.lengths[row] + tokens
        if new_length > self.max_seq_len:
            raise RuntimeError(f"row {row} would outgrow the context of {self.max_seq_len}")
        self.lengths[row] = new_length

    def release(self, row: int) -> None:
        """Free `row`; if it was not the last, the last row moves into it."""
        if not 0 <= row < len(self.owners):
            raise IndexError(f"row {row} is not in use")
        last = len(self.owners) - 1
        if row != last:
            self.owners[row] = self.owners[last]
            self.lengths[row] = self.lengths[last]
        self.owners.pop()
        self.lengths.pop()


class Placement:
    def __init__(
        self,
        slots: SlotTable[Request],
        outbox: Outbox,
        observer: EngineObserver,
        release: Callable[[Request], None],
        config: EngineConfig,
        *,
        tokenizer: Tokenizer,
        grammar_tokenizer: object,
        blocks: BlockManager,
    ) -> None:
        self._slots = slots
        self._outbox = outbox
        self._observer = observer
        self._release = release
        self._tokenizer = tokenizer  # the engine thread's own copy
        self._special_tokens = config.special_tokens  # their text never reaches a client
        self._grammar_tokenizer = grammar_tokenizer
        self._blocks = blocks

    def place(self, leaders: list[Request]) -> list[Request]:
        """The leaders that got a row, in row order. One that cannot be set up fails alone,
        with its followers, at once (it left the queue: nobody else would answer it)."""
        placed = [leader for leader in leaders if self._place_one(leader, with_prefix=True)]
        for leader in leaders:
            for follower in leader.followers:
                if leader in placed:
                    self._place_one(follower, with_prefix=False)
                else:
                    self._fail(follower, leader.error)
        return placed

    def _place_one(self, request: Request, *, with_prefix: bool) -> bool:
        try:
            if not request.started:  # a preempted request keeps its detokenizer and grammar
                request.admit(
                    self._tokenizer,
                    self._special_tokens,
                    time.perf_counter(),
                    self._grammar_tokenizer,
                )
            row = self._slots.allocate(request)
            if with_prefix:
                self._map_cached_prefix(request, row)
        except Exception as exc:
            logger.exception("admission failed (request_id=%s)", request.handle.request_id)
            self._release(request)
            self._fail(request, model_error(exc))
            return False
        return True

    def _map_cached_prefix(self, request: Request, row: int) -> None:
        if request.prefill_alone:
            return  # (prompt logprobs need every position's logits: nothing can be skipped)
        tokens = request.prefill_ids
        # At least the last token is prefilled: its logits give the next token.
        request.blocks = self._blocks.match(tokens, len(tokens) - 1, request.cache_namespace)
        hit = len(request.blocks) * self._blocks.block_size
        if hit:
            self._slots.advance(row, hit)
            request.prefilled = hit
        if not request.started:
            request.cached_tokens = hit
            if self._blocks.prefix_caching:
                self._observer.on_prefix_cache_query(request.prompt_tokens, hit)

    def _fail(self, request: Request, error: EngineError | None) -> None:
        request.error = error or ModelExecutionError("the request could not be admitted")
        self._outbox.fail(request, request.error)



def model_error(cause: Exception) -> ModelExecutionError:
    """A ModelExecutionError chained to the model's own exception (its text stays in logs)."""
    error = ModelExecutionError(f"the model failed: {cause!r}")
    error.__cause__ = cause
    return error


@dataclass(frozen=True)
class PrefillWork:
    """Rows first_slot.. that prefill `chunks` after the `starts` tokens they hold."""

    first_slot: int
    requests: list[Request]
    starts: list[int]
    chunks: list[list[int]]

    @property
    def tables(self) -> list[list[int]]:
        return [r.blocks for r in self.requests]


class RunningBatch:
    def __init__(
        self,
        runner: ModelRunner,
        slots: SlotTable[Request],
        outbox: Outbox,
        observer: EngineObserver,
        config: EngineConfig,
        *,
        tokenizer: Tokenizer,
        grammar_tokenizer: object = None,
        chunk_limits: ChunkLimits,
        blocks: BlockManager,
    ) -> None:
        if min(*chunk_limits.chunks, *chunk_limits.busy_chunks, chunk_limits.admit_tokens) < 1:
            raise ValueError("chunk limits must be >= 1")
        self._runner = runner
        self._slots = slots
        self._outbox = outbox
        self._observer = observer
        self._eos_token_ids = frozenset(config.eos_token_ids)
        self.chunk_limits = chunk_limits
        self.mixed_steps = config.mixed_steps  # warm_up() may turn it off
        self._timeout_s = config.timeout_s
        self._step_s: float | None = None  # recent engine step time (moving average)
        self.blocks = blocks
        self.preempted: list[Request] = []  # back to the queue (the engine requeues them)
        self.preemptions = 0
        self._placement = Placement(
            slots,
            outbox,
            observer,
            self.release,
            config,
            tokenizer=tokenizer,
            grammar_tokenizer=grammar_tokenizer,
            blocks=blocks,
        )

    def budget(self, start: int = 0, others_wait: bool = False) -> int:
        """Prompt tokens of one prompt this step may prefill from position `start` on: bounds
        the running streams' pause, within the stall bound while others wait for a slot
        (throughput), and tighter while nobody does (smoothness); see chunk_sizing.py."""
        if any(r.decoding for r in self._slots.owners):
            return self.chunk_limits.chunk_at(start, busy=others_wait)
        return max(self.chunk_limits.largest, IDLE_PREFILL_TOKENS)

    def admission_budget(self) -> int:
        """Padded prompt tokens of waiting requests admitted together in this step: a burst
        of short prompts starts decoding at once, within the stall bound."""
        if any(r.decoding for r in self._slots.owners):
            return self.chunk_limits.admit_tokens
        return max(self.chunk_limits.largest, IDLE_PREFILL_TOKENS)

    def note_step(self, seconds: float) -> None:
        """How long the engine's last step took: paces a prompt that is late (_catch_up)."""
        self._step_s = seconds if self._step_s is None else 0.8 * self._step_s + 0.2 * seconds

    def _catch_up(self, request: Request) -> int:
        """The chunk a prompt needs to finish its prefill before REQUEST_TIMEOUT_S, with
        CATCH_UP_MARGIN step times to spare per step left. Small chunks keep the streams smooth,
        but not at the price of a 504 for a long prompt on a busy, slow machine."""
        if self._step_s is None or request.prefill_alone:
            return 0
        left_s = request.arrival_s + self._timeout_s - time.perf_counter()
        steps_left = max(1.0, left_s / (CATCH_UP_MARGIN * self._step_s))
        return math.ceil((len(request.prefill_ids) - request.prefilled) / steps_left)

    # ---- 1. retire ----

    def retire_ended(self) -> None:
        """Release ended rows (cancelled ones first marked), highest slot first."""
        now_s = time.perf_counter()
        for slot in range(self._slots.in_use - 1, -1, -1):
            request = self._slots.owners[slot]
            if request.cancelled and not request.ended:
                request.finish_reason = "cancelled"
            late = now_s - request.arrival_s > self._timeout_s
            if request.prefilling and not request.started and late:
                # Still no first token after REQUEST_TIMEOUT_S: a very long chunked prefill.
                request.error = QueueTimeoutError(now_s - request.arrival_s, self._timeout_s)
            leader = request.leader
            if leader is not None and not request.decoding and leader.ended:
                # Its leader ended before prefilling their prompt: so does it, the same way.
                request.error = leader.error
                request.finish_reason = "cancelled" if leader.error is None else None
            if not request.ended:
                continue
            self.release(request)
            if request.error is not None:
                self._outbox.fail(request, request.error)
            else:
                self._outbox.finish(request, now_s)

    # ---- 2. pick this step's prefill ----

    def next_prefill(
        self, admit: Callable[[int], list[Request]], waiting: Callable[[], int]
    ) -> PrefillWork | None:
        """The next chunk of the prompt being chunked; else what admit(budget) gives, as far
        as the pool has blocks for it (the rest goes back to the queue).
        `waiting()`: how many requests wait in the queue (they wait for that prompt too)."""
        for slot, request in enumerate(self._slots.owners):
            if request.prefilling:
                chunk = self._next_chunk(request, waiting)
                if not self._grow_for_prefill(request, len(chunk)):
                    return None  # it waits for blocks; running rows end or make room
                return PrefillWork(slot, [request], [request.prefilled], [chunk])
        if not self.blocks.can_allocate(1 + sum(1 for r in self._slots.owners if r.decoding)):
            return None  # no block to spare: admitting now would only send it back
        admission_budget = self.admission_budget()
        placed = self._placement.place(admit(admission_budget))
        if not placed:
            return None
        chunks = [r.prefill_ids[r.prefilled :] for r in placed]
        first = placed[0]
        if len(placed) == 1 and (len(chunks[0]) > admission_budget or first.prefill_alone):
            chunks[0] = self._next_chunk(first, waiting)  # admitted alone: longer than that
        return self._with_blocks(placed, chunks)

    def _with_blocks(self, placed: list[Request], chunks: list[list[int]]) -> PrefillWork | None:
        """The admitted prompts whose chunks the pool has blocks for; the first that does not
        fit goes back to the queue with every one after it (first come, first served)."""
        for index, (request, chunk) in enumerate(zip(placed, chunks, strict=True)):
            if not self._grow_for_prefill(request, len(chunk)):
                for later in placed[index:]:
                    self._requeue_group(later)
                placed, chunks = placed[:index], chunks[:index]
                break
        if not placed:
            return None
        first_slot = self._slots.owners.index(placed[0])  # leaders are contiguous from here
        return PrefillWork(first_slot, placed, [r.prefilled for r in placed], chunks)

    def _next_chunk(self, request: Request, waiting: Callable[[], int]) -> list[int]:
        """The next chunk of a prompt prefilled over several steps."""
        others_wait = self._slots.free > 0 and waiting() > 0
        take = max(
            _chunk_size(request, self.budget(request.prefilled, others_wait)),
            self._catch_up(request),
        )
        return request.prefill_ids[request.prefilled : request.prefilled + take]

    # ---- KV blocks: grow as tokens are written, preempt when the pool runs short ----

    def _grow_for_prefill(self, request: Request, chunk_tokens: int) -> bool:
        """Blocks for the chunk (and a block per follower for its copy of a partial last
        block once the prompt is whole), leaving one free block per decoding row, so a step
        that admits a prompt does not make the next step preempt a stream."""
        tokens = request.prefilled + chunk_tokens
        missing = self.blocks.blocks_for(tokens) - len(request.blocks)
        if tokens == len(request.prefill_ids):
            missing += len(request.followers)
        headroom = sum(1 for r in self._slots.owners if r.decoding)
        if not self.blocks.can_allocate(max(0, missing) + headroom):
            return False
        return self.blocks.grow(request.blocks, tokens)

    def reserve_decode_blocks(self) -> None:
        """Room for this step's token in every decoding row, most urgent first; when the pool
        is short, the least urgent, most recently admitted sequence is preempted."""
        for request in sorted(self._decoding(), key=_urgency):
            if request not in self._slots.owners:
                continue  # preempted for a more urgent row in this loop
            length = self._slots.lengths[self._slots.owners.index(request)]
            while not self.blocks.grow(request.blocks, length + 1):
                victim = max(self._holders(), key=_urgency)
                self.preempt(victim)
                if victim is request:
                    break

    def _decoding(self) -> list[Request]:
        return [r for r in self._slots.owners if r.decoding]

    def _holders(self) -> list[Request]:
        """Rows holding blocks (a follower not yet given its leader's prompt holds none)."""
        return [r for r in self._slots.owners if r.blocks]

    def preempt(self, victim: Request) -> None:
        """Free the victim's blocks and row (and its group's, if its choices have not been
        split off yet) and send it back to the queue; its written K/V stays in the prefix cache
        (if on) as long as nothing needs the blocks, so its resume is cheap."""
        self.preemptions += 1
        self._observer.on_preemption()
        row = self._slots.owners.index(victim)
        written = (victim.prefill_ids if not victim.decoding else victim.written_ids)[
            : self._slots.lengths[row]
        ]
        self.blocks.register(written, victim.blocks, victim.cache_namespace)
        logger.info(
            "preempted request %s (%d tokens written) to free KV blocks",
            victim.handle.request_id,
            len(written),
        )
        if victim.decoding:
            _split_off(victim)  # its choices run on their own from now on
        self._requeue_group(victim)

    def _requeue_group(self, leader: Request) -> None:
        """Take a request (and its followers, if it still stands for them) out of the batch
        and back to the queue."""
        for request in (leader, *leader.followers):
            if request in self._slots.owners:
                self.release(request)
            request.preempt()
        self.preempted.append(leader)

    # ---- 3. prefill ----

    def prefill(self, work: PrefillWork) -> None:
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
            if r.params.max_new_tokens > 0
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
                    _split_off(follower)
                    self._requeue_group(follower)  # it prefills on its own later
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

    # ---- 4. decode ----

    def decode(self) -> None:
        self.reserve_decode_blocks()  # rows whose prompt this step's prefill completed
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

    # ---- 3+4. a mixed step: prefill and decode in one forward ----

    def mixes(self, work: PrefillWork) -> bool:
        """Whether this step's prefill runs in the decode's forward (mixed_attention.py): when
        some row decodes, so the two forwards would run back to back, and the prefill does not
        need the logits of every position (prompt logprobs)."""
        return (
            self.mixed_steps
            and not work.requests[0].prefill_alone
            and any(r.decoding for r in self._slots.owners)
        )

    def prefill_and_decode(self, work: PrefillWork) -> None:
        """prefill(work) then decode(), as one forward. If it fails, the step runs again as the
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
            self.prefill(work)
            self.decode()
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

    # ---- failing and freeing rows ----

    def _fail(self, requests: list[Request], cause: Exception) -> None:
        """The model failed on a forward these rows shared: each fails with its own error."""
        for request in requests:
            request.error = model_error(cause)
        self.retire_ended()

    def fail_all(self, make_error: Callable[[], EngineError]) -> None:
        for request in self._slots.owners:
            request.error = request.error or make_error()
        self.retire_ended()

    def release(self, request: Request) -> None:
        """Free the request's row and blocks (a shared block stays while others hold it)."""
        if request in self._slots.owners:
            self._slots.release(self._slots.owners.index(request))
        self.blocks.free(request.blocks)


def _urgency(request: Request) -> tuple[int, float]:
    """Smaller is more urgent: priority, then the earlier admitted (resumed ones keep their
    first admission time)."""
    return request.priority, request.admitted_s or 0.0


def _split_off(request: Request) -> None:
    """One of n choices (or their leader) goes on alone: no more group ties."""
    if request.leader is not None:
        request.leader.followers.remove(request)
        request.leader = None
    for follower in request.followers:
        follower.leader = None
    request.followers.clear()


def _chunk_size(request: Request, budget: int) -> int:
    return min(budget, PROMPT_LOGPROBS_CHUNK_TOKENS) if request.prefill_alone else budget
