"""Reading a live server's /metrics from tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from metrics_text import parse_metrics, sample_value


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a /metrics page, parsed as Prometheus text."""
    return sample_value(text, name, **labels)


def step_batch_buckets(url: str) -> dict[float, float]:
    """generate_step_batch_size's cumulative buckets: {upper bound: decode steps so far}."""
    samples = parse_metrics(httpx.get(f"{url}/metrics").text)
    prefix = 'generate_step_batch_size_bucket{le="'
    return {float(k[len(prefix) : -2]): v for k, v in samples.items() if k.startswith(prefix)}


@contextmanager
def largest_decode_step(url: str) -> Iterator[dict[str, float]]:
    """While the block runs, the decode steps the engine itself counts (no sampling that a
    fast machine could slip between): yields {"rows": the smallest histogram bound that
    holds every step of the block}, filled in when the block ends. 1 means every step ran
    one row; 2 means some step ran two rows."""
    before = step_batch_buckets(url)
    found = {"rows": 0.0}
    try:
        yield found
    finally:
        after = step_batch_buckets(url)
        grown = {bound: after[bound] - before.get(bound, 0.0) for bound in after}
        steps = grown[float("inf")]
        found["rows"] = min(bound for bound, count in grown.items() if count == steps)
