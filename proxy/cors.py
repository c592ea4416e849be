"""CORS on the proxy's own answers: a browser client allowed by the replicas can read the proxy's 429.

A replica answers CORS itself, by its `OLLAMA_ORIGINS` (preflights are relayed to it, and its
`Access-Control-Allow-Origin` comes back with what it answered). But what the proxy answers on its own
(a 429 of a quota, a 503 of a full queue, a 401, a 413) never met a replica: without the header, a
browser hides the whole response from the page, which sees a network error instead of an error it can
back off on. `server.cors_origins` (Ollama's default list unless set; set it to what the replicas'
`OLLAMA_ORIGINS` allow) says which origins get it on those answers. Any answer a page may read also
exposes `Retry-After`, `X-Service-Limits` and `X-Request-Id`, which are not CORS-safelisted: without
`Access-Control-Expose-Headers` the page cannot read when to retry.

Invariants: nothing is added to a request without `Origin`; a relayed answer's CORS headers are the
replica's (an origin the replica refused gets nothing from the proxy: its 403 stays unreadable); the
`Origin` echoed is one that matched a configured pattern (never an arbitrary client string), and `*`
allows every origin as Ollama's `OLLAMA_ORIGINS=*` does (answered `*`, no credentials).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from aiohttp import web
from multidict import CIMultiDict

__all__ = ["EXPOSED_HEADERS", "OriginPolicy", "origin_pattern"]

EXPOSED_HEADERS = "Retry-After, X-Service-Limits, X-Request-Id"

_MAX_ORIGIN = 512
_MAX_REMEMBERED = 1024


def origin_pattern(pattern: str) -> re.Pattern[str]:
    """An `OLLAMA_ORIGINS` entry as Ollama (gin-contrib/cors) reads it: `*` is any run of characters and
    every other character is itself. Not a shell glob: `[` and `?` are literal, so `http://[::1]:*`
    means the IPv6 loopback on any port."""
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)


class OriginPolicy:
    """Which `Origin`s may read the proxy's own answers (patterns whose `*` is any run of characters)."""

    __slots__ = ("_allow_all", "_patterns", "_seen")

    def __init__(self, patterns: Iterable[str]) -> None:
        patterns = tuple(patterns)
        self._allow_all = "*" in patterns
        self._patterns = tuple(origin_pattern(p) for p in patterns if p != "*")
        self._seen: dict[str, bool] = {}
        """origin -> allowed: a page sends the same few origins again and again. Bounded: cleared when
        full, so client-chosen values cannot grow it."""

    def allowed(self, origin: str) -> bool:
        if self._allow_all:
            return True
        known = self._seen.get(origin)
        if known is None:
            # Echoed only when it matched: bounded and printable ASCII, as a header value must be.
            known = len(origin) <= _MAX_ORIGIN and origin.isascii() and origin.isprintable() and any(
                pattern.fullmatch(origin) is not None for pattern in self._patterns)
            if len(self._seen) >= _MAX_REMEMBERED:
                self._seen.clear()
            self._seen[origin] = known
        return known

    def apply(self, request: web.BaseRequest, headers: CIMultiDict[str], own: bool) -> None:
        """Add CORS headers to `headers`, a response to `request` about to go out. `own`: the proxy
        answered it (no replica's answer relayed)."""
        origin = request.headers.get("Origin")
        if origin is None or "Access-Control-Request-Method" in request.headers:
            return  # no CORS; or a preflight, the replica's to answer (exposing is for the response)
        if own and "Access-Control-Allow-Origin" not in headers:
            if self._allow_all:
                headers["Access-Control-Allow-Origin"] = "*"
            elif self.allowed(origin):
                headers["Access-Control-Allow-Origin"] = origin
                headers.add("Vary", "Origin")
        if "Access-Control-Allow-Origin" in headers and \
                "Access-Control-Expose-Headers" not in headers:
            headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
