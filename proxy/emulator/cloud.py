"""Emulated ollama.com account routes (reference §2, §9): `/api/me`, `/api/signout`, the deprecated key
deletion, and the web search/fetch passthroughs. The emulator is never signed in, so the routes that need an
account answer 401 with a `signin_url`, as a local Ollama without a key does."""

from __future__ import annotations

import base64
import hashlib
import socket
from typing import Any

from aiohttp import web

from . import wire

__all__ = ["CloudRoutes"]


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
