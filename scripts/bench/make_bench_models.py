"""Bench models and workloads, built offline and deterministically (random weights).

    python scripts/bench/make_bench_models.py [OUT_DIR]          (default: bench_models/)

* A byte-level BPE tokenizer with 8,192 tokens, trained on a seeded synthetic corpus of
  made-up words (the demo corpus is far too small to learn 8k merges). It has no EOS token.
* `classifier`: BertForSequenceClassification, hidden 256, 4 layers, ~5M parameters.
* `llm`: LlamaForCausalLM, hidden 512, 6 layers, 8 heads, 4 KV heads, vocab 8192, tied
  embeddings, ~22M parameters, with `eos_token_id=None` everywhere: every system (our
  service, generate(), transformers' continuous batching) then produces exactly
  max_new_tokens tokens, and the bench checks the counts instead of trusting this.

The workloads (`predict_texts`, `generate_prompts`) are drawn from the same words, so the
texts tokenize to real multi-token sequences.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: shared helpers

from make_demo_models import build_classifier
from tiny_models import decoder_config, save_causal_lm, train_byte_bpe
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 8192
SPECIAL_TOKENS = ["<pad>", "<s>", "<unk>"]  # deliberately no EOS token
ONSETS = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w"]
ONSETS += ["br", "ch", "st", "tr", "pl", "gr", "sh", "th", "qu", "z"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "oo", "y"]
CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ck"]
PUNCTUATION = [".", ",", "!", "?", ";", ":"]


def made_up_words(count: int, seed: int = 0) -> list[str]:
    """`count` distinct pronounceable words, the same for every seed on every machine."""
    rng = random.Random(seed)
    words: dict[str, None] = {}
    while len(words) < count:
        syllables = rng.choice([1, 1, 2, 2, 2, 3, 3, 4])
        word = "".join(
            rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables)
        )
        words.setdefault(word, None)
    return list(words)


class WordSource:
    """Zipf-distributed words from a fixed lexicon (common words recur, like real text)."""

    def __init__(self, seed: int, lexicon_size: int = 12_000) -> None:
        self.words = made_up_words(lexicon_size)
        self.weights = [1.0 / (rank + 1) for rank in range(len(self.words))]
        self.rng = random.Random(seed)

    def sentence(self, n_words: int) -> str:
        words = self.rng.choices(self.words, self.weights, k=n_words)
        if self.rng.random() < 0.5:
            words[0] = words[0].capitalize()
        text = " ".join(words)
        return text + self.rng.choice(PUNCTUATION)


def train_tokenizer(seed: int = 0) -> PreTrainedTokenizerFast:
    source = WordSource(seed)
    lines = [source.sentence(source.rng.randint(4, 30)) for _ in range(20_000)]
    lines += source.words  # every word at least once, so rare words can become tokens too
    return train_byte_bpe(
        lines,
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        model_max_length=512,
    )


def build_llm(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    config = decoder_config(
        "llama",
        vocab_size=VOCAB_SIZE,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=0.2,  # varied greedy tokens, so detokenization does real work
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    save_causal_lm(config, tokenizer, out_dir)


def build_bench_models(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """{"classifier": path, "llm": path}; reuses folders that already hold a model."""
    paths = {"classifier": out_dir / "classifier", "llm": out_dir / "llm"}
    if all((p / "config.json").exists() for p in paths.values()):
        return paths
    tokenizer = train_tokenizer(seed)
    torch.manual_seed(seed)
    build_classifier(
        tokenizer,
        paths["classifier"],
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        num_layers=4,
        intermediate_size=1024,
    )
    torch.manual_seed(seed + 1)
    build_llm(tokenizer, paths["llm"])
    return paths


def predict_texts(count: int, seed: int = 1) -> list[str]:
    """`count` texts of 8-40 words each."""
    source = WordSource(seed)
    return [source.sentence(source.rng.randint(8, 40)) for _ in range(count)]


def repeated_texts(count: int, repeat_share: float, seed: int) -> list[str]:
    """`count` texts of which `repeat_share` repeat an earlier one (the cache workload).

    The unique texts are new for each seed, so each run starts with a cold cache; every repeat
    comes after its text's first use, at a random distance.
    """
    rng = random.Random(seed)
    unique = predict_texts(count - round(count * repeat_share), seed=1000 + seed)
    order = list(unique)
    for _ in range(count - len(unique)):
        order.insert(rng.randint(1, len(order)), "")  # a slot for a repeat
    texts: list[str] = []
    for text in order:
        texts.append(text or rng.choice(texts))
    return texts


def generate_prompts(
    tokenizer: PreTrainedTokenizerFast,
    count: int,
    min_tokens: int = 16,
    max_tokens: int = 32,
    seed: int = 2,
) -> list[str]:
    """`count` prompts whose token count (as the service encodes them) is in [min, max]."""
    source = WordSource(seed)
    prompts: list[str] = []
    while len(prompts) < count:
        target = source.rng.randint(min_tokens, max_tokens)
        words: list[str] = []
        while len(tokenizer.encode(" ".join(words))) < target:
            words.append(source.sentence(1)[:-1])
        text = " ".join(words)
        if min_tokens <= len(tokenizer.encode(text)) <= max_tokens:
            prompts.append(text)
    return prompts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="bench_models", type=Path)
    args = parser.parse_args(argv)
    for name, path in build_bench_models(args.out_dir).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
