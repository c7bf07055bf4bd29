"""Work whose client is gone is dropped before it costs compute: queued streams, and the
siblings of a /predict/batch item that could not be queued."""

from __future__ import annotations

import asyncio
import threading

import pytest
from starlette.requests import Request

from batching.dynamic.collector import BatchCollector
from batching.generation.config import EngineConfig
from batching.generation.engine import GenerationEngine
from batching.generation.sampling import SamplingParams
from service.errors import ApiError
from service.generate.streaming import first_delta
from service.predict.service import submit_all
from tests.batching.conftest import (
    EOS_ID,
    WAIT_S,
    Gate,
    RecordingObserver,
    build_tiny_llama,
    build_tokenizer,
)

PROMPT = [5, 6, 7, 8]


def disconnected_request() -> Request:
    """A request whose client has already hung up (the body was read)."""

    async def receive() -> dict[str, str]:
        return {"type": "http.disconnect"}

    return Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)


async def test_a_queued_stream_whose_client_leaves_is_dropped_before_prefill() -> None:
    model = build_tiny_llama()
    gate = Gate(model)
    observer = RecordingObserver()
    engine = GenerationEngine(
        model,
        build_tokenizer(),
        EngineConfig(
            eos_token_ids=(EOS_ID,), num_slots=1, max_seq_len=64, max_queue=4, timeout_s=30.0
        ),
        observer=observer,
    )
    engine.start()
    try:
        gate.close()
        running = await engine.submit(PROMPT, SamplingParams(3, ignore_eos=True))
        await gate.wait_until_entered()  # it holds the only slot
        queued = await engine.submit(PROMPT, SamplingParams(3))
        with pytest.raises(ApiError) as caught:
            await asyncio.wait_for(first_delta(queued, disconnected_request()), WAIT_S)
        assert caught.value.status == 499
        gate.open()
        assert (await asyncio.wait_for(running.wait(), WAIT_S)).completion_tokens == 3
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while len(observer.finished) < 2:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        assert sorted(f[0] for f in observer.finished) == ["cancelled", "length"]
        assert len(observer.ttfts_s) == 1  # the one that left never got a first token
        assert engine.waiting_requests == 0
    finally:
        gate.remove()
        await engine.stop(drain_timeout_s=0.0)


async def test_a_batch_item_that_cannot_be_queued_takes_its_siblings_out_of_the_queue() -> None:
    started, release = threading.Event(), threading.Event()
    computed: list[list[str]] = []

    def run_batch(texts: list[str]) -> list[str]:
        started.set()
        release.wait(WAIT_S)
        computed.append(texts)
        return texts

    collector: BatchCollector[str, str] = BatchCollector(
        run_batch, max_batch_size=1, max_wait_ms=0, max_queue=2
    )
    collector.start()
    try:
        busy = asyncio.ensure_future(collector.submit("busy"))  # holds the worker
        await asyncio.to_thread(started.wait, WAIT_S)
        with pytest.raises(ApiError) as caught:
            await submit_all(collector, ["a", "b", "c", "d"], "req-1")
        assert caught.value.status == 503
        assert collector.queue_depth == 0  # "a" and "b" were queued, then withdrawn
        release.set()
        assert await asyncio.wait_for(busy, WAIT_S) == "busy"
        assert computed == [["busy"]]
    finally:
        release.set()
        await collector.stop(drain_timeout_s=WAIT_S)
