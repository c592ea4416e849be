"""`GET /system/events` against the real proxy and emulators: admin only, the SSE headers `curl -N` needs,
rejections with their reason (and nothing a client wrote), health transitions and ejections of a stopped
replica, model loads and sampled queue depth, the `kinds` filter, a reader that never reads (it loses
events, requests are not held up), the subscriber cap, and the clean end of a stream on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import yaml

from proxy.config import TelemetryConfig
from proxy.errors import NoHealthyUpstream, Overload, UpstreamBusy
from proxy.events import BUFFER_EVENTS, KINDS, MAX_SUBSCRIBERS, EventBus, TooManySubscribers
from proxy.telemetry.setup import build_telemetry
from tests.support.metrics import metric
from tests.support.polling import wait_for
from tests.support.servers import Server, start_emulator, start_proxy

ADMIN_KEY = "events-admin-key"
TENANT_KEY = "events-tenant-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
TENANT = {"Authorization": f"Bearer {TENANT_KEY}"}
KEYS = {"admin": {"keys": [ADMIN_KEY]},
        "tenants": [{"name": "team-a", "keys": [TENANT_KEY], "requests_per_minute": 1}]}
FAST_HEALTH = {"probe_interval_s": 0.3, "probe_timeout_s": 1.0, "base_ejection_s": 30.0}
READ_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("events")


@pytest.fixture(scope="module")
def emulator(tmp: Path) -> Iterator[Server]:
    server = start_emulator(tmp, name="events-emulator")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(tmp: Path, emulator: Server) -> Iterator[Server]:
    """A proxy with an admin key and one tenant allowed one request per minute."""
    server = start_proxy(tmp, [{"url": emulator.url, "name": "a"}],
                         {**KEYS, "chain": {"health": FAST_HEALTH}}, name="events-proxy")
    yield server
    server.stop()


class Stream:
    """One `/system/events` subscription read as a browser's EventSource would: blocks of `id:`,
    `event:` and `data:` lines ended by a blank line; comments (`: ping`) are skipped."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.seen: list[dict[str, Any]] = []
        self.raw = bytearray()

    async def next(self) -> dict[str, Any]:
        """The next event: `{"id", "event", "data"}` with `data` decoded from JSON."""
        fields: dict[str, Any] = {}
        while True:
            line = await self.response.content.readline()
            if not line:
                raise EOFError("the stream ended")
            self.raw += line
            text = line.decode().rstrip("\r\n")
            if not text:
                if fields:
                    event = {"id": fields.get("id"), "event": fields.get("event"),
                             "data": json.loads(fields["data"])}
                    self.seen.append(event)
                    return event
                continue
            if text.startswith(":"):
                continue
            name, _, value = text.partition(": ")
            fields[name] = value

    async def until(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first event `predicate` accepts (bounded by READ_TIMEOUT_S: a failure, not a timing)."""
        async with asyncio.timeout(READ_TIMEOUT_S):
            while True:
                event = await self.next()
                if predicate(event):
                    return event


@contextlib.asynccontextmanager
async def subscribe(session: aiohttp.ClientSession, proxy: Server,
                    query: str = "") -> AsyncIterator[Stream]:
    async with session.get(f"{proxy.url}/system/events{query}", headers=ADMIN,
                           timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as response:
        assert response.status == 200, await response.text()
        yield Stream(response)


def wait_probed(proxy: Server) -> None:
    """Every replica's model listing is known (from then on unknown model names are labelled `other`)."""
    wait_for(lambda: all(r["models_on_disk"] is not None for r in httpx.get(
        f"{proxy.url}/system/profile", headers=ADMIN, timeout=5).json()["replicas"].values()),
        what="the replicas' model listings")


def error_code(response: httpx.Response) -> str:
    return str(response.json()["code"])


async def test_admin_only_and_headers_curl_needs(proxy: Server) -> None:
    async with httpx.AsyncClient(base_url=proxy.url, timeout=5) as client:
        refused = await client.get("/system/events")
        assert refused.status_code == 401 and error_code(refused) == "unauthorized"
        wrong = await client.get("/system/events", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        forbidden = await client.get("/system/events", headers=TENANT)
        assert forbidden.status_code == 403 and error_code(forbidden) == "forbidden"
        invalids = {query: await client.get(f"/system/events{query}", headers=ADMIN) for query in
                    ("?kinds=bogus", "?kinds=", "?kinds=rejection,,health", "?kinds=Rejection")}
    for query, invalid in invalids.items():
        assert invalid.status_code == 400, query
        assert error_code(invalid) == "invalid_request"
        assert invalid.headers["Content-Type"].startswith("application/json")
        assert "bogus" not in invalid.text  # the message never echoes what the client sent
    async with aiohttp.ClientSession() as session, subscribe(session, proxy) as stream:
        headers = stream.response.headers
        assert headers["Content-Type"] == "text/event-stream"
        assert headers["Cache-Control"] == "no-cache"
        assert headers["X-Accel-Buffering"] == "no"
        assert "Content-Length" not in headers and "Content-Encoding" not in headers


async def test_a_rejection_appears_with_its_reason_and_nothing_the_client_wrote(proxy: Server) -> None:
    wait_probed(proxy)
    secret_prompt = "PROMPT-TEXT-NOBODY-MAY-SEE"
    made_up = "made-up-model-\u2028\nname"
    async with aiohttp.ClientSession() as session, subscribe(session, proxy) as stream:
        async with httpx.AsyncClient(base_url=proxy.url, headers=TENANT, timeout=30) as client:
            statuses = []
            for model in ("llama3.2", "llama3.2", made_up):
                reply = await client.post("/api/generate", json={
                    "model": model, "prompt": secret_prompt, "stream": False,
                    "options": {"num_predict": 2}})
                statuses.append(reply.status_code)
        assert statuses[1:] == [429, 429], statuses  # one request per minute (the first may be 200)
        first = await stream.until(lambda e: e["event"] == "rejection")
        assert first["data"] == {
            "kind": "rejection", "ts": first["data"]["ts"], "status": 429, "code": "rate_limited",
            "step": "quotas", "model": "llama3.2", "tenant": "team-a", "route": "/api/generate",
            "retry_after_s": first["data"]["retry_after_s"]}
        assert first["data"]["retry_after_s"] > 0 and first["id"] is not None
        second = await stream.until(lambda e: e["event"] == "rejection")
        assert second["data"]["model"] == "other"  # a name the fleet does not have is not a label
        assert int(second["id"]) > int(first["id"])
        raw = bytes(stream.raw)
    for text in (secret_prompt, "made-up", TENANT_KEY):
        assert text.encode() not in raw


async def test_health_transitions_ejections_and_the_kinds_filter(tmp: Path) -> None:
    a = start_emulator(tmp, name="events-health-a")
    b = start_emulator(tmp, name="events-health-b")
    proxy = start_proxy(tmp, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
                        {**KEYS, "chain": {"health": FAST_HEALTH}}, name="events-health")
    try:
        wait_probed(proxy)
        async with aiohttp.ClientSession() as session, \
                subscribe(session, proxy, "?kinds=health,ejection") as filtered, \
                subscribe(session, proxy) as everything:
            refused = await asyncio.to_thread(httpx.get, f"{proxy.url}/api/tags",
                                              headers={"Authorization": "Bearer wrong"}, timeout=5)
            assert refused.status_code == 401
            b.stop()
            down = await filtered.until(lambda e: e["event"] == "health" and e["data"]["replica"] == "b")
            assert down["data"]["before"] == "healthy"
            assert down["data"]["after"] == "ejected"
            assert "connect" in down["data"]["reason"].lower()
            ejection = await filtered.until(lambda e: e["event"] == "ejection")  # right after it
            assert int(ejection["id"]) == int(down["id"]) + 1
            assert ejection["data"]["replica"] == "b" and ejection["data"]["backoff_s"] == 30.0
            assert ejection["data"]["ejections"] == 1
            # Events come in publishing order: the rejection came before b's transition. The filtered
            # stream never saw it; the unfiltered one did, and then the same transition.
            assert {e["event"] for e in filtered.seen} <= {"health", "ejection"}
            rejection = await everything.until(lambda e: e["event"] == "rejection")
            assert rejection["data"]["code"] == "unauthorized"
            assert rejection["data"]["step"] == "ingress" and rejection["data"]["tenant"] == "anonymous"
            same = await everything.until(lambda e: e["event"] == "health")
            assert same["id"] == down["id"] and same["data"] == down["data"]
    finally:
        for server in (proxy, a, b):
            server.stop()


async def test_model_loads_and_sampled_queue_depth(tmp: Path) -> None:
    emulator = start_emulator(tmp, name="events-queue-emulator", load_s=0.8, decode_tokens_per_s=20)
    proxy = start_proxy(tmp, [{"url": emulator.url, "name": "a"}],
                        {**KEYS, "chain": {"health": FAST_HEALTH}}, name="events-queue")
    body = {"model": "llama3.2", "prompt": "count", "stream": False, "options": {"num_predict": 30}}
    try:
        wait_probed(proxy)
        async with aiohttp.ClientSession() as session, \
                subscribe(session, proxy, "?kinds=queue,model_load") as stream, \
                httpx.AsyncClient(base_url=proxy.url, headers=ADMIN, timeout=60) as client:
            requests = [asyncio.create_task(client.post("/api/generate", json=body)) for _ in range(3)]
            queued = await stream.until(lambda e: e["event"] == "queue"
                                        and e["data"]["depth"].get("llama3.2", {}).get("interactive"))
            assert queued["data"]["in_flight"] == {"llama3.2": 1}  # num_parallel 1: the rest wait
            load = await stream.until(lambda e: e["event"] == "model_load")
            assert load["data"]["replica"] == "a" and load["data"]["model"] == "llama3.2"
            assert load["data"]["source"] == "request" and load["data"]["duration_s"] >= 0.5
            assert [r.status_code for r in await asyncio.gather(*requests)] == [200, 200, 200]
            drained = await stream.until(lambda e: e["event"] == "queue"
                                         and not e["data"]["depth"] and not e["data"]["in_flight"])
            assert drained["data"] == {"kind": "queue", "ts": drained["data"]["ts"], "depth": {},
                                       "in_flight": {}}
            assert {e["event"] for e in stream.seen} <= {"queue", "model_load"}
    finally:
        proxy.stop()
        emulator.stop()


def _stalled_subscriber(proxy: Server) -> socket.socket:
    """A subscriber that sends its request and then reads nothing, with a small receive buffer, so the
    proxy's writes to it stall soon."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", proxy.port))
    sock.sendall(f"GET /system/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ADMIN_KEY}"
                 "\r\n\r\n".encode())
    return sock


async def test_a_reader_that_never_reads_loses_events_and_holds_up_nothing(proxy: Server) -> None:
    sock = _stalled_subscriber(proxy)
    try:
        sock.settimeout(READ_TIMEOUT_S)
        received = b""
        while b"\r\n\r\n" not in received:  # the head: it is subscribed; from now on it reads nothing
            chunk = sock.recv(4096)
            assert chunk, "the stream ended before its head"
            received += chunk
        answered = 0
        async with httpx.AsyncClient(base_url=proxy.url, headers={"Authorization": "Bearer wrong"},
                                     timeout=10, limits=httpx.Limits(max_connections=8)) as client:
            for _ in range(100):  # bounded: a few hundred events overflow its buffers
                replies = await asyncio.gather(*(client.get("/api/tags") for _ in range(100)))
                assert {r.status_code for r in replies} == {401}  # every request answered at once
                answered += len(replies)
                if metric(proxy.url, "sop_events_dropped_total", kind="rejection"):
                    break
        assert metric(proxy.url, "sop_events_dropped_total", kind="rejection"), answered
        # It reads at last: the events it still had, then how many it lost.
        found = None
        while found is None:
            chunk = sock.recv(65536)
            assert chunk, "the stream ended before a dropped event"
            received += chunk
            found = re.search(rb"event: dropped\r\ndata: (\{[^\r\n]*\})\r\n", received)
        dropped = json.loads(found.group(1))
        assert dropped["dropped"] > 0 and dropped["dropped_total"] >= dropped["dropped"]
        assert received.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"wrong" not in received
    finally:
        sock.close()


def _one_rejection(proxy: Server) -> bool:
    """Cause one rejection; true once the proxy counted a published event (someone subscribes)."""
    httpx.get(f"{proxy.url}/api/tags", headers={"Authorization": "Bearer wrong"}, timeout=5)
    return bool(metric(proxy.url, "sop_events_published_total"))


async def test_subscribers_are_capped(tmp: Path, emulator: Server) -> None:
    proxy = start_proxy(tmp, [emulator.url], KEYS, name="events-cap")
    try:
        url = f"{proxy.url}/system/events"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            no_timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
            streams = [await session.get(url, headers=ADMIN, timeout=no_timeout)
                       for _ in range(MAX_SUBSCRIBERS)]
            try:
                assert {s.status for s in streams} == {200}
                async with session.get(url, headers=ADMIN) as refused:
                    assert refused.status == 503
                    assert (await refused.json())["code"] == "too_many_subscribers"
                    assert int(refused.headers["Retry-After"]) >= 1
                streams.pop().close()  # one reader leaves: its place comes back

                async def admitted() -> bool:
                    async with session.get(url, headers=ADMIN, timeout=no_timeout) as again:
                        return again.status == 200

                # The proxy sees the reader leave a moment later: poll until a new one is admitted.
                for _ in range(600):
                    if await admitted():
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError("no place came back after a reader left")
            finally:
                for stream in streams:
                    stream.close()
    finally:
        proxy.stop()


def test_sigterm_ends_a_curl_stream_cleanly(tmp: Path, emulator: Server) -> None:
    proxy = start_proxy(tmp, [emulator.url], {**KEYS, "server": {"shutdown_timeout_s": 60}},
                        name="events-stop")
    curl = subprocess.Popen(["curl", "-sN", "-H", f"Authorization: Bearer {ADMIN_KEY}",
                             f"{proxy.url}/system/events"], stdout=subprocess.PIPE)
    try:
        wait_for(lambda: _one_rejection(proxy), what="curl subscribed")
        proxy.process.send_signal(signal.SIGTERM)
        out, _ = curl.communicate(timeout=READ_TIMEOUT_S)
        # curl exits 0 only when the chunked body ended properly (18: transfer closed early).
        assert curl.returncode == 0
        text = out.decode()
        assert "event: rejection\r\n" in text
        # The stream ended because the proxy was stopping, not cut at the end of its grace period
        # (that path writes nothing more): its last event says so.
        assert text.rstrip().rsplit("\r\n\r\n", 1)[-1].startswith("event: shutdown\r\n")
        assert proxy.process.wait(READ_TIMEOUT_S) == 0
    finally:
        curl.kill()
        curl.wait()
        proxy.stop()


async def test_a_reload_that_revokes_the_key_ends_its_stream(tmp: Path, emulator: Server) -> None:
    """Two admin keys, a stream opened with each; a SIGHUP reload keeps only the second. The first
    stream gets one `shutdown` (`key_revoked`), nothing after it (not even the reload event), and
    ends; the second carries on: it sees the reload and the events after it."""
    other_key = "events-other-admin-key"
    proxy = start_proxy(tmp, [emulator.url], {"admin": {"keys": [ADMIN_KEY, other_key]},
                                              "tenants": KEYS["tenants"],
                                              "server": {"config_watch_s": 0}}, name="events-revoke")
    no_timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    url = f"{proxy.url}/system/events"
    try:
        async with aiohttp.ClientSession() as session, \
                session.get(url, headers=ADMIN, timeout=no_timeout) as revoked, \
                session.get(url, headers={"Authorization": f"Bearer {other_key}"},
                            timeout=no_timeout) as kept:
            assert (revoked.status, kept.status) == (200, 200)
            first, second = Stream(revoked), Stream(kept)
            assert proxy.config_path is not None
            config = yaml.safe_load(proxy.config_path.read_text())
            config["admin"]["keys"] = [other_key]
            fresh = proxy.config_path.with_suffix(".new")
            fresh.write_text(yaml.safe_dump(config))
            fresh.replace(proxy.config_path)
            proxy.process.send_signal(signal.SIGHUP)

            end = await first.until(lambda e: e["event"] == "shutdown")
            assert end["data"] == {"kind": "shutdown", "reason": "key_revoked"}
            assert not any(e["event"] == "reload" for e in first.seen)
            async with asyncio.timeout(READ_TIMEOUT_S):
                with pytest.raises(EOFError):
                    await first.next()

            reload = await second.until(lambda e: e["event"] == "reload")
            assert reload["data"]["outcome"] == "ok" and "admin.keys" in reload["data"]["changed"]
            wait_for(lambda: _one_rejection(proxy), what="a rejection after the reload")
            await second.until(lambda e: e["event"] == "rejection")
            assert not any(e["event"] == "shutdown" for e in second.seen)
            async with session.get(url, headers=ADMIN) as refused:
                assert refused.status == 401  # the revoked key opens no new stream either
    finally:
        proxy.stop()


def test_kinds_are_the_documented_ones() -> None:
    operations = (Path(__file__).resolve().parent.parent / "docs" / "OPERATIONS.md").read_text()
    section = operations.split("## Live events", 1)[1]
    for kind in KINDS:
        assert f"`{kind}`" in section, kind


def _bus() -> EventBus:
    return build_telemetry(TelemetryConfig()).events


async def test_the_bus_drops_the_oldest_events_of_a_full_buffer_and_counts_them() -> None:
    bus = _bus()
    bus.publish("health", replica="nobody listens")  # no subscriber: nothing is kept or counted
    assert not bus.published
    slow = bus.subscribe()
    picky = bus.subscribe(frozenset({"reload"}))
    for n in range(BUFFER_EVENTS + 10):
        bus.restart(f"r{n}", 0, "success", 0.1)
    assert not picky.buffer and picky.lost == 0  # it asked for reloads only
    lost, events = slow.take()
    assert lost == 10 and slow.lost_total == 10 and bus.dropped["restart"] == 10
    assert len(events) == BUFFER_EVENTS
    assert json.loads(events[0].data)["replica"] == "r10"  # the newest are kept
    assert [e.seq for e in events] == list(range(11, BUFFER_EVENTS + 11))
    assert bus.published["restart"] == BUFFER_EVENTS + 10
    with pytest.raises(ValueError, match="unknown event kind"):
        bus.publish("gossip")
    bus.unsubscribe(slow)
    bus.unsubscribe(picky)
    assert not bus.active


async def test_reload_events_and_escaped_fields() -> None:
    bus = _bus()
    bus.label = lambda model: "other" if model else ""
    subscription = bus.subscribe(frozenset({"reload", "rejection", "health"}))
    bus.reload(7, True, (f"chain.k{i}" for i in range(150)))
    bus.reload("v8", False, error="chain.quotas.mode: bad\nvalue\x1b[31m")
    bus.rejection(UpstreamBusy("busy"), "m\n", "t", "/api/chat")
    bus.rejection(Overload("full"), None, "t", None)
    bus.rejection(NoHealthyUpstream("none", retry_after_s=2.26), "m", "t", "/api/chat", identified=False)
    bus.health("a\r\nforged: 1", "healthy", "ejected", "probe failed")
    _, events = subscription.take()
    data = [json.loads(e.data) for e in events]
    assert data[0]["version"] == 7 and data[0]["outcome"] == "ok" and len(data[0]["changed"]) == 100
    assert data[1]["outcome"] == "refused" and data[1]["changed"] == []
    assert "\x1b" not in data[1]["error"] and "\\x1b" in data[1]["error"]
    assert [d["step"] for d in data[2:5]] == ["forwarder", "backpressure", "ingress"]
    assert data[2]["model"] == "other" and data[3]["model"] is None
    assert data[4]["retry_after_s"] == 2.3
    assert data[5]["replica"] == "a\\x0d\\x0aforged: 1"
    for event in events:
        assert "\n" not in event.data and "\r" not in event.data
    while bus.subscribers < MAX_SUBSCRIBERS:
        bus.subscribe()
    with pytest.raises(TooManySubscribers):
        bus.subscribe()
