"""The servers' own view and the kernel's: Prometheus text from /metrics, TCP counters.

`histogram_mean` of two scrapes taken around a run gives the server's mean batch size over
that run (the difference of `_sum` and `_count`).
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx


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


_SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {"name{labels}": value}; comments and junk skipped."""
    series: dict[str, float] = {}
    for line in text.splitlines():
        match = _SERIES.match(line.strip())
        if match is None or line.startswith("#"):
            continue
        try:
            series[match.group(1)] = float(match.group(2))
        except ValueError:
            continue
    return series


def histogram_mean(before: dict[str, float], after: dict[str, float], name: str) -> float | None:
    """Mean of the observations a histogram got between two scrapes (None if none)."""
    count = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
    total = after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)
    return round(total / count, 4) if count > 0 else None


async def scrape_metrics(url: str) -> dict[str, float]:
    """GET {url}/metrics, parsed; {} when the server has no such endpoint."""
    try:
        async with httpx.AsyncClient(timeout=10.0) as http:
            response = await http.get(f"{url}/metrics")
    except httpx.HTTPError:
        return {}
    return parse_metrics(response.text) if response.status_code == 200 else {}
