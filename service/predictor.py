"""One forward pass over a batch of texts: the `run_batch` the BatchCollector calls.

Runs on the collector's worker thread, never on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from service.models import LoadedModel


@dataclass(frozen=True)
class Classification:
    label: str
    score: float
    scores: dict[str, float]


@dataclass(frozen=True)
class Embedding:
    embedding: list[float]


Prediction = Classification | Embedding


class Predictor:
    """Tokenise with padding, run the model once, split the batch back into per-text results."""

    def __init__(self, loaded: LoadedModel, max_length: int = 512) -> None:
        self.loaded = loaded
        model_limit = getattr(loaded.model.config, "max_position_embeddings", max_length)
        self.max_length = min(max_length, model_limit)
        self.labels: dict[int, str] = dict(getattr(loaded.model.config, "id2label", {}) or {})

    def token_count(self, text: str) -> int:
        """Used to sort a batch by length so that padding stays small."""
        return len(text)  # characters are a cheap, monotone proxy; tokenising twice is not

    @torch.inference_mode()
    def run_batch(self, texts: list[str]) -> list[Prediction]:
        # input_ids, attention_mask: [B, S] padded to the longest text of this batch
        encoded = self.loaded.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.loaded.device)
        output = self.loaded.model(**encoded)
        if self.loaded.task == "classification":
            return self._classifications(output.logits)
        return self._embeddings(output.last_hidden_state, encoded["attention_mask"])

    def _classifications(self, logits: torch.Tensor) -> list[Prediction]:
        probs = logits.float().softmax(dim=-1).cpu()  # [B, num_labels]
        results: list[Prediction] = []
        for row in probs.tolist():
            scores = {self.labels.get(i, str(i)): p for i, p in enumerate(row)}
            best = max(range(len(row)), key=row.__getitem__)
            results.append(Classification(self.labels.get(best, str(best)), row[best], scores))
        return results

    def _embeddings(self, hidden: torch.Tensor, mask: torch.Tensor) -> list[Prediction]:
        # Mean over real tokens only (padding must not move a text's embedding), then L2-normalise
        # so that a dot product is the cosine similarity.
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # [B, S, 1]
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # [B, H]
        normalised = torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()
        return [Embedding(row) for row in normalised.tolist()]
