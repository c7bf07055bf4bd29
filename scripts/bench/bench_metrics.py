"""The servers' own view and the kernel's: Prometheus text from /metrics, TCP counters.

`histogram_mean` of two scrapes taken around a run gives the server's mean batch size over
that run (the difference of `_sum` and `_count`).
"""

from __future__ import annotations

from pathlib import Path

import httpx
from metrics_text import parse_metrics


def tcp_counters() -> dict[str, int]:
    """Kernel TCP counters whose growth during a run explains latency outliers on loopback:
    a full accept queue (ListenOverflows) and retransmissions (RetransSegs)."""
    wanted = {"ListenOverflows", "RetransSegs"}
    counters: dict[str, int] = {}
    for path in (Path("/proc/net/netstat"), Path("/proc/net/snmp")):
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for names, values in zip(lines[::2], lines[1::2], strict=False):
            for name, value in zip(names.split()[1:], values.split()[1:], strict=False):
                if name in wanted:
                    counters[name] = int(value)
    return counters


def histogram_mean(before: dict[str, float], after: dict[str, float], name: str) -> float | None:
    """Mean of the observations a histogram got between two scrapes (None if none)."""
    count = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
    total = after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)
    return round(total / count, 4) if count > 0 else None


def hit_ratio(before: dict[str, float], after: dict[str, float], prefix: str) -> float | None:
    """hits / (hits + misses) between two scrapes of `<prefix>_hits_total` and `_misses_total`
    (None if there were no lookups)."""

    def grown(name: str) -> float:
        return after.get(f"{prefix}_{name}_total", 0.0) - before.get(f"{prefix}_{name}_total", 0.0)

    lookups = grown("hits") + grown("misses")
    return round(grown("hits") / lookups, 4) if lookups > 0 else None


async def scrape_metrics(url: str) -> dict[str, float]:
    """GET {url}/metrics, parsed; {} when the server has no such endpoint."""
    try:
        async with httpx.AsyncClient(timeout=10.0) as http:
            response = await http.get(f"{url}/metrics")
    except httpx.HTTPError:
        return {}
    if response.status_code != 200:
        return {}
    try:
        return parse_metrics(response.text)
    except ValueError:  # a peer whose /metrics is not Prometheus text
        return {}
