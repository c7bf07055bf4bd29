"""Will the server serve this model, and exactly? One command, on your own machine:

    python scripts/check_model.py MODEL [--max-seq-len N] [--prompts FILE] [--max-new-tokens N]

MODEL is a hub id or a folder. The model is loaded with the service's own loading code (the same
ATTN_IMPLEMENTATION, DEVICE and QUANTIZATION settings, from the environment or .env) and put
through what the server does at start-up: the refusals of batching/generation/model_support.py,
then the warm-up checks of every engine path against the model's own forward (model_support.py).
If it is served, a few prompts (or the lines of --prompts) run through the engine together,
staggered, and each output is compared token for token with generate() on that prompt alone.

Prints one verdict line and exits with its code:
    SERVED ...   0   equal to generate() on every prompt (how: attention kernels, layer kinds,
                     mixed steps on or off and why)
    REFUSED ...  1   the server would stop at start-up with this reason
    DIFFERENT .. 2   served, but some output differs from generate() (expected only in half
                     precision on a GPU, where batch shapes change rounding; report it otherwise)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import cast

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo: service/, batching/

from batching.generation.config import EngineConfig
from batching.generation.detokenizer import Tokenizer
from batching.generation.engine import GenerationEngine
from batching.generation.model_support import UnsupportedModelError
from batching.generation.sampling import SamplingParams
from service.generate.service import eos_token_ids
from service.models import LoadedModel, attn_implementation_of, load_generate_model
from service.settings import Settings

PROMPTS = [
    "The quick brown fox",
    "Continuous batching lets requests join and leave the running batch at every step, so",
    "Q: What is the capital of France?\nA:",
    "def fibonacci(n):",
]
SLOTS = 3  # fewer than the prompts: slots are reused, later prompts join running ones
CHUNK_TOKENS = 16  # small prefill chunks, so longer prompts are prefilled in pieces


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="hub id or local folder")
    parser.add_argument("--max-seq-len", type=int, default=512, help="GENERATE_MAX_SEQ_LEN")
    parser.add_argument("--prompts", type=Path, help="a file with one prompt per line")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    prompts = args.prompts.read_text().splitlines() if args.prompts else PROMPTS
    settings = Settings(
        generate_model=args.model, predict_model="", generate_max_seq_len=args.max_seq_len
    )
    try:
        loaded = load_generate_model(settings)
        engine = make_engine(loaded, args.max_seq_len)
    except UnsupportedModelError as exc:
        print(f"REFUSED {args.model}: {exc}")
        return 1
    return asyncio.run(compare(loaded, engine, prompts, args.max_new_tokens))


def make_engine(loaded: LoadedModel, max_seq_len: int) -> GenerationEngine:
    engine = GenerationEngine(
        loaded.model,
        cast(Tokenizer, loaded.tokenizer),
        EngineConfig(
            eos_token_ids=tuple(eos_token_ids(loaded)),
            num_slots=SLOTS,
            max_seq_len=max_seq_len,
            max_queue=64,
            timeout_s=600.0,
            prefill_chunk_tokens=CHUNK_TOKENS,
        ),
    )
    engine.warm_up()  # the path checks: UnsupportedModelError if a path differs
    return engine


async def compare(
    loaded: LoadedModel, engine: GenerationEngine, prompts: list[str], max_new_tokens: int
) -> int:
    engine.start()
    try:
        encoded = [loaded.tokenizer.encode(p) for p in prompts]
        handles = []
        for index, ids in enumerate(encoded):
            handles.append(await engine.submit(ids, SamplingParams(max_new_tokens=max_new_tokens)))
            if index % 2:  # staggered: the next ones join a running batch
                await anext(handles[-1], None)
        outputs = [list((await h.wait()).token_ids) for h in handles]
    finally:
        await engine.stop(drain_timeout_s=0.0)
    eos = eos_token_ids(loaded)
    different = [
        i
        for i, (ids, out) in enumerate(zip(encoded, outputs, strict=True))
        if out != reference(loaded, ids, max_new_tokens, eos)
    ]
    mixed = "on" if engine.mixed_steps else f"off ({engine.mixed_steps_off_reason})"
    how = (
        f"attention {attn_implementation_of(loaded.model)}, layers {engine.attention_layout}, "
        f"mixed steps {mixed}, {loaded.device} {str(loaded.dtype).removeprefix('torch.')}"
    )
    if different:
        print(
            f"DIFFERENT {loaded.name}: {len(different)} of {len(prompts)} prompts differ from "
            f"generate() (prompts {different}); {how}"
        )
        return 2
    print(f"SERVED {loaded.name}: equal to generate() on {len(prompts)} prompts; {how}")
    return 0


def reference(
    loaded: LoadedModel, ids: list[int], max_new_tokens: int, eos: list[int]
) -> list[int]:
    """generate() on one prompt alone, greedy; the engine's output has no EOS token."""
    with torch.inference_mode():
        output = loaded.model.generate(  # type: ignore[operator]
            torch.tensor([ids], device=loaded.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
    tokens: list[int] = output[0, len(ids) :].tolist()
    return tokens[:-1] if tokens and tokens[-1] in eos else tokens


if __name__ == "__main__":
    sys.exit(main())
