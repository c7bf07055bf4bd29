"""Failures: a model step that raises, a dying loop, refused and timed-out requests, stopping."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from transformers import LlamaForCausalLM

from batching.errors import (
    EngineStoppedError,
    InvalidInputError,
    ModelExecutionError,
    PromptTooLongError,
    QueueFullError,
    QueueTimeoutError,
    RequestInterruptedError,
)
from batching.generation.config import EngineConfig
from batching.generation.detokenizer import PROMPT_CONTEXT_TOKENS
from batching.generation.engine import GenerationEngine
from batching.generation.sampling import SamplingParams
from tests.batching.conftest import WAIT_S, EngineFactory, Gate, RecordingObserver

PROMPT = [5, 6, 7, 8]


async def test_a_failing_decode_step_fails_only_its_requests(
    gated_llama: tuple[LlamaForCausalLM, Gate], make_engine: EngineFactory
) -> None:
    model, gate = gated_llama
    observer = RecordingObserver()
    engine = make_engine(model=model, num_slots=1, observer=observer)
    running = await engine.submit(PROMPT, SamplingParams(50, ignore_eos=True))
    await anext(running)
    waiting = await engine.submit(PROMPT, SamplingParams(5, ignore_eos=True))
    gate.failures_left = 1  # the running request's next decode raises
    with pytest.raises(ModelExecutionError):
        await asyncio.wait_for(running.wait(), WAIT_S)
    assert (await asyncio.wait_for(waiting.wait(), WAIT_S)).completion_tokens == 5
    assert engine.is_alive
    assert engine.slots_in_use == 0
    assert [f[0] for f in observer.finished] == ["error", "length"]


async def test_a_failing_prefill_fails_its_request_and_the_next_one_succeeds(
    gated_llama: tuple[LlamaForCausalLM, Gate], make_engine: EngineFactory
) -> None:
    model, gate = gated_llama
    engine = make_engine(model=model)
    gate.failures_left = 1
    with pytest.raises(ModelExecutionError):
        await (await engine.submit(PROMPT, SamplingParams(5))).wait()
    result = await (await engine.submit(PROMPT, SamplingParams(5, ignore_eos=True))).wait()
    assert result.completion_tokens == 5
    assert engine.is_alive
    assert engine.slots_in_use == 0


class ExplodingObserver(RecordingObserver):
    def on_step(self, batch_size: int) -> None:
        raise RuntimeError("a bug outside the model step, secret=/srv/weights")


async def test_a_dead_loop_is_reported_and_refuses_requests(make_engine: EngineFactory) -> None:
    engine = make_engine(observer=ExplodingObserver())
    with pytest.raises(EngineStoppedError) as caught:
        await (await engine.submit(PROMPT, SamplingParams(5))).wait()
    assert "secret" not in str(caught.value)  # the cause goes to the log, not to callers
    assert not engine.is_alive
    with pytest.raises(EngineStoppedError):
        await engine.submit(PROMPT, SamplingParams(5))


class ObserverFailingWhileAdmitting(RecordingObserver):
    """Raises from inside a step's plan once armed: after the step has freed an ended row and
    dropped a cancelled waiting request, while it admits the next one."""

    armed = False

    def on_prefix_cache_query(self, prompt_tokens: int, hit_tokens: int) -> None:
        if self.armed:
            raise RuntimeError("a bug while admitting")
        super().on_prefix_cache_query(prompt_tokens, hit_tokens)


async def test_a_loop_that_dies_while_planning_still_answers_every_request_it_took(
    make_engine: EngineFactory,
) -> None:
    observer = ObserverFailingWhileAdmitting()
    engine = make_engine(num_slots=1, prefix_cache_tokens=64, observer=observer)
    running = await engine.submit(PROMPT, SamplingParams(50, ignore_eos=True))
    await anext(running)
    dropped = await engine.submit([9, 10, 11], SamplingParams(5))
    admitted = await engine.submit([12, 13, 14], SamplingParams(5))
    observer.armed = True
    # Both cancelled at once, between two plans (the engine's lock held): the next plan drops
    # the waiting one from the queue (it is answered only once the plan is made) and, with
    # the running row freed, dies admitting the third.
    with engine._cond:
        dropped.cancel()
        running.cancel()
    with pytest.raises(EngineStoppedError):
        await asyncio.wait_for(dropped.wait(), WAIT_S)
    for handle in (running, admitted):  # ended in the last run, or taken by the dying plan
        with contextlib.suppress(RequestInterruptedError, EngineStoppedError):
            await asyncio.wait_for(handle.wait(), WAIT_S)
    assert not engine.is_alive
    assert len(observer.finished) == 3  # each answered once


async def test_a_full_queue_is_refused_at_once(
    gated_llama: tuple[LlamaForCausalLM, Gate], make_engine: EngineFactory
) -> None:
    model, gate = gated_llama
    engine = make_engine(model=model, num_slots=1, max_queue=2)
    gate.close()
    handles = [await engine.submit(PROMPT, SamplingParams(3, ignore_eos=True))]
    await gate.wait_until_entered()  # the first one holds the only slot
    handles += [await engine.submit(PROMPT, SamplingParams(3, ignore_eos=True)) for _ in range(2)]
    assert engine.waiting_requests == 2
    with pytest.raises(QueueFullError):
        await engine.submit(PROMPT, SamplingParams(3))
    gate.open()
    results = await asyncio.wait_for(asyncio.gather(*(h.wait() for h in handles)), WAIT_S)
    assert [r.completion_tokens for r in results] == [3, 3, 3]


async def test_a_too_long_prompt_is_refused_with_the_numbers(make_engine: EngineFactory) -> None:
    engine = make_engine(max_seq_len=64)
    with pytest.raises(PromptTooLongError) as caught:
        await engine.submit(list(range(3, 63)), SamplingParams(max_new_tokens=10))
    error = caught.value
    assert (error.prompt_tokens, error.max_new_tokens, error.max_seq_len) == (60, 10, 64)
    assert "70" in str(error) and "64" in str(error)


@pytest.mark.parametrize("prompt", [[], [5, -1], [5, 10_000]], ids=["empty", "negative", "big"])
async def test_invalid_token_ids_are_refused(prompt: list[int], make_engine: EngineFactory) -> None:
    engine = make_engine()
    with pytest.raises(InvalidInputError):
        await engine.submit(prompt, SamplingParams(4))


async def test_a_request_waiting_past_the_timeout_fails_without_compute(
    gated_llama: tuple[LlamaForCausalLM, Gate], make_engine: EngineFactory
) -> None:
    model, gate = gated_llama
    observer = RecordingObserver()
    engine = make_engine(model=model, num_slots=1, timeout_s=0.05, observer=observer)
    gate.close()
    running = await engine.submit(PROMPT, SamplingParams(3, ignore_eos=True))
    await gate.wait_until_entered()
    late = await engine.submit(PROMPT, SamplingParams(3))
    await asyncio.sleep(0.1)  # longer than timeout_s while the only slot is busy
    gate.open()
    with pytest.raises(QueueTimeoutError) as caught:
        await asyncio.wait_for(late.wait(), WAIT_S)
    assert caught.value.waited_s > 0.05
    assert (await running.wait()).completion_tokens == 3
    assert len(observer.ttfts_s) == 1  # the late request was never prefilled


async def test_stop_lets_running_requests_finish_and_fails_waiting_ones(
    gated_llama: tuple[LlamaForCausalLM, Gate], make_engine: EngineFactory
) -> None:
    model, gate = gated_llama
    engine = make_engine(model=model, num_slots=1)
    gate.close()
    running = await engine.submit(PROMPT, SamplingParams(6, ignore_eos=True))
    await gate.wait_until_entered()
    waiting = await engine.submit(PROMPT, SamplingParams(6))
    stopping = asyncio.create_task(engine.stop(drain_timeout_s=WAIT_S))
    await asyncio.sleep(0)  # let stop() flip the engine to draining
    gate.open()
    await asyncio.wait_for(stopping, WAIT_S + 10)
    assert (await running.wait()).finish_reason == "length"
    with pytest.raises(EngineStoppedError) as never_started:
        await waiting.wait()
    assert not isinstance(never_started.value, RequestInterruptedError)  # HTTP 503, retryable
    assert not engine.is_alive
    with pytest.raises(EngineStoppedError):
        await engine.submit(PROMPT, SamplingParams(4))


async def test_stop_fails_running_requests_after_the_drain_timeout(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(max_seq_len=256)
    running = await engine.submit(PROMPT, SamplingParams(240, ignore_eos=True))
    await anext(running)
    await engine.stop(drain_timeout_s=0.0)
    with pytest.raises(RequestInterruptedError):  # work had started: HTTP 500, not 503
        await running.wait()
    assert engine.slots_in_use == 0


async def test_warm_up_runs_before_start_and_submit_needs_start(
    tiny_llama: LlamaForCausalLM, make_engine: EngineFactory, tokenizer: object
) -> None:
    engine = GenerationEngine(
        tiny_llama,
        tokenizer,  # type: ignore[arg-type]
        EngineConfig(eos_token_ids=(2,), num_slots=3, max_seq_len=32, max_queue=4, timeout_s=1.0),
    )
    engine.warm_up()
    with pytest.raises(EngineStoppedError):
        await engine.submit(PROMPT, SamplingParams(4))
    # K,V x layers x (3 rows x 2 blocks of 16 tokens, + the spare block padded rows write to)
    # x block size x KV heads x head size x 4 bytes
    assert engine.kv_cache_bytes == 2 * 2 * (3 * 2 + 1) * 16 * 2 * 16 * 4
    started = make_engine()
    with pytest.raises(RuntimeError):
        started.warm_up()


POISON = 77  # a token id the poisoned tokenizer refuses to decode


class PoisonedTokenizer:
    """Decodes like `inner`, but raises on any window of at least `min_ids` ids that holds
    POISON: with min_ids=1 a request's set-up fails (its detokenizer decodes the prompt's
    tail), with min_ids above that tail only its first accepted token does."""

    def __init__(self, inner: Any, min_ids: int) -> None:
        self.inner = inner
        self.min_ids = min_ids

    def decode(self, token_ids: list[int], **kwargs: Any) -> str:
        if POISON in token_ids and len(token_ids) >= self.min_ids:
            raise ValueError("the tokenizer choked")
        text: str = self.inner.decode(token_ids, **kwargs)
        return text


@pytest.mark.parametrize(
    "min_ids", [1, PROMPT_CONTEXT_TOKENS + 1], ids=["at-admission", "at-first-token"]
)
async def test_a_request_the_tokenizer_chokes_on_fails_alone_and_is_answered(
    min_ids: int, make_engine: EngineFactory, tokenizer: Any
) -> None:
    observer = RecordingObserver()
    engine = make_engine(tokenizer=PoisonedTokenizer(tokenizer, min_ids), observer=observer)
    params = SamplingParams(6, ignore_eos=True)
    # Submitted together, so they share one prefill: only the poisoned one may fail.
    handles = [
        await engine.submit(prompt, params) for prompt in (PROMPT, [*PROMPT, POISON], PROMPT)
    ]
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(h.wait() for h in handles), return_exceptions=True), WAIT_S
    )
    assert isinstance(outcomes[1], ModelExecutionError)
    assert [o.completion_tokens for o in (outcomes[0], outcomes[2])] == [6, 6]  # type: ignore[union-attr]
    assert engine.is_alive
    assert engine.slots_in_use == 0
    assert sorted(f[0] for f in observer.finished) == ["error", "length", "length"]
    after = await (await engine.submit(PROMPT, params)).wait()
    assert after.completion_tokens == 6


async def test_a_step_that_hangs_shows_in_step_running_s(
    gated_llama: tuple[LlamaForCausalLM, Gate], make_engine: EngineFactory
) -> None:
    model, gate = gated_llama
    engine = make_engine(model=model)
    assert engine.step_running_s == 0.0
    gate.close()
    handle = await engine.submit(PROMPT, SamplingParams(3, ignore_eos=True))
    await gate.wait_until_entered()
    await asyncio.sleep(0.05)
    assert engine.step_running_s >= 0.05
    gate.open()
    await asyncio.wait_for(handle.wait(), WAIT_S)
    await asyncio.sleep(0.01)  # the step that delivered the result has returned by now
    assert engine.step_running_s == 0.0


async def test_an_urgent_request_is_admitted_next_and_pushes_out_the_least_urgent_when_full(
    gated_llama: tuple[LlamaForCausalLM, Gate], make_engine: EngineFactory
) -> None:
    model, gate = gated_llama
    observer = RecordingObserver()
    engine = make_engine(model=model, num_slots=1, max_queue=3, observer=observer)
    gate.close()
    running = await engine.submit(PROMPT, SamplingParams(2, ignore_eos=True))
    await gate.wait_until_entered()  # it holds the only slot
    batch = [
        await engine.submit(PROMPT, SamplingParams(2, ignore_eos=True), priority=10)
        for _ in range(3)
    ]
    urgent = await engine.submit(PROMPT, SamplingParams(2, ignore_eos=True), priority=0)
    gate.open()
    order: list[str] = []

    async def finish(name: str, handle) -> None:
        try:
            await asyncio.wait_for(handle.wait(), WAIT_S)
            order.append(name)
        except QueueFullError:
            order.append(f"{name}: refused")

    await asyncio.gather(
        finish("running", running),
        finish("urgent", urgent),
        *(finish(f"batch-{i}", h) for i, h in enumerate(batch)),
    )
    # The queue held 3: the urgent one took the place of the last-come batch request, and
    # went first once the slot was free; the other two batch requests keep their order.
    assert order.index("urgent") < order.index("batch-0") < order.index("batch-1")
    assert "batch-2: refused" in order
    with pytest.raises(InvalidInputError, match="priority"):
        await engine.submit(PROMPT, SamplingParams(2), priority=1000)
