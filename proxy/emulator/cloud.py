"""Emulated ollama.com account routes and cloud models (reference §2, §9): `/api/me`, `/api/signout`, the
deprecated key deletion, the web search/fetch passthroughs, and what the daemon relays when it forwards a
cloud model's request (`*:cloud`, `*-cloud`) to ollama.com.

The emulator is never signed in, so the routes that need an account answer 401 with a `signin_url`, as a
local Ollama without a key does; a cloud model listed among the emulator's models is served like a local
one (as if signed in). The `cloud_status` fault makes cloud requests answer what ollama.com answers when it
refuses them (Ollama copies status, headers and body through unchanged): 429 when the account's usage limit
is reached, 503 `Server overloaded, please retry shortly (ref: <uuid>)` when the cloud is out of capacity;
or 502 with Go's client error when the daemon cannot reach ollama.com at all.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import uuid
from typing import Any

from aiohttp import web

from . import wire

__all__ = ["CLOUD_PATHS", "CloudRoutes", "cloud_error_message"]

CLOUD_PATHS = frozenset({
    "/api/generate", "/api/chat", "/api/embed", "/api/show", "/v1/chat/completions", "/v1/completions",
    "/v1/embeddings", "/v1/responses", "/v1/messages", "/v1/models/:model"})
"""Routes on which Ollama forwards a cloud model's request to ollama.com (route patterns)."""

_ACCOUNT = "emulator"


def cloud_error_message(status: int, path: str) -> str:
    """ollama.com's error text for a refused cloud request (as users report them verbatim), or, for 502,
    the daemon's own when it cannot reach ollama.com (Go's client error for the forwarded `path`)."""
    if status == 502:
        return f'Post "https://ollama.com:443{path}": dial tcp: lookup ollama.com: no such host'
    if status == 429:
        return (f"you ({_ACCOUNT}) have reached your session usage limit, "
                "upgrade for higher limits: https://ollama.com/upgrade")
    return f"Server overloaded, please retry shortly (ref: {uuid.uuid4()})"


class CloudRoutes:
    """Handlers for the account and cloud passthrough routes of an unsigned-in daemon."""

    def __init__(self) -> None:
        key = hashlib.sha256(b"emulator-identity").digest()
        self._signin_url = (f"https://ollama.com/connect?name={socket.gethostname()}"
                            f"&key={base64.urlsafe_b64encode(key).decode().rstrip('=')}")

    async def unauthorized(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        """401 with the sign-in URL (map keys sorted, as Go writes gin.H)."""
        del body
        return await wire.send_json(request, {"error": "unauthorized", "signin_url": self._signin_url},
                                    status=401)

    async def signout(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        """Signing out of nothing succeeds with an empty body."""
        del body
        return web.Response(status=200)
