"""When the decode step uses CUDA graphs, and the fallback to eager when it cannot.

Real graphs need a GPU (the equality tests replay them under TEST_DEVICE=cuda). Here a
stand-in for `DecodeGraphs` "captures" by remembering the step and "replays" by running it,
so the runner's capture, check and fallback logic runs on any machine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import pytest
import torch
from transformers import LlamaForCausalLM

from batching.generation import model_runner
from batching.generation.cuda_graphs import DecodeShape
from batching.generation.model_runner import ModelRunner
from batching.generation.sampling import SamplingParams
from tests.batching.conftest import TEST_DEVICE, EngineFactory, paged_runner, row_tables
from tests.batching.test_engine_matches_generate import reference

GRAPHS_LOGGER = "batching.generation.cuda_graphs"
on_cpu_only = pytest.mark.skipif(TEST_DEVICE.type == "cuda", reason="about machines without CUDA")


class StandInGraphs:
    """Replays by re-running the captured step; can fail the capture or corrupt a replay."""

    def __init__(self, *, fail_capture: bool = False, corrupt: bool = False) -> None:
        self.fail_capture = fail_capture
        self.corrupt = corrupt
        self.logits: torch.Tensor | None = None  # the runner's output buffer, for corrupting
        self.shapes: set[DecodeShape] = set()
        self.replays = 0
        self._step: Callable[[int, int], None] | None = None

    def capture(self, run_step: Callable[[int, int], None], shapes: Sequence[DecodeShape]) -> None:
        if self.fail_capture:
            raise RuntimeError("operation not permitted when stream is capturing")
        self._step = run_step
        self.shapes = set(shapes)

    def replay(self, shape: DecodeShape) -> bool:
        if self._step is None or shape not in self.shapes:
            return False
        self._step(*shape)
        self.replays += 1
        if self.corrupt and self.logits is not None:
            self.logits.add_(1.0)
        return True

    def clear(self) -> None:
        self._step = None
        self.shapes = set()


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Callable[..., StandInGraphs]:
    """Make runners built after this use a StandInGraphs, as if CUDA were there."""

    def install(**options: bool) -> StandInGraphs:
        graphs = StandInGraphs(**options)
        monkeypatch.setattr(model_runner, "DecodeGraphs", lambda: graphs)
        monkeypatch.setattr(model_runner, "unavailable_reason", lambda mode, device: None)
        return graphs

    return install


def runner_for(model: LlamaForCausalLM, graphs: StandInGraphs | None = None) -> ModelRunner:
    runner = paged_runner(model, 5, 40, kv_bucket_min=16)
    if graphs is not None:
        graphs.logits = runner.decode_buffers.logits
    return runner


@on_cpu_only
def test_graphs_asked_for_without_cuda_are_reported_unavailable_with_a_warning(
    tiny_llama: LlamaForCausalLM, caplog: pytest.LogCaptureFixture
) -> None:
    runner = paged_runner(tiny_llama, 2, 32, cuda_graphs="on")
    with caplog.at_level(logging.INFO, logger=GRAPHS_LOGGER):
        report = runner.capture_cuda_graphs()
    assert (report.enabled, report.reason) == (False, "no CUDA device: the model runs on cpu")
    assert report.as_dict()["batch_buckets"] == []
    [record] = [r for r in caplog.records if r.name == GRAPHS_LOGGER]
    assert record.levelno == logging.WARNING
    assert "runs eagerly" in record.getMessage()


@on_cpu_only
def test_auto_on_a_cpu_is_eager_without_a_warning(
    tiny_llama: LlamaForCausalLM, caplog: pytest.LogCaptureFixture
) -> None:
    runner = paged_runner(tiny_llama, 2, 32)
    with caplog.at_level(logging.INFO, logger=GRAPHS_LOGGER):
        assert not runner.capture_cuda_graphs().enabled
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == GRAPHS_LOGGER)


def test_graphs_turned_off_say_so(tiny_llama: LlamaForCausalLM) -> None:
    runner = paged_runner(tiny_llama, 2, 32, cuda_graphs="off")
    assert runner.cuda_graphs.reason == "turned off (cuda_graphs='off')"
    assert not runner.capture_cuda_graphs().enabled


def test_a_good_capture_reports_its_buckets_and_serves_by_replay(
    stand_in: Callable[..., StandInGraphs], tiny_llama: LlamaForCausalLM
) -> None:
    graphs = stand_in()
    runner = runner_for(tiny_llama, graphs)
    with torch.inference_mode():
        report = runner.capture_cuda_graphs()
        replays_at_warm_up = graphs.replays
        tables = row_tables(runner)
        runner.prefill(tables[:1], [[5, 6, 7]])
        runner.decode_step([7], [3], tables[:1])
    assert report.enabled
    assert (report.batch_buckets, report.kv_buckets) == ((1, 2, 4, 5), (16, 32, 40))
    assert "12 decode graphs captured" in report.reason
    assert graphs.replays == replays_at_warm_up + 1  # the step was a replay


def test_a_replay_that_differs_from_the_eager_step_falls_back_to_eager(
    stand_in: Callable[..., StandInGraphs],
    tiny_llama: LlamaForCausalLM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    eager = runner_for(tiny_llama)  # built before the stand-in: a plain eager runner
    graphs = stand_in(corrupt=True)
    runner = runner_for(tiny_llama, graphs)
    with caplog.at_level(logging.WARNING, logger=GRAPHS_LOGGER), torch.inference_mode():
        report = runner.capture_cuda_graphs()
        logits = []
        for each in (runner, eager):
            tables = row_tables(each)[:2]
            each.prefill(tables, [[5, 6, 7], [8]])
            logits.append(each.decode_step([7, 8], [3, 1], tables).clone())
    assert not report.enabled
    assert report.reason.startswith("a replay's logits differ from the eager step's")
    assert "differ" in caplog.text
    assert graphs.replays == 1  # the check's replay; never one while serving
    torch.testing.assert_close(logits[0], logits[1])


async def test_a_failed_capture_falls_back_to_eager_and_still_serves(
    stand_in: Callable[..., StandInGraphs], make_engine: EngineFactory
) -> None:
    graphs = stand_in(fail_capture=True)
    engine = make_engine(warm_up=True, num_slots=2, max_seq_len=32)
    report = engine.cuda_graphs
    assert not report.enabled
    assert report.reason == (
        "capture failed: RuntimeError('operation not permitted when stream is capturing')"
    )
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    result = await (await engine.submit([5, 6, 7], params)).wait()
    assert (result.completion_tokens, graphs.replays) == (5, 0)


async def test_replayed_steps_give_the_tokens_of_generate(
    stand_in: Callable[..., StandInGraphs],
    tiny_llama: LlamaForCausalLM,
    make_engine: EngineFactory,
) -> None:
    graphs = stand_in()
    engine = make_engine(warm_up=True, num_slots=3, max_seq_len=48, kv_bucket_min=16)
    assert engine.cuda_graphs.enabled
    replays_at_warm_up = graphs.replays
    prompts = [[5, 6, 7, 8], [9], [10, 11]]
    handles = [await engine.submit(p, SamplingParams(max_new_tokens=30)) for p in prompts]
    for prompt, handle in zip(prompts, handles, strict=True):
        assert list((await handle.wait()).token_ids) == reference(tiny_llama, prompt, 30)
    assert graphs.replays > replays_at_warm_up  # the decode steps were replays


def test_kv_buckets_double_from_128_where_graphs_are_captured_and_step_by_16_where_not(
    stand_in: Callable[..., StandInGraphs], tiny_llama: LlamaForCausalLM
) -> None:
    eager = paged_runner(tiny_llama, 2, 512, cuda_graphs="off")
    chosen = paged_runner(tiny_llama, 2, 96, kv_bucket_min=16)
    stand_in()
    graphed = paged_runner(tiny_llama, 2, 512)
    assert eager.kv_buckets == list(range(16, 513, 16))
    assert graphed.kv_buckets == [128, 256, 512]
    assert chosen.kv_buckets == [16, 32, 64, 96]  # a chosen smallest: the GPU's shapes anywhere
