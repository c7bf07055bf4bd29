"""What one /v1/completions call with many prompts gains over one call per prompt.

    python scripts/bench/bench_batched_prompts.py [--prompts 16] [--new-tokens 32] [--repeats 3]

A real server (`python -m service`, the bench LLM, GENERATE_SLOTS = --prompts) and HTTP.
lm-evaluation-harness's local-completions at batch_size 1 sends one prompt per call and waits
for it; at batch_size N it sends N prompts in one call, which the server submits together so
they batch in the engine. Variants, interleaved repeat after repeat (medians reported):

* one-per-call: --prompts calls in sequence, one prompt each (batch_size 1);
* batched: one call with all the prompts (batch_size = --prompts).

Both are greedy with `ignore_eos`, so every prompt produces exactly --new-tokens tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: shared helpers

import httpx
from harness import start_service
from make_bench_models import build_bench_models, generate_prompts
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[2]


def completions(http: httpx.Client, prompts: list[list[int]], new_tokens: int) -> int:
    body = {"model": "m", "prompt": prompts, "max_tokens": new_tokens, "temperature": 0}
    answer = http.post("/v1/completions", json=body | {"ignore_eos": True})
    answer.raise_for_status()
    return int(answer.json()["usage"]["completion_tokens"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models-dir", type=Path, default=REPO / "bench_models")
    args = parser.parse_args()
    paths = build_bench_models(args.models_dir)
    tokenizer = AutoTokenizer.from_pretrained(paths["llm"])
    prompts = [tokenizer.encode(p) for p in generate_prompts(tokenizer, args.prompts)]
    env = {
        "GENERATE_MODEL": str(paths["llm"]),
        "GENERATE_SLOTS": str(args.prompts),
        "GENERATE_MAX_SEQ_LEN": "256",
        "RATE_LIMIT": "1000000/minute",
        "LOG_LEVEL": "WARNING",
    }
    with tempfile.TemporaryDirectory() as scratch:
        server = start_service(Path(scratch) / "server.log", env, cwd=REPO)
        try:
            server.wait_ready()
            rates: dict[str, list[float]] = {"one-per-call": [], "batched": []}
            with httpx.Client(base_url=server.url, timeout=600) as http:
                completions(http, prompts[:2], 4)  # warm the path
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    tokens = sum(completions(http, [p], args.new_tokens) for p in prompts)
                    rates["one-per-call"].append(tokens / (time.perf_counter() - started))
                    started = time.perf_counter()
                    tokens = completions(http, prompts, args.new_tokens)
                    rates["batched"].append(tokens / (time.perf_counter() - started))
        finally:
            server.stop()
    base = statistics.median(rates["one-per-call"])
    print("| variant | output tok/s | vs one-per-call |\n|---|---:|---:|")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
