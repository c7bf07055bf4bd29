"""The prefill budget: fixed, or cut to about one decode step's worth of prefill as measured."""

from __future__ import annotations

from batching.generation.prefill_budget import MIN_CHUNK_TOKENS, PrefillBudget


def test_with_nothing_decoding_the_budget_is_the_idle_one() -> None:
    budget = PrefillBudget(chunk_tokens=256, idle_tokens=2048, adaptive=True)
    budget.on_decode(0.010)
    budget.on_prefill(256, 1.0)
    assert budget.tokens(rows_decoding=False) == 2048


def test_a_fixed_budget_ignores_the_measurements() -> None:
    budget = PrefillBudget(chunk_tokens=256, idle_tokens=2048, adaptive=False)
    budget.on_decode(0.020)
    budget.on_prefill(256, 0.100)
    assert budget.tokens(rows_decoding=True) == 256


def test_an_adaptive_budget_waits_for_both_measurements() -> None:
    budget = PrefillBudget(chunk_tokens=256, idle_tokens=2048, adaptive=True)
    assert budget.tokens(rows_decoding=True) == 256
    budget.on_decode(0.020)
    assert budget.tokens(rows_decoding=True) == 256


def test_an_adaptive_budget_costs_about_one_decode_step() -> None:
    budget = PrefillBudget(chunk_tokens=256, idle_tokens=2048, adaptive=True)
    budget.on_decode(0.020)  # a 20 ms decode step
    budget.on_prefill(200, 0.080)  # 0.4 ms per prompt token (a 2-core CPU)
    assert budget.tokens(rows_decoding=True) == 50  # 50 x 0.4 ms = one decode step


def test_an_adaptive_budget_stays_within_one_block_and_the_chunk_setting() -> None:
    budget = PrefillBudget(chunk_tokens=256, idle_tokens=2048, adaptive=True)
    budget.on_decode(0.001)
    budget.on_prefill(10, 1.0)  # prefill far dearer than decode
    assert budget.tokens(rows_decoding=True) == MIN_CHUNK_TOKENS
    cheap = PrefillBudget(chunk_tokens=256, idle_tokens=2048, adaptive=True)
    cheap.on_decode(0.003)
    cheap.on_prefill(512, 0.001)  # a GPU: a chunk costs less than a step
    assert cheap.tokens(rows_decoding=True) == 256


def test_the_moving_averages_follow_a_change_in_load() -> None:
    budget = PrefillBudget(chunk_tokens=256, idle_tokens=2048, adaptive=True)
    budget.on_prefill(100, 0.040)
    budget.on_decode(0.020)
    first = budget.tokens(rows_decoding=True)
    for _ in range(30):  # decode steps get slower (a bigger batch): more prefill fits
        budget.on_decode(0.040)
    assert first == 50 and budget.tokens(rows_decoding=True) > 95
