"""Stop strings end a generation through the engine; the stop string is never returned."""

from __future__ import annotations

from batching.generation.detokenizer import REPLACEMENT_CHAR
from batching.generation.sampling import SamplingParams
from tests.batching.conftest import EngineFactory

PROMPT = [40, 41, 42, 43, 44]


async def test_generation_stops_before_a_stop_string(make_engine: EngineFactory) -> None:
    engine = make_engine()
    free = await (await engine.submit(PROMPT, SamplingParams(40, ignore_eos=True))).wait()
    text = free.text
    # A stop string from the second half of the free-running output (random weights emit
    # stray bytes, decoded as U+FFFD: skip those).
    stop = next(
        text[i : i + 2]
        for i in range(len(text) // 2, len(text) - 1)
        if REPLACEMENT_CHAR not in text[i : i + 2]
    )
    cut = text.index(stop)

    handle = await engine.submit(PROMPT, SamplingParams(40, stop=(stop,), ignore_eos=True))
    pieces = [delta.text async for delta in handle]
    result = handle.result
    assert result.finish_reason == "stop"
    assert result.text == "".join(pieces) == text[:cut]
    assert stop not in "".join(pieces)
    assert result.token_ids == free.token_ids[: result.completion_tokens]
