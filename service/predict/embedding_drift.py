"""Embedding drift: each new embedding's cosine similarity to a running mean of recent ones.

The predict_embedding_similarity histogram. While inputs come from one distribution, their
embeddings sit around a stable mean and the similarities keep a stable spread; when the
inputs change (another language, another topic, a broken upstream sending empty strings),
new embeddings point elsewhere and the histogram moves down, until the mean has followed.

The mean is a plain average of the first 1/weight embeddings (so the very first ones do not
dominate it), then an exponential moving average in which each embedding weighs `weight`:
with the default 0.001 it remembers roughly the last thousand embeddings. It is updated once
per batch, on the collector's worker thread (its only writer); a batch is compared with the
mean as it was before that batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

DEFAULT_WEIGHT = 0.001


class EmbeddingDrift:
    def __init__(self, observe: Callable[[float], None], weight: float = DEFAULT_WEIGHT) -> None:
        if not 0 < weight < 1:
            raise ValueError("weight must be in (0, 1)")
        self._observe = observe  # the histogram's observe()
        self._weight = weight
        self._mean: torch.Tensor | None = None  # [H]
        self._seen = 0

    def observe_batch(self, embeddings: torch.Tensor) -> None:
        """Record the similarities of one batch of L2-normalised embeddings [B, H]."""
        rows = embeddings.shape[0]
        if rows == 0:
            return
        batch_mean = embeddings.float().mean(dim=0)  # [H]
        if self._mean is None:
            self._mean, self._seen = batch_mean, rows
            return  # nothing to compare the first batch with
        direction = self._mean / self._mean.norm().clamp(min=1e-12)
        for similarity in (embeddings.float() @ direction).tolist():  # [B]
            self._observe(similarity)
        # B steps of an EMA weigh the batch 1 - (1 - w)^B; a plain average weighs it B / seen.
        share = max(1 - (1 - self._weight) ** rows, rows / (self._seen + rows))
        self._mean = self._mean + share * (batch_mean - self._mean)
        self._seen += rows
