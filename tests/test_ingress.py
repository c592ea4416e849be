"""Ingress protections: body limit answered before the body is read, a request-head deadline against
slowloris, error rendering per route dialect."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import raw
from tests.support.polling import wait_for
from tests.support.servers import Server, start_emulator, start_proxy


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    tmp: Path = tmp_path_factory.mktemp("ingress")
    emulator = start_emulator(tmp, name="ingress-emu")
    proxy = start_proxy(tmp, [emulator.url], {"server": {"max_body_bytes": 4096,
                                                         "header_timeout_s": 1.0}}, name="guard")
    yield emulator, proxy
    proxy.stop()
    emulator.stop()


def _read_response(sock: socket.socket, timeout_s: float = 5.0) -> bytes:
    sock.settimeout(timeout_s)
    data = b""
    try:
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        pass
    return data


def test_oversized_declared_body_is_refused_before_reading(guarded: tuple[Server, Server]) -> None:
    _, proxy = guarded
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        # Announce 1 GB and send none of it: the answer must come without waiting for the body.
        sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000\r\n\r\n")
        start = time.monotonic()
        raw = _read_response(sock)
        took = time.monotonic() - start
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert b'"code":"request_payload_too_large"' in body and b"1000000000" in body
    assert took < 4.0  # answered before the body (which never comes); generous for a loaded machine


def test_oversized_chunked_body_is_refused(guarded: tuple[Server, Server]) -> None:
    _, proxy = guarded

    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b"x" * 1000

    response = httpx.post(f"{proxy.url}/api/generate", content=chunks())
    assert response.status_code == 413
    assert response.json()["code"] == "request_payload_too_large"


def test_body_under_the_limit_is_forwarded(guarded: tuple[Server, Server]) -> None:
    _, proxy = guarded
    prompt = "y" * 3000
    response = httpx.post(f"{proxy.url}/api/generate",
                          json={"model": "llama3.2", "prompt": prompt, "stream": False})
    assert response.status_code == 200 and response.json()["done"] is True


def test_slow_request_head_is_closed(guarded: tuple[Server, Server]) -> None:
    _, proxy = guarded
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(b"GET /api/tags HTTP/1.1\r\n")
        start = time.monotonic()
        closed_after = None
        sock.settimeout(0.2)
        for byte in b"X-Slow: 1234567890123456789012345678901234567890\r\n":
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(1) == b"":
                    closed_after = time.monotonic() - start
                    break
            except TimeoutError:
                continue
            except OSError:
                closed_after = time.monotonic() - start
                break
    assert closed_after is not None, "the proxy kept a slowloris connection open"
    assert 0.8 < closed_after < 3.0


def test_idle_keepalive_connection_outlives_the_head_deadline(guarded: tuple[Server, Server]) -> None:
    """The head deadline applies to a request being sent, not to an idle keep-alive connection."""
    _, proxy = guarded
    with httpx.Client() as client:
        assert client.get(f"{proxy.url}/api/version").status_code == 200
        time.sleep(1.5)
        assert client.get(f"{proxy.url}/api/version").status_code == 200
        assert client.get(f"{proxy.url}/api/version").extensions["http_version"] == b"HTTP/1.1"


def test_errors_take_the_route_dialect(guarded: tuple[Server, Server]) -> None:
    _, proxy = guarded
    big = b'{"model":"m","x":"' + b"z" * 5000 + b'"}'
    native = httpx.post(f"{proxy.url}/api/chat", content=big)
    assert native.json() == {"error": "request body of 5020 bytes exceeds the limit of 4096 bytes",
                             "code": "request_payload_too_large"}
    assert native.headers["content-type"] == "application/json; charset=utf-8"
    openai = httpx.post(f"{proxy.url}/v1/chat/completions", content=big)
    assert openai.json()["error"]["code"] == "request_payload_too_large"
    assert openai.json()["error"]["type"] == "invalid_request_error"
    anthropic = httpx.post(f"{proxy.url}/v1/messages", content=big)
    assert anthropic.json()["type"] == "error"
    assert anthropic.json()["error"]["type"] == "request_too_large"


@pytest.mark.parametrize("path", ["/api/chat", "/healthz"])
def test_a_refused_expectation_carries_the_proxys_headers(guarded: tuple[Server, Server],
                                                          path: str) -> None:
    """An `Expect` other than 100-continue is answered 417 by the route's expect handler before any
    middleware runs (the forwarder's route and a system route alike): it still carries X-Service-Limits
    (v=1, the limits of a request with no tenant yet) and an X-Request-Id that names its access line."""
    _, proxy = guarded
    answer = raw.request(proxy.port, f"POST {path} HTTP/1.1\r\nHost: x\r\nExpect: something-else\r\n"
                                     f"Content-Length: 2\r\n\r\n{{}}".encode())
    assert answer.status == 417, answer.status_line
    assert answer.headers["x-service-limits"] == "v=1; max_body_bytes=4096"
    request_id = answer.headers["x-request-id"]
    assert request_id
    wait_for(lambda: f"{request_id} " in proxy.log(), what="the 417's access line")



def test_a_head_started_behind_a_request_must_arrive_in_time_too(tmp_path: Path) -> None:
    """A head whose first bytes came while the request before it was being answered (pipelined, or sent
    during a stream) gets `header_timeout_s` from the end of that answer: it was held until the
    keep-alive timeout instead, 75 s, and such a connection is no idle one the connection cap may take
    back, so a few cheap requests could hold the proxy's connections that long."""
    emulator = start_emulator(tmp_path, name="pipelined-emu", decode_tokens_per_s=50)
    proxy = start_proxy(tmp_path, [emulator.url], {"server": {"header_timeout_s": 1.0}},
                        name="pipelined-guard")
    try:
        body = b'{"model":"llama3.2","prompt":"hi","options":{"num_predict":25}}'
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                         % len(body) + body)
            sock.settimeout(10)
            data = sock.recv(65536)
            assert data.startswith(b"HTTP/1.1 200"), data[:200]
            sock.sendall(b"GET /api/vers")  # the next head starts while the stream runs, then stops
            while not data.endswith(b"\r\n0\r\n\r\n"):  # the stream's last chunk
                chunk = sock.recv(65536)
                assert chunk, data[-200:]
                data += chunk
            answered = time.monotonic()
            sock.settimeout(5)
            try:
                closed = sock.recv(65536) == b""
            except TimeoutError:
                closed = False
            waited = time.monotonic() - answered
        assert closed and waited < 3.0, f"the unfinished head was held {waited:.1f}s"
    finally:
        proxy.stop()
        emulator.stop()


_SHOW = b'{"model":"llama3.2"}'


@pytest.mark.parametrize("sent", [
    [b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\nGET /api/vers"],
    [b"POST /api/show HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(_SHOW), _SHOW)
     + b"GET /api/vers"],
    [b"POST /api/show HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(_SHOW), _SHOW[:5]),
     _SHOW[5:] + b"GET /api/vers"],
    [b"POST /api/show HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
     b"%x\r\n%s\r\n0\r\n\r\nGET /api/vers" % (len(_SHOW), _SHOW)],
], ids=["pipelined-in-one-read", "after-a-body-in-one-read", "after-a-body-read-later",
        "after-a-chunked-body"])
def test_a_head_begun_in_the_read_that_ended_a_request_must_arrive_in_time(
        guarded: tuple[Server, Server], sent: list[bytes]) -> None:
    """The next head's first bytes in the same read as the end of the request before it (its head,
    or its body) start the head deadline as well: they were not counted, and the unfinished head was
    held until the keep-alive timeout, 75 s."""
    _, proxy = guarded
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        for data in sent:
            sock.sendall(data)
            time.sleep(0.05)
        sock.settimeout(10)
        received = b""
        started = time.monotonic()
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass
        waited = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    assert waited < 5.0, f"the unfinished head was held {waited:.1f}s"


def test_requests_pipelined_behind_a_declined_upgrade_leave_an_idle_connection_idle(
        tmp_path: Path) -> None:
    """aiohttp holds what follows a request asking to upgrade (the proxy declines: the replica answers
    it as a plain request) and parses it once that request is answered. Those bytes are whole requests
    here, not an unfinished head: once all are answered the connection is an idle keep-alive one,
    not cut at `header_timeout_s` (before: the bytes counted while they waited were taken for an
    unfinished head, and the connection closed 1 s after the last answer)."""
    emulator = start_emulator(tmp_path, name="upgrade-emu", decode_tokens_per_s=50)
    proxy = start_proxy(tmp_path, [emulator.url], {"server": {"header_timeout_s": 1.0}},
                        name="upgrade-guard")
    body = b'{"model":"llama3.2","prompt":"hi","options":{"num_predict":25}}'
    upgrade = (b"POST /api/generate HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    show = b'{"model":"llama3.2"}'
    follower = b"POST /api/show HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(show), show)
    try:
        for sent in ([upgrade + follower], [upgrade, follower]):  # in one write; during the stream
            with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
                for data in sent:
                    sock.sendall(data)
                    time.sleep(0.1)
                sock.settimeout(10)
                received = b""
                while received.count(b"HTTP/1.1 200") < 2 or not received.endswith(b"}"):
                    chunk = sock.recv(65536)
                    assert chunk, received[-300:]
                    received += chunk
                sock.settimeout(2.5)  # past header_timeout_s, well within the keep-alive timeout
                try:
                    closed = sock.recv(65536) == b""
                except TimeoutError:
                    closed = False
            assert not closed, f"an idle keep-alive connection was closed ({len(sent)} writes)"
    finally:
        proxy.stop()
        emulator.stop()
