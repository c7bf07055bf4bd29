"""The benchmark's own logic: arguments, percentiles, metric scraping, ratios and targets.

No timing is asserted here (timing claims live in BENCHMARKS.md). The load generator is driven
against the HTTP-floor app in process, through httpx's ASGI transport: no server is launched.
"""

from __future__ import annotations

import itertools
import math
import statistics

import bench
import bench_load as load
import bench_metrics as metrics
import bench_report as report
import httpx
import pytest
from bench_peers import floor_app
from make_bench_models import generate_prompts, made_up_words, predict_texts, repeated_texts
from prometheus_client import CollectorRegistry, Histogram, generate_latest

# ---- arguments ----


def test_quick_run_uses_fewer_requests_and_one_repeat() -> None:
    args = bench.parse_args(["--quick"])
    assert (args.predict_requests, args.repeats, args.open_rates) == (256, 1, [])
    assert (args.naive_streams, args.skip) == (8, ["transformers-cb"])
    assert args.concurrency == [1, 16, 64]


def test_full_run_defaults_match_the_documented_workload() -> None:
    args = bench.parse_args([])
    assert (args.predict_requests, args.repeats, args.open_rates) == (512, 3, [0.5, 0.8])
    assert (args.naive_streams, args.skip) == (0, [])
    assert (args.prompts, args.new_tokens, args.max_batch, args.max_wait_ms) == (32, 64, 32, 5.0)
    assert (args.repeat_share, args.cache_concurrency, args.group_padding_tokens) == (
        0.5,
        [1, 64],
        64,
    )


def test_lists_and_model_folders_are_parsed() -> None:
    args = bench.parse_args(
        ["--concurrency", "2,8", "--skip", "naive, transformers-serve", "--predict-model", "m"]
    )
    assert args.concurrency == [2, 8]
    assert args.skip == ["naive", "transformers-serve"]
    assert args.predict_model == "m"


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--concurrency", "0,4"], ["--bogus"]])
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


# ---- percentiles and summaries ----


def test_percentile_interpolates_between_closest_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert load.percentile(values, 0) == 1.0
    assert load.percentile(values, 50) == 2.5
    assert load.percentile(values, 100) == 4.0
    assert load.percentile([7.0], 99) == 7.0


def test_percentile_agrees_with_the_standard_library() -> None:
    values = [float((i * 37) % 101) for i in range(250)]
    expected = statistics.quantiles(values, n=100, method="inclusive")
    for q in (1, 50, 95, 99):
        assert load.percentile(values, q) == pytest.approx(expected[q - 1])


def test_percentile_of_nothing_is_nan_and_out_of_range_is_refused() -> None:
    assert math.isnan(load.percentile([], 50))
    with pytest.raises(ValueError):
        load.percentile([1.0], 101)


def test_summary_counts_errors_tokens_and_gaps() -> None:
    samples = [
        load.Sample(True, 1.0, ttft_s=0.1, token_gaps_s=[0.01, 0.03], tokens=3),
        load.Sample(True, 2.0, ttft_s=0.3, token_gaps_s=[0.02], tokens=2),
        load.Sample(False, 0.5, error="HTTP 503"),
    ]
    summary = load.summarize(samples, wall_s=2.0)
    assert (summary["requests"], summary["errors"], summary["req_per_s"]) == (3, 1, 1.0)
    assert (summary["output_tokens"], summary["tok_per_s"]) == (5, 2.5)
    assert summary["tokens_per_request"] == [2, 3]
    assert summary["ttft_ms"]["p50"] == pytest.approx(200.0)
    assert summary["itl_ms"]["p50"] == pytest.approx(20.0)
    assert summary["latency_ms"]["p50"] == pytest.approx(1500.0)
    assert summary["error_examples"] == ["HTTP 503"]


def test_poisson_arrivals_are_reproducible_and_average_the_rate() -> None:
    offsets = load.poisson_offsets_s(4000, rate_per_s=200.0, seed=3)
    assert offsets == load.poisson_offsets_s(4000, rate_per_s=200.0, seed=3)
    assert all(b > a for a, b in itertools.pairwise(offsets))
    assert offsets[-1] / len(offsets) == pytest.approx(1 / 200.0, rel=0.1)


# ---- the server's view: Prometheus text ----


def test_mean_batch_size_is_the_difference_of_two_scrapes() -> None:
    registry = CollectorRegistry()
    histogram = Histogram("predict_batch_size", "x", buckets=(1, 8, 32), registry=registry)
    histogram.observe(4)
    before = metrics.parse_metrics(generate_latest(registry).decode())
    for size in (8, 16, 32):
        histogram.observe(size)
    after = metrics.parse_metrics(generate_latest(registry).decode())
    assert before["predict_batch_size_count"] == 1.0
    assert after['predict_batch_size_bucket{le="8.0"}'] == 2.0
    assert metrics.histogram_mean(before, after, "predict_batch_size") == pytest.approx(
        56 / 3, 1e-3
    )
    assert metrics.histogram_mean(after, after, "predict_batch_size") is None
    assert metrics.histogram_mean({}, {}, "absent") is None


def test_metric_parsing_reads_labelled_samples_and_refuses_junk() -> None:
    text = '# HELP x y\n# TYPE x counter\nx_total 3\nlabelled{b="2",a="1"} 2.5e3\n'
    assert metrics.parse_metrics(text) == {"x_total": 3.0, 'labelled{a="1",b="2"}': 2500.0}
    with pytest.raises(ValueError):
        metrics.parse_metrics(text + "not a metric\n")


def test_sse_lines_and_usage_are_read_for_both_api_shapes() -> None:
    assert load.sse_payloads('data: {"text":"a","token_ids":[5]}') == {
        "text": "a",
        "token_ids": [5],
    }
    assert load.sse_payloads("data: [DONE]") is None
    assert load.sse_payloads(": keep-alive") is None
    final = {"text": "", "finish_reason": "length", "usage": {"completion_tokens": 64}}
    assert load._read_ours(final) == (0, 64)
    chunk = {"choices": [{"index": 0, "text": " word"}]}
    assert load._read_openai(chunk) == (1, -1)
    last = {"choices": [{"finish_reason": "length", "text": ""}], "usage": {"completion_tokens": 9}}
    assert load._read_openai(last) == (0, 9)


# ---- the calls against the HTTP floor, in process ----


async def test_streamed_generation_is_counted_and_timed_at_the_client() -> None:
    transport = httpx.ASGITransport(app=floor_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://floor") as http:
        sample = await load.generate_call("http://floor", 8)(http, "a prompt")
        predicted = await load.predict_call("http://floor")(http, "a text")
        missing = await load.predict_call("http://floor/nowhere")(http, "a text")
    assert sample.ok and sample.tokens == 8 and sample.ttft_s is not None
    assert len(sample.token_gaps_s) == 7
    assert predicted.ok
    assert not missing.ok and missing.error == "HTTP 404"


# ---- ratios, ceiling and targets ----


def test_ceiling_adds_model_time_and_http_time_per_request() -> None:
    assert report.ceiling(100.0, 100.0) == pytest.approx(50.0)
    assert report.ceiling(300.0, 1500.0) == pytest.approx(250.0)
    assert math.isnan(report.ceiling(0.0, 10.0))


def test_targets_are_met_or_not_by_their_direction() -> None:
    assert report.Target("a", 1.25, 1.2).met
    assert not report.Target("a", 1.1, 1.2).met
    assert report.Target("p99", 0.9, 1.0, higher_is_better=False).met
    assert not report.Target("missing", math.nan, 1.0).met


def _results() -> dict:
    def run(req_per_s: float, p99: float) -> dict:
        return {"req_per_s": req_per_s, "latency_ms": {"p50": p99 / 2, "p95": p99, "p99": p99}}

    def stream(tok_per_s: float, ttft_p99: float | None = None) -> dict:
        out: dict = {"streams": {"tok_per_s": tok_per_s, "tokens_per_request": [64]}}
        if ttft_p99 is not None:
            out["streams"]["ttft_ms"] = {"p50": ttft_p99, "p99": ttft_p99}
        return out

    return {
        "predict": {
            "limit": 300.0,
            "floor": 1500.0,
            "ceiling": 250.0,
            "systems": {
                "ours": {
                    "c1": run(100, 20),
                    "c16": run(230, 90),
                    "c64": run(240, 300),
                    "repeated c64": run(240, 300),
                },
                "ours-cache": {"repeated c64": run(360, 200)},
                "litserve": {"c16": run(180, 100), "c64": run(190, 400)},
                "naive": {"c1": run(105, 20), "c64": run(100, 900)},
            },
        },
        "generate": {
            "prefill_s": 0.3,
            "systems": {
                "ours": stream(800.0, ttft_p99=500.0),
                "engine": stream(850.0),
                "static": stream(780.0),
                "transformers-serve": stream(400.0),
                "naive": stream(70.0),
            },
        },
    }


def test_every_target_is_computed_from_one_results_dict() -> None:
    results = _results()
    targets = report.predict_targets(results) + report.generate_targets(results)
    measured = {t.name: round(t.measured, 3) for t in targets}
    assert measured["/predict c64: ours / LitServe req/s"] == round(240 / 190, 3)
    assert measured["/predict c64: ours / ceiling"] == 0.96
    assert measured["/predict c1: ours p50 / naive p50"] == 1.0
    assert measured["/predict repeated c64, half the texts repeated: cache on / off req/s"] == 1.5
    assert measured["/generate: ours / naive server tok/s"] == round(800 / 70, 3)
    assert measured["/generate: ours TTFT p99 / one batched prefill"] == round(500 / 300, 3)
    assert all(t.met for t in targets)
    results["targets"] = [t.as_dict() for t in targets]
    text = report.report(results)
    assert "| ours | c64 | 240.0 |" in text and "**not met**" not in text


def test_a_missing_system_fails_its_target_instead_of_crashing() -> None:
    results = _results()
    del results["predict"]["systems"]["litserve"]
    targets = report.predict_targets(results) + report.generate_targets(results)
    by_name = {t.name: t for t in targets}
    assert not by_name["/predict c64: ours / LitServe req/s"].met
    results["targets"] = [t.as_dict() for t in targets]
    missing = next(t for t in results["targets"] if t["name"].endswith("ours / LitServe req/s"))
    assert missing["measured"] is None
    assert "| not measured |" in report.report(results)


# ---- workloads ----


def test_predict_texts_have_8_to_40_words_and_are_reproducible() -> None:
    texts = predict_texts(200)
    assert texts == predict_texts(200)
    assert all(8 <= len(t.split()) <= 40 for t in texts)


def test_cache_workload_repeats_half_its_texts_each_after_its_first_use() -> None:
    texts = repeated_texts(200, 0.5, seed=3)
    assert len(texts) == 200 and len(set(texts)) == 100
    first_use = {t: texts.index(t) for t in set(texts)}
    assert all(first_use[t] <= i for i, t in enumerate(texts))
    assert set(texts).isdisjoint(repeated_texts(200, 0.5, seed=4))  # a cold cache every run


def test_made_up_words_are_distinct() -> None:
    words = made_up_words(500)
    assert len(set(words)) == 500


class _WordTokenizer:
    """One token per word: enough to check the prompt length rule without training a BPE."""

    def encode(self, text: str) -> list[int]:
        return list(range(len(text.split())))


def test_prompts_fit_the_token_range() -> None:
    prompts = generate_prompts(_WordTokenizer(), 20, min_tokens=16, max_tokens=32)  # type: ignore[arg-type]
    assert len(prompts) == 20
    assert all(16 <= len(p.split()) <= 32 for p in prompts)


def test_the_threads_bench_runs_each_server_with_its_default_threads_and_with_one() -> None:
    import bench_threads

    specs = bench_threads.specs("/models/classifier")
    assert list(specs) == ["ours", "ours-1-thread", "litserve", "litserve-1-thread"]
    assert "OMP_NUM_THREADS" not in specs["ours"].env | specs["litserve"].env
    assert specs["ours-1-thread"].env["OMP_NUM_THREADS"] == "1"
    assert specs["litserve-1-thread"].env == {"OMP_NUM_THREADS": "1"}
    assert specs["ours-1-thread"].env["PREDICT_MAX_GROUP_PADDING_TOKENS"] == "64"
    assert len({spec.port for spec in specs.values()}) == 4  # each its own port


def test_the_prefill_bench_compares_each_chunk_size_mixed_and_separate() -> None:
    import bench_prefill

    configs = bench_prefill.chunk_configs(bench_prefill.parse_args([]))
    assert configs == {
        "unchunked": (bench_prefill.UNCHUNKED, False),
        "chunk-auto": ("auto", True),  # auto measures mixed steps: no separate run of it
        "chunk-64": (64, True),
        "chunk-64 separate": (64, False),
        "chunk-256": (256, True),
        "chunk-256 separate": (256, False),
    }
