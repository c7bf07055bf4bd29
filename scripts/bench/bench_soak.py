"""A mixed-traffic soak: does the server's memory level off, and is every request answered?

    python scripts/bench/bench_soak.py --minutes 30 --clients 32

Starts `python -m service` with the demo models (prefix cache on), then `--clients` clients
each loop over a mix like real traffic: /predict, /predict/batch, /generate (plain, streamed,
and streamed then cancelled after its first event), chat with a shared system prompt, chat
with a JSON schema, and completions with logprobs and echo. The server's RSS is sampled every
`--sample-s` seconds; the report gives the answers by kind and status (a request that got no
HTTP answer at all counts as "no_answer"), the RSS at start and end, and the least-squares
RSS slope over the second half (MiB per minute) with the growth over that half.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: shared helpers

from harness import start_service
from make_demo_models import build_demo_models

REPO = Path(__file__).resolve().parents[2]
SYSTEM = "You are a careful assistant for a shop that sells gadgets. " * 4
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "count": {"type": "integer"}},
    "required": ["name", "count"],
    "additionalProperties": False,
}


def chat(content: str, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]
    return {"model": "m", "messages": messages, "max_tokens": 16} | extra


async def one(client: httpx.AsyncClient, kind: str, n: int) -> str:
    """One request of `kind`; its status (as text) once the answer is read to its end."""
    if kind == "predict":
        answer = await client.post("/predict", json={"text": f"text number {n}"})
    elif kind == "predict_batch":
        answer = await client.post("/predict/batch", json={"texts": [f"a {n}", f"b {n}"]})
    elif kind == "generate":
        answer = await client.post("/generate", json={"prompt": f"story {n}", "max_new_tokens": 16})
    elif kind in ("stream", "cancel"):
        body = {"prompt": f"tale {n}", "max_new_tokens": 24, "stream": True}
        async with client.stream("POST", "/generate", json=body) as response:
            async for line in response.aiter_lines():
                if kind == "cancel" and line.startswith("data: "):
                    break  # hang up after the first event: the server must free the slot
            return str(response.status_code)
    elif kind == "chat":
        answer = await client.post("/v1/chat/completions", json=chat(f"question {n}"))
    elif kind == "chat_schema":
        form = {"type": "json_schema", "json_schema": {"name": "g", "schema": SCHEMA}}
        answer = await client.post(
            "/v1/chat/completions", json=chat(f"a gadget {n}", response_format=form)
        )
    else:  # completions with logprobs and echo
        body = {"model": "m", "prompt": f"score {n}", "max_tokens": 4, "logprobs": 2, "echo": True}
        answer = await client.post("/v1/completions", json=body)
    return str(answer.status_code)


KINDS = [
    "predict",
    "predict_batch",
    "generate",
    "stream",
    "cancel",
    "chat",
    "chat_schema",
    "logprobs",
]


async def client_loop(url: str, index: int, deadline: float, counts: Counter[str]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        n = index
        while time.monotonic() < deadline:
            kind = KINDS[n % len(KINDS)]
            try:
                status = await one(client, kind, n)
            except httpx.HTTPError as exc:
                status = f"no_answer:{type(exc).__name__}"
            counts[f"{kind} {status}"] += 1
            n += 1


async def sample_rss(
    pid: int, deadline: float, every_s: float, samples: list[tuple[float, float]]
) -> None:
    process = psutil.Process(pid)
    started = time.monotonic()
    while time.monotonic() < deadline:
        samples.append((time.monotonic() - started, process.memory_info().rss / 2**20))
        await asyncio.sleep(every_s)


def slope_mib_per_min(samples: list[tuple[float, float]]) -> float:
    xs = [t / 60 for t, _ in samples]
    ys = [rss for _, rss in samples]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs) or 1.0
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread


async def soak(url: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    deadline = time.monotonic() + args.minutes * 60
    counts: Counter[str] = Counter()
    samples: list[tuple[float, float]] = []
    await asyncio.gather(
        sample_rss(pid, deadline, args.sample_s, samples),
        *(client_loop(url, i, deadline, counts) for i in range(args.clients)),
    )
    second_half = [s for s in samples if s[0] >= args.minutes * 30]
    return {
        "answers": dict(sorted(counts.items())),
        "requests": sum(counts.values()),
        "no_answer": sum(v for k, v in counts.items() if "no_answer" in k),
        "rss_mib": {"first": round(samples[0][1], 1), "last": round(samples[-1][1], 1)},
        "second_half": {
            "slope_mib_per_min": round(slope_mib_per_min(second_half), 3),
            "growth_mib": round(second_half[-1][1] - second_half[0][1], 1),
        },
        "rss_samples": [(round(t), round(rss, 1)) for t, rss in samples],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--sample-s", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = build_demo_models(Path(tmp) / "models")
        env = {
            "PREDICT_MODEL": str(models["classifier"]),
            "GENERATE_MODEL": str(models["llm"]),
            "DEVICE": "cpu",
            "RATE_LIMIT": "100000000/minute",
            "GENERATE_PREFIX_CACHE_TOKENS": "2048",
            "GENERATE_MAX_QUEUE": str(args.clients * 2),
            "LOG_LEVEL": "WARNING",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO),
        }
        server = start_service(Path(tmp) / "server.log", env, cwd=REPO)
        try:
            server.wait_ready(300)
            report = asyncio.run(soak(server.url, server.proc.pid, args))
        finally:
            server.stop()
    report |= {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "args": vars(args)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
