"""A preempted request waiting in the queue to resume is a running request, not a waiting one:
when the engine stops it is drained to its full output (or, past the drain deadline,
interrupted), its queue timeout does not apply, and either way it is answered exactly once.

The set-up: two requests in a pool of 12 blocks x 4 positions. The urgent one needs all 12
blocks by its end (8 + 40 tokens), the other 8 (8 + 24), so the less urgent one is preempted
while it decodes (after it streamed tokens) and cannot resume before the urgent one ends. A forward
pre-hook holds the engine thread inside one forward at the chosen moment; the test acts (stops
the engine, or lets the queue timeout elapse) and then lets the engine go on.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from batching.errors import EngineStoppedError, RequestInterruptedError
from batching.generation.engine import GenerationEngine
from batching.generation.handle import GenerationHandle, GenerationResult
from batching.generation.sampling import SamplingParams
from tests.batching.conftest import WAIT_S, EngineFactory, RecordingObserver, build_tiny_llama
from tests.batching.test_paged_kv import reference_ignoring_eos, tokens

PROMPT, URGENT_NEW, VICTIM_NEW = 8, 40, 24  # 12 and 8 blocks of 4 positions
BLOCK_SIZE, POOL_BLOCKS = 4, 12
TIMEOUT_S = 30.0  # the queue timeout; its timer is played by the test (test_..._timeout_...)


class HoldInForward:
    """A forward pre-hook that holds the engine thread inside the first forward for which
    `when()` is true, until release(); counts the forwards begun after release(). With
    `first_waits_for`, the very first forward also waits for that event (set by the test once
    everything it submits is queued, so what the engine does from then on is one schedule)."""

    def __init__(
        self,
        model: Any,
        when: Callable[[], bool],
        first_waits_for: threading.Event | None = None,
    ) -> None:
        self._when = when
        self._first_waits_for = first_waits_for
        self.entered = threading.Event()
        self._held = threading.Event()
        self._released = threading.Event()
        self.forwards_after_release = 0
        self._handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module: object, args: object) -> None:
        if not self.entered.is_set():
            self.entered.set()
            if self._first_waits_for and not self._first_waits_for.wait(WAIT_S):
                raise RuntimeError("the test never let the first forward run")
        if self._released.is_set():
            self.forwards_after_release += 1
        elif not self._held.is_set() and self._when():
            self._held.set()
            if not self._released.wait(WAIT_S):
                raise RuntimeError("the test never released the held forward")

    async def wait_until_entered(self) -> None:
        if not await asyncio.to_thread(self.entered.wait, WAIT_S):
            raise TimeoutError("the engine never ran a forward")

    async def wait_until_held(self) -> None:
        if not await asyncio.to_thread(self._held.wait, WAIT_S):
            raise TimeoutError("the engine never reached the moment to hold")

    def release(self) -> None:
        self._released.set()

    def remove(self) -> None:
        if self._first_waits_for is not None:
            self._first_waits_for.set()
        self.release()
        self._handle.remove()


def moment(engine: GenerationEngine, name: str) -> Callable[[], bool]:
    """When to hold the engine: in the forward of the step that preempted the victim, or in a
    later one while the victim waits in the queue to resume."""
    if name == "in the preempting step":
        return lambda: engine.preemptions_total >= 1
    return lambda: engine.preemptions_total >= 1 and engine.waiting_requests >= 1


class Answers:
    """Every token a handle streamed, and each ending it got (result or error)."""

    def __init__(self, handle: GenerationHandle) -> None:
        self.ids: list[int] = []
        self.endings: list[GenerationResult | BaseException] = []
        handle.add_end_callback(lambda result, error: self.endings.append(result or error))  # type: ignore[arg-type]
        self._reading = asyncio.create_task(self._read(handle))

    async def _read(self, handle: GenerationHandle) -> None:
        async for delta in handle:
            self.ids += delta.token_ids

    async def ended(self) -> None:
        """Wait (bounded) for the stream's end; an error ending is in `endings`."""
        await asyncio.wait_for(asyncio.gather(self._reading, return_exceptions=True), 6 * WAIT_S)


async def start_two(
    make_engine: EngineFactory, when: str, **overrides: object
) -> tuple[GenerationEngine, HoldInForward, dict[str, Answers], dict[str, list[int]]]:
    """The urgent request and the victim on a tight pool, held at `when`; with the tokens
    generate() gives each."""
    model = build_tiny_llama()
    prompts = {"urgent": tokens(PROMPT, seed=90), "victim": tokens(PROMPT, seed=91)}
    new_tokens = {"urgent": URGENT_NEW, "victim": VICTIM_NEW}
    expected = {k: reference_ignoring_eos(model, prompts[k], new_tokens[k]) for k in prompts}
    engine = make_engine(
        model=model, num_slots=2, max_seq_len=PROMPT + URGENT_NEW, kv_block_size=BLOCK_SIZE,
        kv_cache_blocks=POOL_BLOCKS, timeout_s=TIMEOUT_S, **overrides,
    )  # fmt: skip
    hold = HoldInForward(model, moment(engine, when))
    answers = {}
    for priority, name in enumerate(prompts):  # the victim is the less urgent
        params = SamplingParams(new_tokens[name], ignore_eos=True)
        handle = await engine.submit(prompts[name], params, priority=priority)
        answers[name] = Answers(handle)
    await hold.wait_until_held()
    return engine, hold, answers, expected


WHEN = ["in the preempting step", "while it waits in the queue"]


@pytest.mark.parametrize("when", WHEN)
async def test_stop_drains_a_preempted_request_to_its_whole_output(
    when: str, make_engine: EngineFactory
) -> None:
    observer = RecordingObserver()
    engine, hold, answers, expected = await start_two(make_engine, when, observer=observer)
    try:
        stopping = asyncio.create_task(engine.stop(drain_timeout_s=6 * WAIT_S))
        await asyncio.sleep(0)  # let stop() flip the engine to draining
        hold.release()
        await asyncio.wait_for(stopping, 8 * WAIT_S)
    finally:
        hold.remove()
    assert engine.preemptions_total >= 1 and not engine.is_alive
    for name, answer in answers.items():
        await answer.ended()
        (ending,) = answer.endings  # answered exactly once
        assert isinstance(ending, GenerationResult), ending
        assert answer.ids == list(ending.token_ids) == expected[name]  # none lost or repeated
    assert [reason for reason, *_ in observer.finished] == ["length", "length"]
    assert engine.kv_blocks_used == 0


@pytest.mark.parametrize("when", WHEN)
async def test_a_preempted_request_is_interrupted_once_when_the_drain_deadline_passes(
    when: str, make_engine: EngineFactory
) -> None:
    observer = RecordingObserver()
    engine, hold, answers, expected = await start_two(make_engine, when, observer=observer)
    try:
        stopping = asyncio.create_task(engine.stop(drain_timeout_s=0.0))
        await asyncio.sleep(0)  # let stop() flip the engine to draining
        hold.release()
        await asyncio.wait_for(stopping, 8 * WAIT_S)
    finally:
        hold.remove()
    for name, answer in answers.items():
        await answer.ended()
        (ending,) = answer.endings  # answered exactly once
        assert isinstance(ending, RequestInterruptedError), ending  # it had started: not a 503
        assert answer.ids == expected[name][: len(answer.ids)]  # a prefix: none repeated
    assert answers["victim"].ids  # it was preempted after streaming tokens
    assert [reason for reason, *_ in observer.finished] == ["error", "error"]
    # Past the deadline the engine computes nothing more: the preempted request is not
    # resumed only to be interrupted.
    assert hold.forwards_after_release == 0


async def test_a_sequence_preempted_in_a_step_past_the_drain_deadline_is_not_resumed(
    make_engine: EngineFactory,
) -> None:
    """A row whose prefill this step completed may find no block for its first decode token:
    a sequence is then preempted while the step runs, and goes back to the queue only as the
    step ends, after the step's own deadline check. Past the drain deadline it is interrupted
    there (once), not resumed only to be failed: no forward runs after the stop."""
    model = build_tiny_llama()
    prompts = [tokens(16 * (1 + i % 2), seed=100 + i) for i in range(6)]
    expected = [reference_ignoring_eos(model, p, 30) for p in prompts]
    engine = make_engine(
        model=model, num_slots=4, max_seq_len=64, kv_cache_blocks=4, mixed_steps=False
    )
    queued = threading.Event()
    planner = engine._planner  # what this step preempted waits there until the step ends
    hold = HoldInForward(model, lambda: bool(planner.preempted), first_waits_for=queued)
    try:
        first = Answers(await engine.submit([5, 6, 7], SamplingParams(1)))
        await hold.wait_until_entered()  # its forward runs once the others are queued too
        params = SamplingParams(30, ignore_eos=True)
        answers = [Answers(await engine.submit(p, params)) for p in prompts]
        queued.set()
        await hold.wait_until_held()  # a sequence was preempted in this step's run
        stopping = asyncio.create_task(engine.stop(drain_timeout_s=0.0))
        await asyncio.sleep(0)  # let stop() flip the engine to draining
        hold.release()
        await asyncio.wait_for(stopping, 8 * WAIT_S)
        for answer in [first, *answers]:
            await answer.ended()
    finally:
        hold.remove()
    interrupted = 0
    for answer, tokens_expected in zip(answers, expected, strict=True):
        (ending,) = answer.endings  # answered exactly once
        assert answer.ids == tokens_expected[: len(answer.ids)]  # none lost or repeated
        if isinstance(ending, GenerationResult):
            assert answer.ids == tokens_expected
        elif answer.ids:
            assert isinstance(ending, RequestInterruptedError), ending
            interrupted += 1
        else:
            assert isinstance(ending, EngineStoppedError), ending
    assert interrupted >= 1 and engine.preemptions_total >= 1
    assert hold.forwards_after_release == 0


async def test_the_queue_timeout_does_not_end_a_preempted_request_that_had_started(
    make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REQUEST_TIMEOUT_S bounds the wait for admission; a preempted request was admitted and
    streamed tokens, so its timer (played here, while it waits to resume) must leave it be."""
    loop = asyncio.get_running_loop()
    timers: list[tuple[Callable[..., object], tuple[object, ...]]] = []
    real_call_later = loop.call_later

    def call_later(delay: float, callback: Callable[..., object], *args: object) -> Any:
        if delay == TIMEOUT_S:  # the engine's queue-timeout timer: the test fires it
            timers.append((callback, args))
            return real_call_later(3600.0, lambda: None)
        return real_call_later(delay, callback, *args)

    monkeypatch.setattr(loop, "call_later", call_later)
    engine, hold, answers, expected = await start_two(make_engine, WHEN[1])
    try:
        assert len(timers) == 2  # one per request
        for callback, args in timers:
            callback(*args)  # TIMEOUT_S has passed: the victim waits in the queue
        hold.release()
        for answer in answers.values():
            await answer.ended()
    finally:
        hold.remove()
    for name, answer in answers.items():
        (ending,) = answer.endings
        assert isinstance(ending, GenerationResult), ending
        assert answer.ids == list(ending.token_ids) == expected[name]
    assert engine.preemptions_total >= 1
