"""An attacker's view of the edge, beyond the issue's list: request smuggling, target and path tricks,
pipelining, malformed framing, and disconnect storms. Each attack goes over a raw socket (an HTTP client
would normalise it) to a real proxy in front of an emulator; the checks are that the proxy answers a
clear 4xx (never a 500, never a response for a smuggled request), that nothing protected leaks, and that
every slot, lease and counter is back afterwards."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from tests.support.servers import Server, start_emulator, start_proxy

ADMIN, TEAM = "sk-attack-admin", "sk-attack-team"


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    tmp: Path = tmp_path_factory.mktemp("attacks")
    emulator = start_emulator(tmp, name="attack-emu", fixed_clock=False, decode_tokens_per_s=50,
                              output_tokens="200,200")
    proxy = start_proxy(tmp, [emulator.url], {
        "admin": {"keys": [ADMIN]},
        "tenants": [{"name": "team", "keys": [TEAM], "max_concurrent": 4}],
        "chain": {"backpressure": {"max_in_flight": 8}}}, name="attack-proxy")
    yield emulator, proxy
    proxy.stop()
    emulator.stop()


def _exchange(proxy: Server, raw: bytes, timeout_s: float = 5.0) -> bytes:
    """Send `raw`, read until the server closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(raw)
        sock.settimeout(timeout_s)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
                if len(_statuses(data)) >= 3:
                    break
        except (TimeoutError, ConnectionResetError):
            pass
    return data


def _statuses(data: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3}) ", data)]


@pytest.mark.parametrize("head", [
    # CL.TE: both framings; a smuggled request hides in the body.
    b"POST /api/tags HTTP/1.1\r\nHost: x\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\nGET /system/queue HTTP/1.1\r\nHost: x\r\n\r\n",
    # Two different Content-Lengths.
    b"POST /api/show HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\n"
    b"{}   GET /system/queue HTTP/1.1\r\n\r\n",
    # An obfuscated Transfer-Encoding.
    b"POST /api/show HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n"
    b"0\r\n\r\nGET /system/queue HTTP/1.1\r\nHost: x\r\n\r\n",
    # A Content-Length that is not a number.
    b"POST /api/show HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}",
    b"POST /api/show HTTP/1.1\r\nHost: x\r\nContent-Length: 0x10\r\n\r\n{}",
    # A space before the colon, a header folded onto the next line, a bare LF line ending.
    b"GET /api/tags HTTP/1.1\r\nHost : x\r\n\r\n",
    b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\n\r\n",
    # A NUL byte in the target, and a request line that is not HTTP at all.
    b"GET /api/ta\x00gs HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
])
def test_ambiguous_framing_is_refused_and_nothing_is_smuggled(target: tuple[Server, Server],
                                                               head: bytes) -> None:
    _, proxy = target
    data = _exchange(proxy, head)
    statuses = _statuses(data)
    assert statuses, data[:200]
    # Exactly one answer, a 4xx: the smuggled /system/queue never gets one of its own.
    assert len(statuses) == 1 and 400 <= statuses[0] < 500, (statuses, data[:300])
    assert b'"models"' not in data  # /system/queue's body
    assert httpx.get(f"{proxy.url}/healthz").status_code == 200


@pytest.mark.parametrize("path", [
    "/system/../system/queue", "//system/queue", "/%73ystem/queue", "/system%2fqueue",
    "/SYSTEM/queue", "/system/queue/", "/./system/queue", "/api/../system/profile",
])
def test_path_tricks_never_reach_admin_routes_without_the_admin_key(target: tuple[Server, Server],
                                                                    path: str) -> None:
    _, proxy = target
    raw = f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEAM}\r\nConnection: close\r\n\r\n"
    data = _exchange(proxy, raw.encode())
    statuses = _statuses(data)
    assert statuses and statuses[0] != 500, data[:300]
    # A tenant sees its own queue entries at /system/queue only; nothing else of /system.
    if statuses[0] == 200:
        body = data.partition(b"\r\n\r\n")[2]
        assert b'"in_flight"' not in body and b'"replicas"' not in body, (path, body[:300])


def test_pipelined_requests_are_answered_in_order(target: tuple[Server, Server]) -> None:
    _, proxy = target
    one = b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n"
    two = b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
    three = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    statuses = _statuses(_exchange(proxy, one + two + three))
    assert statuses == [200, 404, 200]


def test_many_tiny_headers_are_refused_not_forwarded(target: tuple[Server, Server]) -> None:
    _, proxy = target
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(12_000))  # ~100 KB of head
    data = _exchange(proxy, b"GET /api/tags HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    statuses = _statuses(data)
    assert statuses and 400 <= statuses[0] < 500 and statuses[0] != 404, data[:200]


async def _stream_then_leave(session: aiohttp.ClientSession, proxy: Server, key: str) -> int:
    async with session.post(f"{proxy.url}/api/generate", json={
            "model": "llama3.2", "prompt": "tell me a long story"},
            headers={"Authorization": f"Bearer {key}"}) as response:
        if response.status == 200:
            await response.content.readline()  # one token, then the client is gone
        return response.status


def _settled(proxy: Server, emulator: Server, timeout_s: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        queue = httpx.get(f"{proxy.url}/system/queue",
                          headers={"Authorization": f"Bearer {ADMIN}"}).json()["models"]
        quotas = httpx.get(f"{proxy.url}/system/quotas",
                           headers={"Authorization": f"Bearer {ADMIN}"}).json()["tenants"]
        stats = emulator.stats()
        idle = (all(g["queued"] == 0 and sum(g["in_flight"].values()) == 0 for g in queue.values())
                and quotas["team"]["in_flight"] == 0 and stats["active"] == 0)
        if idle:
            return dict(stats)
        assert time.monotonic() < deadline, (queue, quotas, stats)
        time.sleep(0.2)


async def test_a_disconnect_storm_gives_everything_back(target: tuple[Server, Server]) -> None:
    emulator, proxy = target
    before = emulator.stats().get("cancelled", 0)
    async with aiohttp.ClientSession() as session:
        for _ in range(3):  # waves: leases and slots must come back between them
            statuses = await asyncio.gather(*(_stream_then_leave(session, proxy, TEAM)
                                              for _ in range(12)), return_exceptions=True)
            assert all(isinstance(s, int) and s in (200, 429) for s in statuses), statuses
            assert statuses.count(200) >= 4  # max_concurrent 4: at least that many got in
    stats = await asyncio.to_thread(_settled, proxy, emulator)
    assert stats.get("cancelled", 0) > before  # the replica stopped generating for them
    # And the tenant can still use all four of its slots.
    async with aiohttp.ClientSession() as session:
        statuses = await asyncio.gather(*(_stream_then_leave(session, proxy, TEAM) for _ in range(4)))
    assert statuses == [200] * 4
    await asyncio.to_thread(_settled, proxy, emulator)
