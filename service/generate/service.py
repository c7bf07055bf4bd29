"""The generation side of the service: the engine, its tokenizer, its grammar compiler."""

from __future__ import annotations

import logging
import time
from copy import copy
from dataclasses import asdict, dataclass
from typing import Any, cast

from batching.generation.config import EngineConfig
from batching.generation.detokenizer import Tokenizer
from batching.generation.engine import GenerationEngine
from batching.generation.grammar import GrammarCompiler, GrammarLimits
from batching.generation.kv_cache import kv_cache_blocks
from batching.generation.model_support import model_context
from service.generate.special_tokens import prompt_ids
from service.metrics import GenerateMetrics
from service.models import LoadedModel, attn_implementation_of
from service.settings import Settings

log = logging.getLogger(__name__)


def eos_token_ids(loaded: LoadedModel) -> list[int]:
    """EOS ids from the generation config (may be a list, e.g. chat models) and the tokenizer."""
    ids: set[int] = set()
    generation_config = getattr(loaded.model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(int(loaded.tokenizer.eos_token_id))
    return sorted(ids)


def special_token_strings(loaded: LoadedModel) -> list[str]:
    """The text of every special token (BOS, EOS, role markers, ...): generated text never
    carries them (see batching/generation/detokenizer.py)."""
    tokenizer = loaded.tokenizer
    strings = set(tokenizer.all_special_tokens)
    strings.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return sorted(s for s in strings if s)


def grammar_limits(settings: Settings) -> GrammarLimits:
    return GrammarLimits(
        max_grammar_bytes=settings.grammar_max_bytes,
        timeout_s=settings.grammar_compile_timeout_s,
        memory_mb=settings.grammar_compile_memory_mb,
        workers=settings.grammar_compile_workers,
        cache_size=settings.grammar_cache_size,
        wait_s=settings.request_timeout_s,
    )


def logits_size(loaded: LoadedModel) -> int:
    """How many token ids the model scores (its head may be wider than the tokenizer)."""
    head = loaded.model.get_output_embeddings()
    return int(getattr(head, "out_features", None) or len(loaded.tokenizer))


def make_grammar_compiler(loaded: LoadedModel, settings: Settings) -> GrammarCompiler | None:
    """The grammar compiler (structured output; its tokenizer gives token bytes for logprobs),
    or None if llguidance cannot use this tokenizer (it needs a fast one)."""
    vocab_size = logits_size(loaded)
    try:
        backend = copy(loaded.tokenizer.backend_tokenizer)  # as llguidance.hf does it
        backend.no_padding()
        backend.no_truncation()
        return GrammarCompiler(
            backend.to_str(), vocab_size, eos_token_ids(loaded), grammar_limits(settings)
        )
    except Exception:
        log.warning("structured output is off: llguidance cannot use this tokenizer", exc_info=True)
        return None


@dataclass
class GenerationService:
    loaded: LoadedModel
    engine: GenerationEngine
    settings: Settings
    metrics: GenerateMetrics
    grammars: GrammarCompiler | None = None  # None: no structured output for this model

    @classmethod
    def create(
        cls, loaded: LoadedModel, settings: Settings, metrics: GenerateMetrics
    ) -> GenerationService:
        grammars = make_grammar_compiler(loaded, settings)
        blocks = kv_cache_blocks(
            loaded.model,
            settings.generate_kv_block_size,
            kv_cache_bytes=settings.generate_kv_cache_bytes,
            gpu_memory_utilization=settings.generate_gpu_memory_utilization,
        )
        config = EngineConfig(
            num_slots=settings.generate_slots,
            max_seq_len=settings.generate_max_seq_len or model_context(loaded.model),
            max_queue=settings.generate_max_queue,
            timeout_s=settings.request_timeout_s,
            eos_token_ids=tuple(eos_token_ids(loaded)),
            special_tokens=tuple(special_token_strings(loaded)),
            prefill_chunk_tokens=settings.generate_prefill_chunk_tokens,
            max_stall_steps=settings.generate_max_stall_steps,
            mixed_steps=settings.generate_mixed_steps,
            prefix_cache_tokens=settings.generate_prefix_cache_tokens,
            kv_block_size=settings.generate_kv_block_size,
            kv_cache_blocks=blocks,
            cuda_graphs=settings.generate_cuda_graphs,
            paged_attention=settings.generate_paged_attention,
            priority_aging_s=settings.priority_aging_s,
        )
        engine = GenerationEngine(
            loaded.model,
            # HF's decode() is typed for batches too (str | list[str]); given one id list it
            # returns one str, which is all the engine's Tokenizer protocol asks for.
            cast(Tokenizer, loaded.tokenizer),
            config,
            observer=metrics,
            grammar_tokenizer=grammars.tokenizer if grammars else None,
        )
        metrics.slots_total.set(settings.generate_slots)
        metrics.vllm.bind(settings.generate_model, engine.kv_cache_blocks)
        return cls(loaded, engine, settings, metrics, grammars)

    @property
    def vocab_size(self) -> int:
        return logits_size(self.loaded)

    @property
    def grammar_tokenizer(self) -> object:
        """llguidance's tokenizer (exact token bytes for logprobs), or None."""
        return self.grammars.tokenizer if self.grammars else None

    @property
    def cancel_on_disconnect(self) -> bool:
        return self.settings.generate_cancel_on_disconnect

    def warm_up(self) -> float:
        started = time.perf_counter()
        self.engine.warm_up()
        self._compile_chat_template()
        return time.perf_counter() - started

    def _compile_chat_template(self) -> None:
        """Render the chat template once: transformers compiles it (jinja, ~20 ms) on first use
        and keeps it, and the first chat request would otherwise pay that on the event loop."""
        tokenizer = self.loaded.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            return
        try:
            tokenizer.apply_chat_template(
                [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False
            )
        except Exception:  # a template that refuses this conversation is compiled all the same
            log.debug("the chat template refused the warm-up conversation", exc_info=True)

    def start(self) -> None:
        self.engine.start()

    async def stop(self, drain_timeout_s: float) -> None:
        await self.engine.stop(drain_timeout_s)
        if self.grammars is not None:
            await self.grammars.close()

    def encode(self, prompt: str) -> list[int]:
        """Tokenise on the event loop: fast tokenizers take well under a millisecond per KB,
        and the engine keeps a private tokenizer copy, so the two never race."""
        allow = self.settings.generate_special_tokens_in_prompts
        return prompt_ids(self.loaded.tokenizer, prompt, True, allow)

    def refresh_gauges(self) -> None:
        # Each engine figure read once, so the generate_* and vllm:* gauges of one scrape agree
        # (the engine thread may admit a request between two reads).
        waiting, running = self.engine.waiting_requests, self.engine.slots_in_use
        self.metrics.slots_in_use.set(running)
        self.metrics.waiting.set(waiting)
        blocks = self.engine.kv_cache_blocks
        self.metrics.kv_cache_usage.set(blocks.usage_ratio)
        self.metrics.vllm.set_state(waiting=waiting, running=running, blocks=blocks)
        self.metrics.kv_blocks_total.set(self.engine.kv_blocks_total)
        self.metrics.kv_blocks_used.set(self.engine.kv_blocks_used)
        self.metrics.kv_blocks_cached.set(self.engine.kv_blocks_cached)
        self.metrics.kv_cache_bytes.set(self.engine.kv_cache_bytes)
        self.metrics.prefix_cache_usage.set(self.engine.prefix_cache_usage_ratio)

    def info(self) -> dict[str, Any]:
        return {
            "slots": self.engine.slots_total,
            "max_seq_len": self.engine.max_seq_len,
            "max_new_tokens": self.settings.generate_max_new_tokens,
            "max_queue": self.settings.generate_max_queue,
            "kv_cache_bytes": self.engine.kv_cache_bytes,
            # What vllm:cache_config_info and vllm:kv_cache_usage_perc report (blocks of tokens).
            "kv_cache_blocks": asdict(self.engine.kv_cache_blocks),
            "kv_cache": {
                **self.engine.memory_summary(),
                "blocks_used": self.engine.kv_blocks_used,
                "blocks_cached": self.engine.kv_blocks_cached,
                "preemptions": self.engine.preemptions_total,
            },
            "attn_implementation": attn_implementation_of(self.loaded.model),
            "attention_layers": self.engine.attention_layout,
            "mixed_steps_off_reason": self.engine.mixed_steps_off_reason,
            "cuda_graphs": self.engine.cuda_graphs.as_dict(),
            "paged_attention": self.engine.paged_attention.as_dict(),
            "prefill_chunk_tokens": self.settings.generate_prefill_chunk_tokens,
            "max_stall_steps": self.settings.generate_max_stall_steps,
            "prefill_chunk_limits": self.engine.prefill_chunk_limits.as_dict(),
            "mixed_steps": self.engine.mixed_steps,
            "max_choices": self.settings.generate_max_choices,
            "structured_output": self.grammar_tokenizer is not None,
            "prefix_cache": {
                "enabled": self.engine.prefix_cache_enabled,
                "tokens": self.settings.generate_prefix_cache_tokens,
                "bytes": self.engine.prefix_cache_bytes,
            },
        }
