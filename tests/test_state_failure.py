"""Redis trouble is an explicit mode, never a 500: a real redis-server behind a real proxy and emulator is
flooded, killed, restarted and frozen (SIGSTOP), in `state.failure_mode` open and closed; leases never
leak and max_concurrent holds exactly again afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import pytest
import redis
import redis.asyncio

from proxy.state.base import BucketAsk, LeaseAsk
from proxy.state.failover import FailoverState
from proxy.state.redis import RedisState
from tests.support.metrics import metric
from tests.support.polling import wait_for
from tests.support.redis_server import RedisServer
from tests.support.servers import Server, free_port, start_emulator, start_proxy
from tests.support.stalling_relay import StallingRelay

KEY = "sk-team"
ADMIN = "sk-admin"
DEGRADED = "sop_state_degraded"
FAILURES = "sop_state_failures_total"


def _tenant(**limits: Any) -> dict[str, Any]:
    return {"name": "team", "keys": [KEY], "requests_per_minute": 100000,
            "tokens_per_minute": 10_000_000, "max_concurrent": 400, **limits}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state-failure")


@pytest.fixture(scope="module")
def emulator(tmp: Path) -> Iterator[Server]:
    server = start_emulator(tmp, fixed_clock=False, decode_tokens_per_s=50, output_tokens="400,400",
                            name="state-emu", extra=["--num-parallel", "16", "--max-queue", "1024"])
    yield server
    server.stop()


@pytest.fixture
def redis_server(tmp: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp)
    yield server
    server.stop()


def _proxy(tmp: Path, emulator: Server, url: str, name: str, *, tenant: dict[str, Any] | None = None,
           quotas: dict[str, Any] | None = None, **state: Any) -> Server:
    return start_proxy(tmp, [{"url": emulator.url, "num_parallel": 16}], {
        "admin": {"keys": [ADMIN]},
        "tenants": [tenant or _tenant()],
        # The emulator queues (backpressure off): this file is about state.
        "chain": {"backpressure": {"mode": "off"}, "quotas": quotas or {}},
        "state": {"backend": "redis", "url": url, "key_prefix": f"{name}:",
                  "retry_interval_s": 0.5, **state}}, name=name)


def _body(num_predict: int, stream: bool = False) -> dict[str, Any]:
    return {"model": "llama3.2", "prompt": "hello", "stream": stream,
            "options": {"num_predict": num_predict}}


async def _generate(session: aiohttp.ClientSession, url: str, num_predict: int = 1
                    ) -> tuple[int, dict[str, Any], dict[str, str], float]:
    started = time.monotonic()
    async with session.post(f"{url}/api/generate", json=_body(num_predict)) as response:
        body = await response.json(content_type=None)
        return response.status, body, dict(response.headers), time.monotonic() - started


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"},
                                 connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=60))


async def _poll_metric(url: str, name: str, wanted: float, within_s: float = 15.0) -> None:
    deadline = time.monotonic() + within_s
    while (await asyncio.to_thread(metric, url, name)) != wanted:
        assert time.monotonic() < deadline, f"{name} never became {wanted}"
        await asyncio.sleep(0.1)


async def test_burst_waits_for_pooled_connections(tmp: Path, emulator: Server,
                                                  redis_server: RedisServer) -> None:
    # A pool far smaller than the burst and failure_mode closed: a pool that raised instead of waiting
    # (redis-py's default pool raises at its size) or any failed call would show as a 503 or a 500.
    proxy = await asyncio.to_thread(_proxy, tmp, emulator, redis_server.url, "burst",
                                    failure_mode="closed", max_connections=16, socket_timeout_s=5.0)
    try:
        async with _session() as session:
            answers = await asyncio.gather(*(_generate(session, proxy.url) for _ in range(300)))
        statuses = Counter(status for status, *_ in answers)
        assert statuses == {200: 300}, statuses
        assert await asyncio.to_thread(metric, proxy.url, DEGRADED) == 0
        assert not await asyncio.to_thread(metric, proxy.url, FAILURES)
        # Every lease comes back (released just after the last byte: polled, not raced).
        wait_for(lambda: redis.Redis.from_url(redis_server.url).zcard("burst:lease:inflight:team") == 0,
                 10, "every lease back in Redis")
    finally:
        await asyncio.to_thread(proxy.stop)
    assert "Traceback" not in proxy.log()
    # The defaults (open, 512 connections, 0.5 s): the same burst, served.
    proxy = await asyncio.to_thread(_proxy, tmp, emulator, redis_server.url, "burst-defaults")
    try:
        async with _session() as session:
            answers = await asyncio.gather(*(_generate(session, proxy.url) for _ in range(300)))
        assert Counter(status for status, *_ in answers) == {200: 300}
    finally:
        await asyncio.to_thread(proxy.stop)
    assert "Traceback" not in proxy.log()


def _one_transition(log: str) -> None:
    """One WARNING per transition for the outage: one `state degraded` up to the recovery, then `state
    recovered`. A later, separate degradation would be another outage (a machine loaded enough for a
    Redis call to miss its 0.5 s timeout after the test's checks), not this one flapping. (The one
    such report seen, at the proxy's stop, was the pool closed under a settle still in flight: fixed,
    test_stopping_lets_a_settle_in_flight_finish.) The failure message carries the log's tail."""
    until_recovery, recovered, _ = log.partition("state recovered")
    assert recovered, log[-3000:]
    assert until_recovery.count("state degraded") == 1, until_recovery[-3000:]


async def test_redis_killed_open_mode_keeps_serving(tmp: Path, emulator: Server,
                                                    redis_server: RedisServer) -> None:
    proxy = await asyncio.to_thread(_proxy, tmp, emulator, redis_server.url, "killed-open")
    try:
        async with _session() as session:
            assert (await _generate(session, proxy.url))[0] == 200
            await asyncio.to_thread(redis_server.kill)
            for _ in range(3):  # a few waves while Redis is gone: all served, counted locally
                answers = await asyncio.gather(*(_generate(session, proxy.url) for _ in range(20)))
                assert [a[0] for a in answers] == [200] * 20
                assert all(a[2]["X-RateLimit-Limit"] == "100000" for a in answers)
            assert await asyncio.to_thread(metric, proxy.url, DEGRADED) == 1
            assert (await asyncio.to_thread(metric, proxy.url, FAILURES) or 0) >= 1
            await asyncio.to_thread(redis_server.restart)
            await _poll_metric(proxy.url, DEGRADED, 0)
            assert (await _generate(session, proxy.url))[0] == 200
        # Redis is used again: the request bucket was written to the new, empty server.
        assert redis.Redis.from_url(redis_server.url).exists("killed-open:bucket:rpm:team")
    finally:
        await asyncio.to_thread(proxy.stop)
    log = proxy.log()
    _one_transition(log)
    assert "failure_mode=open" in log and "Traceback" not in log


async def test_redis_killed_closed_mode_refuses_with_503(tmp: Path, emulator: Server,
                                                         redis_server: RedisServer) -> None:
    proxy = await asyncio.to_thread(_proxy, tmp, emulator, redis_server.url, "killed-closed",
                                    failure_mode="closed", retry_interval_s=2.0)
    try:
        async with _session() as session:
            assert (await _generate(session, proxy.url))[0] == 200
            await asyncio.to_thread(redis_server.kill)
            answers = await asyncio.gather(*(_generate(session, proxy.url) for _ in range(20)))
            for status, body, headers, _ in answers:
                assert status == 503 and body["code"] == "state_unavailable", (status, body)
                assert headers["Retry-After"] == "2"  # retry_interval_s, whole seconds
                assert "Redis" in body["error"]
            async with session.get(f"{proxy.url}/api/tags") as tags:  # listing spends no quota
                assert tags.status == 200
            # Refusing every request, the process is not ready: an outer load balancer moves on.
            async with session.get(f"{proxy.url}/readyz") as ready:
                assert ready.status == 503 and "shared state" in (await ready.json())["status"]
            await asyncio.to_thread(redis_server.restart)
            deadline = time.monotonic() + 15
            while (status := (await _generate(session, proxy.url))[0]) != 200:
                assert status == 503 and time.monotonic() < deadline
                await asyncio.sleep(0.2)
            async with session.get(f"{proxy.url}/readyz") as ready:
                assert ready.status == 200
    finally:
        await asyncio.to_thread(proxy.stop)
    assert "Traceback" not in proxy.log()


async def test_redis_frozen_costs_one_timeout_and_leaks_no_lease(tmp: Path, emulator: Server,
                                                                 redis_server: RedisServer) -> None:
    proxy = await asyncio.to_thread(_proxy, tmp, emulator, redis_server.url, "frozen",
                                    tenant=_tenant(max_concurrent=2))
    long_stream = _body(num_predict=75, stream=True)  # about 1.5 s at 50 tokens/s
    try:
        async with _session() as session:
            held = [await session.post(f"{proxy.url}/api/generate", json=long_stream)
                    for _ in range(2)]
            for response in held:  # two Redis leases, held while Redis freezes
                assert response.status == 200
                await response.content.readline()
            await asyncio.to_thread(redis_server.pause)
            try:
                # Local leases in open mode; each request waits at most one socket timeout (0.5 s)
                # for Redis, not redis-py's default of retries or no timeout at all.
                answers = await asyncio.gather(*(_generate(session, proxy.url) for _ in range(2)))
                assert [a[0] for a in answers] == [200, 200]
                # One 0.5 s timeout, not redis-py's default 5 s (generous for a loaded machine).
                assert max(a[3] for a in answers) < 4.5, [a[3] for a in answers]
                after = await _generate(session, proxy.url)
                assert after[0] == 200 and after[3] < 3.0  # the circuit is open: Redis not waited for
                for response in held:  # the held streams end while Redis is frozen
                    await response.read()
                    response.release()
                assert await asyncio.to_thread(metric, proxy.url, DEGRADED) == 1
            finally:
                await asyncio.to_thread(redis_server.resume)
            await _poll_metric(proxy.url, DEGRADED, 0)
            # max_concurrent is exact again: nothing leaked from before or during the freeze.
            probe = [await session.post(f"{proxy.url}/api/generate", json=long_stream)
                     for _ in range(2)]
            for response in probe:
                assert response.status == 200, await response.text()
                await response.content.readline()
            third = await _generate(session, proxy.url)
            assert third[0] == 429 and third[1]["code"] == "rate_limited"
            assert third[2]["x-ratelimit-remaining-concurrent"] == "0"
            for response in probe:
                response.close()
            deadline = time.monotonic() + 10
            while (status := (await _generate(session, proxy.url))[0]) != 200:
                assert status == 429 and time.monotonic() < deadline
                await asyncio.sleep(0.1)
    finally:
        await asyncio.to_thread(proxy.stop)
    log = proxy.log()
    _one_transition(log)
    assert "Traceback" not in log


async def test_start_with_redis_unreachable(tmp: Path, emulator: Server) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    open_proxy = await asyncio.to_thread(_proxy, tmp, emulator, url, "start-open")
    closed_proxy = await asyncio.to_thread(_proxy, tmp, emulator, url, "start-closed",
                                           failure_mode="closed")
    late: RedisServer | None = None
    try:
        async with _session() as session:
            assert (await _generate(session, open_proxy.url))[0] == 200
            status, body, headers, _ = await _generate(session, closed_proxy.url)
            assert status == 503 and body["code"] == "state_unavailable" and "Retry-After" in headers
            assert await asyncio.to_thread(metric, open_proxy.url, DEGRADED) == 1
            late = await asyncio.to_thread(RedisServer, tmp, port)
            await _poll_metric(closed_proxy.url, DEGRADED, 0)
            assert (await _generate(session, closed_proxy.url))[0] == 200
            await _poll_metric(open_proxy.url, DEGRADED, 0)
    finally:
        await asyncio.to_thread(open_proxy.stop)
        await asyncio.to_thread(closed_proxy.stop)
        if late is not None:
            await asyncio.to_thread(late.stop)
    assert "state degraded" in open_proxy.log() and "state degraded" in closed_proxy.log()


async def test_an_idle_closed_mode_proxy_is_not_ready_while_redis_is_out(tmp: Path, emulator: Server,
                                                                           redis_server: RedisServer
                                                                           ) -> None:
    """`/readyz` is what keeps a closed-mode proxy out of its load balancer while it would refuse every
    request. A process learns of an outage from a Redis call failing, and an idle one makes none: it
    answered 200 `ready` (and `sop_state_degraded` 0) for as long as Redis was out, so the balancer
    sent it traffic and the first requests were refused. Now a readiness check with no Redis answer
    for `retry_interval_s` asks Redis (one probe, through the breaker)."""
    proxy = await asyncio.to_thread(_proxy, tmp, emulator, redis_server.url, "idle-closed",
                                    failure_mode="closed")
    try:
        async with _session() as session:
            # Started with Redis answering, and no request yet: nothing calls Redis from now on (a
            # request's lease renewals and settle would, and tell of the outage themselves).
            async with session.get(f"{proxy.url}/readyz") as ready:
                assert ready.status == 200
            await asyncio.to_thread(redis_server.kill)
            deadline = time.monotonic() + 5
            while True:  # no request meanwhile: only the probes of /readyz may tell
                async with session.get(f"{proxy.url}/readyz") as ready:
                    if ready.status == 503:
                        assert "shared state" in (await ready.json())["status"]
                        break
                    assert ready.status == 200
                assert time.monotonic() < deadline, "/readyz stayed ready with Redis out"
                await asyncio.sleep(0.2)
            assert await asyncio.to_thread(metric, proxy.url, DEGRADED) == 1
            await asyncio.to_thread(redis_server.restart)
            deadline = time.monotonic() + 10
            while True:
                async with session.get(f"{proxy.url}/readyz") as ready:
                    if ready.status == 200:
                        break
                assert time.monotonic() < deadline, "/readyz never ready again"
                await asyncio.sleep(0.2)
            assert (await _generate(session, proxy.url))[0] == 200
    finally:
        await asyncio.to_thread(proxy.stop)
    log = proxy.log()
    _one_transition(log)
    assert "Traceback" not in log


async def test_an_idle_open_mode_proxy_reports_the_outage_to_a_scrape(tmp: Path, emulator: Server,
                                                                     redis_server: RedisServer) -> None:
    """`sop_state_degraded` (the SOPStateDegraded alert) tells of an outage also in an idle open-mode
    process: a scrape with no Redis answer for `retry_interval_s` asks Redis first (before: the gauge
    stayed 0 for the whole outage until a request's call failed, and open mode has no /readyz probe
    to learn it from)."""
    proxy = await asyncio.to_thread(_proxy, tmp, emulator, redis_server.url, "idle-open",
                                    failure_mode="open")
    try:
        assert await asyncio.to_thread(metric, proxy.url, DEGRADED) == 0
        await asyncio.to_thread(redis_server.kill)
        deadline = time.monotonic() + 10
        while await asyncio.to_thread(metric, proxy.url, DEGRADED) != 1:  # scrapes only, no request
            assert time.monotonic() < deadline, "sop_state_degraded stayed 0 with Redis out"
            await asyncio.sleep(0.2)
        await asyncio.to_thread(redis_server.restart)
        deadline = time.monotonic() + 10
        while await asyncio.to_thread(metric, proxy.url, DEGRADED) != 0:
            assert time.monotonic() < deadline, "sop_state_degraded stayed 1 with Redis back"
            await asyncio.sleep(0.2)
    finally:
        await asyncio.to_thread(proxy.stop)
    _one_transition(proxy.log())


async def test_a_frozen_redis_holds_no_request_past_its_deadline(tmp: Path, emulator: Server,
                                                                 redis_server: RedisServer) -> None:
    """A Redis call may take `state.socket_timeout_s` (raised for a slow Redis) before it counts as
    failed; a request whose deadline (`X-Deadline-S`) is shorter was held that long by a frozen Redis
    (5 s for a deadline of 1 s), in the quotas' admission and in the shared slots' entry alike. Now
    each waits within the deadline: 504 from quotas (as a deadline passing before the replica
    answers), 503 `queue_timeout` from the slots' queue; what Redis grants them once it runs again
    is given back."""
    proxy = await asyncio.to_thread(start_proxy, tmp, [{"url": emulator.url, "num_parallel": 16}], {
        "admin": {"keys": [ADMIN]},
        "tenants": [_tenant(max_concurrent=4), {"name": "free", "keys": ["sk-free"]}],
        "chain": {"backpressure": {"max_in_flight": 2, "queue_timeout_s": 30}},
        "state": {"backend": "redis", "url": redis_server.url, "key_prefix": "deadline:",
                  "retry_interval_s": 0.5, "socket_timeout_s": 5.0}}, "deadline")
    books = redis.Redis.from_url(redis_server.url)

    async def ask(session: aiohttp.ClientSession, key: str) -> tuple[int, dict[str, Any], str | None,
                                                                       float]:
        started = time.monotonic()
        async with session.post(f"{proxy.url}/api/generate", json=_body(1),
                                headers={"Authorization": f"Bearer {key}", "X-Deadline-S": "1"}
                                ) as response:
            body = await response.json(content_type=None)
            return response.status, body, response.headers.get("Retry-After"), \
                time.monotonic() - started

    def empty() -> bool:
        slots = [k for k in books.scan_iter("deadline:slots:*:lease:*") if books.zcard(k)]
        queued = [k for k in books.scan_iter("deadline:slots:*:exp") if books.zcard(k)]
        return not books.zcard("deadline:lease:inflight:team") and not slots and not queued

    try:
        async with _session() as session:
            assert [(await ask(session, key))[0] for key in (KEY, "sk-free")] == [200, 200]
            await asyncio.to_thread(redis_server.pause)
            try:
                quota, slot = await asyncio.gather(ask(session, KEY), ask(session, "sk-free"))
            finally:
                await asyncio.to_thread(redis_server.resume)
            assert quota[0] == 504 and quota[1]["code"] == "upstream_response_timeout", quota
            assert "deadline of 1.0s" in quota[1]["error"]
            assert slot[0] == 503 and slot[1]["code"] == "queue_timeout" and slot[2], slot
            assert quota[3] < 3.0 and slot[3] < 3.0, (quota, slot)  # not the 5 s of socket_timeout_s
            await asyncio.to_thread(wait_for, empty, 15, "the grants of the late calls given back")

            def quiet() -> bool:
                shared = httpx.get(f"{proxy.url}/system/queue", timeout=5,
                                   headers={"Authorization": f"Bearer {ADMIN}"}).json()["shared"]
                return shared["held"] == shared["waiting"] == shared["pending_releases"] == 0

            await asyncio.to_thread(wait_for, quiet, 15, "nothing held in the proxy")
            await _poll_metric(proxy.url, DEGRADED, 0)
            assert [(await ask(session, key))[0] for key in (KEY, "sk-free")] == [200, 200]
    finally:
        books.close()
        await asyncio.to_thread(proxy.stop)
    assert "Traceback" not in proxy.log()


@pytest.mark.parametrize("key", ["sk-free", KEY], ids=["no-quotas", "quotas"])
async def test_a_queued_request_gets_its_queue_timeout_on_time_while_redis_hangs(
        tmp: Path, emulator: Server, redis_server: RedisServer, key: str) -> None:
    """A request waiting in the shared slots' queue when Redis freezes: its wait ends at its deadline
    (`X-Deadline-S` 1.5 here) with 503 `queue_timeout`, but the proxy first waited for its ticket's
    leave, a Redis call of up to `state.socket_timeout_s` (5 s): the answer came at 6.5 s. The leave
    now goes on in the background; the ticket is out of Redis once it answers again. For a tenant
    with quotas, the refusal also waited for the request's settle (the same 5 s): the answer now
    waits for it only within the deadline, and the lease comes back once Redis answers."""
    proxy = await asyncio.to_thread(start_proxy, tmp, [{"url": emulator.url, "num_parallel": 16}], {
        "admin": {"keys": [ADMIN]},
        "tenants": [{"name": "free", "keys": ["sk-free"]}, _tenant(max_concurrent=4)],
        "chain": {"backpressure": {"max_in_flight": 2, "queue_timeout_s": 30}},
        "state": {"backend": "redis", "url": redis_server.url, "key_prefix": "queued:",
                  "retry_interval_s": 0.5, "socket_timeout_s": 5.0}}, "queued")
    books = redis.Redis.from_url(redis_server.url)
    headers = {"Authorization": f"Bearer {key}"}

    def shared() -> dict[str, Any]:
        return dict(httpx.get(f"{proxy.url}/system/queue", timeout=5,
                              headers={"Authorization": f"Bearer {ADMIN}"}).json()["shared"])

    def tickets() -> int:
        return sum(int(books.zcard(k)) for k in books.scan_iter("queued:slots:*:exp"))

    try:
        async with _session() as session:
            running = [asyncio.ensure_future(session.post(f"{proxy.url}/api/generate",
                                                          json=_body(150), headers=headers))
                       for _ in range(2)]  # both slots, ~3 s each
            await asyncio.to_thread(wait_for, lambda: shared()["held"] == 2, 10, "both slots held")
            started = time.monotonic()
            queued = asyncio.ensure_future(session.post(
                f"{proxy.url}/api/generate", json=_body(1),
                headers={**headers, "X-Deadline-S": "1.5"}))
            await asyncio.to_thread(wait_for, lambda: shared()["waiting"] == 1 and tickets() == 1, 10,
                                    "the request queued in Redis")
            await asyncio.to_thread(redis_server.pause)
            try:
                response = await queued
                elapsed = time.monotonic() - started
                body = await response.json(content_type=None)
            finally:
                await asyncio.to_thread(redis_server.resume)
            assert response.status == 503 and body["code"] == "queue_timeout", body
            assert elapsed < 3.0, elapsed  # its deadline, not the deadline plus a Redis timeout
            for answer in running:
                async with await answer as done:
                    assert done.status == 200
            await asyncio.to_thread(wait_for, lambda: tickets() == 0, 15, "the ticket out of Redis")
            await asyncio.to_thread(wait_for, lambda: not books.zcard("queued:lease:inflight:team"), 15,
                                    "the tenant's leases back")

            def quiet() -> bool:
                books_here = shared()
                return books_here["held"] == books_here["waiting"] == books_here["pending_releases"] == 0

            await asyncio.to_thread(wait_for, quiet, 15, "nothing held in the proxy")
    finally:
        books.close()
        await asyncio.to_thread(proxy.stop)
    assert "Traceback" not in proxy.log()


async def test_client_leaving_during_a_frozen_lease_call_leaks_no_lease(
        tmp: Path, emulator: Server, redis_server: RedisServer) -> None:
    # The lease command reaches a frozen Redis, the client leaves while the proxy waits for the answer,
    # and Redis grants the lease once it runs again: the proxy must still give it back.
    proxy = await asyncio.to_thread(_proxy, tmp, emulator, redis_server.url, "cancel",
                                    tenant=_tenant(max_concurrent=1), socket_timeout_s=3.0)
    leases = redis.Redis.from_url(redis_server.url)
    try:
        async with _session() as session:
            assert (await _generate(session, proxy.url))[0] == 200
            await asyncio.to_thread(redis_server.pause)
            try:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await _generate(session, proxy.url)
                await asyncio.sleep(0.5)
            finally:
                await asyncio.to_thread(redis_server.resume)
            deadline = time.monotonic() + 10
            while leases.zcard("cancel:lease:inflight:team"):
                assert time.monotonic() < deadline, "the abandoned request's lease was never given back"
                await asyncio.sleep(0.1)
            assert (await _generate(session, proxy.url))[0] == 200
    finally:
        await asyncio.to_thread(proxy.stop)
    assert "Traceback" not in proxy.log()


async def test_redis_restart_gets_running_leases_back(tmp: Path, emulator: Server,
                                                      redis_server: RedisServer) -> None:
    # Redis restarts empty while two requests hold its leases and a third runs on a local lease:
    # renewals put all three back, so max_concurrent counts them again instead of admitting more.
    proxy = await asyncio.to_thread(_proxy, tmp, emulator, redis_server.url, "restart",
                                    tenant=_tenant(max_concurrent=2), quotas={"lease_ttl_s": 1.5},
                                    retry_interval_s=0.3)
    leases = redis.Redis.from_url(redis_server.url)
    key = "restart:lease:inflight:team"
    long_stream = _body(num_predict=300, stream=True)  # about 6 s at 50 tokens/s
    try:
        async with _session() as session:
            held = [await session.post(f"{proxy.url}/api/generate", json=long_stream)
                    for _ in range(2)]
            for response in held:
                assert response.status == 200
                await response.content.readline()
            await asyncio.to_thread(redis_server.kill)
            local = await session.post(f"{proxy.url}/api/generate", json=long_stream)
            assert local.status == 200  # open mode: a lease of this process
            await local.content.readline()
            held.append(local)
            await asyncio.to_thread(redis_server.restart)
            deadline = time.monotonic() + 5
            while leases.zcard(key) != 3:
                assert time.monotonic() < deadline, f"{leases.zcard(key)} leases in Redis, not 3"
                await asyncio.sleep(0.1)
            refused = await _generate(session, proxy.url)
            assert refused[0] == 429 and refused[1]["code"] == "rate_limited"
            for response in held:
                response.close()
            deadline = time.monotonic() + 10
            while (status := (await _generate(session, proxy.url))[0]) != 200:
                assert status == 429 and time.monotonic() < deadline
                await asyncio.sleep(0.1)
    finally:
        await asyncio.to_thread(proxy.stop)
    assert "Traceback" not in proxy.log()


async def test_redis_frozen_closed_mode_answers_503_fast(tmp: Path, emulator: Server,
                                                         redis_server: RedisServer) -> None:
    proxy = await asyncio.to_thread(_proxy, tmp, emulator, redis_server.url, "frozen-closed",
                                    failure_mode="closed")
    try:
        async with _session() as session:
            assert (await _generate(session, proxy.url))[0] == 200
            await asyncio.to_thread(redis_server.pause)
            try:
                answers = await asyncio.gather(*(_generate(session, proxy.url) for _ in range(10)))
                for status, body, headers, elapsed in answers:
                    assert status == 503 and body["code"] == "state_unavailable"
                    assert headers["Retry-After"] == "1" and elapsed < 3.0
                later = await _generate(session, proxy.url)
                assert later[0] == 503 and later[3] < 1.5  # the circuit is open: no wait at all
            finally:
                await asyncio.to_thread(redis_server.resume)
            deadline = time.monotonic() + 10
            while (status := (await _generate(session, proxy.url))[0]) != 200:
                assert status == 503 and time.monotonic() < deadline
                await asyncio.sleep(0.2)
    finally:
        await asyncio.to_thread(proxy.stop)
    assert "Traceback" not in proxy.log()


async def test_disconnect_storm_gives_every_lease_and_token_back(tmp: Path, emulator: Server,
                                                                 redis_server: RedisServer) -> None:
    proxy = await asyncio.to_thread(_proxy, tmp, emulator, redis_server.url, "storm",
                                    tenant=_tenant(tokens_per_minute=100_000))
    state = redis.Redis.from_url(redis_server.url, decode_responses=True)

    async def leave(after_first_line: bool) -> None:
        async with _session() as session:
            if after_first_line:
                response = await session.post(f"{proxy.url}/api/generate",
                                              json=_body(num_predict=300, stream=True))
                await response.content.readline()
                response.close()
            else:  # gone before any byte came back
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await session.post(f"{proxy.url}/api/generate",
                                           json=_body(num_predict=300, stream=True))
    try:
        await asyncio.gather(*(leave(i % 2 == 0) for i in range(60)))
        deadline = time.monotonic() + 10
        while state.zcard("storm:lease:inflight:team"):
            assert time.monotonic() < deadline, "leases of departed clients were not given back"
            await asyncio.sleep(0.1)
        # Reservations of 300+ tokens each came back: only prompts of cut streams were charged.
        level = float(state.hget("storm:bucket:tpm:team", "level") or 0)
        assert level > 100_000 - 60 * 20, level
    finally:
        await asyncio.to_thread(proxy.stop)
    assert "Traceback" not in proxy.log()


async def test_resets_during_admission_leave_no_lease_behind(tmp: Path, emulator: Server,
                                                            redis_server: RedisServer) -> None:
    # Clients reset their connection 0-6 ms after sending, so many leave while the admit script is on
    # its way. The release of such a holder must not overtake its admit (another pipelined connection):
    # a lease granted after its release stayed for lease_ttl_s (30 s) and locked the tenant out.
    proxy = await asyncio.to_thread(_proxy, tmp, emulator, redis_server.url, "resets",
                                    tenant=_tenant(max_concurrent=4))
    state = redis.Redis.from_url(redis_server.url)
    body = orjson.dumps(_body(num_predict=200, stream=True))
    head = (f"POST /api/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    port = int(proxy.url.rsplit(":", 1)[1])
    rng = random.Random(7)

    async def resetter(deadline: float) -> None:
        while time.monotonic() < deadline:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                       struct.pack("ii", 1, 0))  # RST, not FIN
            writer.write(head + body)
            await writer.drain()
            await asyncio.sleep(rng.uniform(0, 0.006))
            writer.transport.abort()

    try:
        deadline = time.monotonic() + 2.5
        await asyncio.gather(*(resetter(deadline) for _ in range(4)))
        await asyncio.to_thread(wait_for, lambda: state.zcard("resets:lease:inflight:team") == 0,
                                10, "every reset client's lease back")
        async with _session() as session:
            answers = await asyncio.gather(*(_generate(session, proxy.url) for _ in range(4)))
        assert [status for status, *_ in answers] == [200] * 4
    finally:
        await asyncio.to_thread(proxy.stop)
    assert "Traceback" not in proxy.log()


async def test_redis_out_of_memory_stays_out_until_it_takes_writes(tmp: Path, emulator: Server,
                                                                   redis_server: RedisServer) -> None:
    # maxmemory with noeviction: Redis still answers PING and runs the probe's lease script, but
    # refuses writes that may grow it. The probe used to pass, so the breaker closed every
    # retry_interval_s and the next write opened it again (a WARNING pair each time).
    proxy = await asyncio.to_thread(start_proxy, tmp, [{"url": emulator.url, "num_parallel": 16}], {
        "admin": {"keys": [ADMIN]}, "tenants": [_tenant()],
        "chain": {"backpressure": {"max_in_flight": 1, "queue_timeout_s": 10}},
        "state": {"backend": "redis", "url": redis_server.url, "key_prefix": "oom:",
                  "failure_mode": "closed", "retry_interval_s": 0.3}}, "oom")
    admin = redis.Redis.from_url(redis_server.url)
    try:
        async with _session() as session:
            assert (await _generate(session, proxy.url))[0] == 200
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", 1)
            # A slot script that must queue a ticket writes first with ZADD, which Redis refuses now
            # (one that takes a free slot writes first with a command it lets through).
            give_up = time.monotonic() + 15
            while not await asyncio.to_thread(metric, proxy.url, DEGRADED):
                assert time.monotonic() < give_up, "no refused write opened the breaker"
                await asyncio.gather(*(_generate(session, proxy.url, num_predict=20)
                                       for _ in range(4)))
            deadline = time.monotonic() + 4  # about 13 probes
            statuses: Counter[int] = Counter()
            while time.monotonic() < deadline:
                for status, *_ in await asyncio.gather(*(_generate(session, proxy.url)
                                                         for _ in range(4))):
                    statuses[status] += 1
                await asyncio.sleep(0.05)
            assert "state recovered" not in proxy.log()
            assert proxy.log().count("state degraded") == 1
            assert await asyncio.to_thread(metric, proxy.url, DEGRADED) == 1
            assert set(statuses) == {503}, statuses
            admin.config_set("maxmemory", 0)
            await _poll_metric(proxy.url, DEGRADED, 0)
            assert (await _generate(session, proxy.url))[0] == 200
    finally:
        admin.close()
        await asyncio.to_thread(proxy.stop)
    assert "Traceback" not in proxy.log()


@pytest.mark.parametrize("reply", [b"HTTP/1.1 400 Bad Request\r\n\r\n",  # another server on the port
                                   b"$4\r\n\xff\xfe\xfd\xfc\r\n",  # a reply that is not UTF-8
                                   b"*1\r\n$3\r\nabc\r\n"])  # a reply no script returns
async def test_not_redis_on_the_port_is_a_failure_not_a_500(tmp: Path, emulator: Server,
                                                            reply: bytes) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while await reader.read(65536):
                writer.write(reply)
                await writer.drain()
        writer.close()

    impostor = await asyncio.start_server(answer, "127.0.0.1", 0)
    url = f"redis://127.0.0.1:{impostor.sockets[0].getsockname()[1]}/0"
    open_proxy = closed_proxy = None
    try:
        open_proxy = await asyncio.to_thread(_proxy, tmp, emulator, url, "impostor-open")
        closed_proxy = await asyncio.to_thread(_proxy, tmp, emulator, url, "impostor-closed",
                                               failure_mode="closed")
        async with _session() as session:
            assert (await _generate(session, open_proxy.url))[0] == 200
            status, body, *_ = await _generate(session, closed_proxy.url)
            assert status == 503 and body["code"] == "state_unavailable"
    finally:
        proxies = [proxy for proxy in (open_proxy, closed_proxy) if proxy is not None]
        for proxy in proxies:  # every one stopped before any check: a failed check leaks none
            await asyncio.to_thread(proxy.stop)
        impostor.close()
        for proxy in proxies:
            assert "Traceback" not in proxy.log()


@pytest.mark.parametrize("failure_mode", ["open", "closed"])
@pytest.mark.parametrize("fault", ["kill", "pause"])
async def test_redis_fails_in_the_middle_of_a_burst(tmp: Path, emulator: Server,
                                                    redis_server: RedisServer, failure_mode: str,
                                                    fault: str) -> None:
    proxy = await asyncio.to_thread(_proxy, tmp, emulator, redis_server.url, f"mid-{fault}",
                                    failure_mode=failure_mode)
    allowed = {200} if failure_mode == "open" else {200, 503}
    try:
        async with _session() as session:
            async def fail_soon() -> None:
                await asyncio.sleep(0.3)
                await asyncio.to_thread(getattr(redis_server, fault))

            answers, _ = await asyncio.gather(
                asyncio.gather(*(_generate(session, proxy.url, num_predict=5) for _ in range(150))),
                fail_soon())
            statuses = Counter(status for status, *_ in answers)
            assert set(statuses) <= allowed, statuses
            if failure_mode == "closed":
                assert all(body["code"] == "state_unavailable" for status, body, *_ in answers
                           if status == 503)
            assert (await asyncio.to_thread(metric, proxy.url, FAILURES) or 0) >= 1  # it did hit
            await asyncio.to_thread(redis_server.resume if fault == "pause" else redis_server.restart)
            await _poll_metric(proxy.url, DEGRADED, 0)
            assert (await _generate(session, proxy.url))[0] == 200
            key = f"mid-{fault}:lease:inflight:team"
            await asyncio.to_thread(wait_for, lambda: redis.Redis.from_url(redis_server.url).zcard(key) == 0,
                                    10, "every lease back in Redis")
    finally:
        await asyncio.to_thread(proxy.stop)
    assert "Traceback" not in proxy.log()


@pytest.mark.parametrize("held", ["answer", "request"])
async def test_a_settle_redis_answered_late_is_refunded_once(redis_server: RedisServer,
                                                             held: str) -> None:
    """A settle that times out while other calls are answered (this process was busy, not Redis
    down): Redis ran it and the answer came late (`answer`), or it reaches Redis only later
    (`request`). Either way the refund is applied once (it is not sent again) and the lease comes
    back at once (its release, idempotent, is)."""
    relay = await StallingRelay.start(redis_server.port)
    state = FailoverState(RedisState(f"redis://127.0.0.1:{relay.port}/0", "late-settle:"),
                          timeout_s=0.5)
    bucket = ("tpm:team", 1000.0, 1e-6)  # no refill to speak of: levels are exact
    check = redis.asyncio.Redis(port=redis_server.port)
    try:
        await state.start()
        assert (await state.take(*bucket, 500)).ok
        assert (await state.lease("inflight:team", 2, "h1", 30))[0]
        # Once before, so that the held answer is the script's own, not NOSCRIPT before a reload.
        await state.settle(("inflight:team", "nobody"), [BucketAsk(bucket[0], bucket[1], bucket[2], 0)])
        relay.hold_next(requests=held == "request")
        settle = asyncio.get_running_loop().create_task(state.settle(
            ("inflight:team", "h1"), [BucketAsk(bucket[0], bucket[1], bucket[2], 100)]))
        await asyncio.wait_for(relay.held.wait(), 10)
        # Another call, on another connection, answered while the settle waits: Redis is up.
        ran = held == "answer"
        assert await state.level(*bucket) == pytest.approx(600 if ran else 500, abs=0.01)
        await settle  # gives up after timeout_s, without raising
        assert state.failures["settle"] == 1 and not state.degraded
        assert await check.zcard("late-settle:lease:inflight:team") == 0  # the lease came back
        relay.release()  # a held request now runs in Redis: the refund's one and only time
        deadline = time.monotonic() + 10
        while await _level(redis_server.port) < 599.5:  # a held request runs once released
            assert time.monotonic() < deadline, "the held settle never ran"
            await asyncio.sleep(0.05)
        assert await state.level(*bucket) == pytest.approx(600, abs=0.01)  # one refund, not two
    finally:
        await check.aclose()
        await state.close()
        await relay.close()


async def _level(port: int) -> float:
    """The token bucket's level as stored (the scripts keep it in a hash: `level`)."""
    client = redis.asyncio.Redis(port=port)
    try:
        fields = await client.hgetall("late-settle:bucket:tpm:team")
        return float(fields.get(b"level", 0))
    finally:
        await client.aclose()


async def test_stopping_lets_a_settle_in_flight_finish(tmp: Path, emulator: Server,
                                                       redis_server: RedisServer) -> None:
    """The proxy stops while a request's settle (shielded from its client's leaving) is still waiting
    on Redis: the stop waits for it instead of closing the pool under it, so the lease comes back
    and no 'state degraded' is logged for what is only the proxy stopping."""
    relay = await StallingRelay.start(redis_server.port)
    proxy = await asyncio.to_thread(
        _proxy, tmp, emulator, f"redis://127.0.0.1:{relay.port}/0", "stop-settle",
        tenant=_tenant(max_concurrent=2), socket_timeout_s=3.0)
    try:
        async with _session() as session:
            response = await session.post(f"{proxy.url}/api/generate",
                                          json=_body(num_predict=5, stream=True))
            assert response.status == 200
            await response.content.readline()  # admitted: Redis answered the admission
            relay.hold_next()  # the next answer from Redis, the settle's, comes late
            await response.read()  # the whole answer: the proxy now settles (lease back, tokens)
            await asyncio.wait_for(relay.held.wait(), 10)
            response.close()  # the client leaves meanwhile: aiohttp cancels the handler, the
            # settle (shielded) goes on without it, and the request no longer counts in flight
        stopping = asyncio.ensure_future(asyncio.to_thread(proxy.stop))
        await asyncio.sleep(0.5)  # the stop sequence reaches the state's close meanwhile
        relay.release()
        await stopping
    finally:
        await asyncio.to_thread(proxy.stop)
        await relay.close()
    log = proxy.log()
    assert "state degraded" not in log and "Traceback" not in log, log[-3000:]
    leases = redis.Redis(port=redis_server.port).zcard("stop-settle:lease:inflight:team")
    assert leases == 0


async def test_a_renewal_never_brings_back_a_lease_given_back_meanwhile(
        redis_server: RedisServer) -> None:
    """Leases taken in this process while Redis was down are renewed one by one once it is back (each
    moves into Redis). A request that ends during that round gives its lease back: the renewal that
    follows must not add it to Redis again, where it would count against max_concurrent until it
    expired (found by an attack: 16 leases in Redis for 13 live streams)."""
    state = FailoverState(RedisState(redis_server.url, "renew-race:"), timeout_s=0.3,
                          retry_interval_s=0.2)
    check = redis.asyncio.Redis(port=redis_server.port)
    held = {"a", "b", "c"}
    try:
        await state.start()
        redis_server.pause()
        for holder in sorted(held):  # the first call finds Redis frozen; all three are local
            assert (await state.lease("inflight:team", 10, holder, 30))[0]
        assert state.degraded
        redis_server.resume()
        deadline = time.monotonic() + 10
        while state.degraded:
            assert time.monotonic() < deadline, "Redis never came back for the breaker"
            await asyncio.sleep(0.05)

        released: list[asyncio.Task[None]] = []

        def still_held(key: str, holder: str) -> bool:
            if holder == "a":  # b's request ends while a's renewal is out: its lease goes back
                held.discard("b")
                released.append(asyncio.ensure_future(state.release(key, "b")))
            return holder in held

        leases = [("inflight:team", h) for h in ("a", "b", "c")]
        await state.renew_many(leases, 30, held=still_held)
        await asyncio.gather(*released)
        members = {m.decode() for m in await check.zrange("renew-race:lease:inflight:team", 0, -1)}
        assert members == {"a", "c"}
    finally:
        redis_server.resume()
        await check.aclose()
        await state.close()


async def test_a_lease_given_back_after_a_late_admit_stays_given_back(redis_server: RedisServer
                                                                      ) -> None:
    """An admit that times out while Redis answers other calls (this process busy, or its request
    slow on the way) may still run in Redis later: the lease it asked for is given back at once, and
    that release must reach Redis after the admit, not overtake it on another connection (then the
    admit's lease stayed, counting against max_concurrent until it expired; found by an attack
    through a slow link to Redis: leases of no request left after every request had ended)."""
    relay = await StallingRelay.start(redis_server.port)
    state = FailoverState(RedisState(f"redis://127.0.0.1:{relay.port}/0", "late-admit:"),
                          timeout_s=0.5)
    check = redis.asyncio.Redis(port=redis_server.port)
    bucket = ("tpm:team", 1000.0, 1e-6)
    try:
        await state.start()
        # Once before, so that the held request is the script itself, not NOSCRIPT before a reload.
        await state.admit(LeaseAsk("inflight:team", 4, "warm", 30), [])
        await state.release("inflight:team", "warm")
        relay.hold_next(requests=True)  # the admit's request reaches Redis only once released
        admit = asyncio.get_running_loop().create_task(state.admit(
            LeaseAsk("inflight:team", 4, "h1", 30), [BucketAsk(*bucket, 100)]))
        await asyncio.wait_for(relay.held.wait(), 10)
        # Another call, on another connection, answered while the admit waits: Redis is up.
        assert (await state.level(*bucket)) == pytest.approx(1000, abs=0.01)
        assert (await admit).ok  # given up after timeout_s: admitted by this process (open)
        assert state.failures["admit"] == 1 and not state.degraded
        await asyncio.sleep(0.2)  # the release of the given-up lease is sent meanwhile
        relay.release()  # the admit runs in Redis now, and the release after it
        deadline = time.monotonic() + 5
        while await check.zcard("late-admit:lease:inflight:team") != 0:
            assert time.monotonic() < deadline, "the late admit's lease stayed in Redis"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert await check.zcard("late-admit:lease:inflight:team") == 0
    finally:
        await check.aclose()
        await state.close()
        await relay.close()


@pytest.mark.parametrize("noscript", [False, True], ids=["renewal-on-its-way", "noscript"])
async def test_a_renewal_on_its_way_cannot_bring_back_a_lease_settled_meanwhile(
        redis_server: RedisServer, noscript: bool) -> None:
    """A renewal re-adds a lease Redis lost. One still on its way to Redis when its request ends (a
    slow link, another connection's backlog) must not overtake the settle that gives the lease back:
    the settle goes behind it, on its connection.

    `noscript`: the first renewal after Redis started (or restarted) runs a script Redis has not
    loaded yet. Answered NOSCRIPT, it used to be sent again as EVAL: a second round trip, during which
    the settle of a request that ended went first, and the renewal then re-added its lease (found by an
    attack with Redis' MONITOR: EVALSHA renew, settle's ZREM, EVAL renew's ZADD). A connection loads a
    script right before its first EVALSHA, so the renewal runs in its place."""
    prefix = "renew-noscript:" if noscript else "renew-late:"
    relay = await StallingRelay.start(redis_server.port)
    state = FailoverState(RedisState(f"redis://127.0.0.1:{relay.port}/0", prefix), timeout_s=2.0)
    check = redis.asyncio.Redis(port=redis_server.port)
    try:
        await state.start()
        assert (await state.admit(LeaseAsk("inflight:team", 4, "h1", 30), [])).ok
        if noscript:
            # The settle's script is loaded, the renewal's is not: Redis has never run it.
            await state.settle(("inflight:team", "nobody"), [])
        relay.hold_next(requests=True)  # the renewal's request reaches Redis only once released
        renewal = asyncio.get_running_loop().create_task(state.renew("inflight:team", "h1", 30))
        await asyncio.wait_for(relay.held.wait(), 10)
        settle = asyncio.get_running_loop().create_task(state.settle(("inflight:team", "h1"), []))
        await asyncio.sleep(0.2)
        relay.release()
        await asyncio.gather(renewal, settle)
        assert await check.zcard(f"{prefix}lease:inflight:team") == 0
        assert not state.failures
    finally:
        await check.aclose()
        await state.close()
        await relay.close()


async def test_max_concurrent_holds_when_redis_lost_the_running_leases(
        tmp: Path, emulator: Server, redis_server: RedisServer) -> None:
    """Redis loses its data (FLUSHALL here; a restart without persistence) while a tenant's requests
    run at its max_concurrent. The proxy reads the state's epoch every half second while it holds
    leases and renews at once when it changed (or at its first read, which may come after the loss),
    adding the running requests' leases back, so the next request is refused as before, not
    admitted on empty books until the next renewal (a third of chain.quotas.lease_ttl_s: 10 s here;
    an attack saw 6 requests in flight for a max_concurrent of 3 after a restart)."""
    proxy = await asyncio.to_thread(_proxy, tmp, emulator, redis_server.url, "lost-quota",
                                    tenant=_tenant(max_concurrent=2))
    admin = redis.Redis.from_url(redis_server.url)
    try:
        async with _session() as session:
            streams = [await session.post(f"{proxy.url}/api/generate",
                                          json=_body(num_predict=400, stream=True)) for _ in range(2)]
            assert [s.status for s in streams] == [200, 200]
            assert (await _generate(session, proxy.url))[0] == 429  # at max_concurrent
            admin.flushall()  # before the proxy's first look at the epoch, even
            deadline = time.monotonic() + 1.5
            while admin.zcard("lost-quota:lease:inflight:team") < 2:
                assert time.monotonic() < deadline, "the running requests' leases never came back"
                await asyncio.sleep(0.05)
            assert (await _generate(session, proxy.url))[0] == 429
            for stream in streams:
                stream.close()
    finally:
        admin.close()
        await asyncio.to_thread(proxy.stop)
    assert "Traceback" not in proxy.log()
