"""`make bench-embed` (first part): CPU per request of embed_cache and embed_batch in the request phase.

Idle: a chat request (nothing for them to do), which must stay <= 5 us. Acting: embed_cache answering
a full hit of one 768-float vector from memory (lookup, key hashing, rendering the answer). The plugins
run as the chain runs them (`on_request` on a real RequestContext); the coroutines finish without
suspending, so they are driven by hand and the event loop's own cost is not counted. Not a test: it
prints figures, asserts nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any

import orjson

from plugins.embed_batch import EmbedBatch, EmbedBatchConfig
from plugins.embed_cache import EmbedCache, EmbedCacheConfig
from proxy.config import TelemetryConfig
from proxy.context import RequestContext
from proxy.embeddings import parse_ask
from proxy.ollama import classify
from proxy.plugin import PluginServices, Subrequests
from proxy.telemetry.setup import build_telemetry

ROUNDS = 200_000


class _Path:
    """What the plugins read of an aiohttp request: its path."""

    def __init__(self, path: str) -> None:
        self.path = path


def _run(coroutine: Awaitable[Any]) -> Any:
    try:
        coroutine.send(None)  # type: ignore[attr-defined]
    except StopIteration as done:
        return done.value
    raise RuntimeError("the plugin suspended: not the path measured here")


def _per_call_us(plugin: Any, path: str, body: dict[str, Any], rounds: int) -> float:
    route = classify("POST", path)
    raw = orjson.dumps(body)
    request = _Path(path)
    decisions: list[str] = []
    contexts = []
    for i in range(rounds):
        ctx = RequestContext(request_id=str(i), route=route, body=raw)
        ctx.json()  # ingress and limits parsed it already: not the plugin's cost
        contexts.append(ctx)
    start = time.process_time()
    for ctx in contexts:
        _run(plugin.on_request(request, ctx, decisions.append))
    return (time.process_time() - start) / rounds * 1e6


def main() -> None:
    telemetry = build_telemetry(TelemetryConfig())
    services = PluginServices(telemetry=telemetry, subrequests=Subrequests(),
                              model_digest=lambda model: "f" * 64)
    cache = EmbedCache(EmbedCacheConfig(name="embed_cache"), services)
    batch = EmbedBatch(EmbedBatchConfig(name="embed_batch"), services)
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "hello"}], "stream": False}
    embed = {"model": "nomic-embed-text", "input": "a cached sentence"}
    ask = parse_ask("/api/embed", embed)
    assert ask is not None
    vector = orjson.dumps([0.0123456] * 768)
    cache.memory.put(cache.key(ask, "f" * 64, embed["input"]), vector, 5)
    asyncio.set_event_loop(asyncio.new_event_loop())
    rows = [
        ("embed_cache idle (chat request)", _per_call_us(cache, "/api/chat", chat, ROUNDS)),
        ("embed_batch idle (chat request)", _per_call_us(batch, "/api/chat", chat, ROUNDS)),
        ("embed_cache full hit (1 x 768 floats)", _per_call_us(cache, "/api/embed", embed, ROUNDS // 10)),
    ]
    print(f"{'plugin request phase':40} {'CPU us/request':>15}")
    for name, value in rows:
        print(f"{name:40} {value:15.2f}")


if __name__ == "__main__":
    main()
