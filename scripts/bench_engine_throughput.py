"""Decode throughput: GenerationEngine with N concurrent sequences vs generate() one at a time.

    python scripts/bench_engine_throughput.py [--concurrency 32] [--new-tokens 64] [--device cpu]

A ~22M-parameter random Llama (hidden 512, 6 layers, 8 heads, 4 KV heads, vocab 8192), greedy,
ignore_eos so every request decodes exactly --new-tokens tokens. Prints tokens/s for both.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from batching.engine import GenerationEngine
from batching.sampling import SamplingParams


class _NoText:
    """Detokenization is not what is measured here."""

    def decode(self, token_ids: list[int], **_: object) -> str:
        return ""


def build_model(device: str, dtype: torch.dtype, attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def prompts(count: int, length: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, 8192, (length,), generator=generator).tolist() for _ in range(count)]


def bench_generate(model: LlamaForCausalLM, batch: list[list[int]], new_tokens: int) -> float:
    device = model.device
    started = time.perf_counter()
    with torch.inference_mode():
        for prompt in batch:
            model.generate(
                torch.tensor([prompt], device=device),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
    return len(batch) * new_tokens / (time.perf_counter() - started)


async def bench_engine(
    model: LlamaForCausalLM, batch: list[list[int]], new_tokens: int, slots: int
) -> float:
    engine = GenerationEngine(
        model,
        _NoText(),
        eos_token_ids=[2],
        num_slots=slots,
        max_seq_len=max(len(p) for p in batch) + new_tokens,
        max_queue=len(batch),
        timeout_s=600.0,
    )
    engine.warm_up()
    engine.start()
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    started = time.perf_counter()
    handles = [await engine.submit(p, params) for p in batch]
    results = [await h.wait() for h in handles]
    elapsed = time.perf_counter() - started
    await engine.stop(1.0)
    return sum(r.completion_tokens for r in results) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--generate-requests", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    args = parser.parse_args()
    model = build_model(args.device, getattr(torch, args.dtype), args.attn)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: {params_m:.1f}M params on {args.device} {args.dtype} {args.attn}")
    batch = prompts(args.concurrency, args.prompt_tokens)
    bench_generate(model, batch[:1], 4)  # warm-up
    one_at_a_time = bench_generate(model, batch[: args.generate_requests], args.new_tokens)
    print(f"generate(), one request at a time: {one_at_a_time:8.1f} tok/s")
    engine = asyncio.run(bench_engine(model, batch, args.new_tokens, args.concurrency))
    print(f"engine, {args.concurrency} concurrent:          {engine:8.1f} tok/s")
    print(f"speed-up: {engine / one_at_a_time:.1f}x")


if __name__ == "__main__":
    main()
