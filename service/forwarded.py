"""Who the client is behind proxies: X-Forwarded-For, trusted as far as our own proxies wrote it.

uvicorn's rule (`FORWARDED_ALLOW_IPS`) believes X-Forwarded-For only on a connection from a
listed proxy, and then takes the rightmost address that is not itself a listed proxy; with `*`
(every address is a proxy) that is the *leftmost* entry, which a client writes itself whenever
a proxy appends to the header instead of replacing it. NGINX here and ingress-nginx replace it;
Envoy-based gateways (the Kubernetes inference gateway), NGINX Gateway Fabric and cloud load
balancers append. `FORWARDED_TRUSTED_HOPS` says how many entries, counted from the right, our
own proxies appended: the client is the leftmost of those, and whatever a client wrote before
them is ignored, whatever the proxies' addresses.
"""

from __future__ import annotations

from typing import Any, cast

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

FORWARDED_FOR = b"x-forwarded-for"


def last_entries(values: list[bytes], hops: int) -> bytes:
    """The last `hops` addresses of one or more X-Forwarded-For headers, joined."""
    entries = [e.strip() for value in values for e in value.split(b",") if e.strip()]
    return b", ".join(entries[-hops:])


class LastHopsOnly:
    """Cuts X-Forwarded-For to the entries the trusted hops appended, before uvicorn reads it."""

    def __init__(self, app: ASGIApp, hops: int) -> None:
        self.app = app
        self.hops = hops

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = scope["headers"]
            forwarded = [value for name, value in headers if name == FORWARDED_FOR]
            if forwarded:
                kept = [(name, value) for name, value in headers if name != FORWARDED_FOR]
                kept.append((FORWARDED_FOR, last_entries(forwarded, self.hops)))
                scope = dict(scope, headers=kept)
        await self.app(scope, receive, send)


def with_client_address(app: ASGIApp, forwarded_allow_ips: str, trusted_hops: int) -> ASGIApp:
    """The app behind uvicorn's proxy-header rule, and behind the hop count if one is set."""
    # uvicorn and Starlette spell the ASGI types differently; both are plain ASGI callables.
    checked = cast(ASGIApp, ProxyHeadersMiddleware(cast(Any, app), forwarded_allow_ips))
    return LastHopsOnly(checked, trusted_hops) if trusted_hops > 0 else checked
