"""Scheduling: who waits (`Scheduler`, the queue), which rows are held (`SlotTable`), and
what each engine step does (`StepPlanner.schedule`, which returns the step as data: a
`StepPlan`). nano-vllm's `Scheduler.schedule()`: the engine runs the plan (running_batch.py)
and applies its results; nothing here touches the model.

The queue: a bounded queue in front of the batch rows, served by priority, then first come
first served (priority.py: lower is sooner, with aging).

A row is a place in the decode batch, not memory: GENERATE_SLOTS rows are the most sequences
decoded together, and a row's K/V lives in the blocks of its request's block table
(block_manager.py), wherever they are in the pool. `SlotTable` keeps active rows packed at
0..in_use-1, so a decode step's batch is rows 0..B-1: `allocate` takes row `in_use`, and
`release` moves the last row into the hole it leaves (only bookkeeping moves: the K/V stays in
its blocks).

One step's plan, in this order:

1. retire: rows that finished, failed or were cancelled (and a prompt still without its first
   token past REQUEST_TIMEOUT_S) give back their row and blocks;
2. reserve: every decoding row gets a block for this step's token, most urgent first; when the
   pool is short the least urgent, most recently admitted sequence is preempted: its blocks are
   freed (its written K/V stays in the prefix cache while nothing needs the blocks) and it goes
   back to the front of the queue, to be resumed by recomputing what it had written;
3. drop: waiting requests whose client left or whose REQUEST_TIMEOUT_S passed leave the queue
   before they cost compute;
4. prefill: the next chunk of the prompt being chunked, with the short waiting prompts that
   join its step (below); else the waiting requests admitted together within `admit_tokens`,
   each placed in a free row with its longest cached prefix mapped into its block table
   (shared blocks, no copy), as far as the pool has blocks for them (the rest goes back to the
   queue). Followers (choices 2..n of one prompt) get rows after every leader, so the leaders'
   rows stay contiguous for one batched prefill; they share their leader's prompt blocks once
   it is prefilled (the prompt being chunked is moved to the last row first, so the prompts
   joining it follow it);
5. mixed or not: while rows decode, the prefill runs inside the decode's forward.

Chunked prefill: while other rows decode, a step prefills at most what `chunk_limits` allow
(a fixed number, or measured at warm-up against the stall bound: chunk_sizing.py). Waiting
requests are admitted together up to `admit_tokens`, so a burst of short prompts starts at
prefill speed; a prompt longer than that is admitted alone and prefilled in chunks over
several steps, one chunk per step (the smooth limit while nobody else waits, the stall bound's
while someone does), so it costs the running streams one short pause per step instead of one
long freeze. A prompt that would not be through at that pace before REQUEST_TIMEOUT_S gets
bigger chunks (`_catch_up`). At most one prompt is being chunked at a time (it was admitted
alone, see Scheduler.admit). With nothing decoding there is nobody to stall: the budget is
then at least IDLE_PREFILL_TOKENS.

Short prompts join a long prompt's chunk (`_chunk_step`): requests that arrive while a long
prompt is being chunked do not wait behind all of its chunks. The rule, within the same stall
bound: the waiting prompts are admitted first, by urgency and strict FCFS (the first that does
not fit stops admission, so a long or a prompt-logprobs request at the front is not overtaken:
it waits for its own turn), each whole, together within (1 - CHUNK_SHARE) of `admit_tokens`
(padded); the chunk takes what they leave of its own limit at its context: a step's parts add
up to at most one stall bound, each part counted as its share of its own measured limit. So
the long prompt keeps at least CHUNK_SHARE of its pace while a burst arrives, and its full
pace again once nobody waits. Not beside a prompt with prompt logprobs (prefilled alone),
nor a late prompt's catch-up chunk (it needs the whole step), nor while no row decodes (the
idle budget is one big prefill forward that would pad every short prompt to it). With
GENERATE_MIXED_STEPS=false the joined prompts and the chunk run as one padded prefill forward
(model_runner.prefill's rows): the chunk is then no longer than the longest joining prompt.

Plain Python, no threads of its own: the engine guards the queue with one lock (submit() adds
from the event loop, the engine thread takes), and calls `schedule()` under it; so all of this
can be unit-tested without a model.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from batching.errors import QueueFullError, QueueTimeoutError
from batching.generation.block_manager import BlockManager
from batching.generation.chunk_sizing import ChunkLimits
from batching.generation.config import EngineConfig
from batching.generation.observer import EngineObserver
from batching.generation.request import Request
from batching.priority import DEFAULT_AGING_S, urgency

logger = logging.getLogger(__name__)

IDLE_PREFILL_TOKENS = 2048  # the prefill budget of a step with no row decoding
CATCH_UP_MARGIN = 2.0  # a late prompt's chunks finish it in its time left at this x step time
PROMPT_LOGPROBS_CHUNK_TOKENS = 256  # every position's logits: [256, V] at a time
CHUNK_SHARE = 0.25  # short prompts joining a long prompt's step leave its chunk this much


class Waiting(Protocol):
    """What the scheduler needs to know about a waiting request."""

    @property
    def arrival_s(self) -> float:
        """time.perf_counter() at submit."""

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def cancelled(self) -> bool: ...

    @property
    def slots_needed(self) -> int:
        """Slots it takes when admitted (n choices of one prompt take n)."""

    @property
    def prefill_alone(self) -> bool:
        """It must not share its prefill forward (prompt logprobs: every position's logits)."""

    @property
    def priority(self) -> int:
        """Lower is served sooner."""

    @property
    def started(self) -> bool:
        """It sampled tokens before it was preempted: it is neither evicted nor timed out."""


WaitingT = TypeVar("WaitingT", bound=Waiting)


class Scheduler(Generic[WaitingT]):
    """Admission by priority (with aging), then arrival, from a bounded waiting queue."""

    def __init__(self, max_queue: int, timeout_s: float, aging_s: float = DEFAULT_AGING_S) -> None:
        if max_queue < 1 or aging_s <= 0:
            raise ValueError("max_queue must be >= 1 and aging_s > 0")
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.aging_s = aging_s
        self._waiting: deque[WaitingT] = deque()  # in arrival order

    def __len__(self) -> int:
        return len(self._waiting)

    def __iter__(self) -> Iterator[WaitingT]:
        return iter(self._waiting)

    def add(self, request: WaitingT, now_s: float, free_slots: int = 0) -> WaitingT | None:
        """Queue a request. With max_queue waiting, the least urgent of them and the newcomer
        is refused: QueueFullError for the newcomer, or the evicted one is returned (the
        caller answers it 503, as if it had just been refused). Up to `free_slots` waiting
        requests are about to be admitted, not queued: they do not count against max_queue."""
        evicted = None
        fresh = [r for r in self._waiting if not r.started]
        if len(fresh) >= self.max_queue + free_slots:
            least = max(fresh, key=lambda r: self._urgency(r, now_s))
            if self._urgency(request, now_s) >= self._urgency(least, now_s):
                raise QueueFullError(self.max_queue)
            self._waiting.remove(least)
            evicted = least
        self._waiting.append(request)
        return evicted

    def requeue(self, request: WaitingT) -> None:
        """A request taken from the running batch (preempted, or admitted when the KV pool had
        no room for it) waits again. It keeps its arrival time, so it is served before every
        later arrival of its priority; the queue bound does not apply (it was admitted once)."""
        self._waiting.appendleft(request)

    def _urgency(self, request: WaitingT, now_s: float) -> tuple[float, float]:
        return urgency(request.priority, request.arrival_s, now_s, self.aging_s)

    def drop_stale(self, now_s: float) -> tuple[list[WaitingT], list[WaitingT]]:
        """Remove (cancelled, timed_out) requests, before they cost any compute."""
        cancelled: list[WaitingT] = []
        timed_out: list[WaitingT] = []
        kept: deque[WaitingT] = deque()
        for request in self._waiting:
            if request.cancelled:
                cancelled.append(request)
            elif now_s - request.arrival_s > self.timeout_s and not request.started:
                timed_out.append(request)
            else:
                kept.append(request)
        self._waiting = kept
        return cancelled, timed_out

    def admit(
        self,
        free_slots: int,
        prefill_token_budget: int,
        now_s: float = 0.0,
        *,
        must_fit: bool = False,
    ) -> list[WaitingT]:
        """Take the most urgent requests while a slot is free and the prefill budget allows.

        The budget counts padded tokens (rows x longest prompt), which is what a batched
        prefill computes. The front request is always taken when a slot is free, even if it
        alone exceeds the budget (it is then admitted alone and prefilled in chunks, see
        running_batch.py), so a long prompt cannot starve; not with `must_fit` (short prompts
        joining the step of a long prompt being chunked: every one must fit, and none may need
        its prefill alone). Strict FCFS: a request that does not fit the budget stops admission
        for this step rather than being overtaken by a less urgent one.
        """
        admitted: list[WaitingT] = []
        longest = 0
        for candidate in sorted(self._waiting, key=lambda r: self._urgency(r, now_s)):
            if candidate.slots_needed > free_slots:
                break
            new_longest = max(longest, candidate.prompt_tokens)
            alone = candidate.prefill_alone or (admitted and admitted[0].prefill_alone)
            too_many = (len(admitted) + 1) * new_longest > prefill_token_budget
            if (admitted or must_fit) and (alone or too_many):
                break
            admitted.append(candidate)
            free_slots -= candidate.slots_needed
            longest = new_longest
        for request in admitted:
            self._waiting.remove(request)
        return admitted

    def remove(self, request: WaitingT) -> bool:
        """Take one request out if it still waits (True); False if it was admitted or gone."""
        if request in self._waiting:
            self._waiting.remove(request)
            return True
        return False

    def take_all(self) -> list[WaitingT]:
        """Empty the queue (engine stopping or dead); the caller fails each request."""
        taken = list(self._waiting)
        self._waiting.clear()
        return taken


# ---- the batch rows ----

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

    def move_to_last(self, row: int) -> int:
        """Swap `row` with the last row in use (only bookkeeping: K/V stays in its blocks), so
        rows allocated next follow it; returns its new row."""
        if not 0 <= row < len(self.owners):
            raise IndexError(f"row {row} is not in use")
        last = len(self.owners) - 1
        self.owners[row], self.owners[last] = self.owners[last], self.owners[row]
        self.lengths[row], self.lengths[last] = self.lengths[last], self.lengths[row]
        return last

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


# ---- one step's plan ----


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


@dataclass(frozen=True)
class StepPlan:
    """One engine step's work, decided before anything runs (StepPlanner.schedule). Rows are
    already freed, placed and given their blocks; the engine answers, runs and applies it."""

    retired: list[Request]  # ended rows, freed: each is answered (finished or failed)
    cancelled: list[Request]  # leaders that left the queue because their client went away
    timed_out: list[Request]  # leaders that left the queue past REQUEST_TIMEOUT_S
    # Leaders sent back to the front of the queue: preempted when blocks ran short, or admitted
    # when the pool had no blocks for their prompt (not counted as preemptions).
    preempted: list[Request]
    admitted: list[Request]  # given rows this step: each leader, then its followers
    prefill: PrefillWork | None  # the prompt chunk(s) this step prefills
    # Rows that sample a token in this step's decode; a step whose prefill is not mixed also
    # decodes the rows it completes (their first decode token right after their first token).
    decoding: list[Request]
    mixed: bool  # the prefill runs inside the decode's forward (attention.py)


class StepPlanner:
    """Turns the rows, the KV blocks and the queue into one step's `StepPlan`; owns the row
    and block bookkeeping that goes with it (release, preempt). Engine thread only."""

    def __init__(
        self,
        slots: SlotTable[Request],
        blocks: BlockManager,
        observer: EngineObserver,
        config: EngineConfig,
        chunk_limits: ChunkLimits,
    ) -> None:
        if min(*chunk_limits.chunks, *chunk_limits.busy_chunks, chunk_limits.admit_tokens) < 1:
            raise ValueError("chunk limits must be >= 1")
        self.slots = slots
        self.blocks = blocks
        self._observer = observer
        self.chunk_limits = chunk_limits
        self.mixed_steps = config.mixed_steps  # warm_up() may turn it off
        self._timeout_s = config.timeout_s
        self._step_s: float | None = None  # recent engine step time (moving average)
        self.preempted: list[Request] = []  # leaders for the queue, in preemption order
        self.preemptions = 0

    def schedule(self, queue: Scheduler[Request], now_s: float) -> StepPlan:
        """This step's plan (the caller holds the lock that guards `queue`): ended rows freed,
        a block reserved for every decoding row's token (preempting when the pool is short),
        stale waiting requests dropped, then the prefill: the next chunk of the prompt being
        chunked, or the waiting requests admitted into free rows. Preempted leaders are back in
        the queue when it returns."""
        retired = self.retire_ended(now_s)
        self.reserve_decode_blocks()
        cancelled, timed_out = queue.drop_stale(now_s)
        admitted, prefill = self._plan_prefill(queue, now_s)
        preempted, self.preempted = self.preempted, []
        for leader in reversed(preempted):  # the first preempted ends up first in the queue
            queue.requeue(leader)
        decoding = [r for r in self.slots.owners if r.decoding]
        return StepPlan(
            retired=retired,
            cancelled=cancelled,
            timed_out=timed_out,
            preempted=preempted,
            admitted=admitted,
            prefill=prefill,
            decoding=decoding,
            mixed=prefill is not None and self._mixes(prefill, decoding),
        )

    def take_preempted(self) -> list[Request]:
        """Leaders preempted while the step ran (the engine requeues them, under its lock)."""
        preempted, self.preempted = self.preempted, []
        return preempted

    # ---- chunk sizing ----

    def budget(self, start: int = 0, others_wait: bool = False) -> int:
        """Prompt tokens of one prompt this step may prefill from position `start` on: bounds
        the running streams' pause, within the stall bound while others wait for a slot
        (throughput), and tighter while nobody does (smoothness); see chunk_sizing.py."""
        if any(r.decoding for r in self.slots.owners):
            return self.chunk_limits.chunk_at(start, busy=others_wait)
        return max(self.chunk_limits.largest, IDLE_PREFILL_TOKENS)

    def admission_budget(self) -> int:
        """Padded prompt tokens of waiting requests admitted together in this step: a burst
        of short prompts starts decoding at once, within the stall bound."""
        if any(r.decoding for r in self.slots.owners):
            return self.chunk_limits.admit_tokens
        return max(self.chunk_limits.largest, IDLE_PREFILL_TOKENS)

    def note_step(self, seconds: float) -> None:
        """How long the engine's last step took: paces a prompt that is late (_catch_up)."""
        self._step_s = seconds if self._step_s is None else 0.8 * self._step_s + 0.2 * seconds

    def _catch_up(self, request: Request, now_s: float) -> int:
        """The chunk a prompt needs to finish its prefill before REQUEST_TIMEOUT_S, with
        CATCH_UP_MARGIN step times to spare per step left. Small chunks keep the streams smooth,
        but not at the price of a 504 for a long prompt on a busy, slow machine."""
        if self._step_s is None or request.prefill_alone:
            return 0
        left_s = request.arrival_s + self._timeout_s - now_s
        steps_left = max(1.0, left_s / (CATCH_UP_MARGIN * self._step_s))
        return math.ceil((len(request.prefill_ids) - request.prefilled) / steps_left)

    def _mixes(self, work: PrefillWork, decoding: list[Request]) -> bool:
        """Whether this step's prefill runs in the decode's forward (attention.py): when
        some row decodes, so the two forwards would run back to back, and the prefill does not
        need the logits of every position (prompt logprobs)."""
        return self.mixed_steps and not work.requests[0].prefill_alone and bool(decoding)

    # ---- 1. retire ----

    def retire_ended(self, now_s: float) -> list[Request]:
        """Free the rows of ended requests (cancelled ones first marked, a prompt without its
        first token past REQUEST_TIMEOUT_S failed), highest slot first; returns them, for the
        caller to answer."""
        ended: list[Request] = []
        for slot in range(self.slots.in_use - 1, -1, -1):
            request = self.slots.owners[slot]
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
            if request.ended:
                self.release(request)
                ended.append(request)
        return ended

    def release(self, request: Request) -> None:
        """Free the request's row and blocks (a shared block stays while others hold it)."""
        if request in self.slots.owners:
            self.slots.release(self.slots.owners.index(request))
        self.blocks.free(request.blocks)

    # ---- 2. reserve: a block for every decoding row's token, preempting when short ----

    def reserve_decode_blocks(self) -> None:
        """Room for this step's token in every decoding row, most urgent first; when the pool
        is short, the least urgent, most recently admitted sequence is preempted."""
        for request in sorted(self._decoding(), key=_urgency):
            if request not in self.slots.owners:
                continue  # preempted for a more urgent row in this loop
            length = self.slots.lengths[self.slots.owners.index(request)]
            while not self.blocks.grow(request.blocks, length + 1):
                victim = max(self._holders(), key=_urgency)
                self.preempt(victim)
                if victim is request:
                    break

    def _decoding(self) -> list[Request]:
        return [r for r in self.slots.owners if r.decoding]

    def _holders(self) -> list[Request]:
        """Rows holding blocks (a follower not yet given its leader's prompt holds none)."""
        return [r for r in self.slots.owners if r.blocks]

    def preempt(self, victim: Request) -> None:
        """Free the victim's blocks and row (and its group's, if its choices have not been
        split off yet) and send it back to the queue; its written K/V stays in the prefix cache
        (if on) as long as nothing needs the blocks, so its resume is cheap."""
        self.preemptions += 1
        self._observer.on_preemption()
        row = self.slots.owners.index(victim)
        written = (victim.prefill_ids if not victim.decoding else victim.written_ids)[
            : self.slots.lengths[row]
        ]
        self.blocks.register(written, victim.blocks, victim.cache_namespace)
        logger.info(
            "preempted request %s (%d tokens written) to free KV blocks",
            victim.handle.request_id,
            len(written),
        )
        if victim.decoding:
            split_off(victim)  # its choices run on their own from now on
        self.requeue_group(victim)

    def requeue_group(self, leader: Request) -> None:
        """Take a request (and its followers, if it still stands for them) out of the batch
        and back to the queue (at the end of schedule(), or by the engine after the step)."""
        for request in (leader, *leader.followers):
            if request in self.slots.owners:
                self.release(request)
            request.preempt()
        self.preempted.append(leader)

    # ---- 4. prefill: the next chunk, or admissions ----

    def _plan_prefill(
        self, queue: Scheduler[Request], now_s: float
    ) -> tuple[list[Request], PrefillWork | None]:
        """(admitted, work): the next chunk of the prompt being chunked, with the short prompts
        that join it (`_chunk_step`); else the requests the queue admits within the admission
        budget, placed in rows, as far as the pool has blocks for them (the rest goes back to
        the queue). A prompt too long for the budget is admitted alone and its first chunk is
        planned like any later one."""
        for request in self.slots.owners:
            if request.prefilling:
                return self._chunk_step(request, queue, now_s, fresh=False)
        if not self.blocks.can_allocate(1 + len(self._decoding())):
            return [], None  # no block to spare: admitting now would only send it back
        admission_budget = self.admission_budget()
        placed = self._place(queue.admit(self.slots.free, admission_budget, now_s), now_s)
        if not placed:
            return [], None
        first = placed[0]
        if len(placed) == 1 and (
            len(first.prefill_ids) - first.prefilled > admission_budget or first.prefill_alone
        ):
            return self._chunk_step(first, queue, now_s, fresh=True)  # admitted alone: too long
        work = self._with_blocks(placed, [r.prefill_ids[r.prefilled :] for r in placed])
        if work is None:
            return [], None
        return [r for leader in work.requests for r in leader.group], work

    def _chunk_step(
        self, long: Request, queue: Scheduler[Request], now_s: float, *, fresh: bool
    ) -> tuple[list[Request], PrefillWork | None]:
        """The next chunk of `long` (admitted in this step if `fresh`), and the short waiting
        prompts that join it in this step (`_join`). If the pool has no blocks for the chunk,
        nothing is prefilled: `long` waits in its row (a fresh one goes back to the queue) and
        so do the short ones, until running rows end or make room."""
        others_wait = self.slots.free > 0 and len(queue) > 0
        limit = _chunk_size(long, self.budget(long.prefilled, others_wait))
        late = self._catch_up(long, now_s)
        joining = self._join(long, queue, now_s) if late <= limit else []
        take = max(self._chunk_share(long, limit, joining), late)
        chunk = long.prefill_ids[long.prefilled : long.prefilled + take]
        if not self._grow_for_prefill(long, len(chunk)):
            for request in reversed(joining):  # never placed: back to the front, in order
                queue.requeue(request)
            if fresh:
                self.requeue_group(long)
            return [], None
        first_slot = self.slots.move_to_last(self.slots.owners.index(long))  # joiners follow
        joined = self._place(joining, now_s)
        chunks = _rest(joined)
        fit = self._fit_blocks(joined, chunks)
        joined, chunks = joined[:fit], [chunk, *chunks[:fit]]
        work = PrefillWork(
            first_slot, [long, *joined], [r.prefilled for r in (long, *joined)], chunks
        )
        admitted = [r for leader in joined for r in leader.group]
        return [*long.group, *admitted] if fresh else admitted, work

    def _join(self, long: Request, queue: Scheduler[Request], now_s: float) -> list[Request]:
        """Waiting prompts admitted into the step of `long`'s next chunk, by urgency (strict
        FCFS: one that does not fit stops admission), each whole in this step, together within
        (1 - CHUNK_SHARE) of the admission budget, so the chunk keeps at least its share of
        the step. None beside a prompt that needs its prefill alone (prompt logprobs), and none
        while no row decodes (a prefill forward with nobody to stall: its budget is
        IDLE_PREFILL_TOKENS, and it would pad every short prompt to that chunk)."""
        if long.prefill_alone or not self._decoding():
            return []
        budget = int(self.admission_budget() * (1 - CHUNK_SHARE))
        joining = queue.admit(self.slots.free, budget, now_s, must_fit=True)
        for index, request in enumerate(joining):
            if len(request.prefill_ids) > budget:  # resumed: it prefills all it had written
                for later in reversed(joining[index:]):
                    queue.requeue(later)
                return joining[:index]
        return joining

    def _chunk_share(self, long: Request, limit: int, joining: list[Request]) -> int:
        """`long`'s chunk when `joining` prompts share its step: they take their part of the
        stall bound first (their padded tokens over the admission budget), the chunk takes what
        is left of its own limit at its context. A step that is not mixed pads every row to the
        longest: there the chunk is no longer than the longest joining prompt."""
        if not joining:
            return limit
        longest = max(len(r.prefill_ids) for r in joining)
        used = len(joining) * longest / self.admission_budget()
        take = max(1, math.floor(limit * (1 - used)))
        return take if self.mixed_steps else min(take, longest)

    def _place(self, leaders: list[Request], now_s: float) -> list[Request]:
        """Give each leader the next free row and map its longest cached prefix into its block
        table; then each follower a row after every leader (the leaders' rows stay contiguous
        for one batched prefill). Returns the leaders, in row order."""
        for leader in leaders:
            leader.admit(now_s)
            self._map_cached_prefix(leader, self.slots.allocate(leader))
        for leader in leaders:
            for follower in leader.followers:
                follower.admit(now_s)
                self.slots.allocate(follower)
        return leaders

    def _map_cached_prefix(self, request: Request, row: int) -> None:
        if request.prefill_alone:
            return  # (prompt logprobs need every position's logits: nothing can be skipped)
        tokens = request.prefill_ids
        # At least the last token is prefilled: its logits give the next token.
        request.blocks = self.blocks.match(tokens, len(tokens) - 1, request.cache_namespace)
        hit = len(request.blocks) * self.blocks.block_size
        if hit:
            self.slots.advance(row, hit)
            request.prefilled = hit
        if not request.started:
            request.cached_tokens = hit
            if self.blocks.prefix_caching:
                self._observer.on_prefix_cache_query(request.prompt_tokens, hit)

    def _with_blocks(self, placed: list[Request], chunks: list[list[int]]) -> PrefillWork | None:
        """The admitted prompts whose chunks the pool has blocks for; the first that does not
        fit goes back to the queue with every one after it (first come, first served)."""
        fit = self._fit_blocks(placed, chunks)
        if not fit:
            return None
        first_slot = self.slots.owners.index(placed[0])  # leaders are contiguous from here
        return PrefillWork(
            first_slot, placed[:fit], [r.prefilled for r in placed[:fit]], chunks[:fit]
        )

    def _fit_blocks(self, placed: list[Request], chunks: list[list[int]]) -> int:
        """Blocks for the chunks of the first prompts, as many as fit; the first that does not
        goes back to the queue with every one after it. Returns how many fit."""
        for index, (request, chunk) in enumerate(zip(placed, chunks, strict=True)):
            if not self._grow_for_prefill(request, len(chunk)):
                for later in placed[index:]:
                    self.requeue_group(later)
                return index
        return len(placed)

    def _grow_for_prefill(self, request: Request, chunk_tokens: int) -> bool:
        """Blocks for the chunk (and a block per follower for its copy of a partial last
        block once the prompt is whole), leaving one free block per decoding row, so a step
        that admits a prompt does not make the next step preempt a stream."""
        tokens = request.prefilled + chunk_tokens
        missing = self.blocks.blocks_for(tokens) - len(request.blocks)
        if tokens == len(request.prefill_ids):
            missing += len(request.followers)
        headroom = len(self._decoding())
        if not self.blocks.can_allocate(max(0, missing) + headroom):
            return False
        return self.blocks.grow(request.blocks, tokens)


def _urgency(request: Request) -> tuple[int, float]:
    """Smaller is more urgent: priority, then the earlier admitted (resumed ones keep their
    first admission time)."""
    return request.priority, request.admitted_s or 0.0


def split_off(request: Request) -> None:
    """One of n choices (or their leader) goes on alone: no more group ties."""
    if request.leader is not None:
        request.leader.followers.remove(request)
        request.leader = None
    for follower in request.followers:
        follower.leader = None
    request.followers.clear()


def _rest(requests: list[Request]) -> list[list[int]]:
    """What each request has left to prefill (after a prefix-cache hit)."""
    return [r.prefill_ids[r.prefilled :] for r in requests]


def _chunk_size(request: Request, budget: int) -> int:
    return min(budget, PROMPT_LOGPROBS_CHUNK_TOKENS) if request.prefill_alone else budget
