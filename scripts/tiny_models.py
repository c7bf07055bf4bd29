"""The one place that builds tiny models offline: a byte-level BPE trainer and config builders.

Used by make_demo_models.py (the demo), bench/make_bench_models.py (the benchmark models),
bench/bench_engine.py (real model shapes with random weights) and the tests, so a tokenizer or
a model shape is defined once. Everything is deterministic and needs no network.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

DecoderFamily = Literal["llama", "qwen2", "mistral"]
DECODER_CONFIGS: dict[str, tuple[type[PretrainedConfig], str]] = {
    "llama": (LlamaConfig, "LlamaForCausalLM"),
    "qwen2": (Qwen2Config, "Qwen2ForCausalLM"),  # biases on q/k/v
    "mistral": (MistralConfig, "MistralForCausalLM"),  # a sliding window
}
# Small enough to run in milliseconds on a CPU, big enough to have GQA (4 query heads sharing
# 2 KV heads). A wide init makes greedy decoding vary from token to token (0.02 repeats one
# token), which is what equality tests need to mean anything.
TINY_DECODER = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "initializer_range": 0.3,
}


def train_byte_bpe(
    lines: Sequence[str],
    *,
    vocab_size: int,
    special_tokens: Sequence[str],
    unk_token: str | None = None,
    **special: Any,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `lines`: every UTF-8 byte is a token, so any text
    round-trips. `special` names the roles of the special tokens (pad_token="<pad>", ...)."""
    bpe = Tokenizer(models.BPE(unk_token=unk_token))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(lines, trainer=trainer)
    if unk_token is not None:
        special["unk_token"] = unk_token
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **special)


def decoder_config(family: DecoderFamily = "llama", **overrides: Any) -> PretrainedConfig:
    """A decoder-only config of `family`: TINY_DECODER unless overridden (any config field)."""
    config_class, architecture = DECODER_CONFIGS[family]
    return config_class(**(TINY_DECODER | {"architectures": [architecture]} | overrides))


def classifier_config(
    *,
    vocab_size: int,
    pad_token_id: int | None,
    hidden_size: int = 64,
    num_layers: int = 2,
    intermediate_size: int = 128,
) -> BertConfig:
    """A NEGATIVE/POSITIVE BertForSequenceClassification config."""
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=intermediate_size,
        max_position_embeddings=512,
        pad_token_id=pad_token_id,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
        architectures=["BertForSequenceClassification"],
    )


def save_causal_lm(
    config: PretrainedConfig, tokenizer: PreTrainedTokenizerFast, out_dir: Path
) -> None:
    """A random-weight causal LM of `config`, saved with its tokenizer as a hub model would be
    (the generation config follows the config's pad and EOS ids, None included)."""
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
