"""Generation tokens/s over HTTP with 1 and with N concurrent streaming clients, in one run.

    ./scripts/serve &                      # the demo models
    python scripts/bench/demo_throughput.py [--url http://127.0.0.1:8000] [--clients 16]

Each client sends streaming /generate requests one after another for --seconds; tokens are
counted from the SSE events the client receives. The figure in the README comes from here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx


async def client_loop(client: httpx.AsyncClient, deadline: float, new_tokens: int) -> int:
    tokens = 0
    while time.monotonic() < deadline:
        payload = {"prompt": "Tell me a story", "max_new_tokens": new_tokens, "stream": True}
        async with client.stream("POST", "/generate", json=payload) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    tokens += len(json.loads(line[6:]).get("token_ids", []))
    return tokens


async def measure(url: str, clients: int, seconds: float, new_tokens: int) -> float:
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        started = time.monotonic()
        deadline = started + seconds
        counts = await asyncio.gather(
            *(client_loop(client, deadline, new_tokens) for _ in range(clients))
        )
        return sum(counts) / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    asyncio.run(measure(args.url, 1, 1.0, args.new_tokens))  # warm-up
    one = asyncio.run(measure(args.url, 1, args.seconds, args.new_tokens))
    many = asyncio.run(measure(args.url, args.clients, args.seconds, args.new_tokens))
    print(f"1 client:   {one:8.0f} tok/s")
    print(f"{args.clients} clients: {many:8.0f} tok/s")
    print(f"ratio:      {many / one:8.1f}x")


if __name__ == "__main__":
    main()
