"""One forward pass over a batch of texts: the `run_batch` the BatchCollector calls.

Texts are tokenised once, when they are submitted (`Predictor.encode`, on the event loop): the
collector needs their real token counts to sort a batch and keep it within its padded-token
budget, and a character count is a poor proxy (about 7 characters per token for the bench's
made-up words, 4 for English, 1 or less for Chinese). `run_batch` then only pads the ids, on
the collector's worker thread, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from batching.errors import InvalidInputError
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
ModelInput = str | tuple[int, ...]  # a text, or token ids in the model's own vocabulary


@dataclass(frozen=True)
class EncodedText:
    """A text as the tokenizer returned it (input_ids, attention_mask, ...), truncated."""

    encoding: dict[str, Any]

    @property
    def token_count(self) -> int:
        return len(self.encoding["input_ids"])


class Predictor:
    """Pad the encoded texts, run the model once, split the batch back into per-text results."""

    def __init__(self, loaded: LoadedModel, max_length: int = 512) -> None:
        self.loaded = loaded
        model_limit = getattr(loaded.model.config, "max_position_embeddings", max_length)
        self.max_length = min(max_length, model_limit)
        self.labels: dict[int, str] = dict(getattr(loaded.model.config, "id2label", {}) or {})
        # Called with each batch's L2-normalised embeddings [B, H] (the drift metric); set
        # after warm-up, so warm-up batches do not count.
        self.embedding_observer: Callable[[torch.Tensor], None] | None = None
        self._specials = special_tokens_around(loaded.tokenizer)
        self.vocab_size = len(loaded.tokenizer)

    def encode(self, text: str) -> EncodedText:
        """Tokenise one text (truncated to the model's limit). InvalidInputError if it cannot."""
        try:
            encoding = self.loaded.tokenizer(text, truncation=True, max_length=self.max_length)
        except Exception as exc:  # a tokenizer that refuses a text refuses only that request
            raise InvalidInputError(f"the tokenizer cannot encode this text: {exc}") from exc
        return EncodedText(dict(encoding))

    def encode_ids(self, ids: Sequence[int]) -> EncodedText:
        """Token ids in this model's vocabulary (OpenAI-style token-array input), wrapped in
        the special tokens the tokenizer adds to a text and truncated like a text."""
        for token_id in ids:
            if not 0 <= token_id < self.vocab_size:
                raise InvalidInputError(
                    f"token id {token_id} is outside the vocabulary (0 to {self.vocab_size - 1})"
                )
        prefix, suffix = self._specials
        room = max(0, self.max_length - len(prefix) - len(suffix))
        input_ids = [*prefix, *ids[:room], *suffix]
        encoding: dict[str, Any] = {"input_ids": input_ids, "attention_mask": [1] * len(input_ids)}
        if "token_type_ids" in self.loaded.tokenizer.model_input_names:
            encoding["token_type_ids"] = [0] * len(input_ids)
        return EncodedText(encoding)

    def encode_input(self, model_input: ModelInput) -> EncodedText:
        if isinstance(model_input, str):
            return self.encode(model_input)
        return self.encode_ids(model_input)

    @staticmethod
    def token_count(item: EncodedText) -> int:
        """The collector's size_of: the tokens this text costs in a padded batch."""
        return item.token_count

    def predict(self, texts: list[str]) -> list[Prediction]:
        """Encode and run `texts` as one batch (warm-up and tests; the service goes through the
        collector)."""
        return self.run_batch([self.encode(text) for text in texts])

    @torch.inference_mode()
    def run_batch(self, items: list[EncodedText]) -> list[Prediction]:
        # input_ids, attention_mask: [B, S] padded to the longest text of this batch
        encoded = self.loaded.tokenizer.pad(
            [item.encoding for item in items], return_tensors="pt"
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
        if self.embedding_observer is not None:
            self.embedding_observer(normalised)
        return [Embedding(row) for row in normalised.tolist()]


def special_tokens_around(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single text ([CLS] and [SEP] for BERT,
    <s> and </s> for RoBERTa, nothing for many others), found by encoding a probe text with
    and without them: transformers 5 no longer exposes build_inputs_with_special_tokens."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return list(full[:start]), list(full[start + len(bare) :])
    return [], []  # a template that rewrites the text itself: add nothing
