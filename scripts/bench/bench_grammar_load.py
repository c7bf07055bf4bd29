"""Cheap /generate latency while 4 clients send slow-but-valid JSON schemas, for one or more
checkouts side by side (before/after the grammar compiler of issue 20):

    python scripts/bench/bench_grammar_load.py --repo /work/main --repo . --seconds 60

Each repo's `python -m service` serves the demo LLM (scripts/make_demo_models.py). Phase 1
measures the cheap request alone; phase 2 repeats it while 4 clients each send, back to back,
a fresh `patternProperties` schema (SCHEMA_KEYS patterns: a second or more of compiling, and
never the same text twice, so no cache helps). Reported per repo: cheap latency p50/p95/max
in both phases, how many cheap requests were answered, and the schema answers by status.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: shared helpers

from harness import start_service
from make_demo_models import build_demo_models

CHEAP = {"prompt": "hello there", "max_new_tokens": 4, "temperature": 0}
SCHEMA_CLIENTS = 4
SCHEMA_KEYS = 100


def slow_schema(tag: str) -> dict[str, Any]:
    properties = {f"^{tag}k{n}_[a-z]+$": {"type": "string"} for n in range(SCHEMA_KEYS)}
    return {"type": "object", "patternProperties": properties}


def cheap_latencies_ms(url: str, seconds: float) -> list[float]:
    latencies = []
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=300) as client:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            answer = client.post("/generate", json=CHEAP)
            if answer.status_code == 200:
                latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def schema_client(url: str, name: str, stop: threading.Event, statuses: Counter[str]) -> None:
    with httpx.Client(base_url=url, timeout=300) as client:
        n = 0
        while not stop.is_set():
            n += 1
            body = CHEAP | {"json_schema": slow_schema(f"{name}x{n}x")}
            try:
                statuses[str(client.post("/generate", json=body).status_code)] += 1
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1


def summary(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {"answered": 0}
    ordered = sorted(latencies)
    return {
        "answered": len(ordered),
        "p50_ms": round(statistics.median(ordered), 1),
        "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))], 1),
        "max_ms": round(ordered[-1], 1),
    }


def measure(repo: Path, llm: Path, seconds: float, workdir: Path) -> dict[str, Any]:
    env = {
        "GENERATE_MODEL": str(llm),
        "PREDICT_MODEL": "",
        "DEVICE": "cpu",
        "RATE_LIMIT": "1000000/minute",
        "LOG_LEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(repo),
    }
    server = start_service(workdir / f"{repo.name}.log", env, cwd=repo)
    try:
        server.wait_ready(300)
        alone = cheap_latencies_ms(server.url, seconds / 2)
        stop, statuses = threading.Event(), Counter[str]()
        clients = [
            threading.Thread(target=schema_client, args=(server.url, f"c{i}", stop, statuses))
            for i in range(SCHEMA_CLIENTS)
        ]
        for client in clients:
            client.start()
        loaded = cheap_latencies_ms(server.url, seconds)
        stop.set()
        for client in clients:
            client.join(300)
        health = httpx.get(server.url + "/health", timeout=30).status_code
    finally:
        server.stop()
    return {
        "repo": str(repo),
        "alone": summary(alone),
        "with_schema_clients": summary(loaded),
        "schema_answers": dict(statuses),
        "health_after": health,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", action="append", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        llm = build_demo_models(Path(tmp) / "models")["llm"]
        results = [measure(r.resolve(), llm, args.seconds, Path(tmp)) for r in args.repo]
    print(
        json.dumps(
            {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "runs": results}, indent=2
        )
    )


if __name__ == "__main__":
    main()
