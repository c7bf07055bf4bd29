"""A real Prometheus, with monitoring/prometheus.yml, scrapes the real app; the dashboard's
queries run against it."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from harness import ManagedProcess, free_port, http_ok

from tests.edge.processes import PROMETHEUS, REPO, App, needs_prometheus

pytestmark = needs_prometheus

DASHBOARD = REPO / "monitoring" / "grafana" / "dashboards" / "model-serving.json"
SCRAPE_TIMEOUT_S = 30.0
# In dcgm-exporter's default counters (etc/default-counters.csv).
DCGM_DEFAULT_FIELDS = {
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_DEV_GPU_TEMP",
}


@dataclass
class Prometheus:
    url: str

    def query(self, promql: str) -> list[dict]:
        response = httpx.get(self.url + "/api/v1/query", params={"query": promql}, timeout=10)
        payload = response.json()
        assert payload["status"] == "success", f"{promql}: {payload}"
        return payload["data"]["result"]

    def wait_for_value(self, promql: str) -> float:
        """Poll (bounded) until the query has a positive value: a few scrapes may be needed."""
        deadline = time.monotonic() + SCRAPE_TIMEOUT_S
        while time.monotonic() < deadline:
            result = self.query(promql)
            if result and float(result[0]["value"][1]) > 0:
                return float(result[0]["value"][1])
            time.sleep(0.25)
        pytest.fail(f"no positive value for {promql} after {SCRAPE_TIMEOUT_S:g}s")


def render_prometheus_config(app_address: str, out: Path) -> Path:
    """monitoring/prometheus.yml with the app's address and a 1 s scrape interval."""
    text = (REPO / "monitoring" / "prometheus.yml").read_text()
    nowhere = f"127.0.0.1:{free_port()}"  # canary/shadow targets: down, as when not deployed
    replacements = {
        "app:8000": app_address,
        "app-canary:8000": nowhere,
        "app-shadow:8000": nowhere,
        "scrape_interval: 15s": "scrape_interval: 1s",
        "scrape_timeout: 5s": "scrape_timeout: 1s",
    }
    for old, new in replacements.items():
        assert old in text, f"monitoring/prometheus.yml no longer contains {old!r}"
        text = text.replace(old, new)
    out.write_text(text)
    return out


@pytest.fixture(scope="module")
def prometheus(app: App, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """One Prometheus for the module: its first scrape takes up to ~5 s (target sync)."""
    assert PROMETHEUS is not None
    tmp_path = tmp_path_factory.mktemp("prometheus")
    config = render_prometheus_config(f"127.0.0.1:{app.port}", tmp_path / "prometheus.yml")
    port = free_port()
    args = [
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    proc = ManagedProcess("prometheus", args, tmp_path / "prometheus.log")
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_until(lambda: http_ok(url + "/-/ready"), 30, "ready")
        yield Prometheus(url)
    finally:
        proc.stop()


def dashboard_queries() -> list[str]:
    """Every panel query, with Grafana's variables as Grafana would fill them in."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    return [e.replace("$role", ".*").replace("$__rate_interval", "1m") for e in exprs]


def test_prometheus_scrapes_predict_and_generate_series(app: App, prometheus: Prometheus) -> None:
    with httpx.Client(base_url=app.url, timeout=60) as client:
        for i in range(3):
            assert client.post("/predict", json={"text": f"scrape me {i}"}).status_code == 200
        generated = client.post("/generate", json={"prompt": "hello", "max_new_tokens": 8})
        assert generated.status_code == 200, generated.text

    assert prometheus.wait_for_value('up{job="model-serving",role="stable"}') == 1
    assert prometheus.wait_for_value('predict_batch_size_count{role="stable"}') >= 1
    assert prometheus.wait_for_value('generate_output_tokens_total{role="stable"}') >= 1
    assert prometheus.wait_for_value('http_requests_total{handler="/predict",status="200"}') >= 3


def test_every_dashboard_query_runs_on_series_the_app_exports(
    app: App, prometheus: Prometheus
) -> None:
    httpx.post(app.url + "/predict", json={"text": "warm"}, timeout=60)
    httpx.post(app.url + "/generate", json={"prompt": "hi", "max_new_tokens": 4}, timeout=60)
    prometheus.wait_for_value('generate_output_tokens_total{role="stable"}')

    queries = dashboard_queries()
    names = {n for q in queries for n in re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*)\{", q)}
    names |= {n for q in queries for n in re.findall(r"\b(DCGM_[A-Z_]+)\b", q)}
    # The GPU panels read dcgm-exporter's series (job dcgm), not the app's: only its default
    # fields, which no extra exporter configuration is needed for.
    dcgm = {n for n in names if n.startswith("DCGM_")}
    assert dcgm <= DCGM_DEFAULT_FIELDS
    names -= dcgm
    exported = {
        series["metric"]["__name__"]
        for series in prometheus.query('{job="model-serving",role="stable"}')
    }
    assert names - exported == set(), "the dashboard queries series the app does not export"
    for promql in queries:
        prometheus.query(promql)  # asserts the query is valid PromQL
