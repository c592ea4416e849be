"""`make bench-embed` (first part): CPU per request of embed_cache and embed_batch in the request phase.

Idle: a chat request (nothing for them to do), which must stay <= 5 us. Acting: embed_cache answering
a full hit of one 768-float vector from memory (lookup, key hashing, rendering the answer), and
embed_batch joining 64 single-input requests into one batch (join, the batch's sub-request answer read
and split, each request's own answer rendered). The plugins run as the chain runs them (`on_request` on
a real RequestContext). The idle and cache paths finish without suspending, so they are driven by hand
and the event loop's own cost is not counted; the batch path suspends (its requests wait for the
batch), so it runs on an event loop and the same number of empty tasks is measured alone and
subtracted. The batch's upstream call is not part of the plugin: its sub-request is answered from
bytes prepared beforehand (what the replica's /api/embed writes for those inputs), so the figure is
the plugin's own CPU. Not a test: it prints figures, asserts nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Mapping
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
BATCH = 64
BATCH_ROUNDS = 200
DIMENSIONS = 768


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


class _AnsweredSubrequests(Subrequests):
    """The batch's sub-request answered with the bytes an /api/embed of its inputs gets from the
    replica (prepared once), instead of a round trip through a proxy: not the plugin's CPU."""

    def __init__(self, vector: bytes) -> None:
        super().__init__()
        self.vector = vector

    async def post_raw(self, path: str, body: Mapping[str, Any], *, tenant: str,
                       timeout_s: float = 60.0) -> tuple[int, bytes]:
        del path, tenant, timeout_s
        inputs = body["input"]
        return 200, (b'{"model":"nomic-embed-text","embeddings":[' + b",".join([self.vector] * len(inputs))
                     + b'],"total_duration":1000000,"prompt_eval_count":%d}' % (8 * len(inputs)))


async def _batch_join_us(batch: EmbedBatch, rounds: int) -> float:
    """CPU per request of `BATCH` concurrent single-input requests that share one batch, minus the
    same number of tasks doing nothing (the event loop's own cost)."""
    route = classify("POST", "/api/embed")
    request = _Path("/api/embed")
    decisions: list[str] = []

    def contexts(round_: int) -> list[RequestContext]:
        out = []
        for i in range(BATCH):
            raw = orjson.dumps({"model": "nomic-embed-text", "input": f"chunk {round_} {i} of a document"})
            ctx = RequestContext(request_id=str(i), route=route, body=raw)
            ctx.json()
            out.append(ctx)
        return out

    async def nothing(ctx: RequestContext) -> None:
        del ctx

    prepared = [contexts(r) for r in range(rounds)]
    spent = 0.0
    for round_ in prepared:
        start = time.process_time()
        answers = await asyncio.gather(*(batch.on_request(request, ctx, decisions.append)  # type: ignore[arg-type]
                                         for ctx in round_))
        spent += time.process_time() - start
        assert all(answer is not None for answer in answers), "a request was not answered by the batch"
    baseline = 0.0
    for round_ in prepared:
        start = time.process_time()
        await asyncio.gather(*(nothing(ctx) for ctx in round_))
        baseline += time.process_time() - start
    assert decisions.count("batched") == rounds * BATCH, "not every request shared the batch"
    return (spent - baseline) / (rounds * BATCH) * 1e6


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
    vector = orjson.dumps([0.0123456] * DIMENSIONS)
    cache.memory.put(cache.key(ask, "f" * 64, embed["input"]), vector, 5)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    rows = [
        ("embed_cache idle (chat request)", _per_call_us(cache, "/api/chat", chat, ROUNDS)),
        ("embed_batch idle (chat request)", _per_call_us(batch, "/api/chat", chat, ROUNDS)),
        ("embed_cache full hit (1 x 768 floats)", _per_call_us(cache, "/api/embed", embed, ROUNDS // 10)),
    ]
    answered = PluginServices(telemetry=telemetry, subrequests=_AnsweredSubrequests(vector),
                              model_digest=lambda model: "f" * 64)
    joining = EmbedBatch(EmbedBatchConfig(name="embed_batch"), answered)
    rows.append((f"embed_batch join ({BATCH} x 1 input of {DIMENSIONS} floats)",
                 loop.run_until_complete(_batch_join_us(joining, BATCH_ROUNDS))))
    print(f"{'plugin request phase':44} {'CPU us/request':>15}")
    for name, value in rows:
        print(f"{name:44} {value:15.2f}")


if __name__ == "__main__":
    main()
