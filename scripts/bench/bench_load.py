"""The load generator: real sockets (httpx), closed loop or Poisson open loop, client timings.

Each call returns one `Sample`; `summarize` turns a run's samples into req/s, output tok/s and
p50/p95/p99 of latency, time to first token (TTFT) and inter-token latency (ITL), all
measured at the client. `scrape_metrics` + `histogram_mean` read the server's own mean batch
size from the Prometheus text of /metrics (difference of _sum and _count around a run).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from tqdm import tqdm

TIMEOUT_S = 300.0


@dataclass
class Sample:
    """What the client saw of one request."""

    ok: bool
    latency_s: float
    ttft_s: float | None = None
    token_gaps_s: list[float] = field(default_factory=list)
    token_times_s: list[float] = field(default_factory=list)  # perf_counter() of each token event
    tokens: int = 0  # output tokens (generation), from the server's usage when it reports it
    error: str = ""


Call = Callable[[httpx.AsyncClient, Any], Awaitable[Sample]]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks (numpy's
    default). NaN for no values."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def spread_ms(values: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 of values given in seconds, in milliseconds."""
    return {f"p{q}": round(percentile(values, q) * 1000, 3) for q in (50, 95, 99)}


def summarize(samples: Sequence[Sample], wall_s: float) -> dict[str, Any]:
    ok = [s for s in samples if s.ok]
    tokens = sum(s.tokens for s in ok)
    summary: dict[str, Any] = {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "wall_s": round(wall_s, 3),
        "req_per_s": round(len(ok) / wall_s, 2) if wall_s > 0 else math.nan,
        "latency_ms": spread_ms([s.latency_s for s in ok]),
    }
    if tokens:
        summary["output_tokens"] = tokens
        summary["tok_per_s"] = round(tokens / wall_s, 1)
        summary["ttft_ms"] = spread_ms([s.ttft_s for s in ok if s.ttft_s is not None])
        summary["itl_ms"] = spread_ms([g for s in ok for g in s.token_gaps_s])
        summary["tokens_per_request"] = sorted({s.tokens for s in ok})
    first_errors = sorted({s.error for s in samples if not s.ok})[:3]
    if first_errors:
        summary["error_examples"] = first_errors
    return summary


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context for every client: httpx builds one per client otherwise (~20 ms of CPU
    each), although the servers here speak plain HTTP."""
    return ssl.create_default_context()


def client() -> httpx.AsyncClient:
    """A client with one keep-alive connection. Every in-flight request gets a client of its
    own: one shared httpx pool at 64 connections costs the client more CPU than the servers
    under test spend (encode/httpx#3215), and this box has two cores for both."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    return httpx.AsyncClient(limits=limits, timeout=TIMEOUT_S, verify=_tls_context())


async def run_closed(
    call: Call, items: Sequence[Any], concurrency: int, desc: str = "", connect_url: str = ""
) -> tuple[list[Sample], float]:
    """`concurrency` workers, each sending its next request as soon as the last one ends.

    With `connect_url`, every worker first GETs it (outside the clock), so the run measures
    requests over open keep-alive connections, not 64 TCP handshakes at once.
    """
    todo = iter(items)
    samples: list[Sample] = []
    bar = tqdm(total=len(items), desc=desc, unit="req", leave=False, mininterval=0.5)

    async def worker(http: httpx.AsyncClient) -> None:
        for item in todo:  # a shared iterator: each item is taken by exactly one worker
            samples.append(await call(http, item))
            bar.update(1)

    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(client()) for _ in range(concurrency)]
        if connect_url:
            await asyncio.gather(*(http.get(connect_url) for http in clients))
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for http in clients))
        wall_s = time.perf_counter() - started
    bar.close()
    return samples, wall_s


def poisson_offsets_s(count: int, rate_per_s: float, seed: int = 0) -> list[float]:
    """Arrival times of a Poisson process: exponential gaps with mean 1/rate."""
    rng = random.Random(seed)
    offsets, now = [], 0.0
    for _ in range(count):
        now += rng.expovariate(rate_per_s)
        offsets.append(now)
    return offsets


async def run_open(
    call: Call, items: Sequence[Any], rate_per_s: float, desc: str = "", seed: int = 0
) -> tuple[list[Sample], float]:
    """Requests start at Poisson arrival times whatever the server's pace (open loop)."""
    offsets = poisson_offsets_s(len(items), rate_per_s, seed)
    bar = tqdm(total=len(items), desc=desc, unit="req", leave=False, mininterval=0.5)
    idle: list[httpx.AsyncClient] = []  # clients (connections) free for the next arrival
    every: list[httpx.AsyncClient] = []

    async def one(item: Any, at_s: float, started: float) -> Sample:
        await asyncio.sleep(max(0.0, started + at_s - time.perf_counter()))
        if not idle:
            every.append(client())
            idle.append(every[-1])
        http = idle.pop()
        sample = await call(http, item)
        idle.append(http)
        bar.update(1)
        return sample

    started = time.perf_counter()
    try:
        samples = await asyncio.gather(
            *(one(item, at, started) for item, at in zip(items, offsets, strict=True))
        )
        wall_s = time.perf_counter() - started
    finally:
        for http in every:
            await http.aclose()
    bar.close()
    return list(samples), wall_s


# ---- the calls: one per API shape ----


def predict_call(url: str) -> Call:
    """POST {url}/predict {"text"}: ours, the naive server, LitServe and the HTTP floor."""

    async def call(http: httpx.AsyncClient, text: str) -> Sample:
        started = time.perf_counter()
        try:
            response = await http.post(f"{url}/predict", json={"text": text})
        except httpx.HTTPError as exc:
            return Sample(False, time.perf_counter() - started, error=repr(exc))
        latency_s = time.perf_counter() - started
        if response.status_code != 200:
            return Sample(False, latency_s, error=f"HTTP {response.status_code}")
        return Sample(True, latency_s)

    return call


def sse_payloads(line: str) -> Any:
    """The JSON payload of one `data: ...` SSE line; None for other lines and `[DONE]`."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    return None if data in ("", "[DONE]") else json.loads(data)


async def _stream(
    http: httpx.AsyncClient, url: str, body: dict[str, Any], read: Callable[[Any], tuple[int, int]]
) -> Sample:
    """POST a streaming request; `read(event)` -> (tokens in this event, usage total or -1)."""
    started = time.perf_counter()
    sample = Sample(False, 0.0)
    last_s, counted, usage = started, 0, -1
    try:
        async with http.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                sample.error = f"HTTP {response.status_code}"
            async for line in response.aiter_lines():
                event = sse_payloads(line)
                if event is None:
                    continue
                if "error" in event:
                    sample.error = str(event["error"])[:200]
                    continue
                now_s = time.perf_counter()
                tokens, total = read(event)
                usage = total if total >= 0 else usage
                if tokens:
                    sample.token_times_s.append(now_s)
                    if sample.ttft_s is None:
                        sample.ttft_s = now_s - started
                    else:
                        sample.token_gaps_s.append(now_s - last_s)
                    last_s = now_s
                    counted += tokens
    except httpx.HTTPError as exc:
        sample.error = repr(exc)
    sample.latency_s = time.perf_counter() - started
    sample.tokens = usage if usage >= 0 else counted
    sample.ok = not sample.error and sample.tokens > 0
    return sample


def _read_ours(event: dict[str, Any]) -> tuple[int, int]:
    usage = event.get("usage") or {}
    return len(event.get("token_ids") or ()), int(usage.get("completion_tokens", -1))


def _read_openai(event: dict[str, Any]) -> tuple[int, int]:
    usage = event.get("usage") or {}
    choices = event.get("choices") or [{}]
    has_text = bool(choices[0].get("text")) and not choices[0].get("finish_reason")
    return int(has_text), int(usage.get("completion_tokens", -1))


def generate_call(url: str, max_new_tokens: int) -> Call:
    """POST {url}/generate with stream=true: ours, the naive server and the HTTP floor."""

    async def call(http: httpx.AsyncClient, prompt: str) -> Sample:
        body = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0.0}
        return await _stream(http, f"{url}/generate", body | {"stream": True}, _read_ours)

    return call


def completions_call(url: str, model: str, max_new_tokens: int) -> Call:
    """POST {url}/v1/completions with stream=true (transformers serve, OpenAI legacy API).
    Each chunk carries one decode step's text; the token count comes from the final usage."""

    async def call(http: httpx.AsyncClient, prompt: str) -> Sample:
        body = {"model": model, "prompt": prompt, "max_tokens": max_new_tokens}
        body |= {"temperature": 0.0, "stream": True}
        return await _stream(http, f"{url}/v1/completions", body, _read_openai)

    return call
