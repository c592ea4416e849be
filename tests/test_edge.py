"""The HTTP edge against attacks an HTTP client would normalise, over raw sockets to a real proxy (its CLI)
in front of the emulator: the whole-head cap (431 before authentication), the body idle timeout (408),
`Expect: 100-continue`, request-target forms, the connection cap, malformed heads kept out of the log,
access-log escaping and response-header sanitising."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import yaml

from tests.support.polling import wait_for
from tests.support.raw import RawResponse, connect, read_response, request
from tests.support.servers import Server, start_emulator, start_proxy

KEY = "edge-key-7f3a9c21d4"
ADMIN = "edge-admin-51be0d"
HEAD_CAP = 8192
BODY_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_emulator(tmp_path_factory.mktemp("edge-emu"), name="edge-emu")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(emulator: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_proxy(tmp_path_factory.mktemp("edge"), [emulator.url], {
        "server": {"max_header_bytes": HEAD_CAP, "body_timeout_s": BODY_TIMEOUT_S,
                   "max_body_bytes": 65536, "header_timeout_s": 10},
        "tenants": [{"name": "edge", "keys": [KEY], "allow_management": True}],
        "admin": {"keys": [ADMIN]},
        "anonymous": {"allow": False},
        "models": {"llama3.2": {"options": {"num_ctx": 2048, "keep_alive": "10m"}}},
    }, name="edge")
    yield server
    server.stop()


def _auth(key: str = KEY) -> bytes:
    return f"Authorization: Bearer {key}\r\n".encode()


def _wait_for_log(server: Server, pattern: str, timeout_s: float = 10.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = server.log()
        if re.search(pattern, text):
            return text
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} never appeared in the proxy log:\n{server.log()[-3000:]}")


def _has_edge_headers(server: Server, response: RawResponse) -> None:
    """Versioned limits and a request id on a refusal made before any request existed; the id names the
    refusal's log line."""
    assert response.headers["x-service-limits"].startswith("v=1; max_body_bytes="), response.headers
    request_id = response.headers["x-request-id"]
    wait_for(lambda: request_id in server.log(), what=f"the log line of {request_id}")


# head cap -------------------------------------------------------------------------------------------------
def test_a_head_over_the_cap_is_431_before_authentication(proxy: Server) -> None:
    """Many headers, each well under the per-line limit, together over `max_header_bytes`; no key at
    all: the answer is 431 (not 401), JSON, and the connection is closed."""
    headers = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"v" * 200) for i in range(60))
    response = request(proxy.port, b"GET /api/tags HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert response.status == 431
    assert response.json()["code"] == "request_header_fields_too_large"
    assert response.headers["x-should-retry"] == "false"
    assert response.closed
    text = _wait_for_log(proxy, r'"GET /api/tags" 431 request_header_fields_too_large')
    assert response.headers["x-service-limits"].startswith("v=1; max_body_bytes=")
    assert response.headers["x-request-id"] in text
    record = next(line for line in reversed(text.splitlines()) if " 431 " in line)
    assert "upstream=-" in record  # nothing of it went upstream


def test_a_head_that_never_ends_is_refused_while_it_grows(proxy: Server) -> None:
    """A head sent in pieces that never completes: refused as soon as it passes the cap, not read on.
    The client stops right after the piece that crosses the cap, so the refusal is read, not reset."""
    with connect(proxy.port) as sock:
        sock.sendall(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n")
        sent = 0
        line = 0
        while sent <= HEAD_CAP:
            piece = b"X-Grow-%d: %s\r\n" % (line, b"g" * 500)
            sock.sendall(piece)
            sent += len(piece)
            line += 1
            time.sleep(0.01)  # separate reads on the proxy's side
        response = read_response(sock)
    assert response.status == 431
    assert response.json()["code"] == "request_header_fields_too_large"
    _has_edge_headers(proxy, response)
    assert response.closed


def test_one_oversized_header_line_is_431(proxy: Server) -> None:
    response = request(proxy.port, b"GET /api/tags HTTP/1.1\r\nHost: x\r\n" + _auth()
                       + b"X-Huge: " + b"h" * (HEAD_CAP + 100) + b"\r\n\r\n")
    assert response.status == 431
    assert response.json()["code"] == "request_header_fields_too_large"
    _has_edge_headers(proxy, response)
    assert response.closed


def test_body_bytes_do_not_count_as_head_bytes(proxy: Server) -> None:
    """A keep-alive connection carrying bodies far larger than the head cap, in pieces, and then more
    requests: all served."""
    # Large in bytes, small in tokens (an unknown field Ollama ignores): the prompt stays under the
    # model's context, which the limits step now also enforces.
    body = b'{"model":"llama3.2","prompt":"hello","padding":"' + b"p" * 15000 + b'","stream":false,' \
        b'"options":{"num_predict":2}}'
    assert len(body) > 1.5 * HEAD_CAP
    with connect(proxy.port, 30) as sock:
        for _ in range(2):
            sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\n" + _auth()
                         + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
            for start in range(0, len(body), 4096):
                sock.sendall(body[start:start + 4096])
                time.sleep(0.005)
            response = read_response(sock, 30)
            assert response.status == 200, response.body[:300]
            assert not response.closed
        sock.sendall(b"GET /api/version HTTP/1.1\r\nHost: x\r\n" + _auth() + b"\r\n")
        assert read_response(sock).status == 200


# body idle timeout --------------------------------------------------------------------------------------
def test_a_stalled_body_gets_408_and_the_connection_closes(proxy: Server) -> None:
    with connect(proxy.port) as sock:
        sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\n" + _auth()
                     + b"Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"model\":")
        started = time.monotonic()
        response = read_response(sock, 15)
        took = time.monotonic() - started
    assert response.status == 408
    assert response.json()["code"] == "request_timeout"
    assert response.closed
    assert BODY_TIMEOUT_S * 0.9 <= took < BODY_TIMEOUT_S + 8


def test_a_stalled_chunked_body_gets_408(proxy: Server) -> None:
    with connect(proxy.port) as sock:
        sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\n" + _auth()
                     + b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"mod\r\n")
        response = read_response(sock, 15)
    assert response.status == 408
    assert response.closed


def test_a_stalled_blob_upload_gets_408(proxy: Server) -> None:
    """Blob uploads stream to the replica unread; a stall there is the client's, not the replica's."""
    digest = "sha256:" + "ab" * 32
    with connect(proxy.port) as sock:
        sock.sendall(f"POST /api/blobs/{digest} HTTP/1.1\r\nHost: x\r\n".encode() + _auth()
                     + b"Content-Length: 100000\r\n\r\n" + b"z" * 1000)
        response = read_response(sock, 20)
    assert response.status == 408, response.body
    assert response.json()["code"] == "request_timeout"
    assert response.closed


def test_a_slow_but_moving_body_is_served(proxy: Server) -> None:
    """The timeout is for silence, not for the whole body: a body trickling in faster than the
    timeout is read to the end."""
    body = b'{"model":"llama3.2","prompt":"hi","stream":false,"options":{"num_predict":2}}'
    with connect(proxy.port, 30) as sock:
        sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\n" + _auth()
                     + b"Content-Length: %d\r\n\r\n" % len(body))
        for start in range(0, len(body), 20):
            sock.sendall(body[start:start + 20])
            time.sleep(BODY_TIMEOUT_S / 3)
        response = read_response(sock, 30)
    assert response.status == 200, response.body


# Expect: 100-continue -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("extra", "length", "status"), [
    (b"", 50, 401),                                         # a key is required
    (b"Authorization: Bearer not-a-key\r\n", 50, 401),      # unknown key
    (f"Authorization: Bearer {KEY}\r\n".encode(), 10**7, 413),  # declared size over the limit
], ids=["no-key", "unknown-key", "too-large"])
def test_expect_continue_gets_the_final_status_when_refused(proxy: Server, extra: bytes, length: int,
                                                            status: int) -> None:
    with connect(proxy.port) as sock:
        sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n" + extra
                     + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length)
        response = read_response(sock, 5)
    assert response.status == status, response.status_line
    assert b"100 Continue" not in response.raw_head + response.body
    assert response.closed


def test_expect_continue_on_a_forbidden_route_is_refused_without_100(proxy: Server) -> None:
    with connect(proxy.port) as sock:
        sock.sendall(b"POST /system/anything HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     + _auth() + b"Content-Length: 10\r\n\r\n")
        response = read_response(sock, 5)
    assert response.status in (401, 403)
    assert b"100 Continue" not in response.raw_head


@pytest.mark.parametrize("path", [b"/healthz", b"/system/queue"])
def test_expect_continue_on_an_own_route_s_other_method_is_refused_without_100(proxy: Server,
                                                                               path: bytes) -> None:
    """A method the proxy does not answer on its own route is its 405, so no `100 Continue` either: the
    client was invited to send a body the proxy never reads."""
    with connect(proxy.port) as sock:
        sock.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     + _auth(ADMIN) + b"Content-Length: 10\r\n\r\n")
        response = read_response(sock, 5)
    assert response.status == 405, response.status_line
    assert b"100 Continue" not in response.raw_head + response.body
    assert response.headers["allow"] == "GET, HEAD"
    assert response.closed


@pytest.mark.parametrize(("path", "openai"), [(b"/api/embed", False), (b"/v1/embeddings", True)])
def test_an_unknown_expectation_is_a_417_in_the_route_s_shape(proxy: Server, path: bytes,
                                                              openai: bool) -> None:
    """`Expect` other than 100-continue: 417 as Go answers it, refused before the key is checked and
    before the body is read, as the proxy's own JSON error in the route's dialect (it was aiohttp's
    text/plain, outside every client's error parsing)."""
    with connect(proxy.port) as sock:
        sock.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\n"
                     + b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        response = read_response(sock, 5)
    assert response.status == 417, response.status_line
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    if openai:
        assert error["code"] == "expectation_failed" and error["message"], error
    else:
        assert error == "only Expect: 100-continue is supported"
        assert response.json()["code"] == "expectation_failed"
    assert response.headers["x-should-retry"] == "false"
    _has_edge_headers(proxy, response)


def test_an_empty_expectation_is_none(proxy: Server) -> None:
    """An empty `Expect` asks for nothing: Go's net/http (so Ollama) serves the request, as the proxy
    did before it answered other expectations itself (aiohttp skips the expect handler for it)."""
    response = request(proxy.port, b"GET /api/tags HTTP/1.1\r\nHost: x\r\nExpect: \r\n" + _auth()
                       + b"Connection: close\r\n\r\n")
    assert response.status == 200, (response.status_line, response.body)
    assert "models" in response.json()


@pytest.mark.parametrize("target", [b"/api/generate", b"http://elsewhere.example/api/generate"])
def test_expect_continue_is_honoured_for_an_admissible_request(proxy: Server, target: bytes) -> None:
    body = b'{"model":"llama3.2","prompt":"hi","stream":false,"options":{"num_predict":2}}'
    with connect(proxy.port, 30) as sock:
        sock.sendall(b"POST " + target + b" HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n" + _auth()
                     + b"Content-Length: %d\r\n\r\n" % len(body))
        interim = read_response(sock, 5)
        assert interim.status == 100
        sock.sendall(body)
        response = read_response(sock, 30)
    assert response.status == 200, response.body
    assert response.json()["done"] is True


# request targets ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [b"GET", b"POST"])
def test_an_encoded_slash_is_no_own_route_whatever_the_method(proxy: Server, method: bytes) -> None:
    """`/system%2Fqueue` is routed as no own route (aiohttp matches with `%2F` kept): its GET is
    forwarded, and so is its POST, not a 405 whose Allow names a GET the proxy does not serve there."""
    response = request(proxy.port, method + b" /system%2Fqueue HTTP/1.1\r\nHost: x\r\n"
                       + _auth(ADMIN)
                       + b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    assert response.status == 404, response.status_line  # the replica's
    assert "allow" not in response.headers
    assert request(proxy.port, b"POST /heal%74hz HTTP/1.1\r\nHost: x\r\n"
                   + _auth(ADMIN)
                   + b"Content-Length: 0\r\nConnection: close\r\n\r\n").status == 405


@pytest.mark.parametrize(("path", "body", "last"), [
    (b"/api/generate", b'{"model":"llama3.2","prompt":"hi","options":{"num_predict":3}}', b'"done":true'),
    (b"/v1/chat/completions", b'{"model":"llama3.2","stream":true,"max_tokens":3,'
     b'"messages":[{"role":"user","content":"hi"}]}', b"data: [DONE]"),
])
@pytest.mark.parametrize("connection", [b"", b"Connection: keep-alive\r\n"], ids=["plain", "keep-alive"])
def test_an_http_1_0_client_gets_a_stream_delimited_by_the_close(proxy: Server, path: bytes, body: bytes,
                                                                  last: bytes, connection: bytes) -> None:
    """HTTP/1.0 has no chunked coding: a relayed stream (the replica's answer has no Content-Length)
    reaches an HTTP/1.0 client as the raw records, ended by closing the connection, as Go's net/http
    answers a 1.0 client; a client asking to keep the connection alive is told it closes (before: it
    was kept open, aiohttp's keep-alive left as asked, and the client waited for the stream's end
    until the keep-alive timeout)."""
    head = (b"POST " + path + b" HTTP/1.0\r\n" + _auth() + connection
            + b"Content-Length: %d\r\n\r\n" % len(body))
    response = request(proxy.port, head + body, timeout_s=5.0)
    assert response.status_line.startswith("HTTP/1.0 200"), (response.status_line, response.body[:200])
    assert "transfer-encoding" not in response.headers and "content-length" not in response.headers
    assert response.headers.get("connection", "close") == "close"
    assert response.closed
    assert last in response.body.rstrip().splitlines()[-1], response.body[-200:]


def test_an_http_1_0_stream_cut_by_the_replica_ends_with_the_error_record(emulator: Server,
                                                                          proxy: Server) -> None:
    """A close-delimited stream can end with the final error record as a chunked one does: the HTTP/1.0
    client reads why its stream ended, not a close that looks like the end of the answer."""
    httpx.post(f"{emulator.url}/_emulator/faults", json={"reset_after_chunks": 2, "count": 1})
    try:
        body = b'{"model":"llama3.2","prompt":"hi","options":{"num_predict":20}}'
        response = request(proxy.port, b"POST /api/generate HTTP/1.0\r\n" + _auth()
                           + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    finally:
        httpx.delete(f"{emulator.url}/_emulator/faults")
    assert response.status_line.startswith("HTTP/1.0 200"), response.status_line
    assert response.closed
    last = json.loads(response.body.rstrip().splitlines()[-1])
    assert "error" in last and last.get("code", "").startswith("upstream_"), response.body[-300:]
    assert b'"done":true' not in response.body


def test_absolute_form_target_is_routed_by_its_path(proxy: Server) -> None:
    response = request(proxy.port, b"GET http://elsewhere.example/api/tags HTTP/1.1\r\nHost: x\r\n"
                       + _auth() + b"Connection: close\r\n\r\n")
    assert response.status == 200
    assert "models" in response.json()
    body = b'{"model":"llama3.2","prompt":"hi","stream":false,"options":{"num_predict":2}}'
    response = request(proxy.port, b"POST HTTP://elsewhere.example:99/api/generate?x=1 HTTP/1.1\r\n"
                       b"Host: x\r\n" + _auth() + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert response.status == 200, response.body
    assert response.json()["done"] is True


@pytest.mark.parametrize("target", [b"/api/nope%0A", b"/api/x%0D%0AX-Injected:%201",
                                    b"http://elsewhere.example/api/nope%0a"])
def test_a_target_with_an_encoded_newline_is_forwarded_as_sent(proxy: Server, target: bytes) -> None:
    """A %0A in the path decodes to a newline, which the forward route's `.*` did not match: aiohttp
    answered its own text/plain `404: Not Found`. Such a path is the replica's to answer (gin's
    `404 page not found`), still encoded on its request line, and the log gets no raw newline."""
    before = len(proxy.log())
    response = request(proxy.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + _auth()
                       + b"Connection: close\r\n\r\n")
    assert response.status == 404, response.status_line
    assert response.body == b"404 page not found", response.body
    request_id = response.headers["x-request-id"]
    written = wait_for(lambda: text if request_id in (text := proxy.log()[before:]) else None,
                       what="the access line")
    assert "X-Injected" not in written
    assert not any(line and not line[:4].isdigit() for line in written.splitlines()), written


@pytest.mark.parametrize("line", [
    b"CONNECT elsewhere.example:443 HTTP/1.1",
    b"GET * HTTP/1.1",
    b"GET api/tags HTTP/1.1",
    b"GET ftp://elsewhere.example/api/tags HTTP/1.1",
    b"GET //api/tags HTTP/1.1",
    b"GET /../../etc/passwd HTTP/1.1",
    b"GET /%00 HTTP/1.1",
    b"G\x01T /api/tags HTTP/1.1",
    b"GET /api/tags HTTP/9.9",
])
def test_odd_targets_get_a_4xx_never_a_500(proxy: Server, line: bytes) -> None:
    response = request(proxy.port, line + b"\r\nHost: x\r\n" + _auth() + b"Connection: close\r\n\r\n")
    assert 200 <= response.status < 500 or response.status == 505, response.status_line
    assert response.status != 500


@pytest.mark.parametrize(("head", "status", "code"), [
    (b"GET /api/version HTTP/2.0\r\nHost: x\r\n" + _auth() + b"\r\n", 505, "http_version_not_supported"),
    (b"POST /api/show HTTP/2.0\r\nHost: x\r\n" + _auth() + b"Content-Length: 20\r\n\r\n"
     b'{"model":"llama3.2"}', 505, "http_version_not_supported"),
    (b"GET /api/version HTTP/0.9\r\nHost: x\r\n" + _auth() + b"\r\n", 400, "bad_request"),
    (b"GET /api/version\r\n\r\n", 400, "bad_request"),  # HTTP/0.9's request line: no version at all
], ids=["http-2.0", "http-2.0-body", "http-0.9", "no-version"])
def test_an_http_version_besides_1_0_and_1_1_is_refused_in_http_1(proxy: Server, head: bytes,
                                                                   status: int, code: str) -> None:
    """Go's net/http answers HTTP/2.0 sent as text with 505 and a request line without a version with
    400; either way nothing is forwarded, the answer is an HTTP/1.x response (an `HTTP/2.0 200` or
    `HTTP/0.9 401` status line over HTTP/1 framing is no response a client or a proxy in front can
    read), and the connection closes."""
    sock = connect(proxy.port)
    with sock:
        sock.sendall(head)
        response = read_response(sock)
    assert response.status_line.startswith(("HTTP/1.0 ", "HTTP/1.1 ")), response.status_line
    assert response.status == status, response.status_line
    assert response.json()["code"] == code
    assert response.closed


def test_an_http_2_request_behind_a_declined_upgrade_is_refused_too(proxy: Server) -> None:
    """aiohttp parses what follows a request asking to upgrade (to a websocket; the proxy declines: the
    replica answers it as a plain request) only once that request is answered: the version check holds
    for those requests as well."""
    upgrade = (b"GET /api/version HTTP/1.1\r\nHost: x\r\n" + _auth()
               + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    data = b""
    with connect(proxy.port) as sock:
        sock.sendall(upgrade + b"GET /api/version HTTP/2.0\r\nHost: x\r\n" + _auth() + b"\r\n")
        with contextlib.suppress(TimeoutError):  # read until the proxy closes the connection
            while chunk := sock.recv(65536):
                data += chunk
    assert re.findall(rb"HTTP/\d\.\d \d{3}", data) == [b"HTTP/1.1 200", b"HTTP/1.0 505"], data
    assert data.endswith(b'"code":"http_version_not_supported"}'), data[-200:]


def test_options_asterisk_is_answered_like_go(proxy: Server) -> None:
    response = request(proxy.port, b"OPTIONS * HTTP/1.1\r\nHost: x\r\n" + _auth() + b"\r\n")
    assert response.status == 200
    assert response.headers["content-length"] == "0"


# malformed heads and the log ----------------------------------------------------------------------------
@pytest.mark.parametrize("head", [
    f"GET /api/tags HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\x01\r\n\r\n",
    f"GET /api/tags HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nBad Header: 1\r\n\r\n",
    f"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-Key: {KEY}\x00\r\n\r\n",
    f"GET /api/tags?k={KEY} HTT\r\n\r\n",
    f"GET /api/tags HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}{'k' * (HEAD_CAP + 10)}\r\n\r\n",
    f"GET /api/{KEY}\x7f HTTP/1.1\r\nHost: x\r\n\r\n",
], ids=["ctl-in-key", "space-in-name", "nul-in-value", "bad-version", "long-key", "del-in-path"])
def test_malformed_heads_leave_no_key_and_no_traceback_in_the_log(proxy: Server, head: str) -> None:
    before = len(proxy.log())
    response = request(proxy.port, head.encode("latin-1"))
    assert 400 <= response.status < 500
    assert response.headers["content-type"].startswith("application/json")
    assert KEY not in response.body.decode("latin-1")  # the answer does not echo the head either
    # Versioned limits and an id on this response too, though no request ever existed; the id names
    # the log line of the refusal.
    assert response.headers["x-service-limits"].startswith("v=1; max_body_bytes="), response.headers
    request_id = response.headers["x-request-id"]
    written = wait_for(lambda: text if request_id in (text := proxy.log()[before:]) else None,
                       what="the refusal's log line")
    assert KEY not in written
    assert "Traceback" not in written


def test_access_log_fields_are_escaped(proxy: Server) -> None:
    """Model names with CR/LF and ANSI escapes: one access record per request, no control bytes, no
    forged line."""
    forged = "2026-01-01 00:00:00,000 INFO proxy.access forged-record"
    models = [f"m\r\n{forged}", "m\x1b[31mred\x1b[0m\u2028x\u0085y", 'q"uote\\s' + "x" * 1000]
    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
        for model in models:
            response = client.post(f"{proxy.url}/api/show", json={"model": model})
            assert response.status_code in (200, 400, 404)
    text = _wait_for_log(proxy, r"model=q\\x22uote\\x5cs")
    for line in text.splitlines():
        assert not line.startswith("2026-01-01"), line
        assert "\x1b" not in line and "\r" not in line and "\u2028" not in line and "\x85" not in line
    assert "forged-record" in text  # it is there, but inside an escaped field on a real record
    for line in text.splitlines():
        if "forged-record" in line:
            assert "proxy.access" in line and "\\x0d\\x0a" in line
            assert "\\x20INFO\\x20proxy.access\\x20forged-record" in line  # no forged fields either
    long_line = next(line for line in text.splitlines() if "q\\x22uote" in line)
    assert len(long_line) < 800


# response headers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [
    {"keep_alive": "5m\r\nX-Evil: 1"},
    {"options": {"num_ctx": "1\r\nX-Evil: 1", "num_predict": 2}},
], ids=["keep_alive", "num_ctx"])
def test_rewritten_values_with_crlf_give_a_well_formed_response(proxy: Server,
                                                                options: dict[str, object]) -> None:
    body = {"model": "llama3.2", "prompt": "hi", "stream": False, **options}
    body.setdefault("options", {"num_predict": 2})
    response = httpx.post(f"{proxy.url}/api/generate", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {KEY}"})
    # keep_alive is any string to Ollama: the request is served. A string num_ctx may be refused (400)
    # by the limits step; either way the response is well formed and carries no injected header.
    assert response.status_code == 200 if "keep_alive" in options else response.status_code in (200, 400)
    assert "x-evil" not in response.headers
    if response.status_code == 200:
        assert response.json()["done"] is True
        rewritten = response.headers["x-options-rewritten"]
        # Escaped (by the limits step's own bound, or by the header sanitiser): never raw.
        assert "\r" not in rewritten and "\n" not in rewritten and "X-Evil" in rewritten


# connection cap -----------------------------------------------------------------------------------------
def _hold(port: int) -> socket.socket:
    """A connection the proxy accepted and served once (so it is counted), kept open. Retried while
    the proxy is still reaping connections just closed by the test."""
    deadline = time.monotonic() + 10
    while True:
        sock = connect(port)
        sock.sendall(b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n")
        if read_response(sock).status == 200:
            return sock
        sock.close()
        assert time.monotonic() < deadline, "no connection slot came free"
        time.sleep(0.1)


def test_connections_past_the_cap_get_503_and_service_resumes(emulator: Server, tmp_path: Path) -> None:
    cap = 20
    capped = start_proxy(tmp_path, [emulator.url], {"server": {"max_connections": cap,
                                                               "header_timeout_s": 60}}, name="cap")
    # A disconnect storm first (resets mid-head, mid-body, right after connecting): no slot may leak.
    for i in range(150):
        try:
            sock = connect(capped.port)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if i % 3 == 1:
                sock.sendall(b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-Partial: ")
            elif i % 3 == 2:
                sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            sock.close()  # RST
        except OSError:
            pass  # refused while the cap was briefly full of connections not yet reaped
    held: list[socket.socket] = []
    try:
        for _ in range(cap):
            sock = _hold(capped.port)
            sock.sendall(b"GET /api/tags HTTP/1.1\r\n")  # mid-head: busy, not an idle keep-alive one
            held.append(sock)
        with connect(capped.port) as extra:
            refused = read_response(extra, 5)
        assert refused.status == 503
        assert refused.json()["code"] == "too_many_connections"
        assert refused.headers["connection"] == "close"
        assert refused.closed
        assert "serving at most 20 client connections" in capped.log()
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            if httpx.get(f"{capped.url}/api/version", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "service did not resume after the connections closed"
        time.sleep(0.1)
    capped.stop()


def test_an_idle_keepalive_connection_makes_room_past_the_cap(emulator: Server, tmp_path: Path) -> None:
    """A client holding the cap in idle keep-alive connections (answered once, then silent) does not
    lock everyone else out for the keep-alive timeout: the oldest idle one is closed and the new
    connection served, as nginx does."""
    cap = 10
    capped = start_proxy(tmp_path, [emulator.url], {"server": {"max_connections": cap,
                                                               "keepalive_timeout_s": 60}}, name="reuse")
    held: list[socket.socket] = []
    try:
        for _ in range(cap):
            held.append(_hold(capped.port))
        with connect(capped.port) as extra:
            extra.sendall(b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(extra, 5).status == 200
        held[0].settimeout(5)
        assert held[0].recv(1) == b"", "the oldest idle connection was not the one closed"
        assert "closing idle keep-alive connections to admit new ones" in capped.log()
    finally:
        for sock in held:
            sock.close()
        capped.stop()


# framing ------------------------------------------------------------------------------------------------
_SMUGGLED = b"GET /api/ps HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("head", [
    # Content-Length and Transfer-Encoding together (CL.TE / TE.CL desync)
    b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n" + _SMUGGLED,
    # two different Content-Lengths
    b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n{}"
    + _SMUGGLED,
    # a signed Content-Length
    b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\n\r\n{}" + _SMUGGLED,
    # an unknown transfer coding after chunked
    b"POST /api/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"
    + _SMUGGLED,
    # obsolete line folding
    b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n" + _SMUGGLED,
    # a space before the colon
    b"GET /api/tags HTTP/1.1\r\nHost: x\r\nContent-Length : 5\r\n\r\nhello" + _SMUGGLED,
    # a chunk size with garbage
    b"POST /api/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2;\x00\r\n{}\r\n0\r\n\r\n"
    + _SMUGGLED,
], ids=["cl-and-te", "two-cl", "signed-cl", "te-chunked-identity", "obs-fold", "space-before-colon",
        "nul-in-chunk-ext"])
def test_ambiguous_framing_is_refused_and_nothing_is_smuggled(proxy: Server, head: bytes) -> None:
    """Each of these lets a front and a back end disagree on where a request ends; the proxy must refuse
    it with a 4xx, close, and never answer the request hidden behind it."""
    with connect(proxy.port) as sock:
        sock.sendall(head.replace(b"Host: x\r\n", b"Host: x\r\n" + _auth(), 1))
        data = b""
        sock.settimeout(5)
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except TimeoutError:
            pytest.fail(f"the connection stayed open after {data[:200]!r}")
    assert data.startswith((b"HTTP/1.0 4", b"HTTP/1.1 4")), data[:200]
    assert data.count(b"HTTP/1.") == 1, "a second (smuggled) request was answered"


def test_many_stalled_bodies_do_not_deny_service(emulator: Server, tmp_path: Path) -> None:
    """A keyless client opens many requests whose bodies stall: others are still served meanwhile, and
    every stalled one is answered 408 and closed once the body timeout passes."""
    stalled_proxy = start_proxy(tmp_path, [emulator.url], {"server": {"body_timeout_s": 5.0}},
                                name="stalled")
    sockets: list[socket.socket] = []
    try:
        for _ in range(200):
            sock = connect(stalled_proxy.port, 20)
            sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
            sockets.append(sock)
        served = httpx.post(f"{stalled_proxy.url}/api/generate", timeout=20, json={
            "model": "llama3.2", "prompt": "hi", "stream": False, "options": {"num_predict": 2}})
        assert served.status_code == 200
        # ... while the stalled ones were still waiting (not answered yet), so it did not queue behind.
        sockets[-1].setblocking(False)
        with pytest.raises(BlockingIOError):
            sockets[-1].recv(1)
        sockets[-1].setblocking(True)
        statuses = [read_response(sock, 20) for sock in sockets]
        assert all(r.status == 408 and r.closed for r in statuses), \
            {(r.status, r.closed) for r in statuses}
    finally:
        for sock in sockets:
            sock.close()
        stalled_proxy.stop()


@contextlib.contextmanager
def _low_fd_proxy(tmp_path: Path, upstreams: list[dict[str, Any]],
                  nofile: int) -> Iterator[tuple[int, Path]]:
    """The proxy's CLI started with a hard RLIMIT_NOFILE of `nofile`: (its port, its log file)."""
    config = tmp_path / "lowfd.yaml"
    config.write_text(yaml.safe_dump({"server": {"listen": "127.0.0.1:0"},  # the system picks
                                      "upstreams": upstreams}))
    log_path = tmp_path / "lowfd.log"
    # The limit is set in the child itself before the CLI starts (no preexec_fn: unsafe with threads).
    launcher = ("import resource, runpy, sys; "
                f"resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile})); "
                "sys.argv = ['proxy', 'serve', '--config', sys.argv[1]]; "
                "runpy.run_module('proxy', run_name='__main__')")
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-c", launcher, str(config)],
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        text = ""
        deadline = time.monotonic() + 20
        while "listening on" not in text:
            assert time.monotonic() < deadline and process.poll() is None, text
            time.sleep(0.05)
            text = log_path.read_text()
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+),", text)
        assert found is not None, text
        port = int(found.group(1))
        assert port != 0
        yield port, log_path
    finally:
        process.terminate()
        process.wait(20)


def test_the_connection_cap_is_lowered_to_fit_the_descriptor_limit(emulator: Server,
                                                                    tmp_path: Path) -> None:
    """Started with a hard RLIMIT_NOFILE of 256, the proxy cannot hold 8192 connections (two descriptors
    each): it says so and caps itself at what fits, and past that cap answers 503 instead of failing."""
    held: list[socket.socket] = []
    with _low_fd_proxy(tmp_path, [{"url": emulator.url}], 256) as (port, log_path):
        try:
            text = log_path.read_text()
            assert "server.max_connections=8192 does not fit RLIMIT_NOFILE=256" in text
            assert "serving at most 96 client connections" in text
            for _ in range(96):
                held.append(connect(port))
            with connect(port) as extra:
                refused = read_response(extra, 5)
            assert refused.status == 503
            assert httpx.get(f"{emulator.url}/api/version").status_code == 200
        finally:
            for sock in held:
                sock.close()


def _slow_streams(*replicas: Server) -> None:
    """Streams that last a while (0.3 s per line), so that a burst of them overlaps."""
    for replica in replicas:
        httpx.post(f"{replica.url}/_emulator/faults", json={
            "slow_drip_s": 0.3, "paths": ["/api/generate"]}).raise_for_status()


async def _calls(url: str, calls: list[tuple[str, str, str | None]]) -> list[tuple[int, str]]:
    """`calls` (method, path, model) at once, each on a connection of its own: (status, error code)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=len(calls))) as session:
        async def call(method: str, path: str, model: str | None) -> tuple[int, str]:
            body = {"model": model, "prompt": "hi", "options": {"num_predict": 3}} if model else None
            async with session.request(method, url + path, json=body) as reply:
                data = await reply.read()
                return (200, "") if reply.status == 200 else \
                    (reply.status, str(json.loads(data).get("code")))
        return await asyncio.gather(*(call(*c) for c in calls))


def test_running_out_of_descriptors_is_not_blamed_on_the_replicas(tmp_path: Path) -> None:
    """At RLIMIT_NOFILE=128 (32 client connections fit), replica A holds llama3.2, B qwen3 and C an
    embedding model: 32 listings (the data pool keeps its 8 connections to each replica), 32 llama3.2
    streams (32 relay connections to A, idle afterwards), then 32 qwen3 streams at once: 32 more
    connections to B do not fit. The idle
    ones are closed to make room; a request that still cannot connect gets the proxy's own 503
    `overload`. The log says why, and no replica is ejected: a healthy replica is not blamed for the
    proxy's limit."""
    parallel = ["--num-parallel", "32"]  # each burst runs at once (and holds its connections)
    first = start_emulator(tmp_path, name="lowfd-a", models="llama3.2", extra=parallel)
    second = start_emulator(tmp_path, name="lowfd-b", models="qwen3", extra=parallel)
    third = start_emulator(tmp_path, name="lowfd-c", models="nomic-embed-text")
    try:
        _slow_streams(first, second)
        # Slots declared, so that each burst is sent at once.
        upstreams = [{"url": replica.url, "num_parallel": 32} for replica in (first, second, third)]
        with _low_fd_proxy(tmp_path, upstreams, 128) as (port, log_path):
            assert "serving at most 32 client connections" in log_path.read_text()
            url = f"http://127.0.0.1:{port}"
            listings = asyncio.run(_calls(url, [("GET", "/api/tags", None)] * 32))
            assert set(listings) == {(200, "")}, listings
            on_a = asyncio.run(_calls(url, [("POST", "/api/generate", "llama3.2")] * 32))
            assert set(on_a) == {(200, "")}, on_a
            on_b = asyncio.run(_calls(url, [("POST", "/api/generate", "qwen3")] * 32))
            assert set(on_b) <= {(200, ""), (503, "overload")}, on_b
            text = log_path.read_text()
            assert "out of file descriptors (RLIMIT_NOFILE=128" in text, \
                f"the descriptors never ran out: the test proves nothing\n{text[-3000:]}"
            assert "ejected" not in text, text[-3000:]
            ready = httpx.get(f"{url}/readyz", timeout=10).json()
            assert set(ready["upstreams"].values()) == {"healthy"}, ready
    finally:
        first.stop()
        second.stop()
        third.stop()


def test_listings_cannot_take_the_descriptors_new_clients_need(emulator: Server,
                                                               tmp_path: Path) -> None:
    """At RLIMIT_NOFILE=256 (96 client connections fit) with two replicas, 90 clients list the models
    over and over (each listing fans out to both replicas) while another opens a new connection for
    /healthz every 0.1 s: every one is answered. The data pool is bounded (DATA_POOL_PER_REPLICA) within
    the descriptors kept aside; unbounded, the listings took them all and the new connections were reset
    unanswered."""
    second = start_emulator(tmp_path, name="lowfd-tags")
    replicas = [{"url": emulator.url}, {"url": second.url}]
    try:
        with _low_fd_proxy(tmp_path, replicas, 256) as (port, _):
            url = f"http://127.0.0.1:{port}"
            until = time.monotonic() + 4

            async def lists(session: aiohttp.ClientSession) -> None:
                while time.monotonic() < until:
                    async with session.get(f"{url}/api/tags") as reply:
                        await reply.read()
                        assert reply.status == 200

            async def probes() -> list[str]:
                outcomes = []
                while time.monotonic() < until:
                    try:
                        reader, writer = await asyncio.open_connection("127.0.0.1", port)
                        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        outcomes.append((await asyncio.wait_for(reader.read(), 10))[:12].decode())
                        writer.close()
                    except OSError as exc:
                        outcomes.append(type(exc).__name__)
                    await asyncio.sleep(0.1)
                return outcomes

            async def run() -> list[str]:
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=90)) as session:
                    *_, outcomes = await asyncio.gather(*(lists(session) for _ in range(90)), probes())
                    return outcomes

            outcomes = asyncio.run(run())
            assert len(outcomes) >= 10
            assert set(outcomes) == {"HTTP/1.1 200"}, outcomes
    finally:
        second.stop()


@pytest.mark.parametrize("path", [b"/api/generate", b"/api/blobs/sha256:" + b"d" * 64, b"/v1/embeddings"])
@pytest.mark.parametrize("coding", [b"gzip, chunked", b"x-custom ,chunked"])
def test_a_transfer_coding_besides_chunked_is_501(proxy: Server, path: bytes, coding: bytes) -> None:
    """aiohttp frames `gzip, chunked` by its chunks and leaves the gzip on: the body went on coded,
    with nothing left to say so (Transfer-Encoding is hop-by-hop). Go's net/http (Ollama) answers 501;
    so does the proxy, in the route's shape, before reading the body."""
    body = gzip.compress(b'{"model":"llama3.2","prompt":"hi","stream":false}')
    with connect(proxy.port) as sock:
        sock.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + _auth() + b"Transfer-Encoding: "
                     + coding + b"\r\n\r\n%x\r\n%b\r\n0\r\n\r\n" % (len(body), body))
        response = read_response(sock, 5)
    assert response.status == 501, (response.status_line, response.body[:200])
    error = response.json()["error"]
    code = error["code"] if path.startswith(b"/v1/") else response.json()["code"]
    assert code == "unsupported_transfer_coding", response.body
    _has_edge_headers(proxy, response)


def test_too_many_headers_is_431(proxy: Server) -> None:
    headers = b"".join(b"X-H%d: 1\r\n" % i for i in range(300))  # small in bytes, many in number
    response = request(proxy.port, b"GET /api/tags HTTP/1.1\r\nHost: x\r\n" + _auth() + headers + b"\r\n")
    assert response.status == 431
    assert response.json()["code"] == "request_header_fields_too_large"
    _has_edge_headers(proxy, response)
    assert response.closed


@pytest.mark.parametrize("path", [b"/api/generate", b"/api/blobs/sha256:" + b"c" * 64])
@pytest.mark.parametrize("broken", [b"zz\r\n{}\r\n0\r\n\r\n", b"2\r\n{}XX0\r\n\r\n"], ids=["size", "crlf"])
def test_a_broken_chunk_after_the_head_is_a_400(proxy: Server, path: bytes, broken: bytes) -> None:
    """Chunked framing that breaks after the head was parsed (in a later packet): a 400 for that
    request (not a wait for the body timeout, nor a 502 blamed on the replica), then close."""
    with connect(proxy.port) as sock:
        first = b"5\r\nhello\r\n" if b"blobs" in path else b""  # a blob upload already under way
        sock.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + _auth()
                     + b"Transfer-Encoding: chunked\r\n\r\n" + first)
        time.sleep(0.3)
        sock.sendall(broken)
        response = read_response(sock, 10)
    assert response.status == 400, response.body
    assert response.json()["code"] == "invalid_request"
    assert response.closed
    time.sleep(0.2)
    assert "Traceback" not in proxy.log()


@pytest.mark.parametrize("path", [b"/v1/chat/completions", b"/v1/embeddings", b"/api/embed"])
@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_an_undecodable_body_is_the_client_s_400_and_no_error_in_the_log(proxy: Server, path: bytes,
                                                                        framing: str) -> None:
    """A body that does not decode as its Content-Encoding says is the client's mistake: a 400 in the
    route's shape, the connection closed, and nothing at ERROR level in the log (before, aiohttp's
    reading of the body's unread rest after the answer raised the decoding error again, and the log
    had `ERROR ... Unhandled exception: RequestPayloadError` and its frames for every such request, an
    alert any client could set off)."""
    before = len(proxy.log())
    body = b'{"model":"llama3.2","input":"not gzip at all"}'
    framed = (b"Content-Length: %d\r\n\r\n%b" % (len(body), body) if framing == "length"
              else b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n" % (len(body), body))
    with connect(proxy.port) as sock:
        sock.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + _auth()
                     + b"Content-Type: application/json\r\nContent-Encoding: gzip\r\n" + framed)
        response = read_response(sock, 10)
    assert response.status == 400, response.body
    if path.startswith(b"/v1/"):
        assert response.json()["error"]["code"] == "invalid_request", response.body
    else:
        assert response.json()["code"] == "invalid_request", response.body
    # The server closed the connection, so whatever it had to log about it is written.
    assert response.closed
    request_id = response.headers["x-request-id"]
    wait_for(lambda: request_id in proxy.log()[before:], what="the request's access-log line")
    time.sleep(0.2)
    written = proxy.log()[before:]
    assert " ERROR " not in written, written
