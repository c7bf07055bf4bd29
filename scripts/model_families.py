"""The decoder families the engine is checked against, and what it does with each.

One entry per family: a tiny config built from transformers' own config class (random weights,
milliseconds per forward), and the verdict the engine must reach. tests/batching/
test_model_coverage.py holds every entry to its verdict (output equal to generate(), or the
refusal message), and the README's "Supported models" table is printed from this list
(`python scripts/supported_models.py`), so the table cannot claim what the test does not check.

Windows and chunk sizes are shrunk to WINDOW tokens, far below the prompts and outputs the test
runs, so sliding and chunked layers really slide; mixed kinds of layer alternate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import AutoConfig, PretrainedConfig

Verdict = Literal["served", "served without mixed steps", "refused"]
WINDOW = 8  # sliding window / attention chunk of the windowed families, in tokens
VOCAB = 384
TINY = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.3,  # varied greedy tokens (0.02 repeats one)
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "tie_word_embeddings": False,
}
GPT2_STYLE = {  # GPT-2, GPT-J, CodeGen, GPTBigCode name their sizes the old way
    "vocab_size": VOCAB,
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 256,
    "initializer_range": 0.3,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
ALTERNATING = {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": WINDOW}
MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
LOCAL_EXPERTS = {"num_local_experts": 4, "num_experts_per_tok": 2}
ALIBI_NOTE = "ALiBi biases, which the model builds from a 2D mask; the engine passes 4D masks"
MLA_NOTE = "multi-head latent attention: K and V of different widths, the KV slots have one"
NO_MIXED = "attention does not go through transformers' AttentionInterface"


@dataclass(frozen=True)
class Family:
    """A decoder family, how to build a tiny one, and what the engine does with it."""

    name: str
    model_type: str
    overrides: dict[str, Any] = field(default_factory=dict)
    verdict: Verdict = "served"
    why: str = ""  # served: what is special; refused: the reason (a regex of the message)
    plain: bool = False  # no TINY defaults (old-style configs)
    max_seq_len: int = 64
    note: str = ""  # the README's words, where `why` is a pattern

    def config(self) -> PretrainedConfig:
        base = {} if self.plain else TINY
        return AutoConfig.for_model(self.model_type, **(base | self.overrides))

    @property
    def test_id(self) -> str:
        return self.name.lower().replace(" ", "-").replace("(", "").replace(")", "")


FAMILIES: tuple[Family, ...] = (
    Family("Llama", "llama"),
    Family("Qwen2", "qwen2"),
    Family("Qwen3", "qwen3", {"head_dim": 16}),
    Family("Qwen3-MoE", "qwen3_moe", {"head_dim": 16} | MOE),
    Family(
        "Qwen2-MoE",
        "qwen2_moe",
        MOE | {"shared_expert_intermediate_size": 32},
        why="sliding_window=0 read as no window",
    ),
    Family(
        "Mixtral",
        "mixtral",
        LOCAL_EXPERTS | {"sliding_window": WINDOW},
        why="sliding window on every layer",
    ),
    Family("Mistral", "mistral", {"sliding_window": WINDOW}, why="sliding window on every layer"),
    Family("Ministral", "ministral", {"head_dim": 16} | ALTERNATING, why="sliding + full layers"),
    Family("Gemma", "gemma", {"head_dim": 16}),
    Family("Gemma2", "gemma2", {"head_dim": 16} | ALTERNATING, why="sliding + full layers"),
    Family("Gemma3", "gemma3_text", {"head_dim": 16} | ALTERNATING, why="sliding + full layers"),
    Family("Cohere", "cohere"),
    Family("Cohere2", "cohere2", ALTERNATING, why="sliding + full layers"),
    Family("Phi", "phi"),
    Family("Phi3", "phi3"),
    Family(
        "Starcoder2", "starcoder2", {"sliding_window": WINDOW}, why="sliding window on every layer"
    ),
    Family("OLMo", "olmo"),
    Family("OLMo2", "olmo2"),
    Family("OLMo3", "olmo3", ALTERNATING, why="sliding + full layers"),
    Family("EXAONE-4", "exaone4", ALTERNATING, why="sliding + full layers"),
    Family(
        "gpt-oss",
        "gpt_oss",
        {"head_dim": 16} | LOCAL_EXPERTS | ALTERNATING,
        why="sliding + full layers, attention sinks",
    ),
    Family(
        "Llama-4",
        "llama4_text",
        {
            "head_dim": 16,
            "intermediate_size_mlp": 128,
            "num_local_experts": 2,
            "attention_chunk_size": WINDOW,
            "no_rope_layers": [1, 0],
            "layer_types": ["chunked_attention", "full_attention"],
        },
        why="chunked + full layers",
    ),
    Family("Granite", "granite"),
    Family("GraniteMoE", "granitemoe", LOCAL_EXPERTS),
    Family("SmolLM3", "smollm3"),
    Family("GLM", "glm", {"head_dim": 16}),
    Family("GLM4", "glm4", {"head_dim": 16}),
    Family("Ernie4.5", "ernie4_5"),
    Family("Seed-OSS", "seed_oss", {"head_dim": 16}),
    Family("HunYuan-dense", "hunyuan_v1_dense", {"head_dim": 16}),
    Family("Apertus", "apertus"),
    Family("GPT-2", "gpt2", GPT2_STYLE, plain=True),
    Family("GPTBigCode", "gpt_bigcode", GPT2_STYLE | {"multi_query": True}, plain=True),
    Family("GPT-NeoX", "gpt_neox", {"num_key_value_heads": 4}),
    Family("OPT", "opt", {"ffn_dim": 128, "word_embed_proj_dim": 64, "num_key_value_heads": 4}),
    Family(
        "Falcon",
        "falcon",
        {"num_kv_heads": 2, "new_decoder_architecture": True},
        "served without mixed steps",
        NO_MIXED,
    ),
    Family("StableLM", "stablelm", {}, "served without mixed steps", NO_MIXED),
    Family(
        "GPT-J",
        "gptj",
        GPT2_STYLE | {"rotary_dim": 8},
        "served without mixed steps",
        NO_MIXED,
        plain=True,
    ),
    Family(
        "CodeGen",
        "codegen",
        GPT2_STYLE | {"rotary_dim": 8, "n_ctx": 256},
        "served without mixed steps",
        NO_MIXED,
        plain=True,
    ),
    Family(
        "GPT-Neo",
        "gpt_neo",
        {
            "vocab_size": VOCAB,
            "hidden_size": 64,
            "num_layers": 2,
            "num_heads": 4,
            "attention_types": [[["global", "local"], 1]],
            "window_size": 64,
            "max_position_embeddings": 256,
            "initializer_range": 0.3,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        "served without mixed steps",
        NO_MIXED + "; contexts up to its local window",
        plain=True,
    ),
    Family(
        "GPT-Neo (past its window)",
        "gpt_neo",
        {
            "vocab_size": VOCAB,
            "hidden_size": 64,
            "num_layers": 2,
            "num_heads": 4,
            "attention_types": [[["global", "local"], 1]],
            "window_size": WINDOW,
            "max_position_embeddings": 256,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        "refused",
        "local attention layers take their 8-token window from the batch's padded "
        "length.*GENERATE_MAX_SEQ_LEN to at most 8",
        plain=True,
        note="its local layers cut their window by the batch's padded length: served only "
        "with GENERATE_MAX_SEQ_LEN up to window_size (256 in the released checkpoints)",
    ),
    Family(
        "Bloom",
        "bloom",
        {"n_layer": 2, "n_head": 4},
        "refused",
        "ALiBi position biases",
        note=ALIBI_NOTE,
    ),
    Family(
        "MPT",
        "mpt",
        {"d_model": 64, "n_heads": 4, "n_layers": 2, "vocab_size": VOCAB},
        "refused",
        "ALiBi position biases",
        plain=True,
        note=ALIBI_NOTE,
    ),
    Family(
        "DeepSeek-V2",
        "deepseek_v2",
        {
            "kv_lora_rank": 16,
            "q_lora_rank": 32,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "first_k_dense_replace": 1,
        },
        "refused",
        "multi-head latent attention",
        note=MLA_NOTE,
    ),
    Family(
        "DeepSeek-V3",
        "deepseek_v3",
        {
            "kv_lora_rank": 16,
            "q_lora_rank": 32,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
        },
        "refused",
        "multi-head latent attention",
        note=MLA_NOTE,
    ),
    Family(
        "Qwen3-Next",
        "qwen3_next",
        {"head_dim": 16} | MOE,
        "refused",
        "linear-attention .* layers, not only attention",
        note="linear-attention (Gated DeltaNet) layers: per-sequence state the KV slots "
        "cannot hold",
    ),
    Family(
        "LFM2",
        "lfm2",
        {"layer_types": ["conv", "full_attention"]},
        "refused",
        "short-convolution layers, not only attention",
        note="short-convolution layers: per-sequence state the KV slots cannot hold",
    ),
    Family(
        "Jamba",
        "jamba",
        {"num_experts": 2},
        "refused",
        "Mamba .* layers, not only attention",
        note="Mamba layers: per-sequence state the KV slots cannot hold",
    ),
    Family(
        "Falcon-H1",
        "falcon_h1",
        {},
        "refused",
        "Mamba-2 .* layers, not only attention",
        note="Mamba-2 layers: per-sequence state the KV slots cannot hold",
    ),
    Family(
        "Mamba",
        "mamba",
        {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2},
        "refused",
        "Mamba .* layers, not only attention",
        plain=True,
        note="state-space layers: per-sequence state the KV slots cannot hold",
    ),
)


# /predict families (tests/service/test_predict_families.py): batched equals alone, for a
# classifier head and for embeddings. model_type -> extra config fields.
ENCODER_FAMILIES: dict[str, dict[str, Any]] = {
    "BERT": {"model_type": "bert"},
    "RoBERTa": {"model_type": "roberta"},
    "DistilBERT": {"model_type": "distilbert", "dim": 64, "hidden_dim": 128, "n_layers": 2,
                   "n_heads": 4},
    "DeBERTa-v2": {"model_type": "deberta-v2"},
    "XLM-R": {"model_type": "xlm-roberta"},
    "ELECTRA": {"model_type": "electra", "embedding_size": 64},
    "ModernBERT": {"model_type": "modernbert", "global_attn_every_n_layers": 2,
                   "local_attention": 8},
    "ALBERT": {"model_type": "albert", "embedding_size": 32},
    "MPNet": {"model_type": "mpnet"},
}  # fmt: skip


def readme_table() -> str:
    """The README's "Supported models" table, from FAMILIES and ENCODER_FAMILIES."""
    lines = [
        "| Family | `model_type` | What the server does | Why / how |",
        "|---|---|---|---|",
    ]
    for family in FAMILIES:
        if family.verdict == "refused":
            what = "refused at start-up"
        elif family.verdict == "served":
            what = "served, equal to `generate()`"
        else:
            what = "served without mixed steps, equal to `generate()`"
        why = family.note or family.why or "full attention"
        lines.append(f"| {family.name} | `{family.model_type}` | {what} | {why} |")
    for name, fields in ENCODER_FAMILIES.items():
        lines.append(
            f"| {name} | `{fields['model_type']}` | `/predict`: classification and embeddings, "
            "batched equal to alone | encoder |"
        )
    return "\n".join(lines) + "\n"
