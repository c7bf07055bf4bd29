"""Admission counts requests about to take free slots as admitted, and a queued request's
timeout holds even while one engine step runs long (and its timer ends with the request)."""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import pytest

from batching.errors import QueueTimeoutError
from batching.generation.request import Request
from batching.generation.sampling import SamplingParams
from tests.batching.conftest import WAIT_S, EngineFactory
from tests.batching.test_prefix_and_chunked_prefill import forward_pre_hook


class StepGate:
    """Holds the engine thread inside its next forward until opened."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def __call__(self, *_: object) -> None:
        self.entered.set()
        self.opened.wait(WAIT_S * 3)


async def test_a_burst_of_free_slots_plus_queue_requests_is_all_accepted(
    tiny_llama, make_engine: EngineFactory
) -> None:
    engine = make_engine(num_slots=3, max_queue=2)
    gate = StepGate()
    with forward_pre_hook(tiny_llama, gate):
        running = await engine.submit([5, 6, 7], SamplingParams(3))
        await asyncio.to_thread(gate.entered.wait, WAIT_S)  # 1 slot busy, 2 free, none queued
        burst = [await engine.submit([10 + i, 11], SamplingParams(2)) for i in range(2 + 2)]
        gate.opened.set()
    results = await asyncio.wait_for(asyncio.gather(*(h.wait() for h in [running, *burst])), WAIT_S)
    assert all(r.completion_tokens >= 1 for r in results)


async def test_a_queued_request_times_out_on_time_while_a_step_runs_long(
    tiny_llama, make_engine: EngineFactory
) -> None:
    engine = make_engine(num_slots=1, timeout_s=0.2)
    gate = StepGate()
    with forward_pre_hook(tiny_llama, gate):
        running = await engine.submit([5, 6, 7], SamplingParams(3))
        await asyncio.to_thread(gate.entered.wait, WAIT_S)  # the engine is inside a step
        queued = await engine.submit([8, 9], SamplingParams(2))
        with pytest.raises(QueueTimeoutError):
            await asyncio.wait_for(queued.wait(), WAIT_S)
        assert not gate.opened.is_set()  # answered while the step still ran
        gate.opened.set()
    assert (await asyncio.wait_for(running.wait(), WAIT_S)).completion_tokens >= 1
    assert engine.waiting_requests == 0


async def test_a_finished_request_is_not_kept_alive_by_its_queue_timer(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(num_slots=1, timeout_s=3600.0)  # a timer that would outlive the test
    handle = await engine.submit([5, 6, 7], SamplingParams(2))
    await asyncio.wait_for(handle.wait(), WAIT_S)

    def still_held() -> bool:
        gc.collect()
        return any(isinstance(o, Request) and o.handle is handle for o in gc.get_objects())

    deadline_s = time.monotonic() + WAIT_S  # the engine thread may still end its step
    while still_held() and time.monotonic() < deadline_s:
        await asyncio.sleep(0.05)
    assert not still_held()
