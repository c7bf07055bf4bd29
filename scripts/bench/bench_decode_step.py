"""The runner's decode step alone, in CPU time, for one checkout's `batching`: the paged
engine's gather against the slot engine's view, without the engine loop's noise.

    for i in 1 2 3; do
        python scripts/bench/bench_decode_step.py /tmp/base     # a checkout before the change
        python scripts/bench/bench_decode_step.py .              # this one
    done

The llama-22m shape (6 layers, hidden 512, 8 heads / 4 KV heads), one torch thread, 64 prompt
tokens per row, then 20 decode steps at batch 1, 8 and 32; prints each batch's median process
CPU time per step (a shared machine slows wall time far more than CPU time).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

CODE = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
sys.path[:0] = [str(CODE), str(CODE / "scripts")]

import torch  # noqa: E402
from tiny_models import decoder_config  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from batching.generation import model_runner  # noqa: E402

MAX_SEQ_LEN, PROMPT, BLOCK = 256, 64, 16


def stepper(model: torch.nn.Module, rows: int) -> Callable[[list[int], list[int]], object]:
    """Prefill `rows` prompts and return a decode step, for either engine's runner."""
    runner: object
    if hasattr(model_runner, "build_paged_cache"):
        per_row = MAX_SEQ_LEN // BLOCK
        cache = model_runner.build_paged_cache(model, rows * per_row, BLOCK, MAX_SEQ_LEN)
        paged = model_runner.ModelRunner(model, cache, max_rows=rows, cuda_graphs="off")
        tables = [list(range(1 + r * per_row, 1 + (r + 1) * per_row)) for r in range(rows)]
        paged.prefill(tables, [[1] * PROMPT] * rows)
        return lambda tokens, lengths: paged.decode_step(tokens, lengths, tables)
    slots = getattr(model_runner, "build_slot_cache")(model, rows, MAX_SEQ_LEN)  # noqa: B009
    runner = model_runner.ModelRunner(model, slots, cuda_graphs="off")  # type: ignore[call-arg]
    runner.prefill(0, [[1] * PROMPT] * rows)  # type: ignore[attr-defined, arg-type]
    return lambda tokens, lengths: runner.decode_step(tokens, lengths)  # type: ignore[attr-defined, call-arg]


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = decoder_config(
        "llama", hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=4, vocab_size=8192,
        tie_word_embeddings=True, max_position_embeddings=4096,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    report = []
    with torch.inference_mode():
        for rows in (1, 8, 32):
            step = stepper(model, rows)
            for _ in range(3):
                step([1] * rows, [PROMPT] * rows)
            cpu = []
            for i in range(20):
                started = time.process_time()
                step([1] * rows, [PROMPT + i] * rows)
                cpu.append(time.process_time() - started)
            report.append(f"batch {rows}: {statistics.median(cpu) * 1000:.1f} ms")
    print(CODE, ", ".join(report))


if __name__ == "__main__":
    main()
