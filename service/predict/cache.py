"""An in-process LRU cache of one-shot results (PREDICT_CACHE_SIZE, PREDICT_CACHE_TTL_S).

One cache is created per loaded model (it lives on its PredictService), and its keys name the
model, revision and task as well as the exact input, so a result can never outlive the model
that computed it, and the tenant (the caller's API key unless PREDICT_CACHE_SHARED), so a hit
never tells one client what another sent. It stores model outputs (a Classification or an
Embedding) with their token counts, not responses: /v1/embeddings shares it with /predict.
Only the event loop thread touches it. Generation is never cached (sampling makes two answers
to one prompt differ by design).

`Cache-Control` on a request, as HTTP caches read it: `no-cache` skips the lookup (the result
is computed afresh, and the fresh result replaces the stored one); `no-store` keeps the result
out of the cache. Both together bypass it entirely.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

ValueT = TypeVar("ValueT")


class CacheKey(NamedTuple):
    tenant: str  # the caller's API key, hashed (deps.cache_share), or "" (open API, shared cache)
    model: str
    revision: str
    task: str
    text: str | tuple[int, ...]  # the input as given: a text, or token ids


@dataclass(frozen=True)
class CacheUse:
    """What one request lets the cache do: serve a stored result, and store a fresh one."""

    read: bool = True
    write: bool = True

    @classmethod
    def from_cache_control(cls, header: str | None) -> CacheUse:
        directives = {part.strip().lower() for part in (header or "").split(",")}
        return cls(read="no-cache" not in directives, write="no-store" not in directives)


class PredictionCache(Generic[ValueT]):
    """Least recently used entries go first beyond `max_entries`; entries older than `ttl_s`
    are never served (0 = no expiry). `clock` is injectable so tests need not sleep."""

    def __init__(
        self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 1 or ttl_s < 0:
            raise ValueError("max_entries must be at least 1 and ttl_s at least 0")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[CacheKey, tuple[float, ValueT]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey) -> ValueT | None:
        """The stored value, now the most recently used; None if absent or expired."""
        stored = self._entries.get(key)
        if stored is None:
            return None
        stored_at_s, value = stored
        if self.ttl_s and self._clock() - stored_at_s >= self.ttl_s:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: CacheKey, value: ValueT) -> None:
        self._entries[key] = (self._clock(), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
