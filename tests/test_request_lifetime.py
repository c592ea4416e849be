"""A request's own objects die with it, by reference counting: no reference cycle through its context.

A cycle (a closure over the context stored on the context, say) leaves every finished request's object
graph (context, exchange, routing, admission, span, headers) alive until the cycle collector runs, which
under load is thousands of objects per young-generation pass, on the event loop (issue 16). The proxy
runs in-process with the collector switched off; after the requests, no RequestContext may remain."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import aiohttp

from proxy.context import RequestContext
from proxy.ingress import INGRESS
from tests.support.inprocess import in_process_proxy

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False,
        "options": {"num_predict": 2}}


async def test_finished_requests_leave_no_context_behind(aiohttp_client: Any, aiohttp_server: Any,
                                                         tmp_path: Path) -> None:
    client, _ = await in_process_proxy(aiohttp_client, aiohttp_server, tmp_path, {
        "tenants": [{"name": "team", "keys": ["sk-life"], "requests_per_minute": 1000}],
        "models": {"llama3.2": {"max_prompt_tokens": 1000}}})
    # Connection: close: a kept-alive connection holds its last request until the next one comes.
    headers = {"Authorization": "Bearer sk-life", "Connection": "close"}
    warm = await client.post("/api/chat", json=CHAT, headers=headers)  # lazily built state
    await warm.read()
    gc.collect()
    gc.disable()
    try:
        for body in (CHAT, {"model": "llama3.2"}, {**CHAT, "stream": True}, CHAT):
            response = await client.post("/api/chat", json=body, headers=headers)
            await response.read()
            assert response.status in (200, 400), response.status
        for _ in range(5):  # the loop's next turns: spans encoded, access lines written
            await asyncio.sleep(0)
        left = [o for o in gc.get_objects() if isinstance(o, RequestContext)]
    finally:
        gc.enable()
    assert left == [], f"{len(left)} finished requests' contexts kept alive by a reference cycle"


async def test_a_stream_the_client_left_leaves_no_context_behind(aiohttp_client: Any, aiohttp_server: Any,
                                                                 tmp_path: Path) -> None:
    """A stream cut short by its client: aiohttp keeps the prepared response's request, whose context
    holds that response (`ctx.prepared`), a cycle that only the collector broke."""
    client, emulator = await in_process_proxy(aiohttp_client, aiohttp_server, tmp_path)
    warm = await client.post("/api/chat", json=CHAT, headers={"Connection": "close"})
    await warm.read()
    async with aiohttp.ClientSession() as direct:
        set_fault = await direct.post(f"http://127.0.0.1:{emulator.port}/_emulator/faults",
                                      json={"hang_after_chunks": 2})
        assert set_fault.status == 200, await set_fault.text()
    gc.collect()
    gc.disable()
    try:
        response = await client.post("/api/chat", json={**CHAT, "stream": True},
                                     headers={"Connection": "close"})
        await response.content.readline()
        response.close()  # the client leaves mid-stream
        # The proxy notices the closed connection and ends the request (its context counted out).
        active = client.app[INGRESS].telemetry.metrics.active
        for _ in range(500):
            await asyncio.sleep(0.01)
            if not any(active.values()):
                break
        for _ in range(5):
            await asyncio.sleep(0)
        left = [o for o in gc.get_objects() if isinstance(o, RequestContext)]
    finally:
        gc.enable()
    assert left == [], f"{len(left)} contexts of a stream the client left kept alive by a cycle"
