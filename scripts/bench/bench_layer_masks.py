"""What masks per layer kind cost a decode step, and what the warm-up path checks cost.

    python scripts/bench/bench_layer_masks.py [--rounds 15]

One Ministral-shaped model (22M parameters: hidden 512, 6 layers), built twice with the same
weights: every layer full attention, and layers alternating sliding (window 128) and full, so the
runner builds two masks per forward instead of one. Decode steps at batch 8 over 512-token rows
alternate between the two (A, B, A, B, ...: a busy machine slows both alike); the median ratio
is printed. Then the time of the warm-up path checks (model_support.py) against the rest of the
warm-up, for each. CPU only; random weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import MinistralConfig, MinistralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo: batching/

from batching.generation.model_runner import ModelRunner, build_paged_cache
from batching.generation.model_support import check_mixed_step, check_prefill_and_decode, make_probe

ROWS, CONTEXT, MAX_SEQ_LEN = 8, 512, 1024
BLOCK = 16  # KV block size, tokens
PER_ROW = MAX_SEQ_LEN // BLOCK  # blocks each row owns
TABLES = [list(range(1 + r * PER_ROW, 1 + (r + 1) * PER_ROW)) for r in range(ROWS)]


def runner(layer_types: list[str]) -> ModelRunner:
    config = MinistralConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=8, head_dim=64, sliding_window=128,
        layer_types=layer_types, max_position_embeddings=2048,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MinistralForCausalLM(config).eval()
    cache = build_paged_cache(model, ROWS * PER_ROW, BLOCK, MAX_SEQ_LEN)
    return ModelRunner(model, cache, max_rows=ROWS, cuda_graphs="off")


def decode_ms(run: ModelRunner) -> float:
    started = time.perf_counter()
    run.decode_step([5] * ROWS, [CONTEXT] * ROWS, TABLES)
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    with torch.inference_mode():
        full = runner(["full_attention"] * 6)
        mixed = runner(["sliding_attention", "full_attention"] * 3)
        for run in (full, mixed):
            run.prefill(TABLES, [[7] * CONTEXT] * ROWS)  # rows of 512 tokens
            decode_ms(run)  # first-call costs
        pairs = [(decode_ms(full), decode_ms(mixed)) for _ in range(args.rounds)]
        ratio = statistics.median(b / a for a, b in pairs)
        full_ms = statistics.median(a for a, _ in pairs)
        mixed_ms = statistics.median(b for _, b in pairs)
        print(
            f"decode step, batch {ROWS} x {CONTEXT} tokens: full {full_ms:.1f} ms, sliding+full "
            f"{mixed_ms:.1f} ms, ratio {ratio:.2f} (median of {args.rounds} interleaved pairs)"
        )
        for name, run in (("full", full), ("sliding 128 + full", mixed)):
            started = time.perf_counter()
            probe = make_probe(run)
            check_prefill_and_decode(run, probe)
            check_mixed_step(run, probe)
            seconds = time.perf_counter() - started
            print(f"warm-up path checks, {name}: {len(probe.tokens)}-token probe, {seconds:.2f} s")


if __name__ == "__main__":
    main()
