"""Logprobs (of sampled and of prompt tokens) and grammar-constrained output in the engine."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
import torch

from batching.errors import InvalidInputError
from batching.generation.grammar import CompiledGrammar, grammar_tokenizer, json_schema_grammar
from batching.generation.sampling import SamplingParams
from tests.batching.conftest import EOS_ID, VOCAB_SIZE, WAIT_S
from tests.batching.test_engine_matches_generate import reference

PROMPT = [5, 6, 7, 8, 9, 10]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "count", "ok"],
    "additionalProperties": False,
}


def direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's own logits at every position of ids: [len, V]."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids], device=model.device)).logits[0]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


async def test_sampled_tokens_carry_the_models_own_logprobs(tiny_llama, make_engine) -> None:
    engine = make_engine()
    plain = await (await engine.submit(PROMPT, SamplingParams(8, ignore_eos=True))).wait()
    handles = [
        await engine.submit(PROMPT, SamplingParams(8, ignore_eos=True, logprobs=3)),
        await engine.submit([40, 41, 42], SamplingParams(8, ignore_eos=True)),
    ]
    with_logprobs, _ = [await asyncio.wait_for(h.wait(), WAIT_S) for h in handles]
    assert with_logprobs.token_ids == plain.token_ids  # asking for logprobs changes nothing
    expected = direct_logprobs(tiny_llama, PROMPT + list(plain.token_ids))
    for step, entry in enumerate(with_logprobs.logprobs):
        row = expected[len(PROMPT) - 1 + step]
        assert entry.token_id == plain.token_ids[step]
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-4)
        assert [t for t, _ in entry.top] == row.topk(3).indices.tolist()
    assert plain.logprobs == ()


@pytest.mark.parametrize("chunk_tokens", [256, 16], ids=["one-forward", "chunked"])
async def test_prompt_logprobs_equal_a_direct_forward_and_max_tokens_zero_scores_only(
    chunk_tokens: int, tiny_llama, make_engine
) -> None:
    engine = make_engine(prefill_chunk_tokens=chunk_tokens, prefix_cache_tokens=256)
    runner_up = await engine.submit([3, 4], SamplingParams(30, ignore_eos=True))
    await anext(runner_up)  # something decodes, so a 16-token budget really chunks
    prompt = torch.randint(3, VOCAB_SIZE, (45,), generator=torch.Generator().manual_seed(3))
    ids = prompt.tolist()
    params = SamplingParams(0, prompt_logprobs=2)
    for _ in range(2):  # the second time its blocks are cached: they must not be skipped
        result = await asyncio.wait_for((await engine.submit(ids, params)).wait(), WAIT_S)
        assert result.completion_tokens == 0 and result.finish_reason == "length"
        assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == len(ids)
        expected = direct_logprobs(tiny_llama, ids)
        for position, entry in enumerate(result.prompt_logprobs[1:], start=1):
            assert entry is not None and entry.token_id == ids[position]
            assert entry.logprob == pytest.approx(
                float(expected[position - 1, ids[position]]), abs=1e-4
            )
            assert len(entry.top) == 2
    await runner_up.wait()


def compiled(tokenizer, schema):
    """Compiled here, in the test's thread: the service compiles in grammar.py (GrammarCompiler)."""
    return CompiledGrammar(
        grammar_tokenizer(tokenizer, VOCAB_SIZE, [EOS_ID]), json_schema_grammar(schema)
    )


def json_engine(make_engine, tokenizer, **options):
    return make_engine(
        grammar_tokenizer=grammar_tokenizer(tokenizer, VOCAB_SIZE, [EOS_ID]),
        num_slots=8,
        max_seq_len=160,
        **options,
    )


async def test_every_sampled_output_under_a_json_schema_parses_and_validates(
    make_engine, tokenizer
) -> None:
    engine = json_engine(make_engine, tokenizer)
    grammar = compiled(tokenizer, SCHEMA)
    params = [SamplingParams(120, temperature=1.0, seed=s, grammar=grammar) for s in range(50)]
    handles = [await engine.submit(PROMPT, p) for p in params]
    results = await asyncio.wait_for(asyncio.gather(*(h.wait() for h in handles)), WAIT_S * 3)
    for result in results:
        assert result.finish_reason in ("stop", "eos"), result.text
        jsonschema.validate(json.loads(result.text), SCHEMA)


async def test_a_constrained_row_leaves_its_unconstrained_neighbours_unchanged(
    tiny_llama, make_engine, tokenizer
) -> None:
    engine = json_engine(make_engine, tokenizer)
    prompts = [[11, 12, 13], [20, 21, 22, 23], [30, 31]]
    grammar = compiled(tokenizer, SCHEMA)
    constrained = await engine.submit(PROMPT, SamplingParams(60, grammar=grammar))
    free = [await engine.submit(p, SamplingParams(10)) for p in prompts]
    for prompt, handle in zip(prompts, free, strict=True):
        assert list((await handle.wait()).token_ids) == reference(tiny_llama, prompt, 10)
    jsonschema.validate(json.loads((await constrained.wait()).text), SCHEMA)


def test_an_invalid_schema_does_not_compile(tokenizer) -> None:
    with pytest.raises(InvalidInputError, match="nonsense"):
        compiled(tokenizer, {"type": "nonsense"})


async def test_the_engine_refuses_a_grammar_that_was_not_compiled(make_engine, tokenizer) -> None:
    engine = json_engine(make_engine, tokenizer)
    with pytest.raises(InvalidInputError, match="compiled"):
        await engine.submit(PROMPT, SamplingParams(4, grammar=json_schema_grammar(SCHEMA)))  # type: ignore[arg-type]


async def test_n_choices_share_one_prefill_and_each_samples_as_it_would_alone(
    tiny_llama, make_engine
) -> None:
    engine = make_engine(num_slots=4)
    prefills: list[int] = []
    hook = tiny_llama.register_forward_pre_hook(
        lambda m, a, k: prefills.append(1) if k["input_ids"].shape[1] > 1 else None,
        with_kwargs=True,
    )
    try:
        greedy = await engine.submit_choices(PROMPT, [SamplingParams(10)] * 3)
        sampled = await engine.submit_choices(
            [40, 41, 42, 43],
            [SamplingParams(10, temperature=1.0, seed=s, ignore_eos=True) for s in (7, 8)],
        )
        greedy_results = [await asyncio.wait_for(h.wait(), WAIT_S) for h in greedy]
        sampled_results = [await asyncio.wait_for(h.wait(), WAIT_S) for h in sampled]
    finally:
        hook.remove()
    assert len(prefills) <= 2  # one prefill per prompt, not per choice (maybe both in one)
    expected = reference(tiny_llama, PROMPT, 10)
    assert [list(r.token_ids) for r in greedy_results] == [expected] * 3
    for seed, result in zip((7, 8), sampled_results, strict=True):
        params = SamplingParams(10, temperature=1.0, seed=seed, ignore_eos=True)
        alone = await (await engine.submit([40, 41, 42, 43], params)).wait()
        assert result.token_ids == alone.token_ids
    assert engine.slots_in_use == 0
    with pytest.raises(InvalidInputError, match="choices"):
        await engine.submit_choices(PROMPT, [SamplingParams(4)] * 5)


async def test_choices_of_a_prompt_prefilled_in_chunks_equal_generate(tiny_llama, make_engine):
    engine = make_engine(num_slots=4, max_seq_len=128, prefill_chunk_tokens=16)
    stream = await engine.submit([3, 4, 5], SamplingParams(40, ignore_eos=True))
    await anext(stream)  # it decodes, so the long prompt is prefilled in chunks
    prompt = torch.randint(3, VOCAB_SIZE, (50,), generator=torch.Generator().manual_seed(9))
    handles = await engine.submit_choices(prompt.tolist(), [SamplingParams(8)] * 2)
    expected = reference(tiny_llama, prompt.tolist(), 8)
    for handle in handles:
        assert list((await asyncio.wait_for(handle.wait(), WAIT_S)).token_ids) == expected
    await stream.wait()
