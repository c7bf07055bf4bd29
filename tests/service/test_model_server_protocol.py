"""The Model Server Protocol the Kubernetes inference gateway reads: vLLM's metric names and types
in a real /metrics, and the three gauges following the engine under a load the test steps
forward one model forward at a time (ordered by events and gauges, never by timing)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, cast

import httpx
import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from metrics_text import family_names, parse_metrics
from prometheus_client import CollectorRegistry, generate_latest

from batching.generation.engine import KVCacheBlocks
from service.app import create_app
from service.generate.service import GenerationService
from service.metrics import GenerateMetrics
from service.settings import Settings
from tests.conftest import REPO

from .inprocess import wait_ready
from .scrape import metric

GATEWAY_OVERLAY = REPO / "deploy" / "kubernetes" / "overlays" / "inference-gateway"
WAIT_S = 30.0
SLOTS, MAX_SEQ_LEN = 2, 128
# name as exposed -> its `# TYPE` (vLLM's, vllm/v1/metrics/loggers.py).
MSP_TYPES = {
    "vllm:num_requests_waiting": "gauge",
    "vllm:num_requests_running": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:cache_config_info": "gauge",
    "vllm:prompt_tokens_total": "counter",
    "vllm:generation_tokens_total": "counter",
    "vllm:request_success_total": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
}


def declared_types(text: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))


def series(text: str, name: str) -> dict[str, float]:
    """Every sample of `name` (exact sample name), by its label part."""
    return {
        key[len(name) :]: value
        for key, value in parse_metrics(text).items()
        if key == name or key.startswith(name + "{")
    }


@pytest.fixture(scope="module")
def server(start_server, demo_models):
    return start_server(
        GENERATE_MODEL=str(demo_models["llm"]),
        GENERATE_SLOTS=str(SLOTS),
        GENERATE_MAX_SEQ_LEN=str(MAX_SEQ_LEN),
    )


def test_every_msp_metric_is_in_metrics_with_vllms_name_and_type(server, demo_models):
    text = httpx.get(server.url + "/metrics", timeout=30).text
    types = declared_types(text)
    assert {name: types.get(name) for name in MSP_TYPES} == MSP_TYPES
    served = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    assert served == str(demo_models["llm"])
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running"):
        ((labels, value),) = series(text, name).items()
        assert value == 0
        assert labels == f'{{engine="0",model_name="{served}"}}'
    reasons = {
        re.search(r'finished_reason="(\w+)"', labels).group(1)  # type: ignore[union-attr]
        for labels in series(text, "vllm:request_success_total")
    }
    assert reasons == {"stop", "length", "abort", "error", "repetition"}


def test_cache_config_info_carries_the_block_size_and_count_info_reports(server):
    text = httpx.get(server.url + "/metrics", timeout=30).text
    blocks = httpx.get(server.url + "/info", timeout=30).json()["generate"]["kv_cache_blocks"]
    ((labels, value),) = series(text, "vllm:cache_config_info").items()
    assert value == 1
    assert f'block_size="{blocks["block_size"]}"' in labels
    assert f'num_gpu_blocks="{blocks["blocks_total"]}"' in labels
    assert blocks["blocks_total"] * blocks["block_size"] >= MAX_SEQ_LEN  # one whole sequence


def test_a_completion_moves_the_vllm_counters_as_it_moves_ours(server):
    def counts() -> dict[str, float]:
        samples = parse_metrics(httpx.get(server.url + "/metrics", timeout=30).text)

        def total(prefix: str) -> float:
            return sum(v for k, v in samples.items() if k.split("{")[0] == prefix)

        return {
            "prompt": total("vllm:prompt_tokens_total"),
            "generated": total("vllm:generation_tokens_total"),
            "ours_generated": samples["generate_output_tokens_total"],
            "ttft": total("vllm:time_to_first_token_seconds_count"),
            "e2e": total("vllm:e2e_request_latency_seconds_count"),
            "length": sum(
                v
                for k, v in samples.items()
                if k.startswith("vllm:request_success_total") and 'reason="length"' in k
            ),
        }

    before = counts()
    body = {"model": "any", "prompt": "count me", "max_tokens": 5}
    answer = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    after = counts()
    usage = answer["usage"]
    assert after["prompt"] - before["prompt"] == usage["prompt_tokens"]
    assert after["generated"] - before["generated"] == usage["completion_tokens"]
    assert after["ours_generated"] - before["ours_generated"] == usage["completion_tokens"]
    assert (after["ttft"] - before["ttft"], after["e2e"] - before["e2e"]) == (1, 1)
    finish = answer["choices"][0]["finish_reason"]
    assert after["length"] - before["length"] == (1 if finish == "length" else 0)


def picker_metric_names() -> set[str]:
    """The series the endpoint picker is configured to read (epp-config.yaml)."""
    config = yaml.safe_load((GATEWAY_OVERLAY / "epp-config.yaml").read_text())
    (extractor,) = (p for p in config["plugins"] if p["type"] == "core-metrics-extractor")
    default = extractor["parameters"]["defaultEngine"]
    (engine,) = (e for e in extractor["parameters"]["engineConfigs"] if e["name"] == default)
    return {value.split("{")[0] for key, value in engine.items() if key.endswith("Spec") and value}


def keda_metric_names() -> set[str]:
    scaled = yaml.safe_load((GATEWAY_OVERLAY / "scaledobject.yaml").read_text())
    queries = [trigger["metadata"]["query"] for trigger in scaled["spec"]["triggers"]]
    return {name for q in queries for name in re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*)\{", q)}


def test_every_metric_the_picker_and_keda_read_is_in_our_metrics(server):
    wanted = picker_metric_names()
    assert wanted == {
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:cache_config_info",
    }
    wanted |= keda_metric_names()
    text = httpx.get(server.url + "/metrics", timeout=30).text
    assert wanted - family_names(text) == set()


class StepGate:
    """A forward pre-hook that lets the engine run only the model forwards the test allows:
    forward k (counting from 1) starts once k have been allowed. Between two allowances the
    engine's state is still, so /metrics, /info and the engine can be compared exactly."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._cond = threading.Condition()
        self.entered = 0
        self._allowed = 0
        self._open = False
        self._handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any) -> None:
        with self._cond:
            self.entered += 1
            self._cond.notify_all()
            number = self.entered
            if not self._cond.wait_for(lambda: self._open or self._allowed >= number, WAIT_S):
                raise RuntimeError("the test never let this forward run")

    def step(self) -> None:
        """Let the held forward run, and wait until the engine is held at the next one."""
        with self._cond:
            self._allowed += 1
            self._cond.notify_all()
        self.wait_entered(self._allowed + 1)

    def wait_entered(self, count: int) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.entered >= count, WAIT_S):
                raise TimeoutError(f"the engine never reached forward {count}")

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def remove(self) -> None:
        self.open()
        self._handle.remove()


@pytest.fixture
def gated_app(demo_models) -> Iterator[tuple[TestClient, StepGate]]:
    settings = Settings(
        generate_model=str(demo_models["llm"]),
        generate_slots=SLOTS,
        generate_max_seq_len=MAX_SEQ_LEN,
    )
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        model = client.app.state.runtime.generate.loaded.model  # type: ignore[attr-defined]
        gate = StepGate(model)  # after warm-up: only requests' forwards are counted
        try:
            yield client, gate
        finally:
            gate.remove()


def gauges(client: TestClient) -> tuple[float, float, float]:
    """(running, waiting, KV use) as the inference gateway reads them."""
    text = client.get("/metrics").text

    def one(name: str) -> float:
        ((_, value),) = series(text, name).items()
        return value

    return (
        one("vllm:num_requests_running"),
        one("vllm:num_requests_waiting"),
        one("vllm:kv_cache_usage_perc"),
    )


def until_waiting(client: TestClient, count: int) -> None:
    """The handlers run on the client's event loop: wait (bounded) until all have queued."""
    deadline = time.monotonic() + WAIT_S
    while gauges(client)[1] < count:
        assert time.monotonic() < deadline, f"never {count} waiting"
        time.sleep(0.01)


def test_running_waiting_and_kv_use_follow_a_load_stepped_one_forward_at_a_time(gated_app):
    client, gate = gated_app
    engine = client.app.state.runtime.generate.engine  # type: ignore[attr-defined]
    assert gauges(client) == (0, 0, 0)

    block_size = engine.kv_cache_blocks.block_size
    service = client.app.state.runtime.generate  # type: ignore[attr-defined]
    # A first prompt one token into a block: its blocks are ceil(tokens / block), not floor.
    first_prompt = "request number 0 of the stepped load"
    while len(service.encode(first_prompt)) % block_size != 1:
        first_prompt += " x"

    def post(i: int) -> Future[httpx.Response]:
        prompt = first_prompt if i == 0 else f"request number {i} of the stepped load"
        body = {"prompt": prompt, "max_new_tokens": 40}
        return pool.submit(client.post, "/generate", json=body)

    pool = ThreadPoolExecutor(max_workers=4)
    try:
        first = post(0)
        gate.wait_entered(1)  # held in its prefill: it has a row, and the blocks it writes
        running, waiting, prefill_use = gauges(client)  # (allocated right before the forward,
        assert (running, waiting) == (1, 0) and prefill_use > 0  # as vLLM's scheduler does)

        gate.step()  # its prompt is written; held in the forward after its prefill
        running, waiting, first_use = gauges(client)
        assert (running, waiting) == (1, 0)
        assert first_use >= prefill_use
        info = client.get("/info").json()["generate"]["kv_cache_blocks"]
        assert first_use == info["blocks_used"] / info["blocks_total"]
        assert engine.kv_cache_blocks == type(engine.kv_cache_blocks)(**info)
        first_blocks = info["blocks_used"]

        queued = [post(i) for i in (1, 2, 3)]
        until_waiting(client, 3)  # the engine is held, so they cannot be admitted
        assert gauges(client)[:2] == (1, 3)
        for _ in range(4):  # the next engine step admits a second row (the rows are the limit)
            gate.step()
            running, waiting, use = gauges(client)
            if running == SLOTS:
                break
        assert (running, waiting) == (SLOTS, 2)
        assert use >= first_use

        # While the same two rows decode (nobody finished, nobody admitted), every written token
        # stays written: use never falls, and it rises as rows fill blocks.
        seen = [first_use]
        for _ in range(30):
            gate.step()
            running, waiting, use = gauges(client)
            if (running, waiting) != (SLOTS, 2):
                break
            assert use >= seen[-1]
            seen.append(use)
        assert max(seen) > first_use, seen

        gate.open()
        answers = [first.result(WAIT_S), *(f.result(WAIT_S) for f in queued)]
    finally:
        gate.open()  # a failed assertion must not leave the requests held in the engine
        pool.shutdown(wait=True)
    assert [a.status_code for a in answers] == [200] * 4
    # Held after its prefill, the first request had written its prompt, one token into a block.
    prompt_tokens = answers[0].json()["prompt_tokens"]
    assert prompt_tokens % block_size == 1
    assert first_blocks == prompt_tokens // block_size + 1
    deadline = time.monotonic() + WAIT_S
    while gauges(client) != (0, 0, 0):  # the engine retires the last rows one step later
        assert time.monotonic() < deadline, gauges(client)
        time.sleep(0.01)
    assert metric(client.get("/metrics").text, "kv_cache_usage_ratio") == 0


class FillingEngine:
    """The engine's figures as a scrape reads them while requests keep arriving: every read of
    waiting_requests finds one more (the engine thread does not stop for /metrics)."""

    def __init__(self) -> None:
        self.reads = 0
        self.slots_in_use = 2
        self.kv_blocks_total, self.kv_blocks_used, self.kv_blocks_cached = 64, 8, 0
        self.kv_cache_bytes, self.prefix_cache_usage_ratio = 1024, 0.0

    @property
    def waiting_requests(self) -> int:
        self.reads += 1
        return self.reads

    @property
    def kv_cache_blocks(self) -> KVCacheBlocks:
        return KVCacheBlocks(block_size=16, blocks_total=64, blocks_used=8)


def test_one_scrape_reports_one_waiting_count_under_both_names() -> None:
    registry = CollectorRegistry()
    metrics = GenerateMetrics(registry, max_slots=4)
    engine = FillingEngine()
    metrics.vllm.bind("demo", engine.kv_cache_blocks)
    service = GenerationService(
        cast(Any, None), cast(Any, engine), Settings(), metrics
    )  # only refresh_gauges is called
    service.refresh_gauges()
    text = generate_latest(registry).decode()
    waiting = series(text, "vllm:num_requests_waiting")
    assert list(waiting.values()) == [series(text, "generate_waiting_requests")[""]]
    assert engine.reads == 1
