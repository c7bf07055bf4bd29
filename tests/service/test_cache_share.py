"""One rule for whose share of a cache a request uses (the /predict response cache and the
prefix cache): its configured API key's, hashed; one share for an open API or a shared cache."""

from __future__ import annotations

from starlette.requests import Request

from service.deps import cache_share
from service.settings import Settings


def bearer(token: str) -> Request:
    return Request({"type": "http", "headers": [(b"authorization", f"Bearer {token}".encode())]})


def test_each_configured_key_has_its_own_share_and_a_shared_cache_has_one() -> None:
    settings = Settings(api_keys="alpha-key-0123,beta-key-0123")
    alpha = cache_share(bearer("alpha-key-0123"), settings, shared=False)
    beta = cache_share(bearer("beta-key-0123"), settings, shared=False)
    assert alpha and beta and alpha != beta
    assert "alpha-key-0123" not in alpha  # keys never sit in a cache in clear
    assert alpha == cache_share(bearer("alpha-key-0123"), settings, shared=False)
    assert cache_share(bearer("made-up-token"), settings, shared=False) == ""
    assert cache_share(bearer("alpha-key-0123"), settings, shared=True) == ""
    assert cache_share(bearer("anything"), Settings(api_keys=""), shared=False) == ""
