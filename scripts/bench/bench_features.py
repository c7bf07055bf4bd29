"""What logprobs and structured output cost the engine, when used and when not.

    python scripts/bench/bench_features.py [--repeats 5] [--streams 32] [--new-tokens 64]

One process, the bench LLM (22M-parameter Llama, bench_models/), the engine without HTTP,
`--streams` prompts of 16-32 tokens submitted at once, greedy. Variants, interleaved repeat
after repeat so that machine noise hits each alike (medians reported):

* plain: no logprobs, no grammar;
* logprobs: every stream asks for logprobs with 5 alternatives;
* schema-half: half the streams must write JSON of a schema (an array of 60 digits, so they
  produce about as many tokens as the others), the other half are plain; the plain half's
  tokens/s is reported separately: what a constrained neighbour costs an unconstrained row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: shared helpers

import torch
from engine_settings import build_engine
from make_bench_models import build_bench_models, generate_prompts
from transformers import AutoModelForCausalLM, AutoTokenizer

from batching.generation.engine import GenerationEngine
from batching.generation.grammar import CompiledGrammar, grammar_tokenizer, json_schema_grammar
from batching.generation.sampling import SamplingParams

DIGITS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}}
SCHEMA = DIGITS | {"minItems": 30, "maxItems": 30}  # "[d,d,...]": about 60 tokens


async def run(engine: GenerationEngine, prompts: list[list[int]], params: list[SamplingParams]):
    started = time.perf_counter()
    handles = [await engine.submit(p, q) for p, q in zip(prompts, params, strict=True)]
    results = [await h.wait() for h in handles]
    return results, time.perf_counter() - started


def tok_per_s(results: list[Any], seconds: float) -> float:
    return sum(r.completion_tokens for r in results) / seconds


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    paths = build_bench_models(args.models_dir)
    tokenizer = AutoTokenizer.from_pretrained(paths["llm"])
    model = AutoModelForCausalLM.from_pretrained(paths["llm"]).eval()
    vocab = model.get_output_embeddings().out_features
    grammars = grammar_tokenizer(tokenizer, vocab, [tokenizer.pad_token_id])
    engine = build_engine(
        model, tokenizer, eos_token_ids=[], num_slots=args.streams, max_seq_len=256,
        max_queue=args.streams, timeout_s=600.0, grammar_tokenizer=grammars,
    )  # fmt: skip
    engine.warm_up()
    engine.start()
    prompts = [tokenizer.encode(p) for p in generate_prompts(tokenizer, args.streams)]
    new = args.new_tokens
    grammar = CompiledGrammar(grammars, json_schema_grammar(SCHEMA))
    half = args.streams // 2
    variants = {
        "plain": [SamplingParams(new, ignore_eos=True)] * args.streams,
        "logprobs": [SamplingParams(new, ignore_eos=True, logprobs=5)] * args.streams,
        "schema-half": [SamplingParams(new, ignore_eos=True, grammar=grammar)] * half
        + [SamplingParams(new, ignore_eos=True)] * (args.streams - half),
    }
    figures: dict[str, list[float]] = {}
    for repeat in range(args.repeats):
        for name, params in variants.items():
            results, seconds = await run(engine, prompts, params)
            figures.setdefault(name, []).append(tok_per_s(results, seconds))
            if name == "schema-half":
                for result in results[:half]:
                    json.loads(result.text)  # constrained output must parse
                plain_half = results[half:]
                figures.setdefault("schema-half (plain rows)", []).append(
                    tok_per_s(plain_half, seconds)
                )
        print(f"repeat {repeat + 1} done", flush=True)
    await engine.stop(0.0)
    return {name: round(statistics.median(values), 1) for name, values in figures.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=Path("bench_models"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = asyncio.run(measure(args))
    for name, value in results.items():
        print(f"{name:28s} {value:8.1f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
