"""A queued ticket lost while Redis still answers: two real proxy processes share a one-slot emulator
through a real redis-server. Only the breaker's being open (`state.failure_mode: open`) may admit a
request past the shared books; a lost ticket queues again, so the emulator never sees two requests."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import redis
import yaml

from tests.support.polling import wait_for
from tests.support.redis_server import RedisServer
from tests.support.servers import Server, start_emulator, start_proxy

MODEL = "llama3.2"
ADMIN = "sk-admin"
TENANTS = [{"name": "a", "keys": ["sk-a"]}, {"name": "b", "keys": ["sk-b"]}]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared-tickets")


def _stack(tmp: Path, redis_url: str, tokens_per_s: int, lease_ttl_s: float
           ) -> tuple[Server, list[Server]]:
    emulator = start_emulator(tmp, fixed_clock=False, decode_tokens_per_s=tokens_per_s,
                              output_tokens="400,400", name="tickets-emu",
                              extra=["--num-parallel", "1", "--max-queue", "64"])
    proxies: list[Server] = []
    try:
        for i in range(2):
            proxies.append(start_proxy(tmp, [{"url": emulator.url, "num_parallel": 1}], {
                "admin": {"keys": [ADMIN]},
                "tenants": TENANTS,
                "chain": {"backpressure": {"max_in_flight": 1, "max_queue_size": 64,
                                           "queue_timeout_s": 30}},
                "state": {"backend": "redis", "url": redis_url, "key_prefix": "tk:",
                          "failure_mode": "closed", "retry_interval_s": 0.5,
                          "lease_ttl_s": lease_ttl_s}}, name=f"tickets-p{i}"))
    except BaseException:
        for proxy in proxies:
            proxy.stop()
        emulator.stop()
        raise
    return emulator, proxies


def _stop(emulator: Server, proxies: list[Server]) -> None:
    for proxy in proxies:
        proxy.stop()
    emulator.stop()
    for proxy in proxies:
        assert "Traceback" not in proxy.log()


def _shared(proxy: Server) -> dict[str, Any]:
    response = httpx.get(f"{proxy.url}/system/queue", headers={"Authorization": f"Bearer {ADMIN}"},
                         timeout=5)
    return dict(response.json()["shared"])


async def _generate(session: aiohttp.ClientSession, proxy: Server, key: str, num_predict: int
                    ) -> int:
    async with session.post(f"{proxy.url}/api/generate", headers={"Authorization": f"Bearer {key}"},
                            json={"model": MODEL, "prompt": "x", "stream": False,
                                  "options": {"num_predict": num_predict}}) as response:
        await response.read()
        return response.status


async def test_a_ticket_lost_while_redis_answers_queues_again(tmp: Path,
                                                              fresh_redis_server: RedisServer) -> None:
    """The queue's keys vanish (lost writes, a flush) while the only slot is held through the first
    proxy and a request waits on the second. The renewal finds the ticket gone: the request used to
    go to its process's own gate, which knew of no request in flight, and reached the replica beside
    the one holding the slot, in failure_mode closed with Redis up. It queues again now."""
    emulator, proxies = await asyncio.to_thread(_stack, tmp, fresh_redis_server.url, 50, 3.0)
    state = redis.Redis.from_url(fresh_redis_server.url)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            long = asyncio.ensure_future(_generate(session, proxies[0], "sk-a", 250))  # ~5 s
            await asyncio.to_thread(wait_for, lambda: emulator.stats()["active"] == 1, 10,
                                    "the long request on the replica")
            waiting = asyncio.ensure_future(_generate(session, proxies[1], "sk-b", 5))
            await asyncio.to_thread(wait_for, lambda: _shared(proxies[1])["waiting"] == 1, 10,
                                    "the second request queued")
            for key in [*state.scan_iter("tk:slots:*:exp"), *state.scan_iter("tk:slots:*:tk")]:
                state.delete(key)
            # A renewal (every lease_ttl_s / 3) finds the ticket missing, the request enters again
            # and is served once the long request ends.
            assert await waiting == 200 and await long == 200
        assert emulator.stats()["peak"] == 1
        assert _shared(proxies[1]).get("reentered") == 1
    finally:
        await asyncio.to_thread(_stop, emulator, proxies)
        state.close()


async def test_renewals_racing_grants_never_admit_twice(tmp: Path,
                                                        fresh_redis_server: RedisServer) -> None:
    """No fault: 1 slot, two proxies with twenty clients each, renewals every 0.33 s. A renewal that met
    a ticket just granted (out of the queue, its grant on its way by message) or not yet queued
    (its enter still on another connection) reported it lost, and its request went through its own
    process's gate beside the slot's holder."""
    emulator, proxies = await asyncio.to_thread(_stack, tmp, fresh_redis_server.url, 1000, 1.0)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            stop = time.monotonic() + 10
            statuses: list[int] = []

            async def client(proxy: Server, key: str) -> None:
                while time.monotonic() < stop:
                    statuses.append(await _generate(session, proxy, key, 2))

            await asyncio.gather(*(client(proxies[i % 2], "sk-a" if i % 2 == 0 else "sk-b")
                                   for i in range(40)))
        assert statuses and set(statuses) == {200}
        # Neither a grant that found nobody waiting nor a ticket queued again: no race was lost.
        books = [_shared(proxy) for proxy in proxies]
        assert [(b["orphans"], b.get("reentered", 0)) for b in books] == [(0, 0), (0, 0)], books
        assert emulator.stats()["peak"] == 1
    finally:
        await asyncio.to_thread(_stop, emulator, proxies)


async def test_a_lowered_max_in_flight_holds_for_requests_already_queued(
        tmp: Path, fresh_redis_server: RedisServer) -> None:
    """One replica with 2 slots, ten requests, then a reload to max_in_flight 1. Each queued ticket
    carried the limit of its queueing, and a grant reads the head ticket's: the queue of that time
    kept getting 2 at once. The tick stamps queued tickets with the new limit (as the in-process
    backend applies it to its queue)."""
    emulator = await asyncio.to_thread(
        start_emulator, tmp, fixed_clock=False, decode_tokens_per_s=40, output_tokens="20,20",
        name="shrink-emu", extra=["--num-parallel", "4"])
    proxy = await asyncio.to_thread(start_proxy, tmp, [{"url": emulator.url, "num_parallel": 2}], {
        "server": {"config_watch_s": 0}, "admin": {"keys": [ADMIN]}, "tenants": TENANTS,
        "chain": {"backpressure": {"max_in_flight": 2, "queue_timeout_s": 60}},
        "state": {"backend": "redis", "url": fresh_redis_server.url, "key_prefix": "shrink:"}},
        name="shrink")
    assert proxy.config_path is not None
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            requests = [asyncio.ensure_future(_generate(session, proxy, "sk-a", 20))
                        for _ in range(10)]
            await asyncio.to_thread(wait_for, lambda: _shared(proxy)["waiting"] >= 6, 10,
                                    "requests queued behind the two slots")
            settings = yaml.safe_load(proxy.config_path.read_text())
            settings["chain"]["backpressure"]["max_in_flight"] = 1
            proxy.config_path.write_text(yaml.safe_dump(settings))
            proxy.process.send_signal(signal.SIGHUP)
            await asyncio.to_thread(wait_for, lambda: "configuration version 2 applied"
                                    in proxy.log(), 10, "the reload")
            # The two running at the reload end within 0.5 s; a tick (0.5 s) stamps the queue.
            await asyncio.sleep(1.2)
            active: list[int] = []
            while not all(request.done() for request in requests):
                active.append(int(emulator.stats()["active"]))
                await asyncio.sleep(0.05)
            assert [request.result() for request in requests] == [200] * 10
        assert active and max(active) == 1, active
    finally:
        await asyncio.to_thread(proxy.stop)
        await asyncio.to_thread(emulator.stop)
    assert "Traceback" not in proxy.log()
