"""Per-client rate limits: keyed by API key when it is a configured one, else by client IP.

Only a key from API_KEYS may name a bucket. On an open API any other Bearer token counts
against the client's IP: otherwise a client sending a fresh random token per request would
never be limited. Behind NGINX the client IP comes from X-Forwarded-For, which uvicorn trusts
only from FORWARDED_ALLOW_IPS.

slowapi's Limiter owns the storage and the windowing strategy. Its middleware cannot see
routes included with include_router in this FastAPI version (they sit behind an
`_IncludedRouter`), so the check runs as a route dependency instead, on the work routes only:
/health, /ready, /info and /metrics are never limited.
"""

from __future__ import annotations

import hashlib
import math
import time

from fastapi import Depends, Request
from limits import RateLimitItem, parse_many
from slowapi import Limiter
from slowapi.util import get_remote_address

from service.deps import configured_key
from service.errors import ApiError
from service.settings import Settings

SHARED_SCOPE = "api"  # one budget per client across /predict, /generate and /v1


def rate_limit_key(request: Request, api_keys: frozenset[str]) -> str:
    key = configured_key(request, api_keys)
    if key is not None:
        # Keys never sit in memory in clear beyond the request that carried them.
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
    return "ip:" + get_remote_address(request)


class RateLimiter:
    def __init__(self, settings: Settings) -> None:
        self.api_keys = settings.api_key_set
        self.limiter = Limiter(key_func=get_remote_address, storage_uri="memory://")
        self.items: list[RateLimitItem] = parse_many(settings.rate_limit)

    def check(self, request: Request) -> None:
        key = rate_limit_key(request, self.api_keys)
        strategy = self.limiter.limiter
        for item in self.items:
            if not strategy.hit(item, key, SHARED_SCOPE):
                reset_at, _ = strategy.get_window_stats(item, key, SHARED_SCOPE)
                retry_after_s = max(1, math.ceil(reset_at - time.time()))
                raise ApiError(
                    429,
                    "rate_limited",
                    f"rate limit exceeded: {item}",
                    {"Retry-After": str(retry_after_s)},
                )


async def enforce_rate_limit(request: Request) -> None:
    rate_limiter: RateLimiter = request.app.state.rate_limiter
    rate_limiter.check(request)


RateLimitDep = Depends(enforce_rate_limit)
