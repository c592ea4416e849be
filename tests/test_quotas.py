"""The `quotas` step: requests per minute, tokens per minute (reserve, settle, refund) and concurrency per
tenant, with Retry-After and X-RateLimit headers, in memory and shared by two proxy processes via Redis,
including a dead proxy's leases coming back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from proxy.state.memory import MemoryState
from proxy.state.redis import RedisState
from tests.support.redis_server import RedisServer
from tests.support.servers import Server, start_emulator, start_proxy

ADMIN, RPM, TPM, CONC = "sk-admin", "sk-rpm", "sk-tpm", "sk-conc"
TENANTS = [
    {"name": "rpm", "keys": [RPM], "requests_per_minute": 3},
    {"name": "tpm", "keys": [TPM], "tokens_per_minute": 600},
    {"name": "conc", "keys": [CONC], "max_concurrent": 1},
]


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quotas")


@pytest.fixture(scope="module")
def emulator(tmp: Path) -> Iterator[Server]:
    server = start_emulator(tmp, fixed_clock=False, decode_tokens_per_s=40, output_tokens="20,20",
                            name="quota-emu")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_server(tmp: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp)
    yield server
    server.stop()


def _proxy(tmp: Path, emulator: Server, name: str, **extra: Any) -> Server:
    return start_proxy(tmp, [emulator.url], {"admin": {"keys": [ADMIN]}, "tenants": TENANTS,
                                             **extra}, name=name)


def _quotas(proxy: Server) -> dict[str, Any]:
    return dict(httpx.get(f"{proxy.url}/system/quotas", headers=_auth(ADMIN)).json()["tenants"])


def _chat(proxy: Server, key: str, **options: Any) -> httpx.Response:
    return httpx.post(f"{proxy.url}/api/chat", headers=_auth(key), timeout=30, json={
        "model": "llama3.2", "stream": False, "options": options,
        "messages": [{"role": "user", "content": "hello there"}]})


def test_requests_per_minute(tmp: Path, emulator: Server) -> None:
    proxy = _proxy(tmp, emulator, "rpm")
    try:
        answers = [_chat(proxy, RPM) for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert answers[0].headers["x-ratelimit-limit"] == "3"
        assert answers[0].headers["x-ratelimit-remaining"] == "2"
        refused = answers[3]
        assert refused.json()["code"] == "rate_limited" and "3 requests per minute" in refused.json()[
            "error"]
        assert 1 <= int(refused.headers["retry-after"]) <= 20  # one request refills in 20 s
        assert refused.json()["retry_after_s"] == int(refused.headers["retry-after"])
        assert "requests_per_minute=3" in refused.headers["x-service-limits"]
        assert _chat(proxy, TPM).status_code == 200  # other tenants are not affected
    finally:
        proxy.stop()


def test_tokens_reserved_then_settled(tmp: Path, emulator: Server) -> None:
    proxy = _proxy(tmp, emulator, "tpm")
    try:
        first = _chat(proxy, TPM, num_predict=20)
        assert first.status_code == 200
        used = first.json()["prompt_eval_count"] + first.json()["eval_count"]
        remaining = _quotas(proxy)["tpm"]["tokens_per_minute"]["remaining"]
        assert 600 - used - 1 <= remaining <= 600 - used + 15  # settled to the real count (+ refill)
        too_big = _chat(proxy, TPM, num_predict=5000)
        assert too_big.status_code == 429 and too_big.json()["code"] == "quota_exceeded"
        assert "more than tenant tpm's 600 tokens per minute" in too_big.json()["error"]
        for _ in range(20):
            response = _chat(proxy, TPM, num_predict=100)
            if response.status_code == 429:
                break
        assert response.json()["code"] == "quota_exceeded"
        assert 1 <= int(response.headers["retry-after"]) <= 60
    finally:
        proxy.stop()


async def test_concurrency_and_release_on_disconnect(tmp: Path, emulator: Server) -> None:
    proxy = await asyncio.to_thread(_proxy, tmp, emulator, "conc")
    try:
        body = {"model": "llama3.2", "prompt": "a long story", "options": {"num_predict": 20}}
        async with aiohttp.ClientSession(headers=_auth(CONC)) as session:
            response = await session.post(f"{proxy.url}/api/generate", json=body)
            await response.content.readline()  # streaming: the lease is held
            second = await session.post(f"{proxy.url}/api/generate", json=body)
            assert second.status == 429 and (await second.json())["code"] == "rate_limited"
            assert int(second.headers["Retry-After"]) >= 1
            response.close()  # the client leaves mid-stream: the lease must come back at once
            await asyncio.sleep(0.3)
            third = await session.post(f"{proxy.url}/api/generate", json={**body, "stream": False})
            assert third.status == 200
        in_flight = (await asyncio.to_thread(_quotas, proxy))["conc"]["in_flight"]
        assert in_flight == 0
    finally:
        await asyncio.to_thread(proxy.stop)


async def test_cancelled_request_refunds_its_reservation(tmp: Path, emulator: Server) -> None:
    slow = await asyncio.to_thread(start_emulator, tmp, fixed_clock=False, load_s=2.0, name="cold")
    proxy = await asyncio.to_thread(start_proxy, tmp, [slow.url], {
        "admin": {"keys": [ADMIN]}, "tenants": TENANTS}, name="refund")
    try:
        async with aiohttp.ClientSession(headers=_auth(TPM)) as session:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):  # gone while the model loads: nothing produced
                    await session.post(f"{proxy.url}/api/generate", json={
                        "model": "llama3.2", "prompt": "hi", "options": {"num_predict": 300}})
        await asyncio.sleep(0.3)
        remaining = (await asyncio.to_thread(_quotas, proxy))["tpm"]["tokens_per_minute"]["remaining"]
        assert remaining >= 599  # the whole reservation came back
    finally:
        await asyncio.to_thread(proxy.stop)
        await asyncio.to_thread(slow.stop)


def test_shadow_mode(tmp: Path, emulator: Server) -> None:
    proxy = _proxy(tmp, emulator, "quota-shadow", chain={"quotas": {"mode": "shadow"}})
    try:
        answers = [_chat(proxy, RPM) for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 200]
        assert answers[3].headers["x-shadow-decision"] == "quotas=rate_limited"
        assert "x-shadow-decision" not in answers[0].headers
    finally:
        proxy.stop()


def test_quota_holds_across_two_proxies_sharing_redis(tmp: Path, emulator: Server,
                                                       redis_server: RedisServer) -> None:
    state = {"backend": "redis", "url": redis_server.url, "key_prefix": "sop-shared:"}
    first = _proxy(tmp, emulator, "redis-a", state=state)
    second = _proxy(tmp, emulator, "redis-b", state=state)
    try:
        statuses = [_chat(proxy, RPM).status_code for proxy in (first, second, first, second, first)]
        assert statuses == [200, 200, 200, 429, 429]
        assert _quotas(second)["rpm"]["requests_per_minute"]["remaining"] < 1
    finally:
        first.stop()
        second.stop()


async def test_dead_proxys_lease_expires(tmp: Path, emulator: Server,
                                         redis_server: RedisServer) -> None:
    state = {"backend": "redis", "url": redis_server.url, "key_prefix": "sop-lease:"}
    chain = {"quotas": {"lease_ttl_s": 1.5}}
    doomed = await asyncio.to_thread(_proxy, tmp, emulator, "doomed", state=state, chain=chain)
    survivor = await asyncio.to_thread(_proxy, tmp, emulator, "survivor", state=state, chain=chain)
    try:
        body = {"model": "llama3.2", "prompt": "long", "options": {"num_predict": 20}}
        async with aiohttp.ClientSession(headers=_auth(CONC)) as session:
            held = await session.post(f"{doomed.url}/api/generate", json=body)
            await held.content.readline()
            await asyncio.to_thread(doomed.kill)  # dies holding the tenant's only lease
            refused = await session.post(f"{survivor.url}/api/generate", json={**body, "stream": False})
            assert refused.status == 429
            deadline = time.monotonic() + 5
            while True:
                retry = await session.post(f"{survivor.url}/api/generate",
                                           json={**body, "stream": False})
                if retry.status == 200:
                    break
                assert time.monotonic() < deadline, "the dead proxy's lease never expired"
                await asyncio.sleep(0.25)
    finally:
        await asyncio.to_thread(survivor.stop)


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_state_backends_agree(backend: str, redis_server: RedisServer) -> None:
    state = MemoryState() if backend == "memory" else RedisState(redis_server.url, f"sop-{backend}:")
    try:
        taken = [await state.take("b", 3, 0.001, 1) for _ in range(4)]
        assert [t.ok for t in taken] == [True, True, True, False]
        assert taken[3].retry_after_s == pytest.approx(1000, rel=0.05)
        assert await state.adjust("b", 3, 0.001, 2) == pytest.approx(2, abs=0.01)
        assert await state.adjust("b", 3, 0.001, 10) == pytest.approx(3, abs=0.01)  # capped
        assert await state.adjust("b", 3, 0.001, -5) == pytest.approx(-2, abs=0.01)  # debt
        assert (await state.lease("l", 2, "a", 5))[0] and (await state.lease("l", 2, "b", 5))[0]
        assert await state.lease("l", 2, "c", 5) == (False, 2)
        await state.release("l", "a")
        assert await state.holders("l") == 1
        assert (await state.lease("l", 2, "short", 0.2))[0]
        await asyncio.sleep(0.35)
        assert await state.holders("l") == 1  # the short lease expired by itself
    finally:
        await state.close()
