"""The forwarder against real peers: streaming without buffering, header policy, client disconnects that
reach the upstream, phase timeouts and upstream failures before and after the first byte."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.support.servers import Server, free_port, start_emulator, start_proxy
from tests.support.threaded import ThreadedApp


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("forwarding")


@pytest.fixture(scope="module")
def slow(tmp: Path) -> Iterator[tuple[Server, Server]]:
    """An emulator decoding 20 tokens/s and loading models in 1.5 s, behind a proxy."""
    emulator = start_emulator(tmp, decode_tokens_per_s=20, load_s=1.5, fixed_clock=False, name="slow")
    proxy = start_proxy(tmp, [emulator.url], name="slow-proxy")
    yield emulator, proxy
    proxy.stop()
    emulator.stop()


def _wait_for(predicate: object, timeout_s: float = 5.0) -> float:
    """Poll until predicate() is true; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():  # type: ignore[operator]
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError("condition not reached in time")


async def test_stream_lines_arrive_before_generation_ends(slow: tuple[Server, Server]) -> None:
    _, proxy = slow
    body = {"model": "llama3.2", "prompt": "count", "options": {"num_predict": 30}, "keep_alive": -1}
    async with aiohttp.ClientSession() as session:
        # load the model first so the timing below is pure decoding
        async with session.post(f"{proxy.url}/api/generate", json={"model": "llama3.2"}) as r:
            assert (await r.json())["done_reason"] == "load"
        start = time.monotonic()
        arrivals: list[float] = []
        async with session.post(f"{proxy.url}/api/generate", json=body) as response:
            assert response.headers["Content-Type"] == "application/x-ndjson"
            async for line in response.content:
                arrivals.append(time.monotonic() - start)
                assert line.endswith(b"\n") and line.strip()  # nothing injected, no blank lines
        assert len(arrivals) == 31
        # 30 tokens at 20/s take 1.5 s: the first line must arrive long before the end
        assert arrivals[0] < arrivals[-1] / 3
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        assert max(gaps) < 0.5  # each line was flushed as it came, not batched


async def test_disconnect_mid_stream_cancels_upstream(slow: tuple[Server, Server]) -> None:
    emulator, proxy = slow
    before = emulator.stats()["cancelled"]
    body = {"model": "llama3.2", "prompt": "long", "options": {"num_predict": 500}, "keep_alive": -1}
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"{proxy.url}/api/generate", json=body)
        await response.content.readline()
        assert emulator.stats()["active"] == 1
        response.close()  # the client hangs up mid-stream
        gone = time.monotonic()
    took = await asyncio.to_thread(_wait_for, lambda: emulator.stats()["cancelled"] == before + 1)
    stats = emulator.stats()
    assert stats["active"] == 0 and stats["waiting"] == 0
    print(f"upstream saw the mid-stream disconnect after {(time.monotonic() - gone) * 1000:.0f} ms")
    assert took < 5.0  # generous for a loaded machine; not cancelling would never get there


async def test_disconnect_while_waiting_for_headers_cancels_upstream(
        slow: tuple[Server, Server]) -> None:
    emulator, proxy = slow
    before = emulator.stats()["cancelled"]
    body = {"model": "qwen3", "prompt": "x", "keep_alive": 0}  # qwen3 is not loaded: 1.5 s load
    async with aiohttp.ClientSession() as session:
        with pytest.raises(asyncio.TimeoutError):
            async with asyncio.timeout(0.4):
                await session.post(f"{proxy.url}/api/generate", json=body)
    took = await asyncio.to_thread(_wait_for, lambda: emulator.stats()["cancelled"] == before + 1)
    assert emulator.stats()["waiting"] == 0
    assert took < 5.0  # generous for a loaded machine; not cancelling would never get there


def _upstream_errors(proxy: Server) -> dict[tuple[str, str], float]:
    """`sop_upstream_errors_total` by (error type, replica), as a scrape of /metrics shows it."""
    found: dict[tuple[str, str], float] = {}
    for line in httpx.get(f"{proxy.url}/metrics").text.splitlines():
        if line.startswith("sop_upstream_errors_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            found[(labels["error_type"], labels["sop_upstream_name"])] = float(line.rsplit(" ", 1)[1])
    return found


def test_unreachable_upstream_is_502_with_code(tmp: Path) -> None:
    # Without health checks the forwarder meets the refused connection itself (with them, the replica is
    # out after its first failed probe and the answer is health's 503, tested in test_health.py).
    port = free_port()
    proxy = start_proxy(tmp, [f"http://127.0.0.1:{port}"], {"chain": {"health": {"mode": "off"}}},
                        name="unreachable")
    try:
        response = httpx.post(f"{proxy.url}/api/chat", json={"model": "llama3.2", "messages": []})
        assert response.status_code == 502
        assert response.headers["content-type"].startswith("application/json")
        assert response.json()["code"] == "upstream_connect_failure"
        assert "cannot connect" in response.json()["error"]
        v1 = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "m", "messages": []})
        assert v1.status_code == 502 and v1.json()["error"]["code"] == "upstream_connect_failure"
        # Counted where docs/OPERATIONS.md sends operators: by error type and replica (it counted only
        # failures after the first byte, without the replica).
        errors = _upstream_errors(proxy)
        assert errors.get(("upstream_connect_failure", f"127.0.0.1:{port}"), 0) >= 2, errors
    finally:
        proxy.stop()


def test_first_byte_timeout_is_504(tmp: Path) -> None:
    emulator = start_emulator(tmp, load_s=3, name="cold")
    proxy = start_proxy(tmp, [emulator.url], {"forwarding": {"first_byte_timeout_s": 0.5}},
                        name="impatient")
    try:
        response = httpx.post(f"{proxy.url}/api/generate", json={"model": "llama3.2", "prompt": "x"})
        assert response.status_code == 504
        assert response.json()["code"] == "upstream_response_timeout"
        _wait_for(lambda: emulator.stats()["cancelled"] == 1)
        name = emulator.url.removeprefix("http://")
        assert _upstream_errors(proxy) == {("upstream_response_timeout", name): 1.0}
    finally:
        proxy.stop()
        emulator.stop()


def test_idle_gap_timeout_ends_stream_with_error_line(tmp: Path) -> None:
    emulator = start_emulator(tmp, decode_tokens_per_s=2, name="dribble")
    proxy = start_proxy(tmp, [emulator.url], {"forwarding": {"idle_timeout_s": 0.2}}, name="idle")
    try:
        with httpx.stream("POST", f"{proxy.url}/api/generate", timeout=10,
                          json={"model": "llama3.2", "prompt": "x"}) as response:
            assert response.status_code == 200
            lines = [json.loads(line) for line in response.iter_lines()]
        assert lines[-1]["code"] == "upstream_response_timeout" and "error" in lines[-1]
        assert not any(line.get("done") for line in lines)
        name = emulator.url.removeprefix("http://")
        assert _upstream_errors(proxy) == {("upstream_response_timeout", name): 1.0}
    finally:
        proxy.stop()
        emulator.stop()


def _dechunk(raw: bytes) -> bytes:
    """The body of a chunked HTTP/1.1 response read whole from a socket."""
    parts, at = [], raw.index(b"\r\n\r\n") + 4
    while True:
        end = raw.index(b"\r\n", at)
        size = int(raw[at:end], 16)
        if size == 0:
            return b"".join(parts)
        parts.append(raw[end + 2:end + 2 + size])
        at = end + 2 + size + 2


_FIREHOSE_BODY = json.dumps({"model": "llama3.2", "prompt": "x", "options": {"num_predict": 40000}}).encode()
"""A 40,000-token generation: more than the socket buffers between the proxy and a client hold."""


def _firehose(tmp: Path, name: str) -> Server:
    """An emulator that answers `_FIREHOSE_BODY` with 40,000 tokens as fast as it can."""
    return start_emulator(tmp, decode_tokens_per_s=20000, name=name, output_tokens="40000,40000",
                          extra=["--context-length", "131072"])


def _post_without_reading(client: socket.socket, port: int, deadline_s: int | None = None) -> None:
    """Send `_FIREHOSE_BODY` to the proxy on `client`, whose receive buffer is made small (2 KiB), and
    read nothing: the proxy's writes to it soon wait on the client."""
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    client.connect(("127.0.0.1", port))
    deadline = b"X-Deadline-S: %d\r\n" % deadline_s if deadline_s is not None else b""
    client.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\n" + deadline
                   + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(_FIREHOSE_BODY)
                   + _FIREHOSE_BODY)


def _read_chunked_to_end(client: socket.socket) -> bytes:
    """Everything `client` receives until its chunked response ends (or the connection does)."""
    client.settimeout(20)
    received = bytearray()
    while not received.endswith(b"\r\n0\r\n\r\n"):
        chunk = client.recv(1 << 20)
        if not chunk:
            break
        received += chunk
    return bytes(received)


def test_a_client_slow_to_read_is_not_an_idle_replica(tmp: Path) -> None:
    # The idle limit is the replica's silence. A client that stops reading a large stream for a while
    # (its receive buffer small and full) holds the proxy's write; the replica is not silent, and the
    # stream must come out whole once the client reads again. (It was cut with "upstream sent nothing
    # for 0.5s" and counted as the replica's gateway failure.) The idle limit is 1.5 s, not less: a
    # loaded machine may starve the emulator between two chunks for a fraction of a second.
    emulator = _firehose(tmp, "firehose")
    proxy = start_proxy(tmp, [emulator.url], {"forwarding": {"idle_timeout_s": 1.5}},
                        name="slow-reader")
    try:
        with socket.socket() as client:
            _post_without_reading(client, proxy.port)
            time.sleep(6.0)  # four idle limits without reading a byte
            raw = _read_chunked_to_end(client)
        lines = [json.loads(line) for line in _dechunk(raw).splitlines()]
        assert not any("error" in line for line in lines), lines[-1]
        assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 40000
        assert len(raw) > 3_000_000  # more than the socket buffers hold: the proxy waited on the client
        errors = [line for line in httpx.get(f"{proxy.url}/metrics").text.splitlines()
                  if line.startswith("sop_upstream_errors_total")]
        assert errors == [], errors
    finally:
        proxy.stop()
        emulator.stop()


def test_a_client_slow_to_read_cut_at_its_deadline_is_a_timeout_not_a_disconnect(tmp: Path) -> None:
    # A client that reads nothing of a large stream (its receive buffer small and full) holds the proxy's
    # write when its deadline passes: the stream ends there with the deadline's final record, and the
    # request is recorded as the deadline's timeout. (The deadline's timer cancelled aiohttp's wait for
    # the client's buffers, that cancelled wait made the final write raise CancelledError at once, and
    # the request was logged as "499 client_disconnect", though the client never left.)
    emulator = _firehose(tmp, "firehose-deadline")
    proxy = start_proxy(tmp, [{"url": emulator.url, "name": "replica-a"}], name="slow-reader-deadline")
    try:
        with socket.socket() as client:
            _post_without_reading(client, proxy.port, deadline_s=3)
            # The request ends at its deadline while the client still reads nothing.
            _wait_for(lambda: '"POST /api/generate"' in proxy.log(), 20)
            raw = _read_chunked_to_end(client)
        lines = [json.loads(line) for line in _dechunk(raw).splitlines()]
        assert lines[-1]["code"] == "upstream_response_timeout", lines[-1]
        assert "deadline of 3.0s passed" in lines[-1]["error"]
        assert not any(line.get("done") for line in lines)
        access = [line for line in proxy.log().splitlines() if '"POST /api/generate"' in line]
        assert len(access) == 1 and " 200 upstream_response_timeout " in access[0], access
        took = re.search(r" ([0-9.]+)s tenant=", access[0])
        # The deadline's 3 s, +1 s at most for the last write; generous for a loaded machine.
        assert took is not None and float(took[1]) < 10, access
        durations = {s.labels.get("error_type") for f in
                     text_string_to_metric_families(httpx.get(f"{proxy.url}/metrics").text)
                     if f.name == "http_server_request_duration_seconds" for s in f.samples
                     if s.name.endswith("_count") and s.labels.get("http_route") == "/api/generate"}
        assert durations == {"upstream_response_timeout"}, durations
        _wait_for(lambda: emulator.stats()["active"] == 0)  # the generation was cancelled upstream
    finally:
        proxy.stop()
        emulator.stop()


def test_a_client_that_never_reads_does_not_keep_its_connection_after_the_cut(tmp: Path) -> None:
    # A client that reads nothing, its stream cut at its deadline: the connection is closed behind the
    # final record, and asyncio's close waits for the client to take what is queued. The close is
    # bounded: once the grace passes the connection is dropped, giving back its slot under
    # server.max_connections (before: held, with its file descriptor, for as long as the client
    # stayed connected without reading; with max_connections 1 every later client got 503).
    emulator = _firehose(tmp, "firehose-never-reads")
    proxy = start_proxy(tmp, [{"url": emulator.url, "name": "replica-a"}],
                        {"server": {"max_connections": 1}}, name="never-reads")

    def version_answered() -> bool:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(b"GET /api/version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return sock.recv(65536).startswith(b"HTTP/1.1 200")

    try:
        with socket.socket() as client:
            _post_without_reading(client, proxy.port, deadline_s=2)
            _wait_for(lambda: '"POST /api/generate"' in proxy.log(), 20)
            assert not version_answered()  # the cap's one connection is still this client's
            _wait_for(version_answered, 20)  # the grace, 5 s, then the slot is free again
    finally:
        proxy.stop()
        emulator.stop()


def test_a_stream_cut_at_the_requests_own_deadline_is_not_the_replicas_failure(tmp: Path) -> None:
    """A stream the request's own deadline cuts (X-Deadline-S here, or the tenant's deadline_s) ends with
    the deadline's error record and is recorded as a timeout in the access log and the request metric,
    but it is not a failure of the replica: no WARNING naming it, nothing in `sop_upstream_errors_total`
    (as before the first byte). The replica's own idle silence still is its failure. (The deadline was
    logged as "upstream ... failed mid-response" and counted against the replica: any client could
    inflate both with tiny deadlines.)"""
    emulator = start_emulator(tmp, decode_tokens_per_s=20, output_tokens="200,200", fixed_clock=False,
                              name="long-talker")
    proxy = start_proxy(tmp, [{"url": emulator.url, "name": "replica-a"}],
                        {"forwarding": {"idle_timeout_s": 2}}, name="own-deadline")
    body = {"model": "llama3.2", "prompt": "x"}
    try:
        for path, request, sse in (("/api/generate", body, False),
                                   ("/v1/chat/completions", {"model": "llama3.2", "stream": True,
                                                             "messages": [{"role": "user", "content": "x"}]},
                                    True)):
            with httpx.stream("POST", proxy.url + path, json=request, headers={"X-Deadline-S": "1"},
                              timeout=20) as response:
                assert response.status_code == 200
                lines = [line for line in response.iter_lines() if line]
            last = json.loads(lines[-1].removeprefix("data: "))
            error = last["error"] if sse else last
            assert error["code"] == "upstream_response_timeout", lines[-1]
            assert "deadline of 1.0s passed" in (error["message"] if sse else error["error"]), lines[-1]
            assert len(lines) > 3  # the tokens sent before the deadline stay
        _wait_for(lambda: proxy.log().count('" 200 upstream_response_timeout ') == 2)
        assert _upstream_errors(proxy) == {}
        assert "failed mid-response" not in proxy.log()
        durations = {(s.labels["http_route"], s.labels.get("error_type")) for f in
                     text_string_to_metric_families(httpx.get(f"{proxy.url}/metrics").text)
                     if f.name == "http_server_request_duration_seconds" for s in f.samples
                     if s.name.endswith("_count") and s.labels.get("http_route") != "/metrics"}
        assert durations == {("/api/generate", "upstream_response_timeout"),
                             ("/v1/chat/completions", "upstream_response_timeout")}, durations
        # The replica's own silence mid-stream (its idle timeout) remains its failure.
        assert httpx.post(f"{emulator.url}/_emulator/faults", json={"hang_after_chunks": 3, "count": 1},
                          timeout=5).status_code == 200
        with httpx.stream("POST", f"{proxy.url}/api/generate", json=body, timeout=20) as response:
            lines = [line for line in response.iter_lines() if line]
        assert "sent nothing for 2s" in json.loads(lines[-1])["error"], lines[-1]
        assert _upstream_errors(proxy) == {("upstream_response_timeout", "replica-a"): 1.0}
        assert "upstream replica-a failed mid-response: upstream_response_timeout" in proxy.log()
    finally:
        proxy.stop()
        emulator.stop()


@pytest.mark.parametrize("path,body,sse", [
    ("/api/chat", {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}],
                   "options": {"num_predict": 400}}, False),
    ("/v1/chat/completions", {"model": "llama3.2", "stream": True, "max_tokens": 400,
                              "messages": [{"role": "user", "content": "x"}]}, True),
])
def test_upstream_dying_mid_stream_ends_with_one_error_record(
        tmp: Path, path: str, body: dict[str, object], sse: bool) -> None:
    emulator = start_emulator(tmp, decode_tokens_per_s=50, name="doomed")
    proxy = start_proxy(tmp, [emulator.url], name="survivor")
    try:
        with httpx.stream("POST", proxy.url + path, json=body, timeout=10) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            first = next(lines)
            assert first
            emulator.kill()
            rest = [line for line in lines if line]
        last = rest[-1]
        if sse:
            assert last.startswith("data: ")
            error = json.loads(last[len("data: "):])["error"]
            assert error["code"] == "upstream_reset_after_response_started"
            assert "[DONE]" not in "".join(rest)
        else:
            error = json.loads(last)
            assert error["code"] == "upstream_reset_after_response_started" and error["error"]
    finally:
        proxy.stop()
        emulator.stop()


@pytest.fixture(scope="module")
def echo(tmp: Path) -> Iterator[tuple[ThreadedApp, Server]]:
    """An upstream that answers with the request it received, behind a proxy."""

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {"method": request.method, "path": request.raw_path,
             "headers": [[k, v] for k, v in request.headers.items()], "body": body.decode()},
            headers={"Keep-Alive": "timeout=5", "X-Upstream": "kept", "Connection": "keep-alive"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    with ThreadedApp(app) as upstream:
        proxy = start_proxy(tmp, [upstream.url], name="echo-proxy")
        yield upstream, proxy
        proxy.stop()


def _received(response: httpx.Response) -> dict[str, str]:
    return {k.lower(): v for k, v in response.json()["headers"]}


def test_request_header_policy(echo: tuple[ThreadedApp, Server]) -> None:
    upstream, proxy = echo
    response = httpx.post(
        f"{proxy.url}/api/chat?keep=1", content=b'{"model":"m"}',
        headers={"Host": "gateway.example:8080", "X-Custom": "yes", "Connection": "X-Drop",
                 "X-Drop": "hop", "TE": "trailers", "Authorization": "Bearer k",
                 "User-Agent": "ollama-python/0.6.3", "Content-Type": "application/json"})
    seen = _received(response)
    assert response.json()["path"] == "/api/chat?keep=1"
    assert response.json()["body"] == '{"model":"m"}'
    assert seen["host"] == f"127.0.0.1:{upstream.port}"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "gateway.example:8080"
    assert seen["x-custom"] == "yes" and seen["authorization"] == "Bearer k"
    assert seen["user-agent"] == "ollama-python/0.6.3"
    assert "x-drop" not in seen and "te" not in seen
    version, trace_id, span_id, flags = seen["traceparent"].split("-")
    assert version == "00" and len(trace_id) == 32 and len(span_id) == 16
    # Valid W3C ids (lower-case hex, not all zeros); this proxy exports no spans, so it samples nothing
    # (telemetry/setup.py: ALWAYS_OFF): the sampled bit of the flags is clear (other bits, such as
    # level 2's random-trace-id flag, may be set).
    assert all(set(part) <= set("0123456789abcdef") for part in (trace_id, span_id, flags))
    assert int(trace_id, 16) != 0 and int(span_id, 16) != 0
    assert len(flags) == 2 and int(flags, 16) & 0x01 == 0
    assert response.headers["x-upstream"] == "kept"
    assert "keep-alive" not in response.headers


def test_no_headers_are_invented(echo: tuple[ThreadedApp, Server]) -> None:
    """aiohttp's automatic User-Agent/Accept/Content-Type must not reach the upstream."""
    _, proxy = echo
    import socket

    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(b"POST /api/x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nConnection: close"
                     b"\r\n\r\n{}")
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    seen = {k.lower(): v for k, v in json.loads(raw.split(b"\r\n\r\n", 1)[1])["headers"]}
    assert "user-agent" not in seen and "accept" not in seen and "content-type" not in seen
    assert "accept-encoding" not in seen


def test_incoming_trace_is_continued(echo: tuple[ThreadedApp, Server]) -> None:
    _, proxy = echo
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    seen = _received(httpx.get(f"{proxy.url}/api/tags", headers={"traceparent": incoming}))
    assert seen["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
    assert seen["traceparent"].split("-")[2] != "b7ad6b7169203331"


def test_a_malformed_trace_header_is_ignored_without_a_log_line(echo: tuple[ThreadedApp, Server]) -> None:
    """A traceparent over 512 characters cannot be valid; OpenTelemetry ignores it but logs a WARNING
    each time, so any client could write a log line per request. The proxy ignores it itself: a
    fresh trace, and nothing logged."""
    _, proxy = echo
    for _ in range(3):
        seen = _received(httpx.get(f"{proxy.url}/api/tags",
                                   headers={"traceparent": "00-" + "a" * 600 + "-b7ad6b7169203331-01"}))
        version, trace_id, _span_id, _flags = seen["traceparent"].split("-")
        assert version == "00" and len(trace_id) == 32 and trace_id != "a" * 32
    # A malformed or oversized tracestate beside a valid traceparent: OpenTelemetry logged the
    # client's text in a WARNING each time.
    valid = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    for state in ("SECRET-STATE key=v", "x" * 600):
        seen = _received(httpx.get(f"{proxy.url}/api/tags",
                                   headers={"traceparent": valid, "tracestate": state}))
        assert seen["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
    log = proxy.log()
    assert "traceparent" not in log and "tracestate" not in log and "SECRET-STATE" not in log
    assert "w3c" not in log


def test_dropped_headers_are_dropped_in_any_spelling(echo: tuple[ThreadedApp, Server]) -> None:
    """A header keeps the spelling its sender chose: hop-by-hop and proxy-owned names are dropped
    whatever their case, and a client's X-Forwarded-For continues in the proxy's, never twice."""
    _, proxy = echo
    import socket

    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(b"POST /api/x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nconnection: close\r\n"
                     b"proxy-connection: keep-alive\r\nkeep-alive: 5\r\n"
                     b"x-forwarded-for: 10.0.0.1\r\nX-FORWARDED-PROTO: https\r\nX-Forwarded-For: 10.0.0.2\r\n"
                     b"trailer: x\r\n\r\n{}")
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    pairs = json.loads(body)["headers"]
    names = [k.lower() for k, _ in pairs]
    for dropped in ("proxy-connection", "keep-alive", "trailer"):
        assert dropped not in names, dropped
    assert names.count("x-forwarded-for") == 1 and names.count("x-forwarded-proto") == 1
    seen = dict((k.lower(), v) for k, v in pairs)
    assert seen["x-forwarded-for"] == "10.0.0.1, 10.0.0.2, 127.0.0.1"  # every line, then the peer
    assert seen["x-forwarded-proto"] == "http"


def test_credentials_in_the_replica_url_are_sent(tmp: Path) -> None:
    """`http://user:pass@host` authenticates every relayed request (as the probes), in place of
    whatever Authorization the client sent."""
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"authorization": request.headers.get("Authorization"),
                                  "version": "0.12.0"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    with ThreadedApp(app) as upstream:
        url = f"http://ops:s3cret@127.0.0.1:{upstream.port}"
        proxy = start_proxy(tmp, [url], name="userinfo")
        try:
            seen = httpx.post(f"{proxy.url}/api/show", json={"model": "m"},
                              headers={"Authorization": "Bearer client"}).json()
            assert seen["authorization"] == "Basic b3BzOnMzY3JldA=="  # base64("ops:s3cret")
        finally:
            proxy.stop()


Generate = Callable[[asyncio.StreamWriter], Awaitable[bool]]


async def _raw_replica(generate: Generate) -> asyncio.Server:
    """A replica written byte by byte, for what the emulator never does: it answers the health probes
    with empty JSON and hands each /api/generate to `generate`, which writes the answer and says
    whether the connection goes on."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                if head.split(b" ")[1] == b"/api/generate":
                    if not await generate(writer):
                        return
                    continue
                payload = b'{"models":[],"version":"0.12.0"}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%b" % (len(payload), payload))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def _through_raw_replica(tmp: Path, generate: Generate, name: str,
                               body: dict[str, Any]) -> tuple[int, str, bytes, str]:
    """POST `body` to /api/generate through a proxy in front of `_raw_replica(generate)`: the
    response's status, reason and bytes, and the proxy's log."""
    server = await _raw_replica(generate)
    port = server.sockets[0].getsockname()[1]
    proxy = await asyncio.to_thread(start_proxy, tmp, [f"http://127.0.0.1:{port}"], name=name)
    try:
        async with aiohttp.ClientSession() as session, session.post(
                f"{proxy.url}/api/generate", json=body) as response:
            return response.status, response.reason or "", await response.read(), proxy.log()
    finally:
        await asyncio.to_thread(proxy.stop)
        server.close()


async def test_a_reason_phrase_with_control_characters_is_replaced_not_a_500(tmp: Path) -> None:
    """HTTP allows more in a reason phrase than aiohttp sends: a replica's `200 O\\x01K` is relayed
    as 200 with the standard phrase and the body, not turned into a 500 after the replica's work."""
    body = b'{"model":"m","response":"hi","done":true}'

    async def generate(writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 O\x01K\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        await writer.drain()
        return True

    status, reason, got, log = await _through_raw_replica(
        tmp, generate, "reason", {"model": "m", "prompt": "x", "stream": False})
    assert status == 200 and reason == "OK"
    assert got == body
    assert "Traceback" not in log


@pytest.mark.parametrize("framing", ["ndjson", "sse"])
async def test_a_stream_cut_mid_record_ends_with_whole_records(tmp: Path, framing: str) -> None:
    """The replica sends a record, half of the next, and dies: the client gets the whole record and
    then the error record, each parseable (the half record never goes out; the error is not glued
    onto it, which made the ollama and openai clients raise a JSON error instead of theirs)."""
    if framing == "ndjson":
        content_type, first, half = (b"application/x-ndjson", b'{"response":"Hi","done":false}\n',
                                     b'{"response":"the')
    else:
        content_type, first, half = (b"text/event-stream", b'data: {"choices":[{"delta":{}}]}\n\n',
                                     b'data: {"choices":[{"del')

    async def generate(writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: %b\r\nTransfer-Encoding: chunked\r\n"
                     b"\r\n" % content_type)
        for piece in (first, half):
            writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.transport.abort()  # dies mid-record
        return False

    _, _, body, _ = await _through_raw_replica(tmp, generate, "cut", {"model": "m", "prompt": "x"})
    separator = b"\n" if framing == "ndjson" else b"\n\n"
    records = [r for r in body.split(separator) if r]
    assert records[0] + separator == first and len(records) == 2, body
    error = json.loads(records[1].removeprefix(b"data: "))
    assert "error" in error and b"the" not in records[1], body


async def test_a_record_longer_than_the_hold_goes_through_whole_and_in_order(tmp: Path) -> None:
    """A 1.5 MiB NDJSON line, sent in 64 KiB pieces, then a short record: past the 1 MiB the relay
    holds back, the long record goes out as it comes, and every byte arrives in order."""
    long_record = b'{"response":"' + b"x" * (3 << 19) + b'"}\n'
    last = b'{"done":true}\n'

    async def generate(writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        body = long_record + last
        for at in range(0, len(body), 1 << 16):
            piece = body[at:at + (1 << 16)]
            writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    status, _, body, _ = await _through_raw_replica(tmp, generate, "long",
                                                    {"model": "m", "prompt": "x"})
    assert status == 200
    assert body == long_record + last


@pytest.mark.parametrize("framing", ["ndjson", "sse"])
async def test_a_stream_that_ends_without_its_final_record_ends_with_an_error(
        tmp: Path, framing: str) -> None:
    """The replica ends the stream cleanly after an ordinary record (no `done`, no `[DONE]`): the
    text so far is not the whole answer, and the Python clients would raise nothing. The client gets
    the records and then one error record."""
    if framing == "ndjson":
        content_type, first = b"application/x-ndjson", b'{"response":"Hello wor","done":false}\n'
    else:
        content_type, first = b"text/event-stream", b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'

    async def generate(writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: %b\r\nTransfer-Encoding: chunked\r\n"
                     b"\r\n%x\r\n%b\r\n0\r\n\r\n" % (content_type, len(first), first))
        await writer.drain()
        return True

    status, _, body, _ = await _through_raw_replica(tmp, generate, "nodone", {"model": "m", "prompt": "x"})
    separator = b"\n" if framing == "ndjson" else b"\n\n"
    records = [r for r in body.split(separator) if r]
    assert status == 200 and records[0] + separator == first and len(records) == 2, body
    error = json.loads(records[1].removeprefix(b"data: "))
    assert "without its final record" in json.dumps(error), body


async def test_a_stream_cut_inside_a_record_past_the_hold_is_a_broken_connection(tmp: Path) -> None:
    """Part of a record longer than the hold already went out when the replica died: an error record
    glued onto it would be one unparseable line, so the client's connection is broken instead (its
    client raises a connection error, not a JSON one)."""
    async def generate(writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        piece = b'{"response":"' + b"x" * (1 << 16)
        for _ in range(24):  # 1.5 MiB of one record, past the 1 MiB hold
            writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            await writer.drain()
            piece = b"x" * (1 << 16)
        writer.transport.abort()
        return False

    with pytest.raises(aiohttp.ClientPayloadError):
        await _through_raw_replica(tmp, generate, "cutlong", {"model": "m", "prompt": "x"})


def test_a_compressed_request_body_reaches_the_replica_decoded(echo: tuple[ThreadedApp, Server]) -> None:
    """aiohttp decodes a gzip (deflate, br, zstd) request body before the proxy reads it: the replica
    gets the decoded body without the Content-Encoding that no longer describes it. A body that does
    not decode is the client's 400, not a 500 with a traceback."""
    _, proxy = echo
    body = b'{"model":"m","prompt":"compressed"}'
    response = httpx.post(f"{proxy.url}/api/generate", content=gzip.compress(body),
                          headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
                          timeout=10)
    assert response.status_code == 200, response.text
    assert "content-encoding" not in _received(response)
    assert response.json()["body"] == body.decode()
    broken = httpx.post(f"{proxy.url}/api/generate", content=b"not gzip at all",
                        headers={"Content-Encoding": "gzip"}, timeout=10)
    assert broken.status_code == 400
    assert broken.json() == {"error": "the request body could not be decoded as its Content-Encoding says",
                             "code": "invalid_request"}
    assert "Traceback" not in proxy.log()


@pytest.mark.parametrize("ending", [b"data: [DONE]\r\n\r\n: ping\r\n\r\n", b"data: [DONE]\n\n:\n\n"])
async def test_a_comment_after_the_final_event_is_not_a_cut(tmp: Path, ending: bytes) -> None:
    """An SSE comment (a keep-alive some gateways add) after `[DONE]`, with either line ending: the
    stream ended whole, and nothing is added to it."""
    first = b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'
    body = first + ending

    async def generate(writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked"
                     b"\r\n\r\n%x\r\n%b\r\n0\r\n\r\n" % (len(body), body))
        await writer.drain()
        return True

    status, _, got, _ = await _through_raw_replica(tmp, generate, "comment", {"model": "m", "prompt": "x"})
    assert status == 200 and got == body
