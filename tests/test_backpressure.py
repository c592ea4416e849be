"""The `backpressure` step against the emulator: a bounded queue with honest 503s (overload, queue_timeout,
early refusal) carrying Retry-After from the drain rate, interactive ahead of bulk, token-fair order between
tenants, capacity freed the moment a client leaves, the adaptive limit, /system/queue, and accounting that
returns to zero on every path."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from middlewares.backpressure import BackpressureConfig, BackpressureStep, ModelGate
from proxy.errors import Overload
from proxy.fairqueue import FairQueue, Waiter
from proxy.ollama import model_key
from proxy.upstreams import Upstream, UpstreamSet
from tests.support.metrics import metric
from tests.support.polling import until
from tests.support.redis_server import RedisServer
from tests.support.servers import Server, start_emulator, start_proxy

ADMIN, CHAT, CHAT2, BULK = "sk-admin", "sk-chat", "sk-chat-two", "sk-bulk"
TENANTS = [{"name": "chat", "keys": [CHAT]}, {"name": "chat2", "keys": [CHAT2]},
           {"name": "bulk", "keys": [BULK], "lane": "bulk"}]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("backpressure")


@pytest.fixture(scope="module")
def slow(tmp: Path) -> Iterator[Server]:
    """One slot, 0.5 s per request."""
    server = start_emulator(tmp, fixed_clock=False, decode_tokens_per_s=20, output_tokens="10,10",
                            name="bp-emu")
    yield server
    server.stop()


def _proxy(tmp: Path, upstream: Server, name: str, **backpressure: Any) -> Server:
    return start_proxy(tmp, [upstream.url], {
        "admin": {"keys": [ADMIN]}, "tenants": TENANTS, "chain": {"backpressure": backpressure}},
        name=name)


async def _generate(session: aiohttp.ClientSession, proxy: Server, key: str, **extra: Any
                    ) -> tuple[int, dict[str, str], float]:
    started = time.monotonic()
    body = {"model": "llama3.2", "prompt": "hello", "stream": False, **extra}
    async with session.post(f"{proxy.url}/api/generate", json=body,
                            headers={"Authorization": f"Bearer {key}"}) as response:
        await response.read()
        return response.status, dict(response.headers), time.monotonic() - started


def _queue(proxy: Server, key: str = ADMIN) -> dict[str, Any]:
    return dict(httpx.get(f"{proxy.url}/system/queue",
                          headers={"Authorization": f"Bearer {key}"}).json()["models"])


def _queued(proxy: Server, running: int, queued: int) -> bool:
    """Whether the proxy's llama3.2 gate has `running` requests on the replica and `queued` waiting."""
    gate = _queue(proxy).get("llama3.2:latest")
    return gate is not None and (sum(gate["in_flight"].values()), gate["queued"]) == (running, queued)


def _settled(proxy: Server, upstream: Server) -> None:
    """The invariant: nothing queued, nothing in flight, in the proxy and in Ollama."""
    deadline = time.monotonic() + 5
    while True:
        gates = _queue(proxy)
        stats = upstream.stats()
        if (all(g["queued"] == 0 and sum(g["in_flight"].values()) == 0 for g in gates.values())
                and stats["active"] == 0 and stats["waiting"] == 0):
            return
        assert time.monotonic() < deadline, (gates, stats)
        time.sleep(0.05)


async def test_bounded_queue_and_overload(tmp: Path, slow: Server) -> None:
    proxy = await asyncio.to_thread(_proxy, tmp, slow, "bp-bounded", max_queue_size=2)
    try:
        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.ensure_future(_generate(session, proxy, CHAT)) for _ in range(3)]
            await until(lambda: _queued(proxy, 1, 2), what="one running, two queued")
            status, headers, took = await _generate(session, proxy, CHAT)
            assert status == 503 and took < 5.0  # refused at once, not after its 30 s queue timeout
            assert headers["Content-Type"] == "application/json; charset=utf-8"
            assert int(headers["Retry-After"]) >= 1
            results = await asyncio.gather(*tasks)
        assert [r[0] for r in results] == [200, 200, 200]
        waits = sorted(int(r[1]["X-Queue-Wait-Ms"]) for r in results)
        assert waits[0] < 100 and waits[2] > 700  # the last one waited for two others
        snapshot = _queue(proxy)["llama3.2:latest"]
        assert snapshot["rejections"] == {"overload": 1} and snapshot["wait_ms"]["p95"] > 700
        assert snapshot["drain_rate_per_s"] is not None
        await asyncio.to_thread(_settled, proxy, slow)
    finally:
        await asyncio.to_thread(proxy.stop)


async def test_queue_timeout_and_early_refusal(tmp: Path, slow: Server) -> None:
    proxy = await asyncio.to_thread(_proxy, tmp, slow, "bp-timeout", queue_timeout_s=0.3)
    try:
        async with aiohttp.ClientSession() as session:
            # The model loaded first: a request waiting on a load gets cold_queue_timeout_s, not
            # queue_timeout_s (run alone, this test would otherwise find the model cold).
            assert (await _generate(session, proxy, CHAT))[0] == 200
            first = asyncio.ensure_future(_generate(session, proxy, CHAT))
            await until(lambda: _queued(proxy, 1, 0), what="the first request running")
            status, _, took = await _generate(session, proxy, CHAT)
            assert status == 503 and 0.25 < took < 10.0  # waited its queue timeout, not a stream
            assert (await first)[0] == 200
            # The drain rate is known now: a request whose deadline is shorter than its estimated
            # wait is refused at once instead of timing out later.
            for _ in range(3):
                await _generate(session, proxy, CHAT)
            running = [asyncio.ensure_future(_generate(session, proxy, CHAT)) for _ in range(3)]
            await until(lambda: _queued(proxy, 1, 2), what="one running, two queued")
            async with session.post(f"{proxy.url}/api/generate", json={
                    "model": "llama3.2", "prompt": "x", "stream": False},
                    headers={"Authorization": f"Bearer {CHAT}", "X-Deadline-S": "0.2"}) as refused:
                payload = await refused.json()
            assert refused.status == 503 and payload["code"] == "overload"
            assert "estimated wait" in payload["error"]
            await asyncio.gather(*running, return_exceptions=True)
        rejections = _queue(proxy)["llama3.2:latest"]["rejections"]
        assert rejections["queue_timeout"] >= 1 and rejections["overload"] == 1
        await asyncio.to_thread(_settled, proxy, slow)
    finally:
        await asyncio.to_thread(proxy.stop)


async def test_interactive_ahead_of_bulk_and_fair_between_tenants(tmp: Path, slow: Server) -> None:
    proxy = await asyncio.to_thread(_proxy, tmp, slow, "bp-order", bulk_share=0.0001)
    try:
        async with aiohttp.ClientSession() as session:
            order: list[str] = []

            async def tagged(key: str, tag: str, **extra: Any) -> None:
                status, _, _ = await _generate(session, proxy, key, **extra)
                assert status == 200
                order.append(tag)

            # The blocker streams with a drip before each of its ~11 writes: it holds the slot ~3.5 s
            # (the others take 0.5 s), long enough on a loaded machine for all six to be seen queued.
            await asyncio.to_thread(httpx.post, f"{slow.url}/_emulator/faults",
                                    json={"slow_drip_s": 0.3, "count": 1}, timeout=10)
            blocker = asyncio.ensure_future(tagged(CHAT, "blocker", stream=True))
            await until(lambda: _queued(proxy, 1, 0), what="the blocker running")
            # One at a time: two requests sent together on two connections reach the queue in
            # either order (CI saw bulk1 ahead of bulk0), and the assertion below is about FIFO order.
            tasks = [asyncio.ensure_future(tagged(BULK, "bulk0"))]
            await until(lambda: _queued(proxy, 1, 1), what="bulk0 queued")
            tasks += [asyncio.ensure_future(tagged(BULK, "bulk1"))]
            await until(lambda: _queued(proxy, 1, 2), what="bulk1 queued behind bulk0")
            tasks += [asyncio.ensure_future(tagged(CHAT, f"chat{i}")) for i in range(3)]
            await until(lambda: _queued(proxy, 1, 5), what="the three chat requests queued")
            tasks += [asyncio.ensure_future(tagged(CHAT2, "chat2-0"))]
            await until(lambda: _queued(proxy, 1, 6), what="chat2 queued behind the three chats")
            await asyncio.gather(blocker, *tasks)
        # interactive before bulk; chat2 arrived after chat's three but is served after one of them
        assert order[0] == "blocker" and order[-2:] == ["bulk0", "bulk1"]
        assert order.index("chat2-0") <= 2
        await asyncio.to_thread(_settled, proxy, slow)
    finally:
        await asyncio.to_thread(proxy.stop)


async def test_leaving_frees_capacity_at_once(tmp: Path) -> None:
    slow = await asyncio.to_thread(start_emulator, tmp, fixed_clock=False, decode_tokens_per_s=20,
                                   output_tokens="200,200", name="bp-long")
    proxy = await asyncio.to_thread(_proxy, tmp, slow, "bp-cancel")
    try:
        before = slow.stats()
        async with aiohttp.ClientSession() as session:
            body = {"model": "llama3.2", "prompt": "long"}
            running = await session.post(f"{proxy.url}/api/generate", json=body,
                                         headers={"Authorization": f"Bearer {CHAT}"})
            await running.content.readline()
            queued = asyncio.ensure_future(_generate(session, proxy, CHAT, options={"num_predict": 2}))
            leaving = asyncio.ensure_future(_generate(session, proxy, CHAT))
            await until(lambda: _queued(proxy, 1, 2), what="one running, two queued")
            leaving.cancel()  # leaves while queued
            await until(lambda: _queued(proxy, 1, 1), what="the cancelled request out of the queue")
            assert metric(proxy.url, "sop_backpressure_decisions_total", decision="cancelled") == 1
            running.close()  # leaves while running: the queued one gets the slot at once
            status, _, took = await queued
            assert status == 200 and took < 3.0  # generous: a loaded CI machine
        stats = slow.stats()
        assert stats["cancelled"] == before["cancelled"] + 1  # the running one reached Ollama as a cancel
        assert stats["completed"] == before["completed"] + 1  # the one that left the queue never did
        await asyncio.to_thread(_settled, proxy, slow)
    finally:
        await asyncio.to_thread(proxy.stop)
        await asyncio.to_thread(slow.stop)


async def test_upstream_failure_returns_the_slot(tmp: Path, slow: Server) -> None:
    proxy = await asyncio.to_thread(_proxy, tmp, slow, "bp-fail")
    try:
        await asyncio.to_thread(httpx.post, f"{slow.url}/_emulator/faults", json={"status": 500,
                                                                                 "count": 2})
        async with aiohttp.ClientSession() as session:
            statuses = [r[0] for r in await asyncio.gather(*(_generate(session, proxy, CHAT)
                                                             for _ in range(3)))]
        assert sorted(statuses) == [200, 500, 500]
        await asyncio.to_thread(_settled, proxy, slow)
    finally:
        await asyncio.to_thread(httpx.delete, f"{slow.url}/_emulator/faults")
        await asyncio.to_thread(proxy.stop)


async def test_adaptive_limit_follows_time_per_token(tmp: Path) -> None:
    wide = await asyncio.to_thread(start_emulator, tmp, fixed_clock=False, decode_tokens_per_s=100,
                                   output_tokens="30,30", name="wide", extra=["--num-parallel", "4"])
    proxy = await asyncio.to_thread(start_proxy, tmp, [wide.url], {
        "admin": {"keys": [ADMIN]}, "chain": {"backpressure": {
            "max_in_flight": 4, "adaptive": True, "adaptive_max_in_flight": 4}}}, name="adaptive")
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(3):  # quiet traffic first: the no-load time per token (the baseline)
                await _generate(session, proxy, ADMIN)
            assert list(_queue(proxy)["llama3.2:latest"]["limits"].values()) == [4.0]
            for _ in range(4):
                await asyncio.gather(*(_generate(session, proxy, ADMIN) for _ in range(8)))
        limits = _queue(proxy)["llama3.2:latest"]["limits"]
        (limit,) = limits.values()
        assert 1 <= limit < 3.5  # 4 concurrent streams slow each token ~2.3x: the limit came down
    finally:
        await asyncio.to_thread(proxy.stop)
        await asyncio.to_thread(wide.stop)


def test_queue_view_metrics_and_tenant_privacy(tmp: Path, slow: Server) -> None:
    proxy = _proxy(tmp, slow, "bp-view")
    try:
        assert httpx.post(f"{proxy.url}/api/generate", headers={"Authorization": f"Bearer {CHAT}"},
                          json={"model": "llama3.2", "prompt": "x", "stream": False}).status_code == 200
        admin = _queue(proxy)["llama3.2:latest"]
        assert {"depth", "queued", "in_flight", "limits", "wait_ms", "drain_rate_per_s",
                "rejections"} <= set(admin)
        own = _queue(proxy, CHAT)["llama3.2:latest"]
        assert set(own) == {"depth"}
        assert httpx.get(f"{proxy.url}/system/queue").status_code == 401
        families = {f.name for f in text_string_to_metric_families(httpx.get(f"{proxy.url}/metrics").text)}
        assert {"sop_queue_wait_seconds", "sop_queue_depth", "sop_upstream_in_flight",
                "sop_backpressure_decisions"} <= families
    finally:
        proxy.stop()


def test_fair_queue_unit_order() -> None:
    loop = asyncio.new_event_loop()
    try:
        queue = FairQueue(fair=True, bulk_share=0.25)

        def waiter(tenant: str, lane: str = "interactive", cost: float = 100) -> Waiter:
            return Waiter(tenant, 1.0, lane, cost, loop.create_future())

        for _ in range(4):
            queue.push(waiter("heavy", cost=1000))
        queue.push(waiter("light"))
        first = [queue.pop() for _ in range(2)]
        assert [w.tenant for w in first if w] == ["heavy", "light"]  # light is not stuck behind heavy
        for _ in range(3):
            queue.push(waiter("batch", "bulk"))
        lanes = [w.lane for w in (queue.pop() for _ in range(4)) if w]
        assert lanes.count("bulk") == 1  # anti-starvation share while interactive waits
        assert len(queue) == 2
    finally:
        loop.close()


async def test_shadow_mode_reports_and_never_waits(tmp: Path, slow: Server) -> None:
    proxy = await asyncio.to_thread(_proxy, tmp, slow, "bp-shadow", mode="shadow")
    try:
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(*(_generate(session, proxy, CHAT) for _ in range(3)))
        assert [r[0] for r in results] == [200, 200, 200]
        shadowed = [r[1].get("X-Shadow-Decision") for r in results]
        assert shadowed.count("backpressure=queue") == 2 and shadowed.count(None) == 1
        await asyncio.to_thread(_settled, proxy, slow)
    finally:
        await asyncio.to_thread(proxy.stop)


async def test_shadow_mode_reports_overload_past_the_queue_it_would_hold(tmp: Path, slow: Server) -> None:
    """Shadowed requests never wait, so those running beyond the slots are the queue enforce would hold:
    with one slot and `max_queue_size: 1`, five at once are one admitted, one that would queue and
    three that would be refused (before: every shadowed one reported `queue`, never `overload`)."""
    proxy = await asyncio.to_thread(_proxy, tmp, slow, "bp-shadow-full", mode="shadow", max_queue_size=1)
    try:
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(*(_generate(session, proxy, CHAT) for _ in range(5)))
        assert [r[0] for r in results] == [200] * 5
        shadowed = sorted(str(r[1].get("X-Shadow-Decision")) for r in results)
        assert shadowed == ["None"] + ["backpressure=overload"] * 3 + ["backpressure=queue"], shadowed
        await asyncio.to_thread(_settled, proxy, slow)
    finally:
        await asyncio.to_thread(proxy.stop)


async def test_admission_follows_capacity_not_recent_demand(tmp: Path) -> None:
    """After a quiet spell the recent completion rate is tiny; a burst the replica can serve within the
    deadline must still be admitted, because the estimate divides by capacity (slots / service time)."""
    emulator = await asyncio.to_thread(
        start_emulator, tmp, fixed_clock=False, decode_tokens_per_s=20, output_tokens="10,10",
        name="bp-capacity-emu")
    proxy = await asyncio.to_thread(_proxy, tmp, emulator, "bp-capacity", queue_timeout_s=120)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(2):  # learn the service time: ~0.5 s
                assert (await _generate(session, proxy, CHAT))[0] == 200
            await asyncio.sleep(8)  # quiet: two completions over ~9 s is a "drain rate" of 0.2/s
            burst = [asyncio.ensure_future(_burst_one(session, proxy)) for _ in range(8)]
            statuses = [status for status, _ in await asyncio.gather(*burst)]
        # 8 x 0.5 s on one slot drain in ~4 s, well inside the 15 s deadline: nobody is refused.
        assert statuses == [200] * 8, statuses
        gate = _queue(proxy)["llama3.2:latest"]
        assert gate["capacity"] == 1 and 0.1 < gate["service_s"] < 5
        assert gate["rejections"].get("overload", 0) == 0
        await asyncio.to_thread(_settled, proxy, emulator)
    finally:
        await asyncio.to_thread(proxy.stop)
        await asyncio.to_thread(emulator.stop)


async def _burst_one(session: aiohttp.ClientSession, proxy: Server) -> tuple[int, str]:
    async with session.post(f"{proxy.url}/api/generate", json={
            "model": "llama3.2", "prompt": "x", "stream": False},
            headers={"Authorization": f"Bearer {CHAT}", "X-Deadline-S": "15"}) as response:
        return response.status, await response.text()


async def _deadline_generate(session: aiohttp.ClientSession, proxy: Server, deadline_s: float) -> int:
    body = {"model": "llama3.2", "prompt": "hello"}
    async with session.post(f"{proxy.url}/api/generate", json=body, headers={
            "Authorization": f"Bearer {CHAT}", "X-Deadline-S": str(deadline_s)}) as response:
        await response.read()
        return response.status


async def test_a_slot_handed_over_as_the_wait_times_out_comes_back(tmp: Path) -> None:
    """Every request has the same short deadline: the running ones are cut at it, freeing their slots
    in the very turn the queued ones' timers fire. A slot handed to a request that then gives up (408
    or 503) must come back: before the fix, each such race kept one slot counted in flight forever,
    and after a few rounds the model answered nothing but 503 queue_timeout."""
    emulator = start_emulator(tmp, fixed_clock=False, decode_tokens_per_s=50, output_tokens="30,30",
                              name="race-emu")
    proxy = _proxy(tmp, emulator, "race", max_in_flight=2)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(6):
                await asyncio.gather(*(_deadline_generate(session, proxy, 0.5)
                                       for _ in range(8)), return_exceptions=True)
                # Back to nothing held, in the proxy and in Ollama, once the round is over.
                await until(lambda: _queued(proxy, 0, 0) and emulator.stats()["active"] == 0, 10,
                            "every slot back")
            status, _, _ = await _generate(session, proxy, CHAT, num_predict=2)
            assert status == 200
    finally:
        proxy.stop()
        emulator.stop()


async def test_a_fully_qualified_model_name_waits_in_the_same_queue(tmp: Path, slow: Server) -> None:
    """`registry.ollama.ai/library/llama3.2:latest` is `llama3.2` to Ollama: it meets the same slots
    and queue, not a pass of its own as an unknown model."""
    assert {model_key(name) for name in (
        "llama3.2", "LLaMA3.2:latest", "library/llama3.2", "registry.ollama.ai/library/llama3.2:latest",
        "Registry.Ollama.AI/Library/LLAMA3.2")} == {"llama3.2:latest"}
    assert model_key("someone/llama3.2") == "someone/llama3.2:latest"  # another namespace
    assert model_key("localhost:5000/library/llama3.2") == "localhost:5000/library/llama3.2:latest"
    proxy = _proxy(tmp, slow, "qualified", max_in_flight=1)
    try:
        async with aiohttp.ClientSession() as session:
            first = asyncio.ensure_future(_generate(session, proxy, CHAT))
            await until(lambda: _queued(proxy, 1, 0), 10, "the first request running")
            second = asyncio.ensure_future(_generate(
                session, proxy, CHAT2, model="registry.ollama.ai/library/llama3.2:latest"))
            await until(lambda: _queued(proxy, 1, 1), 10, "the qualified name queued behind it")
            assert (await first)[0] == 200
            status, headers, _ = await second
            assert "X-Queue-Wait-Ms" in headers, (status, headers)
        assert set(_queue(proxy)) == {"llama3.2:latest"}
    finally:
        proxy.stop()


async def test_names_no_replica_confirmed_get_no_shared_books(tmp_path: Path,
                                                              redis_server: RedisServer) -> None:
    """With Redis state and no replica's listing (health off), any model name is tracked, but shared
    books are Redis keys that live an hour: a name gets them once a replica confirmed it (here: served
    it once). 60 random names (each a replica's 404) leave no keys; the served model's later requests
    go through the shared books."""
    emulator = await asyncio.to_thread(start_emulator, tmp_path, name="unlisted-emu")
    proxy = await asyncio.to_thread(start_proxy, tmp_path, [emulator.url], {
        "state": {"backend": "redis", "url": redis_server.url, "key_prefix": "unlisted:"},
        "chain": {"health": {"mode": "off"}}}, name="unlisted")
    try:
        async with aiohttp.ClientSession() as session:
            for i in range(60):
                async with session.post(f"{proxy.url}/api/generate", json={
                        "model": f"nonexistent-{i}-" + "x" * 40, "prompt": "hi", "stream": False}) as r:
                    assert r.status == 404
            for _ in range(2):
                async with session.post(f"{proxy.url}/api/generate", json={
                        "model": "llama3.2", "prompt": "hi", "stream": False}) as served:
                    assert served.status == 200
        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            names = {key.split("{", 1)[1].split("}", 1)[0] for key in client.scan_iter("unlisted:slots:*")}
        finally:
            client.close()
        assert names == {"llama3.2:latest"}, names
    finally:
        await asyncio.to_thread(proxy.stop)
        await asyncio.to_thread(emulator.stop)


def test_a_pushed_out_waiter_that_leaves_in_the_same_turn_gives_nothing_back() -> None:
    """A waiter pushed out of a full queue (its future holds Overload) whose client leaves, or whose
    timer fires, before its task resumes: it was never popped, so never charged and holding no slot.
    Giving up must neither refund its tenant a charge it never paid nor raise the Overload over the
    cancellation."""
    loop = asyncio.new_event_loop()
    try:
        fleet = UpstreamSet([Upstream("a", URL("http://127.0.0.1:9"))])
        gate = ModelGate("llama3.2:latest", fleet, BackpressureConfig())
        gate.queue.charge("t", 1.0, 100)  # the tenant has been served before
        before = dict(gate.queue.counters)
        future: asyncio.Future[Upstream | None] = loop.create_future()
        waiter = Waiter("t", 1.0, "interactive", 100, future)
        gate.queue.push(waiter)
        assert gate.queue.remove(waiter)  # pushed out: taken out without being popped
        future.set_exception(Overload("pushed out"))
        BackpressureStep._give_up(gate, waiter, future, "t", 1.0, 100)
        assert gate.queue.counters == before
        assert sum(gate.in_flight.values()) == 0
    finally:
        loop.close()
