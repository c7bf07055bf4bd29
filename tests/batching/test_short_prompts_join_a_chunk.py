"""Short prompts that arrive while a long prompt is prefilled in chunks join its steps (issue
21): they get their first token before the long prompt's prefill is done, and every output is
still generate()'s. Ordered by the engine's steps, not by time."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from batching.generation.sampling import SamplingParams
from tests.batching.conftest import WAIT_S, EngineFactory, Gate
from tests.batching.test_chunk_sizing import LIMITS, start_stream
from tests.batching.test_engine_matches_generate import reference
from tests.batching.test_prefix_and_chunked_prefill import tokens


class ChunkSteps:
    """The prompt tokens each prefilling forward of an engine ran, one list per step, from
    the runner's mixed steps (or, with them off, its prefill forwards). After the first such
    forward it closes `gate`, so the engine is held in its next forward while a test submits."""

    def __init__(self, engine: Any, gate: Gate, mixed: bool) -> None:
        self.steps: list[list[int]] = []
        self.first_done = threading.Event()
        runner = engine._runner
        name = "mixed_step" if mixed else "prefill"
        original = getattr(runner, name)

        def recorded(*args: Any, **kwargs: Any) -> Any:
            chunks = args[5] if mixed else args[1]
            self.steps.append([len(chunk) for chunk in chunks])
            result = original(*args, **kwargs)
            if len(self.steps) == 1:
                gate.close()
                self.first_done.set()
            return result

        setattr(runner, name, recorded)


@pytest.mark.parametrize(
    ("mixed", "expected"),
    [
        # Held in the second step's forward (planned before they came), they join the third:
        # 3 x 8 of the 64 padded tokens leave the chunk 32 x 40/64 = 20 of its busy 32.
        (True, [[16], [16], [20, 8, 8, 8], [16], [16], [16]]),
        # The held forward is the first step's decode, so they join the very next step, as
        # one padded prefill forward [4, 8]: the chunk is cut to the short prompts' 8.
        (False, [[16], [8, 8, 8, 8], [16], [16], [16], [16], [12]]),
    ],
    ids=["mixed", "separate-forwards"],
)
async def test_short_prompts_arriving_during_a_long_prefill_start_before_it_ends(
    make_engine: EngineFactory, gated_llama: Any, mixed: bool, expected: list[list[int]]
) -> None:
    model, gate = gated_llama
    engine = make_engine(
        model=model, num_slots=8, max_seq_len=128, prefill_chunk_tokens=LIMITS,
        kv_bucket_min=16, mixed_steps=mixed,
    )  # fmt: skip
    stream = await start_stream(engine)  # every prefill rides beside its decode
    steps = ChunkSteps(engine, gate, mixed)
    long_prompt = tokens(100, seed=70)
    long_handle = await engine.submit(long_prompt, SamplingParams(4))
    await asyncio.to_thread(steps.first_done.wait, WAIT_S)  # its first chunk is in
    await gate.wait_until_entered()  # the engine is held in its next forward
    shorts = [tokens(8, seed=71 + i) for i in range(3)]
    handles = [await engine.submit(prompt, SamplingParams(4)) for prompt in shorts]
    gate.open()

    for prompt, handle in zip(shorts, handles, strict=True):
        result = await asyncio.wait_for(handle.wait(), WAIT_S)
        assert list(result.token_ids) == reference(model, prompt, 4)
    result = await asyncio.wait_for(long_handle.wait(), WAIT_S)
    assert list(result.token_ids) == reference(model, long_prompt, 4)
    # The step after the held one carries the next chunk and all three short prompts, whole
    # (their first tokens come from it); the long prompt still has chunks to go after it.
    assert steps.steps == expected
    joined = expected.index(next(s for s in expected if len(s) > 1))
    assert sum(map(sum, (s[:1] for s in expected[: joined + 1]))) < len(long_prompt)
    await asyncio.wait_for(stream.wait(), WAIT_S)
