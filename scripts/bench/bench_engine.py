"""Our engine without HTTP on one device: throughput per concurrency, decode step time, and
the memory-bandwidth bound of a decode step, against generate() (one at a time, and as one
static left-padded batch). Used for the GPU figures in BENCHMARKS.md.

    python scripts/bench/bench_engine.py --shape qwen2.5-0.5b --device cuda --dtypes bfloat16 nf4
    python scripts/bench/bench_engine.py --shape qwen2.5-0.5b --device cuda --dtypes bfloat16 \
        --cuda-graphs on off                                   # graphs on vs off, side by side
    python scripts/bench/bench_engine.py --shape llama-22m --device cpu --dtypes float32 \
        --concurrency 1 8 32 --before-dir /tmp/base --repeats 3   # before/after a change
    python scripts/bench/bench_engine.py --shape tiny --device cpu --concurrency 1 4   # smoke run
    python scripts/bench/bench_engine.py --shape llama-22m --device cpu --dtypes float32 \
        --paged-attention gather in_place --skip-generate   # decode attention: both, alternating

Random weights, greedy, ignore_eos: every request decodes exactly --new-tokens tokens.
`--before-dir` runs every measurement in a fresh process, alternately against that checkout's
`batching` and this one's (bench_engine_compare.py). Needs only torch, transformers,
bitsandbytes (for nf4) and this repo (no web stack).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: shared helpers

from engine_settings import accepted_settings, build_engine
from tiny_models import DecoderFamily, decoder_config

import batching
from batching.generation.engine import GenerationEngine
from batching.generation.observer import NoopEngineObserver
from batching.generation.sampling import SamplingParams

SHAPES: dict[str, tuple[DecoderFamily, dict[str, int]]] = {
    # Qwen2.5-0.5B: 24 layers, hidden 896, 14 heads / 2 KV heads, tied embeddings.
    "qwen2.5-0.5b": ("qwen2", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
    )),
    # The CPU bench LLM (make_bench_models.py): 22M parameters, 6 layers, hidden 512.
    "llama-22m": ("llama", dict(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=4, vocab_size=8192,
    )),
    "tiny": ("qwen2", dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
    )),
}  # fmt: skip


T = TypeVar("T")


def on_fresh_thread(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) on a thread that then ends, as the service sets models up: on a CPU, torch
    keeps an OpenMP pool per thread that ran model work, and idle pools beside the engine
    thread's own slow it down (BENCHMARKS.md). generate() runs last, on the main thread."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


class _NoText:
    """Detokenization is not what is measured here."""

    def decode(self, token_ids: list[int], **_: object) -> str:
        return ""


class StepClock(NoopEngineObserver):
    """Times decode steps: the gap between consecutive on_step calls with a full batch, in wall
    time and in the engine thread's CPU time (on_step runs on that thread)."""

    def __init__(self) -> None:
        self.stamps: list[tuple[float, float, int]] = []

    def on_step(self, batch_size: int) -> None:
        self.stamps.append((time.perf_counter(), time.thread_time(), batch_size))

    def median_step_s(self, batch_size: int, *, cpu: bool = False) -> float:
        clock = 1 if cpu else 0
        gaps = [
            later[clock] - earlier[clock]
            for earlier, later in zip(self.stamps, self.stamps[1:], strict=False)
            if earlier[2] == batch_size
        ]
        return statistics.median(gaps[2:] or gaps) if gaps else float("nan")


@dataclass
class Row:
    shape: str
    dtype: str
    system: str
    concurrency: int
    output_tokens: int
    seconds: float
    tok_per_s: float
    decode_step_ms: float | None = None
    bound_step_ms: float | None = None
    cuda_graphs: str = ""  # on / off (the engine's report), "" where it has no such setting
    paged_attention: str = ""  # gather / in_place (the engine's choice), "" where it has none
    # CPU time of the whole process for the run, and of the engine thread per decode step: with
    # --threads 1 (no OpenMP workers) that is the work done, whatever else loads the machine.
    cpu_seconds: float | None = None
    decode_step_cpu_ms: float | None = None


@dataclass
class EngineRun:
    seconds: float
    tokens: int
    step_s: float
    step_cpu_s: float
    cpu_seconds: float
    cuda_graphs: str
    paged_attention: str


def build(shape: str, dtype: str, device: torch.device, scratch: Path) -> PreTrainedModel:
    torch.manual_seed(0)
    family, sizes = SHAPES[shape]
    config = decoder_config(
        family, **sizes, initializer_range=0.02, tie_word_embeddings=True,
        max_position_embeddings=4096,
    )  # fmt: skip
    if dtype != "nf4":
        with torch.device(device):
            model: PreTrainedModel = AutoModelForCausalLM.from_config(config)
        return model.to(getattr(torch, dtype)).eval()
    folder = scratch / f"{shape}-bf16"
    if not folder.exists():
        with torch.device(device):
            AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quant, device_map={"": str(device)}, dtype=torch.bfloat16
    )
    return model.eval()


def bytes_read_per_step(model: PreTrainedModel) -> int:
    """Weights a decode step must stream from memory: every parameter except the input
    embedding table (only B rows of it are read), unless it doubles as the tied lm_head."""
    embedding = model.get_input_embeddings()
    tied = model.get_output_embeddings().weight is embedding.weight  # type: ignore[union-attr]
    total = 0
    for param in model.parameters():
        if param is embedding.weight and not tied:
            continue
        total += param.numel() * param.element_size()
    return total


def kv_bytes_per_token(model: PreTrainedModel) -> int:
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    itemsize = model.get_input_embeddings().weight.element_size()  # type: ignore[union-attr]
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * itemsize


def prompts(count: int, length: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (length,), generator=generator).tolist() for _ in range(count)]


def engine_options(
    cuda_graphs: str,
    kv_bucket_min: int | None,
    prefill_tokens: int | None = None,
    paged_attention: str | None = None,
) -> dict[str, Any]:
    """Options this checkout's engine accepts (an older one, for --before-dir, has fewer; the
    prefill budget was `prefill_token_budget` before chunked prefill)."""
    accepted = accepted_settings()
    options = {
        "cuda_graphs": cuda_graphs,
        "kv_bucket_min": kv_bucket_min,
        "prefill_chunk_tokens": prefill_tokens,
        "prefill_token_budget": prefill_tokens,
        "paged_attention": paged_attention,
    }
    return {k: v for k, v in options.items() if k in accepted and v is not None}


async def run_engine(
    model: PreTrainedModel,
    batch: list[list[int]],
    new_tokens: int,
    cuda_graphs: str,
    kv_bucket_min: int | None = None,
    paged_attention: str | None = None,
) -> EngineRun:
    clock = StepClock()

    def make_engine() -> GenerationEngine:
        engine = build_engine(
            model, _NoText(), eos_token_ids=[], num_slots=len(batch),
            max_seq_len=max(map(len, batch)) + new_tokens, max_queue=len(batch),
            timeout_s=600.0, observer=clock,
            **engine_options(
                cuda_graphs, kv_bucket_min, max(2048, sum(map(len, batch))), paged_attention
            ),
        )  # fmt: skip
        engine.warm_up()
        return engine

    engine = on_fresh_thread(make_engine)
    report = getattr(engine, "cuda_graphs", None)
    graphs = "" if report is None else ("on" if report.enabled else "off")
    paged = getattr(engine, "paged_attention", None)
    paged_path = "" if paged is None else str(paged.path)
    engine.start()
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    started, started_cpu = time.perf_counter(), time.process_time()
    handles = [await engine.submit(p, params) for p in batch]
    results = [await h.wait() for h in handles]
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
    await engine.stop(1.0)
    tokens = sum(r.completion_tokens for r in results)
    assert tokens == len(batch) * new_tokens, "every request must decode exactly new_tokens"
    step_s, step_cpu_s = (clock.median_step_s(len(batch), cpu=cpu) for cpu in (False, True))
    return EngineRun(seconds, tokens, step_s, step_cpu_s, cpu_seconds, graphs, paged_path)


def run_generate(
    model: PreTrainedModel, batch: list[list[int]], new_tokens: int
) -> tuple[float, float]:
    """One static left-padded batch through generate(); returns seconds and CPU seconds."""
    width = max(map(len, batch))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=model.device)
    mask = (torch.arange(width, device=model.device)[None] >= (width - torch.tensor(
        [len(p) for p in batch], device=model.device))[:, None]).long()  # fmt: skip
    started, started_cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = model.generate(  # type: ignore[operator]
            ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=0, eos_token_id=None,
        )  # fmt: skip
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    assert out.shape[1] == width + new_tokens
    return time.perf_counter() - started, time.process_time() - started_cpu


def bench(args: argparse.Namespace, dtype: str, scratch: Path) -> list[Row]:
    device = torch.device(args.device)
    model = on_fresh_thread(build, args.shape, dtype, device, scratch)
    weights, kv_token = bytes_read_per_step(model), kv_bytes_per_token(model)
    vocab = model.config.vocab_size
    print(f"{args.shape} {dtype}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params,"
          f" {weights / 2**20:.0f} MiB read per decode step", flush=True)  # fmt: skip
    rows: list[Row] = []
    paged_modes = args.paged_attention
    for mode in args.cuda_graphs:
        for paged in paged_modes:  # warm-up
            asyncio.run(run_engine(model, prompts(2, args.prompt_tokens, vocab), 4, mode, None,
                                   paged))  # fmt: skip
        for n in args.concurrency:
            batch = prompts(n, args.prompt_tokens, vocab)
            for paged in paged_modes:  # alternating at each concurrency: the same load for both
                run = asyncio.run(run_engine(model, batch, args.new_tokens, mode,
                                             args.kv_bucket_min, paged))  # fmt: skip
                mean_len = args.prompt_tokens + args.new_tokens / 2
                bound_s = (weights + n * mean_len * kv_token) / (args.bandwidth_gbs * 1e9)
                rows.append(Row(args.shape, dtype, "engine", n, run.tokens, run.seconds,
                                run.tokens / run.seconds, run.step_s * 1e3, bound_s * 1e3,
                                run.cuda_graphs, run.paged_attention, run.cpu_seconds,
                                run.step_cpu_s * 1e3))  # fmt: skip
                print(f"  engine x{n:<3} graphs {run.cuda_graphs or '-':3} "
                      f"attention {run.paged_attention or '-':8} "
                      f"{run.tokens / run.seconds:9.0f} tok/s  step {run.step_s * 1e3:6.2f} ms "
                      f"({run.step_cpu_s * 1e3:.2f} ms CPU; bandwidth bound "
                      f"{bound_s * 1e3:.2f} ms)", flush=True)  # fmt: skip
    if not args.skip_generate:
        rows += bench_generate(args, model, dtype, vocab)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def bench_generate(
    args: argparse.Namespace, model: PreTrainedModel, dtype: str, vocab: int
) -> list[Row]:
    """generate() one request at a time, and the static batch of --static-batch prompts."""
    one = prompts(1, args.prompt_tokens, vocab)
    run_generate(model, one, 4)  # warm-up
    seconds, cpu_seconds = run_generate(model, one, args.new_tokens)
    rows = [Row(args.shape, dtype, "generate() one request", 1, args.new_tokens, seconds,
                args.new_tokens / seconds, cpu_seconds=cpu_seconds)]  # fmt: skip
    static_n = args.static_batch
    static = prompts(static_n, args.prompt_tokens, vocab)
    seconds, cpu_seconds = run_generate(model, static, args.new_tokens)
    tokens = static_n * args.new_tokens
    rows.append(Row(args.shape, dtype, "generate() static batch", static_n, tokens, seconds,
                    tokens / seconds, cpu_seconds=cpu_seconds))  # fmt: skip
    for row in rows:
        print(f"  {row.system} x{row.concurrency}: {row.tok_per_s:9.0f} tok/s", flush=True)
    return rows


def markdown(rows: list[Row], device_name: str, bandwidth_gbs: float) -> str:
    lines = [
        f"Device: {device_name}; bandwidth bound at {bandwidth_gbs:g} GB/s.",
        "",
        "| shape | dtype | system | CUDA graphs | paged attention | concurrency | output tok/s |"
        " decode step ms | decode step CPU ms | bound ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        step = f"{r.decode_step_ms:.2f}" if r.decode_step_ms is not None else ""
        bound = f"{r.bound_step_ms:.2f}" if r.bound_step_ms is not None else ""
        cpu = f"{r.decode_step_cpu_ms:.2f}" if r.decode_step_cpu_ms is not None else ""
        lines.append(f"| {r.shape} | {r.dtype} | {r.system} | {r.cuda_graphs} | "
                     f"{r.paged_attention} | {r.concurrency} | {r.tok_per_s:,.0f} | {step} | "
                     f"{cpu} | {bound} |")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "nf4"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 16, 32, 64])
    parser.add_argument("--static-batch", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--bandwidth-gbs", type=float, default=3350.0, help="H100 SXM HBM3")
    parser.add_argument(
        "--cuda-graphs", nargs="+", choices=["auto", "on", "off"], default=["auto"],
        help="GENERATE_CUDA_GRAPHS for the engine; several: measured one after the other",
    )  # fmt: skip
    parser.add_argument(
        "--paged-attention", nargs="+", choices=["auto", "gather", "in_place"], default=["auto"],
        help="GENERATE_PAGED_ATTENTION; several: alternated at each concurrency",
    )  # fmt: skip
    parser.add_argument("--kv-bucket-min", type=int, default=None, help="the engine's default")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--skip-generate", action="store_true", help="only the engine")
    parser.add_argument(
        "--before-dir", type=Path, default=None,
        help="a checkout of the code before a change: measure it and this one, interleaved",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="with --before-dir")
    parser.add_argument(
        "--wait-for-idle-s", type=float, default=0.0,
        help="with --before-dir: before each run, wait up to this long for an idle CPU",
    )  # fmt: skip
    parser.add_argument("--rows-json", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("bench_results"))
    return parser.parse_args(argv)


def measure(args: argparse.Namespace) -> tuple[list[Row], str]:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if args.threads > 0:
        torch.set_num_threads(args.threads)  # every thread's intra-op pool, the engine's too
    if args.device == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # as the service does (model_runner.py)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as scratch:
        for dtype in args.dtypes:
            rows += bench(args, dtype, Path(scratch))
    return rows, device_name


def main() -> None:
    args = parse_args()
    if args.before_dir is not None:
        from bench_engine_compare import compare

        compare(args, Path(__file__).resolve())
        return
    print(f"batching from {Path(batching.__file__).parent}", flush=True)
    rows, device_name = measure(args)
    if args.rows_json is not None:  # a worker of bench_engine_compare.py
        args.rows_json.write_text(json.dumps([asdict(r) for r in rows]))
        return
    table = markdown(rows, device_name, args.bandwidth_gbs)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"engine_{args.shape}_{args.device}.json").write_text(
        json.dumps({"device": device_name, "rows": [asdict(r) for r in rows]}, indent=1)
    )
    (args.out / f"engine_{args.shape}_{args.device}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
