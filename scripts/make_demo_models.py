"""Build tiny random-weight demo models offline, deterministically, in seconds.

    python scripts/make_demo_models.py [OUT_DIR]      (default: demo_models/)

Creates OUT_DIR/classifier (BertForSequenceClassification, labels NEGATIVE/POSITIVE) and
OUT_DIR/llm (LlamaForCausalLM with a chat template), sharing one byte-level BPE tokenizer
trained on the text below. Both are saved with save_pretrained, so the service loads them
through exactly the same Auto* code path as a real hub model. The weights are random: the
answers are meaningless, only the plumbing is real.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tiny_models import classifier_config, decoder_config, save_causal_lm, train_byte_bpe
from transformers import BertForSequenceClassification, PreTrainedTokenizerFast

VOCAB_SIZE = 1024  # a multiple of 32: bitsandbytes nf4 needs every linear output divisible by 32
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
# Plain turns as before; with tools, a Hermes/Qwen-style system block lists them and the model
# is taught to answer <tool_call>{"name": ..., "arguments": {...}}</tool_call> (the format
# service/openai/tools/parsers.py reads as "hermes"); tool results come back as <|tool|> turns.
CHAT_TEMPLATE = (
    "{% if tools %}<|system|>\nYou may call these tools:\n<tools>\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    'To call one, answer <tool_call>{"name": ..., "arguments": {...}}</tool_call>\n'
    "{% endif %}"
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] %}{{ message['content'] }}\n{% endif %}"
    "{% for call in message.get('tool_calls') or [] %}"
    '<tool_call>{"name": "{{ call.function.name }}", '
    '"arguments": {{ call.function.arguments | tojson }}}</tool_call>\n'
    "{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CORPUS = """
The quick brown fox jumps over the lazy dog. A great product, I love it and would buy again.
Terrible service, the package arrived broken and nobody answered my emails.
Serving models in production means batching requests, bounding queues and measuring latency.
Continuous batching lets requests join and leave the running batch at every decode step.
The key value cache keeps the attention keys and values of every token generated so far.
Prometheus scrapes metrics; NGINX limits the request rate and passes server-sent events.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 2.71 42. Punctuation: ! ? , ; : ' " ( ) [ ] { }
Unicode: héllo wörld, café, naïve, façade, smørrebrød, Ærøskøbing, 日本語のテキスト, 中文, 한국어,
Ελληνικά, русский текст, emoji 😀 🚀 ✓ ★ — and “quotes” ‘too’.
user assistant system: hello, how are you? I am fine, thank you. What is the weather today?
def main(): return sum(x * x for x in range(10))  # code is text too
"""


def train_tokenizer() -> PreTrainedTokenizerFast:
    """The demo's byte-level BPE, with a chat template so /v1/chat/completions works."""
    lines = [line for line in CORPUS.splitlines() if line.strip()]
    tokenizer = train_byte_bpe(
        lines * 4,
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_classifier(
    tokenizer: PreTrainedTokenizerFast, out_dir: Path, vocab_size: int = VOCAB_SIZE, **shape: int
) -> None:
    """A NEGATIVE/POSITIVE BertForSequenceClassification (the bench builds a bigger one)."""
    config = classifier_config(vocab_size=vocab_size, pad_token_id=tokenizer.pad_token_id, **shape)
    BertForSequenceClassification(config).eval().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def build_llm(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    config = decoder_config(
        "llama",
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    save_causal_lm(config, tokenizer, out_dir)


def build_demo_models(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Build both demo models under out_dir; returns {"classifier": path, "llm": path}."""
    torch.manual_seed(seed)
    tokenizer = train_tokenizer()
    paths = {"classifier": out_dir / "classifier", "llm": out_dir / "llm"}
    build_classifier(tokenizer, paths["classifier"])
    torch.manual_seed(seed + 1)
    build_llm(tokenizer, paths["llm"])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="demo_models", type=Path)
    args = parser.parse_args(argv)
    paths = build_demo_models(args.out_dir)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
