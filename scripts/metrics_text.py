"""The one /metrics reader for tests and benchmarks: Prometheus text via prometheus_client's own
parser, so a malformed exposition fails loudly instead of being half read."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def series_key(name: str, labels: dict[str, str]) -> str:
    """`name{a="1",b="2"}` with labels sorted by name (`name` alone when there are none)."""
    if not labels:
        return name
    inner = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample of the exposition as {series_key: value}. Raises ValueError if malformed."""
    return {
        series_key(sample.name, sample.labels): float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample, its labels spelled out in full. KeyError if it is absent."""
    series = parse_metrics(text)
    key = series_key(name, labels)
    if key not in series:
        raise KeyError(f"{key} not in /metrics")
    return series[key]


def family_names(text: str) -> set[str]:
    """The metric families the exposition declares (as prometheus_client names them)."""
    return {family.name for family in text_string_to_metric_families(text)}
