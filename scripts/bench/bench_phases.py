"""The phases of a benchmark run (bench.py): offline systems, /predict, the cache workload,
/generate. Each takes the parsed arguments and the running servers and fills `results`."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import bench_load as load
import bench_offline as offline
import bench_report
import bench_servers as servers
from make_bench_models import predict_texts, repeated_texts

PREDICT_SYSTEMS = ("floor", "ours", "litserve", "naive")
CACHE_SYSTEMS = ("ours", "ours-cache")  # the same server, response cache off and on
# Ours runs as two processes, one model each, as LitServe and transformers serve do: on a small
# CPU box two engine threads in one process slow each other down (see BENCHMARKS.md).
GENERATE_SERVERS = ("floor", "ours-generate", "naive", "transformers-serve")
SHOWN_AS = {"ours-generate": "ours"}


def median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The repeat with the median `key` (an actual run, so its fields stay consistent)."""
    ordered = sorted(runs, key=lambda r: r.get(key) or 0.0)
    return ordered[len(ordered) // 2] | {"repeats": [r.get(key) for r in runs]}


async def predict_phase(
    args: argparse.Namespace, systems: servers.Systems, texts: list[str], results: dict[str, Any]
) -> None:
    names = [n for n in PREDICT_SYSTEMS if n in systems.specs]
    calls = {n: load.predict_call(systems.specs[n].url) for n in names}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {n: {} for n in names}
    for repeat in range(args.repeats):  # systems interleaved: drift in load hits all alike
        for c in args.concurrency:
            for n in names:
                desc = f"predict {n} c{c} #{repeat + 1}"
                run = await systems.measure(n, calls[n], calls[n], texts, c, desc=desc)
                runs[n].setdefault(f"c{c}", []).append(run)
    by_system = {
        n: {run: median_run(r, "req_per_s") for run, r in by_run.items()}
        for n, by_run in runs.items()
    }
    predict = results["predict"]
    floor_runs = by_system.get("floor", {}).values()
    floor = max((s.get("req_per_s", 0.0) for s in floor_runs), default=0.0)
    predict |= {"floor": floor, "ceiling": bench_report.ceiling(predict["limit"], floor)}
    for fraction in args.open_rates if floor else []:
        rate = round(fraction * predict["ceiling"], 1)
        for n in (n for n in names if n != "floor"):
            desc = f"predict {n} open {rate}/s"
            run = await systems.measure(n, calls[n], calls[n], texts, rate=rate, desc=desc)
            by_system[n][f"open@{rate}/s"] = run
    predict["systems"] = by_system
    await cache_phase(args, systems, by_system)


async def cache_phase(
    args: argparse.Namespace, systems: servers.Systems, by_system: dict[str, Any]
) -> None:
    """The same server with its response cache off and on, over texts half of which repeat.
    Each repeat draws new texts, so every run starts with a cold cache; the warm-up uses texts
    of its own."""
    if not all(n in systems.specs for n in CACHE_SYSTEMS):
        return
    warm = predict_texts(16, seed=99)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {n: {} for n in CACHE_SYSTEMS}
    for repeat in range(args.repeats):
        for c in args.cache_concurrency:

            def texts(attempt: int, seed: int = repeat * 1000 + c * 10) -> list[str]:
                return repeated_texts(args.predict_requests, args.repeat_share, seed + attempt)

            for n in CACHE_SYSTEMS:
                call = load.predict_call(systems.specs[n].url)
                desc = f"predict {n} repeated c{c} #{repeat + 1}"
                run = await systems.measure(n, call, call, texts, c, desc=desc, warm_items=warm)
                runs[n].setdefault(f"repeated c{c}", []).append(run)
    for n, by_run in runs.items():
        by_system.setdefault(n, {}).update(
            {run: median_run(r, "req_per_s") for run, r in by_run.items()}
        )


def generate_call(name: str, url: str, model: str, new_tokens: int) -> load.Call:
    if name == "transformers-serve":
        return load.completions_call(url, model, new_tokens)
    return load.generate_call(url, new_tokens)


async def generate_phase(
    args: argparse.Namespace, systems: servers.Systems, prompts: list[str], results: dict[str, Any]
) -> None:
    names = [n for n in GENERATE_SERVERS if n in systems.specs]
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for repeat in range(args.repeats):
        for n in names:
            url = systems.specs[n].url
            call = generate_call(n, url, args.generate_model, args.new_tokens)
            warm = generate_call(n, url, args.generate_model, 4)
            desc = f"generate {n} #{repeat + 1}"
            items = (
                prompts[: args.naive_streams] if n == "naive" and args.naive_streams else prompts
            )
            runs[n].append(
                await systems.measure(
                    n,
                    call,
                    warm,
                    items,
                    len(items),
                    desc=desc,
                    histogram="generate_step_batch_size",
                )
            )
    by_system = results["generate"]["systems"]
    for n, by_repeat in runs.items():
        by_system[SHOWN_AS.get(n, n)] = {"streams": median_run(by_repeat, "tok_per_s")}
    floor = by_system.get("floor", {}).get("streams", {}).get("tok_per_s", 0.0)
    limit = by_system["static"]["streams"]["tok_per_s"]
    results["generate"] |= {"floor": floor, "ceiling": bench_report.ceiling(limit, floor)}


def offline_phase(
    args: argparse.Namespace, texts: list[str], prompts: list[str], results: dict[str, Any]
) -> None:
    """Each system in a fresh process (see bench_offline.isolated)."""
    print("offline: the model alone, our engine, transformers continuous batching ...")
    g, n, r = args.generate_model, args.new_tokens, args.repeats

    def iso(fn: Callable[..., Any], *fn_args: Any) -> Any:
        servers.wait_for_quiet({os.getpgid(0)}, args.max_background_cpu)
        return offline.isolated(fn, *fn_args)

    predict, model, batch = results["predict"], args.predict_model, args.max_batch
    # The limit does the service's per-batch work, padding groups included; one padded forward
    # per batch (what the service did before it grouped) is kept for comparison.
    predict["limit"] = iso(
        offline.predict_limit, model, texts, batch, r, args.group_padding_tokens
    )["req_per_s"]
    predict["limit_one_forward"] = iso(offline.predict_limit, model, texts, batch, r, None)[
        "req_per_s"
    ]
    static = iso(offline.generate_limit, g, prompts, n, r)
    generate = results["generate"]
    generate["prefill_s"] = static.pop("prefill_s")
    systems = generate["systems"]
    systems["static"] = {"streams": static}
    systems["engine"] = {"streams": iso(offline.engine_run, g, prompts, n, r)}
    if "transformers-cb" not in args.skip:
        systems["transformers-cb"] = {"streams": iso(offline.transformers_cb, g, prompts, n, r)}
