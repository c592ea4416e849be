"""A counting pass-through in front of one replica, for benchmarks: what the replica was sent, whoever sent
it (clients, a proxy's plugins and their sub-requests, summaries).

Every request is relayed to the replica as it came and its answer back chunk by chunk as it arrives
(status, headers, bytes; the client leaving closes the upstream call, Ollama's cancel signal). Per route
and model it counts calls, answers by status, the inputs of `/api/embed` calls, and the prompt tokens the
replica reported evaluating: the last `prompt_eval_count` of each answer (Ollama counts a cached prefix
too, so this is the prompt the replica was given, not its prefill work). Loopback only.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import aiohttp
import attrs
import orjson
from aiohttp import web
from multidict import CIMultiDict

from .runner import assert_loopback

__all__ = ["RouteCount", "Tap"]

_PROMPT_EVAL = re.compile(rb'"prompt_eval_count":(\d+)')
_TAIL_BYTES = 8192
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                         "trailer", "transfer-encoding", "upgrade", "host", "content-length"})


@attrs.define
class RouteCount:
    """What one (route, model) received."""

    calls: int = 0
    prompt_tokens: int = 0
    """Sum of `prompt_eval_count` over the answers that reported one."""
    inputs: int = 0
    """Texts embedded (`/api/embed`: a string input is one, a list its length)."""
    statuses: Counter[int] = attrs.field(factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "prompt_tokens": self.prompt_tokens, "inputs": self.inputs,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())}}


class Tap:
    """A pass-through to `upstream` on a free loopback port; `url` once `start` returned.

    `counts` is keyed by `"<METHOD> <path>"` then model (`""` when the body names none)."""

    def __init__(self, upstream: str) -> None:
        assert_loopback(upstream)
        self.upstream = upstream.rstrip("/")
        self.url = ""
        self.counts: dict[str, dict[str, RouteCount]] = {}
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> str:
        # No decompression (the bytes go back as they came), no pool limit (the proxy bounds itself).
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None))
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._relay)
        # Handler cancellation: a client that leaves ends the upstream call too.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def totals(self, routes: tuple[str, ...] = ("POST /api/chat", "POST /api/generate",
                                                 "POST /api/embed")) -> dict[str, Any]:
        """Prompt tokens, calls and embedded inputs over `routes`, in all and per model."""
        by_model: dict[str, dict[str, int]] = {}
        for route in routes:
            for model, count in self.counts.get(route, {}).items():
                entry = by_model.setdefault(model, {"calls": 0, "prompt_tokens": 0, "inputs": 0})
                entry["calls"] += count.calls
                entry["prompt_tokens"] += count.prompt_tokens
                entry["inputs"] += count.inputs
        return {"prompt_tokens": sum(e["prompt_tokens"] for e in by_model.values()),
                "calls": sum(e["calls"] for e in by_model.values()),
                "by_model": dict(sorted(by_model.items()))}

    def snapshot(self) -> dict[str, Any]:
        return {route: {model: count.as_dict() for model, count in sorted(models.items())}
                for route, models in sorted(self.counts.items())}

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        model, inputs = _describe(request.path, body)
        count = self.counts.setdefault(f"{request.method} {request.path}", {}).setdefault(
            model, RouteCount())
        count.calls += 1
        count.inputs += inputs
        headers = CIMultiDict((k, v) for k, v in request.headers.items()
                              if k.lower() not in _HOP_BY_HOP)
        try:
            upstream = await self._session.request(
                request.method, self.upstream + request.path_qs, data=body, headers=headers,
                allow_redirects=False)
        except aiohttp.ClientError:
            count.statuses[502] += 1
            return web.Response(status=502)
        async with upstream:
            count.statuses[upstream.status] += 1
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in _HOP_BY_HOP:
                    response.headers.add(key, value)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            tail = b""
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
                tail = (tail + chunk)[-_TAIL_BYTES:]
            await response.write_eof()
        found = _PROMPT_EVAL.findall(tail)
        if found:
            count.prompt_tokens += int(found[-1])
        return response


def _describe(path: str, body: bytes) -> tuple[str, int]:
    """(model, texts to embed) of a request body; ("", 0) when it is not a JSON object naming one."""
    if not body or not path.startswith("/api/"):
        return "", 0
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "", 0
    if not isinstance(data, dict):
        return "", 0
    model = data.get("model")
    name = model if isinstance(model, str) else ""
    if path != "/api/embed":
        return name, 0
    value = data.get("input")
    return name, (1 if isinstance(value, str) else len(value) if isinstance(value, list) else 0)
