"""StepPlanner.schedule(): one engine step's work as data (admissions, prefill chunks,
preemptions), from the rows, the KV blocks and the queue alone: no model, no threads."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from batching.generation.block_manager import BlockManager
from batching.generation.chunk_sizing import ChunkLimits
from batching.generation.config import EngineConfig
from batching.generation.handle import GenerationHandle
from batching.generation.observer import NoopEngineObserver
from batching.generation.request import Request
from batching.generation.sampling import SamplingParams
from batching.generation.scheduler import (
    CHUNK_SHARE,
    Scheduler,
    SlotTable,
    StepPlan,
    StepPlanner,
)

TIMEOUT_S = 30.0


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()  # handles only need one to belong to; nothing runs on it
    yield loop
    loop.close()


def request(
    loop: asyncio.AbstractEventLoop,
    name: str,
    prompt_tokens: int,
    priority: int = 0,
    params: SamplingParams | None = None,
) -> Request:
    handle = GenerationHandle(name, loop, lambda: None)
    prompt = list(range(1, prompt_tokens + 1))
    return Request(handle, prompt, params or SamplingParams(8), priority)


def planner(
    *,
    rows: int = 4,
    blocks: int = 64,
    block_size: int = 4,
    chunk_tokens: int = 16,
    limits: ChunkLimits | None = None,
) -> StepPlanner:
    config = EngineConfig(num_slots=rows, max_seq_len=256, max_queue=8, timeout_s=TIMEOUT_S)
    return StepPlanner(
        SlotTable(rows, 256),
        BlockManager(blocks, block_size, prefix_caching=False),
        NoopEngineObserver(),
        config,
        limits or ChunkLimits.fixed(chunk_tokens),
    )


def queue_of(*requests: Request) -> Scheduler[Request]:
    queue: Scheduler[Request] = Scheduler(max_queue=8, timeout_s=TIMEOUT_S)
    for waiting in requests:
        queue.add(waiting, now_s=time.perf_counter())
    return queue


def prefill_as_planned(plan: StepPlan, step_planner: StepPlanner) -> None:
    """What running the plan's prefill does to the rows (RunningBatch's part, without a
    model): the chunks are written."""
    assert plan.prefill is not None
    work = plan.prefill
    for offset, (waiting, chunk) in enumerate(zip(work.requests, work.chunks, strict=True)):
        step_planner.slots.advance(work.first_slot + offset, len(chunk))
        waiting.prefilled += len(chunk)
        waiting.prefill_chunks += 1


def test_a_burst_of_short_prompts_is_admitted_and_prefilled_in_one_step(loop) -> None:
    burst = [request(loop, f"r{i}", prompt_tokens=5) for i in range(3)]
    step_planner, queue = planner(), queue_of(*burst)

    plan = step_planner.schedule(queue, now_s=time.perf_counter())

    assert plan.admitted == burst
    assert plan.prefill is not None
    assert plan.prefill.requests == burst
    assert plan.prefill.first_slot == 0
    assert plan.prefill.chunks == [r.prompt_ids for r in burst]
    assert not plan.mixed and plan.decoding == []  # nobody decodes yet: nobody to mix with
    assert len(queue) == 0
    assert step_planner.slots.owners == burst


def test_a_long_prompt_is_prefilled_one_chunk_per_step_beside_a_decoding_row(loop) -> None:
    step_planner = planner(chunk_tokens=16)
    short = request(loop, "short", prompt_tokens=6)
    queue = queue_of(short)
    prefill_as_planned(step_planner.schedule(queue, now_s=time.perf_counter()), step_planner)
    long = request(loop, "long", prompt_tokens=40)
    queue.add(long, now_s=time.perf_counter())

    first = step_planner.schedule(queue, now_s=time.perf_counter())
    assert first.admitted == [long]
    assert first.decoding == [short]
    assert first.mixed  # the chunk rides in the decode's forward
    assert first.prefill is not None
    assert first.prefill.chunks == [long.prompt_ids[:16]]
    prefill_as_planned(first, step_planner)

    second = step_planner.schedule(queue, now_s=time.perf_counter())
    assert second.admitted == []  # its next chunk admits nobody
    assert second.prefill is not None
    assert second.prefill.requests == [long]
    assert second.prefill.starts == [16]
    assert second.prefill.chunks == [long.prompt_ids[16:32]]


def test_a_short_pool_preempts_the_least_urgent_sequence_back_to_the_queue(loop) -> None:
    # 5 blocks of 4 tokens: two 8-token prompts take 4; the next decode token of each needs
    # one more block, and only one is left.
    step_planner = planner(blocks=5, block_size=4)
    urgent = request(loop, "urgent", prompt_tokens=8, priority=0)
    relaxed = request(loop, "relaxed", prompt_tokens=8, priority=1)
    queue = queue_of(urgent, relaxed)
    prefill_as_planned(step_planner.schedule(queue, now_s=time.perf_counter()), step_planner)

    plan = step_planner.schedule(queue, now_s=time.perf_counter())

    assert plan.preempted == [relaxed]
    assert plan.decoding == [urgent]
    assert plan.admitted == []  # the preempted one waits at least one step
    assert list(queue) == [relaxed]
    assert step_planner.slots.owners == [urgent]
    assert (relaxed.prefilled, relaxed.blocks, relaxed.preemptions) == (0, [], 1)
    assert step_planner.preemptions == 1


def test_ended_rows_are_retired_and_stale_waiters_dropped_before_anything_runs(loop) -> None:
    step_planner = planner(rows=1)
    running, cancelled = request(loop, "running", 5), request(loop, "gone", 5)
    queue = queue_of(running, cancelled)
    prefill_as_planned(step_planner.schedule(queue, now_s=time.perf_counter()), step_planner)
    running.finish_reason = "length"
    cancelled.handle.cancel()

    plan = step_planner.schedule(queue, now_s=time.perf_counter())

    assert plan.retired == [running]
    assert plan.cancelled == [cancelled]
    assert plan.prefill is None and plan.admitted == []
    assert step_planner.slots.in_use == 0
    assert step_planner.blocks.used_blocks == 0


def test_choices_of_one_prompt_get_rows_after_every_leader_and_prefill_once(loop) -> None:
    step_planner = planner()
    leader, other = request(loop, "n2", prompt_tokens=6), request(loop, "solo", prompt_tokens=6)
    follower = request(loop, "n2", prompt_tokens=6)
    follower.follow(leader)
    queue = queue_of(leader, other)

    plan = step_planner.schedule(queue, now_s=time.perf_counter())

    assert plan.prefill is not None
    assert plan.prefill.requests == [leader, other]  # the follower shares its leader's prefill
    assert step_planner.slots.owners == [leader, other, follower]  # leaders' rows contiguous
    assert plan.admitted == [leader, follower, other]
    assert follower.blocks == []  # it gets its leader's prompt blocks once they are written


def test_a_long_prompt_gets_the_busy_chunk_while_others_wait_for_a_row(loop) -> None:
    step_planner = planner(limits=ChunkLimits((0,), (16,), busy_chunks=(32,), admit_tokens=16))
    short = request(loop, "short", prompt_tokens=6)
    queue = queue_of(short)
    prefill_as_planned(step_planner.schedule(queue, now_s=time.perf_counter()), step_planner)
    # The waiter is too long to join the long prompt's step (12 of admit_tokens' 16 at most).
    long, waiter = request(loop, "long", prompt_tokens=40), request(loop, "waiter", 14)
    queue.add(long, now_s=time.perf_counter())
    queue.add(waiter, now_s=time.perf_counter())

    plan = step_planner.schedule(queue, now_s=time.perf_counter())

    assert plan.admitted == [long]  # admitted alone: longer than admit_tokens
    assert list(queue) == [waiter]
    assert plan.prefill is not None
    assert plan.prefill.chunks == [long.prompt_ids[:32]]  # the stall bound's, not 16


def test_a_late_prompt_gets_bigger_chunks_to_finish_before_its_timeout(loop) -> None:
    step_planner = planner(chunk_tokens=16)
    short = request(loop, "short", prompt_tokens=6)
    queue = queue_of(short)
    prefill_as_planned(step_planner.schedule(queue, now_s=time.perf_counter()), step_planner)
    long = request(loop, "long", prompt_tokens=40)
    now_s = time.perf_counter()
    long.arrival_s = now_s - (TIMEOUT_S - 4.0)  # 4 s left
    queue.add(long, now_s=now_s)
    step_planner.note_step(1.0)  # steps of 1 s: 4 s left are 2 steps at CATCH_UP_MARGIN 2

    plan = step_planner.schedule(queue, now_s=now_s)

    assert plan.prefill is not None
    assert plan.prefill.chunks == [long.prompt_ids[:20]]  # half of it per step, not 16


# Short prompts joining a long prompt's chunk (issue 21): 16-token chunks while nobody waits,
# 32 while someone does, 32 padded tokens of short prompts a step.
JOIN_LIMITS = ChunkLimits((0,), (16,), busy_chunks=(32,), admit_tokens=32)


def chunking_beside_a_stream(
    loop: asyncio.AbstractEventLoop,
    long_params: SamplingParams | None = None,
    mixed_steps: bool = True,
) -> tuple[StepPlanner, Scheduler[Request], Request]:
    """A decoding stream and a 100-token prompt whose first chunk is prefilled."""
    step_planner = planner(rows=8, blocks=128, limits=JOIN_LIMITS)
    step_planner.mixed_steps = mixed_steps
    queue = queue_of(request(loop, "stream", prompt_tokens=6))
    prefill_as_planned(step_planner.schedule(queue, now_s=time.perf_counter()), step_planner)
    long = request(loop, "long", prompt_tokens=100, params=long_params)
    queue.add(long, now_s=time.perf_counter())
    first = step_planner.schedule(queue, now_s=time.perf_counter())
    assert first.admitted == [long] and first.prefill is not None
    prefill_as_planned(first, step_planner)
    return step_planner, queue, long


def test_short_prompts_arriving_while_a_long_prompt_is_chunked_join_its_step(loop) -> None:
    step_planner, queue, long = chunking_beside_a_stream(loop)
    start = long.prefilled
    shorts = [request(loop, f"short{i}", prompt_tokens=6) for i in range(3)]
    for short in shorts:
        queue.add(short, now_s=time.perf_counter())

    plan = step_planner.schedule(queue, now_s=time.perf_counter())

    assert plan.admitted == shorts
    assert plan.mixed
    work = plan.prefill
    assert work is not None
    assert work.requests == [long, *shorts]  # the chunk first: it was admitted first
    # The shorts take 3 x 6 = 18 of the 32 padded tokens: the chunk keeps 14/32 of its 32.
    assert work.chunks == [long.prompt_ids[start : start + 14], *(s.prompt_ids for s in shorts)]
    assert work.starts == [start, 0, 0, 0]
    used = len(shorts) * 6 / JOIN_LIMITS.admit_tokens + len(work.chunks[0]) / 32
    assert used <= 1.0  # within one stall bound
    # One contiguous run of rows from the chunk's row on, as one mixed forward needs.
    owners = step_planner.slots.owners
    assert owners[work.first_slot : work.first_slot + 4] == [long, *shorts]
    assert list(queue) == []


def test_a_more_urgent_waiter_that_does_not_fit_is_not_overtaken_by_a_short_one(loop) -> None:
    step_planner, queue, long = chunking_beside_a_stream(loop)
    start = long.prefilled
    too_long = request(loop, "too_long", prompt_tokens=30)  # over 24 of the 32: not in one step
    short = request(loop, "short", prompt_tokens=6)
    queue.add(too_long, now_s=time.perf_counter())
    queue.add(short, now_s=time.perf_counter())

    plan = step_planner.schedule(queue, now_s=time.perf_counter())

    assert plan.admitted == []  # the short one does not jump the queue
    assert plan.prefill is not None
    assert plan.prefill.requests == [long]
    assert plan.prefill.chunks == [long.prompt_ids[start : start + 32]]  # others wait: busy
    assert list(queue) == [too_long, short]


def test_short_prompts_join_in_priority_order_within_their_share(loop) -> None:
    step_planner, queue, _ = chunking_beside_a_stream(loop)
    relaxed = request(loop, "relaxed", prompt_tokens=10, priority=1)
    urgent = [request(loop, f"urgent{i}", prompt_tokens=10) for i in range(2)]
    for waiting in (relaxed, *urgent):
        queue.add(waiting, now_s=time.perf_counter())

    plan = step_planner.schedule(queue, now_s=time.perf_counter())

    budget = int(JOIN_LIMITS.admit_tokens * (1 - CHUNK_SHARE))  # 24: two 10-token prompts
    assert plan.admitted == urgent
    assert list(queue) == [relaxed]
    assert plan.prefill is not None
    assert len(urgent) * 10 <= budget < (len(urgent) + 1) * 10
    assert len(plan.prefill.chunks[0]) == 12  # 32 x (1 - 20/32)


def test_nobody_joins_a_prompt_whose_prompt_logprobs_need_its_prefill_alone(loop) -> None:
    step_planner, queue, long = chunking_beside_a_stream(
        loop, long_params=SamplingParams(8, prompt_logprobs=1)
    )
    short = request(loop, "short", prompt_tokens=6)
    queue.add(short, now_s=time.perf_counter())

    plan = step_planner.schedule(queue, now_s=time.perf_counter())

    assert plan.admitted == [] and list(queue) == [short]
    assert plan.prefill is not None and plan.prefill.requests == [long]
    assert not plan.mixed


def test_without_mixed_steps_the_chunk_is_no_longer_than_the_joining_prompts(loop) -> None:
    step_planner, queue, long = chunking_beside_a_stream(loop, mixed_steps=False)
    start = long.prefilled
    shorts = [request(loop, f"short{i}", prompt_tokens=6) for i in range(2)]
    for short in shorts:
        queue.add(short, now_s=time.perf_counter())

    plan = step_planner.schedule(queue, now_s=time.perf_counter())

    assert plan.admitted == shorts and not plan.mixed
    assert plan.prefill is not None
    # One padded prefill forward [3, 6]: the chunk's share (20 of 32) is cut to 6.
    assert plan.prefill.chunks == [
        long.prompt_ids[start : start + 6],
        *(s.prompt_ids for s in shorts),
    ]


def test_a_short_prompt_behind_a_long_one_joins_its_first_chunk(loop) -> None:
    step_planner = planner(rows=8, blocks=128, limits=JOIN_LIMITS)
    stream = request(loop, "stream", prompt_tokens=6)
    queue = queue_of(stream)
    prefill_as_planned(step_planner.schedule(queue, now_s=time.perf_counter()), step_planner)
    long, short = request(loop, "long", prompt_tokens=100), request(loop, "short", 6)
    queue.add(long, now_s=time.perf_counter())
    queue.add(short, now_s=time.perf_counter())

    plan = step_planner.schedule(queue, now_s=time.perf_counter())

    assert plan.admitted == [long, short]
    assert plan.prefill is not None
    assert plan.prefill.requests == [long, short]
    assert plan.prefill.chunks == [long.prompt_ids[:26], short.prompt_ids]  # 32 x (1 - 6/32)
    assert step_planner.slots.owners == [stream, long, short]


def test_a_joining_prompt_with_n_choices_brings_its_followers_after_it(loop) -> None:
    step_planner, queue, long = chunking_beside_a_stream(loop)
    leader, follower = request(loop, "n2", prompt_tokens=6), request(loop, "n2", 6)
    follower.follow(leader)
    queue.add(leader, now_s=time.perf_counter())

    plan = step_planner.schedule(queue, now_s=time.perf_counter())

    assert plan.admitted == [leader, follower]
    assert plan.prefill is not None
    assert plan.prefill.requests == [long, leader]  # the follower shares its leader's prefill
    assert step_planner.slots.owners[plan.prefill.first_slot :] == [long, leader, follower]


def test_a_late_long_prompt_takes_its_catch_up_chunk_alone(loop) -> None:
    step_planner, queue, long = chunking_beside_a_stream(loop)
    start = long.prefilled
    now_s = time.perf_counter()
    long.arrival_s = now_s - (TIMEOUT_S - 4.0)  # 4 s left: 2 steps of 1 s at CATCH_UP_MARGIN 2
    step_planner.note_step(1.0)
    short = request(loop, "short", prompt_tokens=6)
    queue.add(short, now_s=now_s)

    plan = step_planner.schedule(queue, now_s=now_s)

    assert plan.admitted == [] and list(queue) == [short]
    assert plan.prefill is not None
    assert plan.prefill.chunks == [long.prompt_ids[start : start + 42]]  # half of the 84 left
