"""/predict over the encoder families (scripts/model_families.py ENCODER_FAMILIES): each model is
saved as a hub model would be and loaded by the service's own code, as a classifier and as an
embedding model, and a padded batch gives every text what it gets alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_families import ENCODER_FAMILIES
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from service.models import load_predict_model
from service.predict.predictor import Classification, Embedding, Predictor
from service.settings import Settings
from tests.batching.conftest import VOCAB_SIZE, build_tokenizer

TINY_ENCODER = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
    "id2label": {0: "NEGATIVE", 1: "POSITIVE"},
    "label2id": {"NEGATIVE": 0, "POSITIVE": 1},
}
TEXTS = [
    "a",
    "The quick brown fox jumps over the lazy dog.",
    "héllo wörld ✓ 日本語",
    "Continuous batching lets requests join and leave the batch at every step, again and again.",
]


def save(name: str, task: str, folder: Path) -> Path:
    fields = dict(ENCODER_FAMILIES[name])
    config = AutoConfig.for_model(str(fields.pop("model_type")), **(TINY_ENCODER | fields))
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModel
    torch.manual_seed(0)
    auto.from_config(config).save_pretrained(folder)  # its architectures say the task
    build_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("task", ["classification", "embedding"])
@pytest.mark.parametrize("name", list(ENCODER_FAMILIES))
def test_a_batch_gives_every_text_what_it_gets_alone(name: str, task: str, tmp_path: Path) -> None:
    folder = save(name, task, tmp_path / "model")
    loaded = load_predict_model(Settings(predict_model=str(folder), device="cpu"))
    assert loaded.task == task
    predictor = Predictor(loaded)
    batched = predictor.predict(TEXTS)
    for text, together in zip(TEXTS, batched, strict=True):
        (alone,) = predictor.predict([text])
        if isinstance(alone, Classification):
            assert isinstance(together, Classification) and together.label == alone.label
            assert together.score == pytest.approx(alone.score, abs=1e-5)
        else:
            assert isinstance(alone, Embedding) and isinstance(together, Embedding)
            assert torch.allclose(
                torch.tensor(together.embedding), torch.tensor(alone.embedding), atol=1e-5
            )
