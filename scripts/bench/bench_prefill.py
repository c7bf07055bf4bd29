"""The prefix cache and chunked prefill, over HTTP, each measured on/off side by side.

    python scripts/bench/bench_prefill.py                  # ~6 minutes on a 2-core box
    python scripts/bench/bench_prefill.py --repeats 1      # a quick look

Servers (`python -m service`, the bench LLM: 22M-parameter Llama, no EOS, so every request
makes exactly the tokens it asks for) start together; all but the one measured are paused,
and the runs interleave repeat after repeat. Prompts are token ids sent to /v1/completions,
so their lengths are exact. Three scenarios:

* shared: 32 requests at once sharing a 512-token prefix, each with its own 16-token suffix,
  32 new tokens each, after one request has warmed the prefix: TTFT p50/p99 and total
  output tok/s, prefix cache on vs off.
* distinct: the same, but 32 prompts with nothing in common: the cost of the cache when it
  never hits.
* long: 16 streams decoding 256 tokens each; once they run, one 1,500-token prompt arrives:
  the 16 streams' inter-token latency p50, p99 and max, prefill chunked vs in one forward,
  and the long prompt's TTFT. `--chunks` sweeps GENERATE_PREFILL_CHUNK_TOKENS, each chunk
  size with GENERATE_MIXED_STEPS on ("chunk-N": the chunk runs in the decode forward) and off
  ("chunk-N separate": a prefill forward, then the decode forward); `--mixed on` skips the off.
  `--scenarios long` measures only that one.
* long-engine: the same workload on our engine in this process, no HTTP (one engine per
  configuration, runs interleaved): the gaps between the deltas each stream's handle
  receives, so what the engine itself bounds, apart from the HTTP stack's and the client's
  noise on a 2-core box.
* join-engine: long-engine with 8 free rows more, and 8 short prompts (16-32 tokens, 16 new
  tokens each) that arrive JOIN_DELAY_S after the long prompt, while it is being prefilled:
  their TTFT (from their own arrival), the long prompt's, and the streams' longest gap while
  the long prompt waited. `--chunks`/`--mixed` pick the configurations as for 'long'. To
  compare two checkouts, run it from each (PYTHONPATH=. so that each imports its own
  `batching`), alternately.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: shared helpers

import bench_load as load
import bench_servers as servers
from engine_settings import build_engine
from harness import HttpServer
from make_bench_models import VOCAB_SIZE, build_bench_models
from transformers import AutoModelForCausalLM, AutoTokenizer

from batching.generation.engine import GenerationEngine
from batching.generation.sampling import SamplingParams

NO_LONG_PROMPT = "no long prompt"  # the 'long' scenario's baseline: the streams alone
BASELINE_WINDOW_S = 2.0
LONG = {"slots": 17, "max_seq_len": 1536}  # the long scenarios: 16 streams + a 1,500-token prompt
UNCHUNKED = 4096  # a chunk budget above every prompt here: each prompt in one forward
JOIN = {"slots": 25, "shorts": 8, "delay_s": 0.3}  # join-engine: rows for them, when they come


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=Path("bench_models"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunks", default="auto,64,256", help="chunk sizes for 'long'")
    parser.add_argument("--mixed", default="on,off", help="GENERATE_MIXED_STEPS for 'long'")
    parser.add_argument(
        "--scenarios",
        default="cache,long,long-engine",
        help="cache (shared, distinct), long, long-engine, join-engine",
    )
    parser.add_argument("--out", type=Path, default=Path("bench_results"))
    return parser.parse_args(argv)


def ids(count: int, rng: random.Random) -> list[int]:
    return [rng.randrange(3, VOCAB_SIZE) for _ in range(count)]


def call(url: str, new_tokens: int) -> load.Call:
    async def run(http: Any, prompt: list[int]) -> load.Sample:
        body = {"model": "bench", "prompt": prompt, "max_tokens": new_tokens}
        body |= {"temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
        return await load._stream(http, f"{url}/v1/completions", body, load._read_openai)

    return run


def spec(
    name: str, model: str, slots: int, max_seq_len: int, **settings: str
) -> servers.ServerSpec:
    base = servers.ours("", model, 32, 5.0, slots, max_seq_len, max_new_tokens=256)
    env = base.env | {k.upper(): v for k, v in settings.items()}
    return servers.ServerSpec(name, base.command, env, base.ready_path, base.port, base.cwd)


async def burst(server: HttpServer, prompts: list[list[int]], warm: list[int]) -> dict[str, Any]:
    """One warm request (it caches the shared prefix where there is one), then all at once."""
    await load.run_closed(call(server.url, 32), [warm], 1)
    samples, wall_s = await load.run_closed(call(server.url, 32), prompts, len(prompts))
    summary = load.summarize(samples, wall_s)
    return {k: summary[k] for k in ("errors", "tok_per_s", "ttft_ms")}


async def long_prompt_during_streams(
    server: HttpServer, rng: random.Random, send_long: bool
) -> dict[str, Any]:
    """The streams' gaps that overlap the time the long prompt waited for its first token (or,
    with `send_long` off, BASELINE_WINDOW_S: what this box's noise alone does to them)."""
    streams = [ids(16, rng) for _ in range(16)]
    running = asyncio.create_task(load.run_closed(call(server.url, 256), streams, 16))
    await asyncio.sleep(1.5)  # the 16 streams are decoding by now
    sent_s = time.perf_counter()
    long_samples: list[load.Sample] = []
    if send_long:
        long_samples, _ = await load.run_closed(call(server.url, 8), [ids(1500, rng)], 1)
        ended_s = sent_s + (long_samples[0].ttft_s or float("nan"))
    else:
        await asyncio.sleep(BASELINE_WINDOW_S)
        ended_s = time.perf_counter()
    samples, _ = await running
    gaps = [g for s in samples for g in s.token_gaps_s]
    during = [
        later - earlier
        for s in samples
        for earlier, later in itertools.pairwise(s.token_times_s)
        if later > sent_s and earlier < ended_s
    ]
    p50 = load.percentile(gaps, 50) * 1000
    return {
        "errors": sum(not s.ok for s in [*samples, *long_samples]),
        "itl_p50_ms": round(p50, 2),
        "during_p99_ms": round(load.percentile(during, 99) * 1000, 2),
        "during_max_ms": round(max(during, default=float("nan")) * 1000, 2),
        "max_over_p50": round(max(during, default=float("nan")) * 1000 / p50, 2),
        "run_max_ms": round(max(gaps) * 1000, 2),
        "long_ttft_ms": round((ended_s - sent_s) * 1000, 1) if send_long else None,
    }


async def long_prompt_in_engine(engine: GenerationEngine, rng: random.Random) -> dict[str, Any]:
    """long_prompt_during_streams on an engine: the arrival time of every stream's deltas."""

    async def stream(prompt: list[int], new_tokens: int) -> list[float]:
        handle = await engine.submit(prompt, SamplingParams(new_tokens, ignore_eos=True))
        return [time.perf_counter() async for _ in handle]

    streams = [asyncio.create_task(stream(ids(16, rng), 256)) for _ in range(16)]
    await asyncio.sleep(1.5)
    sent_s = time.perf_counter()
    long_times = await stream(ids(1500, rng), 8)
    times = await asyncio.gather(*streams)
    pairs = [pair for arrivals in times for pair in itertools.pairwise(arrivals)]
    gaps = [later - earlier for earlier, later in pairs]
    during = [
        later - earlier for earlier, later in pairs if later > sent_s and earlier < long_times[0]
    ]
    p50 = load.percentile(gaps, 50) * 1000
    return {
        "itl_p50_ms": round(p50, 2),
        "during_p99_ms": round(load.percentile(during, 99) * 1000, 2),
        "during_max_ms": round(max(during) * 1000, 2),
        "max_over_p50": round(max(during) * 1000 / p50, 2),
        "long_ttft_ms": round((long_times[0] - sent_s) * 1000, 1),
    }


async def short_prompts_during_long_prefill(
    engine: GenerationEngine, rng: random.Random
) -> dict[str, Any]:
    """long_prompt_in_engine, with JOIN["shorts"] short prompts arriving JOIN["delay_s"] after
    the long one: how long they wait for their first token while it is prefilled."""

    async def first_token_s(prompt: list[int], new_tokens: int) -> tuple[float, list[float]]:
        sent_s = time.perf_counter()
        handle = await engine.submit(prompt, SamplingParams(new_tokens, ignore_eos=True))
        return sent_s, [time.perf_counter() async for _ in handle]

    streams = [asyncio.create_task(first_token_s(ids(16, rng), 256)) for _ in range(16)]
    await asyncio.sleep(1.5)
    long = asyncio.create_task(first_token_s(ids(1500, rng), 8))
    await asyncio.sleep(float(JOIN["delay_s"]))
    shorts = await asyncio.gather(
        *(first_token_s(ids(rng.randint(16, 32), rng), 16) for _ in range(int(JOIN["shorts"])))
    )
    long_sent_s, long_times = await long
    times = [arrivals for _, arrivals in await asyncio.gather(*streams)]
    during = [
        later - earlier
        for arrivals in times
        for earlier, later in itertools.pairwise(arrivals)
        if later > long_sent_s and earlier < long_times[0]
    ]
    ttfts = [arrivals[0] - sent_s for sent_s, arrivals in shorts]
    p50 = load.percentile([b - a for t in times for a, b in itertools.pairwise(t)], 50) * 1000
    return {
        "short_ttft_p50_ms": round(load.percentile(ttfts, 50) * 1000, 1),
        "short_ttft_max_ms": round(max(ttfts) * 1000, 1),
        "shorts_before_long": sum(arrivals[0] < long_times[0] for _, arrivals in shorts),
        "long_ttft_ms": round((long_times[0] - long_sent_s) * 1000, 1),
        "itl_p50_ms": round(p50, 2),
        "during_max_ms": round(max(during) * 1000, 2),
        "max_over_p50": round(max(during) * 1000 / p50, 2),
    }


def engines(
    model_dir: str, configs: dict[str, dict[str, Any]], slots: int = LONG["slots"]
) -> dict[str, GenerationEngine]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    built = {}
    for name, options in configs.items():
        engine = build_engine(
            model, tokenizer, eos_token_ids=[], num_slots=slots,
            max_seq_len=LONG["max_seq_len"], max_queue=64,
            timeout_s=300.0, **options,
        )  # fmt: skip
        engine.warm_up()
        engine.start()
        built[name] = engine
    return built


async def measure_in_engine(
    repeats: int, built: dict[str, GenerationEngine], scenario: str = "long-engine"
) -> dict[str, Any]:
    workload = (
        long_prompt_in_engine if scenario == "long-engine" else short_prompts_during_long_prefill
    )
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        for repeat in range(repeats):
            for name, engine in built.items():
                result = await workload(engine, random.Random(repeat))
                runs.setdefault(f"{scenario} {name}", []).append(result)
                print(f"repeat {repeat + 1}: engine {name} done", flush=True)
    finally:
        for engine in built.values():
            await engine.stop(drain_timeout_s=0.0)
    limits = {name: e.prefill_chunk_limits.as_dict() for name, e in built.items()}
    key = "during_max_ms" if scenario == "long-engine" else "short_ttft_p50_ms"
    return {label: median_of(r, key) for label, r in runs.items()} | {
        "engine chunk limits": {k: v for k, v in limits.items() if v["measured"]}
    }


def median_of(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run whose `key` is the median (a whole run, so its figures belong together)."""
    ordered = sorted(runs, key=lambda run: _scalar(run[key]))
    return ordered[len(ordered) // 2]


def _scalar(value: Any) -> float:
    return float(value["p50"]) if isinstance(value, dict) else float(value)


async def measure(args: argparse.Namespace, systems: dict[str, HttpServer]) -> dict[str, Any]:
    rng = random.Random(0)
    prefix = ids(512, rng)
    shared = [prefix + ids(16, rng) for _ in range(32)]
    distinct = [ids(528, rng) for _ in range(32)]
    runs: dict[str, list[dict[str, Any]]] = {}
    for repeat in range(args.repeats):
        for name, server in systems.items():
            server.resume()
            try:
                if name.startswith("cache"):
                    for kind, prompts in (("shared", shared), ("distinct", distinct)):
                        warm = prefix + ids(16, rng) if kind == "shared" else ids(528, rng)
                        result = await burst(server, prompts, warm)
                        runs.setdefault(f"{kind} {name}", []).append(result)
                else:
                    result = await long_prompt_during_streams(
                        server, random.Random(repeat), send_long=name != NO_LONG_PROMPT
                    )
                    runs.setdefault(f"long {name}", []).append(result)
            finally:
                server.pause()
            print(f"repeat {repeat + 1}: {name} done", flush=True)
    return {
        label: median_of(by_repeat, "ttft_ms" if label.startswith(("shared", "distinct")) else
                         "during_max_ms")
        for label, by_repeat in runs.items()
    }  # fmt: skip


def chunk_configs(args: argparse.Namespace) -> dict[str, tuple[int | str, bool]]:
    """For the long scenarios: name -> (GENERATE_PREFILL_CHUNK_TOKENS, GENERATE_MIXED_STEPS)."""
    configs: dict[str, tuple[int | str, bool]] = {"unchunked": (UNCHUNKED, False)}
    for chunk in args.chunks.split(","):
        for mixed in args.mixed.split(","):
            if not (chunk == "auto" and mixed == "off"):  # auto measures mixed steps
                name = f"chunk-{chunk}" + (" separate" if mixed == "off" else "")
                configs[name] = (chunk if chunk == "auto" else int(chunk), mixed == "on")
    return configs


def server_specs(model: str, scenarios: list[str], args: argparse.Namespace) -> dict[str, Any]:
    cache = {"slots": 32, "max_seq_len": 576}  # 528-token prompts + 32 new tokens
    specs = {}
    if "cache" in scenarios:
        specs["cache-on"] = spec("cache-on", model, **cache, generate_prefix_cache_tokens="8192")
        specs["cache-off"] = spec("cache-off", model, **cache, generate_prefix_cache_tokens="0")
    if "long" in scenarios:
        specs[NO_LONG_PROMPT] = spec(NO_LONG_PROMPT, model, **LONG)
        for name, (chunk, mixed) in chunk_configs(args).items():
            specs[name] = spec(
                name, model, **LONG, generate_prefill_chunk_tokens=str(chunk),
                generate_mixed_steps=str(mixed).lower(),
            )  # fmt: skip
    return specs


def measure_servers(args: argparse.Namespace, specs: dict[str, Any]) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="bench-prefill-"))
    systems: dict[str, HttpServer] = {}
    limits: dict[str, dict[str, Any]] = {}
    try:
        for name, server_spec in specs.items():  # one at a time: warm-up measures the chunk
            systems[name] = server = servers.start_server(server_spec, log_dir)  # limits (auto)
            server.wait_ready(servers.READY_TIMEOUT_S)
            with urllib.request.urlopen(f"{server.url}/info") as response:
                limits[name] = json.load(response)["generate"]["prefill_chunk_limits"]
            server.pause()
        results = asyncio.run(measure(args, systems))
    finally:
        for server in systems.values():
            server.stop(timeout_s=5.0)
    return results | {"chunk limits (/info)": {k: v for k, v in limits.items() if v["measured"]}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = str(build_bench_models(args.models_dir)["llm"])
    scenarios = args.scenarios.split(",")
    results: dict[str, Any] = {}
    configs = {
        name: {"prefill_chunk_tokens": chunk, "mixed_steps": mixed}
        for name, (chunk, mixed) in chunk_configs(args).items()
    }
    if "long-engine" in scenarios:
        results |= asyncio.run(measure_in_engine(args.repeats, engines(model, configs)))
    if "join-engine" in scenarios:
        built = engines(model, configs, slots=int(JOIN["slots"]))
        results |= {
            f"join-engine {k}" if k == "engine chunk limits" else k: v
            for k, v in asyncio.run(measure_in_engine(args.repeats, built, "join-engine")).items()
        }
    specs = server_specs(model, scenarios, args)
    if specs:
        results |= measure_servers(args, specs)
    for label, result in results.items():
        print(f"{label:24s} {json.dumps(result)}")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"bench-prefill-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
