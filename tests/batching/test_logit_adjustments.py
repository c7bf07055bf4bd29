"""logit_bias, min_tokens and stop_token_ids per row: equal to transformers' own processors
(generate() with sequence_bias / min_new_tokens), and free for the rows beside them."""

from __future__ import annotations

import asyncio

import torch

from batching.generation.sampling import SamplingParams
from tests.batching.conftest import EOS_ID, WAIT_S
from tests.batching.test_engine_matches_generate import reference

PROMPTS = [[5, 6, 7, 8], [40, 41, 42], [9, 10, 11, 12, 13]]


def reference_with(model, prompt: list[int], new: int, **generate_kwargs) -> list[int]:
    with torch.inference_mode():
        output = model.generate(
            torch.tensor([prompt], device=model.device),
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=EOS_ID,
            pad_token_id=0,
            **generate_kwargs,
        )
    tokens: list[int] = output[0, len(prompt) :].tolist()
    return tokens[:-1] if tokens and tokens[-1] == EOS_ID else tokens


async def test_biased_rows_match_generate_and_leave_their_neighbours_alone(
    tiny_llama, make_engine
) -> None:
    engine = make_engine()
    plain_alone = reference(tiny_llama, PROMPTS[0], 10)
    favourite = plain_alone[1]  # a token the model finds plausible, so a small bias matters
    bias = ((favourite, 2.5), (plain_alone[0], -1.5))
    handles = [
        await engine.submit(PROMPTS[0], SamplingParams(10)),
        await engine.submit(PROMPTS[1], SamplingParams(10, logit_bias=bias)),
        await engine.submit(PROMPTS[2], SamplingParams(10, logit_bias=((favourite, 100.0),))),
    ]
    plain, biased, forced = [await asyncio.wait_for(h.wait(), WAIT_S) for h in handles]
    assert list(plain.token_ids) == plain_alone
    sequence_bias = {(token,): value for token, value in bias}
    assert list(biased.token_ids) == reference_with(
        tiny_llama, PROMPTS[1], 10, sequence_bias=sequence_bias
    )
    assert list(forced.token_ids) == [favourite] * 10


async def test_min_tokens_keeps_eos_and_stop_tokens_away_until_then(
    tiny_llama, make_engine
) -> None:
    engine = make_engine()
    to_eos = ((EOS_ID, 100.0),)
    eager = await (await engine.submit(PROMPTS[0], SamplingParams(8, logit_bias=to_eos))).wait()
    assert eager.token_ids == () and eager.finish_reason == "eos"
    held = SamplingParams(8, logit_bias=to_eos, min_tokens=3)
    result = await asyncio.wait_for((await engine.submit(PROMPTS[0], held)).wait(), WAIT_S)
    assert list(result.token_ids) == reference_with(
        tiny_llama, PROMPTS[0], 8, min_new_tokens=3, sequence_bias={(EOS_ID,): 100.0}
    )
    assert len(result.token_ids) == 3 and result.finish_reason == "eos"
    stop_token = reference(tiny_llama, PROMPTS[1], 4)[2]
    params = SamplingParams(8, logit_bias=((stop_token, 100.0),), stop_token_ids=(stop_token,))
    stopped = await (await engine.submit(PROMPTS[1], params)).wait()
    assert stopped.token_ids == () and stopped.finish_reason == "stop"
    late = SamplingParams(8, logit_bias=((stop_token, 100.0),), stop_token_ids=(stop_token,),
                          min_tokens=2)  # fmt: skip
    two = await (await engine.submit(PROMPTS[1], late)).wait()
    assert len(two.token_ids) == 2 and stop_token not in two.token_ids
    assert two.finish_reason == "stop"
