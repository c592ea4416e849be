"""Raw-socket HTTP/1.1 for tests where an HTTP client would normalise the attack (oversized or malformed
heads, odd request targets, stalled bodies, Expect handshakes)."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

__all__ = ["RawResponse", "connect", "read_response", "request"]


class RawResponse:
    """One response as bytes: status line, headers (lower-case names), body; `closed` when the server
    closed the connection after it."""

    def __init__(self, head: bytes, body: bytes, closed: bool) -> None:
        self.raw_head = head
        lines = head.split(b"\r\n")
        self.status_line = lines[0].decode("latin-1")
        parts = self.status_line.split(" ", 2)
        self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.decode("latin-1").partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.body = body
        self.closed = closed

    def json(self) -> Any:
        return json.loads(self.body)


def connect(port: int, timeout_s: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_response(sock: socket.socket, timeout_s: float = 10.0) -> RawResponse:
    """Read one response (Content-Length or close-delimited; 1xx responses are returned as they are)."""
    deadline = time.monotonic() + timeout_s
    data = b""
    closed = False
    while b"\r\n\r\n" not in data:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            closed = True
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    response = RawResponse(head, b"", closed)
    length = response.headers.get("content-length")
    if 100 <= response.status < 200:
        response.body = rest
        return response
    if length is not None:
        while len(rest) < int(length) and not closed:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                closed = True
                break
            rest += chunk
    elif not closed:
        while True:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                closed = True
                break
            rest += chunk
    response.body = rest
    if not closed:
        closed = is_closed(sock, 4.0 if response.headers.get("connection") == "close" else 0.0)
    response.closed = closed
    return response


def is_closed(sock: socket.socket, wait_s: float) -> bool:
    """Whether the peer closed `sock` (waiting up to `wait_s` for the FIN)."""
    sock.settimeout(max(wait_s, 0.001))
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def request(port: int, raw: bytes, timeout_s: float = 10.0) -> RawResponse:
    """Send `raw` on a new connection and read one response."""
    with connect(port, timeout_s) as sock:
        sock.sendall(raw)
        return read_response(sock, timeout_s)
