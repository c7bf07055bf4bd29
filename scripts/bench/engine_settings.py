"""One way for the benchmarks to build a GenerationEngine from plain settings, on this checkout
or on an older one (`--before-dir`), whose engine took its settings as keyword arguments
instead of an EngineConfig."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any


def accepted_settings() -> set[str]:
    """The settings this checkout's engine accepts."""
    try:
        from batching.generation.config import EngineConfig
    except ImportError:  # an older checkout: keyword arguments of GenerationEngine
        from batching.generation.engine import GenerationEngine

        return set(inspect.signature(GenerationEngine).parameters)
    return {field.name for field in dataclasses.fields(EngineConfig)}


def build_engine(
    model: Any,
    tokenizer: Any,
    *,
    observer: Any = None,
    grammar_tokenizer: Any = None,
    **settings: Any,
) -> Any:
    """GenerationEngine(model, tokenizer, EngineConfig(**settings), ...) where there is an
    EngineConfig, else GenerationEngine(model, tokenizer, **settings, ...)."""
    from batching.generation.engine import GenerationEngine

    helpers = {"observer": observer, "grammar_tokenizer": grammar_tokenizer}
    helpers = {name: value for name, value in helpers.items() if value is not None}
    try:
        from batching.generation.config import EngineConfig
    except ImportError:
        return GenerationEngine(model, tokenizer, **settings, **helpers)
    for listed in ("eos_token_ids", "special_tokens"):
        if listed in settings:
            settings[listed] = tuple(settings[listed])
    return GenerationEngine(model, tokenizer, EngineConfig(**settings), **helpers)
