"""Running an aiohttp application the way a proxy must: handler cancellation on (a client that leaves
cancels its handler at once), a deep listen backlog, a deadline and a size cap for the request head, a cap
on open connections, malformed heads answered without echoing them to the log, and a graceful stop.

aiohttp has no header-read timeout and caps only each line of the head, not the whole: `EdgeHandler` closes
a connection whose request head is not complete within `header_timeout_s` of its first byte (or of the
connection opening), refuses with 431 a head that grows past `max_header_bytes`, and answers connections
beyond `max_connections` with an immediate 503. `GracefulStop` and `run_until_signalled` implement SIGTERM
(stop accepting, drain, then end what is left with `shutting_down`), and SIGHUP (reload).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable
from typing import Any

from aiohttp import HttpVersion10, HttpVersion11, web
from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD, EmptyStreamReader, StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo
from aiohttp.web_request import BaseRequest

from .escaping import escape, withheld
from .rendering import error_body

__all__ = [
    "EDGE_ERROR_HEADERS",
    "STOP",
    "EdgeHandler",
    "GracefulStop",
    "HeadDeadlineHandler",
    "ProxyRunner",
    "bound_port",
    "cannot_bind",
    "escape_field",
    "fit_connections",
    "raise_nofile_limit",
    "run_until_signalled",
    "start_site",
    "write_port_file",
]

log = logging.getLogger("proxy.serving")

_FD_RESERVE = 64
"""File descriptors kept for everything that is not a client connection or its upstream one (listening
socket, log files, Redis, health probes, tokenizer files, and the fan-out's data pool: at most
fleet.client.DATA_POOL_LIMIT of them)."""


_LINGER_S = 2.0
"""After a response to a request whose body was not read (a refusal, a 408), the rest of the body is
read and dropped for at most this long before the connection closes, so a client still sending sees
the response rather than a reset (nginx's lingering close); aiohttp's default of 10 s let refused or
stalled clients hold their connection five times longer."""


_RECLAIM_BACKOFF_S = 0.1
"""After a search for an idle keep-alive connection to close (past the connection cap) found none, new
connections are refused without searching again for this long."""


def escape_field(value: object, limit: int = 200) -> str:
    """`value` as one safe token for a log line: control characters (C0, DEL, C1, and other non-printable
    code points such as U+2028), space, backslash and double quote escaped as `\\xNN`/`\\uNNNN`, and at
    most `limit` characters (then `...`). Anything a client sent goes through this before reaching a log,
    so a value can neither start a new line nor forge a `key=value` field of the same record."""
    text = value if isinstance(value, str) else str(value)
    if (len(text) <= limit and text.isprintable() and " " not in text and '"' not in text
            and "\\" not in text):
        return text  # the common case (a model name, an address) costs a few scans
    return escape(text, limit, _log_safe)


def _log_safe(char: str) -> bool:
    return char.isprintable() and char not in ' "\\'


def _raw_response(status: int, reason: str, message: str, code: str, *,
                  retry_after_s: int | None = None, headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, for refusals made before aiohttp has a
    request object (the connection cap, a head that never ends). `headers`: the proxy's own
    (`EdgeHandler.error_headers`: ASCII by construction, never a client's bytes)."""
    body = error_body("ollama", status, code, message)
    extra = (f"Retry-After: {retry_after_s}\r\nretry-after-ms: {retry_after_s * 1000}\r\n"
             if retry_after_s is not None else "x-should-retry: false\r\n" if 400 <= status < 500 else "")
    extra += "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n")
    return head.encode("ascii") + body


class _UnsupportedHttpVersion(BadHttpMessage):
    """A request line naming HTTP/2.0 or later as text (505, as Go's net/http answers it)."""


class _NoHttpVersion(BadHttpMessage):
    """A request line of HTTP/0.9 (no version, or `HTTP/0.9`): a malformed request line for Go (400)."""


_HTTP_1 = frozenset({HttpVersion10, HttpVersion11})


def _raw_bytes(body: StreamReader | None) -> int:
    """The bytes of a request body received so far, as sent (before any Content-Encoding is undone)."""
    return 0 if body is None or isinstance(body, EmptyStreamReader) else body.total_raw_bytes


class EdgeHandler(RequestHandler):
    """A RequestHandler with the edge protections of nginx and Envoy that aiohttp lacks.

    - Head deadline: armed when the connection opens, whenever bytes arrive while no request is being
      handled, and when a request is answered while the next head has begun; disarmed as soon as the
      parser produced a complete request message.
    - Head size: bytes are counted while a head is being received (not while a body is); past
      `max_header_bytes` without a complete head the client gets 431 and the connection closes. A head
      that completes inside one read is measured exactly by ingress instead (`Ingress.head_bytes`).
    - Connection cap: past `max_connections` open connections the oldest idle keep-alive connection is
      closed to make room; when there is none, a new one gets 503 and is closed at once.
    - Malformed heads get a JSON 400 (431 for an oversized line or too many headers) and are logged by
      exception type only: aiohttp's own message quotes the offending bytes, which may hold an API key.
    - HTTP versions: only 1.0 and 1.1 are served. aiohttp's parser accepts `HTTP/2.0` as text and
      HTTP/0.9's request line, and would answer them with an `HTTP/2.0 200` or `HTTP/0.9 401` status
      line over HTTP/1 framing (forwarding the request first); they get 505 and 400 instead, as from
      Go's net/http, and the connection closes.
    """

    header_timeout_s: float = 10.0
    max_header_bytes: int = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        """Bytes of the head being received; -1 while a request body is being received."""
        self._body: StreamReader | None = None
        """The body being received, if any."""
        self._body_chunked = False
        """Whether that body is in chunked coding (its end is then found by its blank line)."""
        self._counted = False

    def _arm(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self._loop.call_later(self.header_timeout_s, self._head_expired)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_expired(self) -> None:
        self._head_deadline = None
        log.info("closing a connection whose request head did not arrive within %.1fs",
                 self.header_timeout_s)
        self.force_close()
        if self.transport is not None:
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        server = self._manager
        if isinstance(server, _EdgeServer):
            self._counted = True
            server.open_connections += 1
            if server.open_connections > server.max_connections and not server.reclaim_idle():
                server.refused_connections += 1
                if server.refused_connections == 1 or server.refused_connections % 1000 == 0:
                    log.warning("refusing connections beyond server.max_connections=%d (%d so far)",
                                server.max_connections, server.refused_connections)
                transport.write(_raw_response(  # type: ignore[attr-defined]
                    503, "Service Unavailable", "too many open connections to the proxy",
                    "too_many_connections", retry_after_s=1, headers=self._error_headers()))
                self.force_close()
                return
        self._arm()

    def _body_done(self) -> None:
        self._head_bytes = max(self._head_bytes, 0)
        self._body = None

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        idle = self._waiter is not None and not self._messages
        counting = self._head_bytes >= 0
        body = self._body
        body_before = _raw_bytes(body)
        if counting:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._request_count != before:
            self._refuse_versions(self._request_count - before)
            self._disarm()
            self._head_bytes = 0
            if body is not None and not body.is_eof() and any(
                    isinstance(message, _ErrInfo) for message, _ in self._messages):
                # The parser failed inside the body being received (bad chunk framing): aiohttp
                # queues a 400 for after the request, whose handler would wait for body bytes that
                # will never be parsed. Fail the body now, so it is answered at once.
                body.set_exception(BadHttpMessage("malformed request body"))
                body.feed_eof()  # nothing more will come: no lingering read of it either
            self._track(data, whole=self._request_count - before == 1 and counting and body is None)
        else:
            if body is not None and body.is_eof() and self._body is None and self._head_bytes == 0:
                # This read ended the body: what follows it is the next head's beginning.
                self._head_bytes = self._after_body(data, self._body_chunked,
                                                    _raw_bytes(body) - body_before)
            if idle:
                self._arm()
            if counting and self._head_bytes > self.max_header_bytes:
                self._refuse_head()

    def _track(self, data: bytes, *, whole: bool) -> None:
        """Start counting again after `data` completed requests: the next head's bytes (`_unparsed`),
        or none while the last request's body is still coming."""
        self._head_bytes = 0
        self._body = None
        if self._messages:
            message, payload = self._messages[-1]
            if not payload.is_eof():
                # A body follows: its bytes are not head bytes. Count again once it has ended.
                self._head_bytes = -1
                self._body = payload
                self._body_chunked = not isinstance(message, _ErrInfo) and message.chunked
                payload.on_eof(self._body_done)
            elif not isinstance(message, _ErrInfo):
                self._head_bytes = self._unparsed(data, message, payload, whole=whole)

    @staticmethod
    def _unparsed(data: bytes, message: Any, payload: StreamReader, *, whole: bool) -> int:
        """How many bytes of `data`, the read that completed `message` (the last request parsed, its
        body, if any, complete as well), follow it: the next head's beginning, which the parser holds
        and which must get its deadline once this request is answered. Exact for a request without
        a body or with a chunked one (the read then ends in the head's or the body's blank line, which
        no unfinished head contains); for a Content-Length body only when `whole`, the read holding
        just this request from its first byte. 0 when it cannot be told (the keep-alive timeout then
        bounds that head, as before)."""
        size = _raw_bytes(payload)
        if message.chunked or not size:
            end = data.rfind(b"\r\n\r\n")
            return len(data) - end - 4 if end >= 0 else 0
        if not whole:
            return 0
        end = data.find(b"\r\n\r\n")
        return max(0, len(data) - end - 4 - size) if end >= 0 else 0

    @staticmethod
    def _after_body(data: bytes, chunked: bool, body_bytes: int) -> int:
        """How many bytes of `data`, the read that ended a request body begun in an earlier read (of
        which it held `body_bytes`, as sent), follow that body (see `_unparsed`)."""
        if chunked:
            end = data.rfind(b"\r\n\r\n")
            return len(data) - end - 4 if end >= 0 else 0
        return max(0, len(data) - body_bytes)

    async def finish_response(self, request: BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        """aiohttp's, and the version check for the requests it parses itself: those that followed a
        request asking to upgrade, which aiohttp holds back until that request is answered. Then the
        head deadline for a head that began while this request was being answered (pipelined, or sent
        during a stream): it could not run then (it would have cut the answer short), and without it
        such a head could stay unfinished until the keep-alive timeout."""
        before = self._request_count
        tail = self._message_tail if self._upgraded else b""
        result = await super().finish_response(request, resp, start_time)
        if self._request_count != before:
            self._refuse_versions(self._request_count - before)
            # What was counted while the tail waited covered these requests (their bodies too): the
            # count starts again from what the parser holds after them.
            self._track(tail, whole=self._request_count - before == 1)
        elif self._head_bytes > 0 and not self._messages:
            self._arm()
        return result

    def _refuse_versions(self, new: int) -> None:
        """Replace the first of the `new` messages just parsed whose HTTP version is not 1.0 or 1.1 by
        a parse error (answered in order by `handle_error`, which closes the connection), and drop the
        messages behind it: they are never answered on a connection that closes."""
        queued = list(self._messages)
        for index in range(max(0, len(queued) - new), len(queued)):
            message, _ = queued[index]
            if isinstance(message, _ErrInfo) or message.version in _HTTP_1:
                continue
            exc: BadHttpMessage
            if message.version.major >= 2:
                exc, status = _UnsupportedHttpVersion("unsupported protocol version"), 505
            else:
                exc, status = _NoHttpVersion("malformed request line"), 400
            self._messages.clear()
            self._messages.extend(queued[:index])
            self._messages.append((_ErrInfo(status=status, exc=exc, message=exc.message), EMPTY_PAYLOAD))
            return

    def _error_headers(self) -> dict[str, str]:
        return self.error_headers() if self.error_headers is not None else {}

    def _refuse_head(self) -> None:
        headers = self._error_headers()
        log.info("refusing a request head over server.max_header_bytes=%d from %s (request id %s)",
                 self.max_header_bytes, escape_field(self._peer()), headers.get("X-Request-Id", "-"))
        self._head_bytes = -1
        busy = self._request_in_progress or bool(self._messages)
        if self.transport is not None and not busy:
            self.transport.write(_raw_response(
                431, "Request Header Fields Too Large",
                f"request head exceeds {self.max_header_bytes} bytes", "request_header_fields_too_large",
                headers=headers))
        # A pipelined head behind a running request cannot be answered in order: only closed.
        self.force_close()

    @property
    def idle(self) -> bool:
        """No request on this connection is being handled or waiting to be (keep-alive, or mid-head)."""
        return not self._request_in_progress and not self._messages

    @property
    def mid_head(self) -> bool:
        """Some bytes of a request head have arrived, not all of it, and no request is being handled:
        the client has begun a request (what a graceful stop lets finish)."""
        return self.idle and self._head_bytes > 0 and self.transport is not None \
            and not self._force_close

    @property
    def reusable(self) -> bool:
        """Idle between requests: answered at least once, waiting in keep-alive, no byte of a next head
        received. Closing it loses nothing a client sent (HTTP lets either side close such a connection;
        clients retry a request on a reused connection that closes)."""
        # `_waiter` pending: aiohttp's own test that the loop is parked for the next message. Between a
        # message's pop and its handler task the other flags still read idle, and closing then would
        # drop a request already received.
        waiter = self._waiter
        return (self._request_count > 0 and self._keepalive_handle is not None and self._head_bytes == 0
                and not self._force_close and self.transport is not None and self.idle
                and waiter is not None and not waiter.done())

    def _peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else "-"

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        if self._counted and isinstance(self._manager, _EdgeServer):
            self._counted = False
            self._manager.open_connections -= 1
        super().connection_lost(exc)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's exception log, without the exception's message: for parser errors it quotes raw
        request bytes (headers, keys). The type and the frames are enough to debug.

        A `RequestPayloadError` here is the client's body failing to decode or frame while aiohttp
        reads and drops its unread rest after the answer (the request was answered already, a 400
        when the proxy had read that far): the client's doing, not the proxy's, so INFO without
        frames, and the connection closes as for any error. At ERROR any client could fill the log
        and set off alerts with one bad body per request."""
        exc_info = kw.pop("exc_info", None)
        if exc_info is True:
            exc_info = sys.exc_info()[1]
        message = str(args[0]) if args else "error"
        if isinstance(exc_info, RequestPayloadError):
            log.info("dropped the rest of a request body from %s that could not be read (%s)",
                     escape_field(self._peer()), type(exc_info).__name__)
            return
        self._log_error(message, exc_info)

    @staticmethod
    def _log_error(message: str, exc: BaseException | None) -> None:
        if isinstance(exc, BaseException):
            log.error("%s: %s", message, withheld(exc))
        else:
            log.error("%s", message)

    error_headers: Callable[[], dict[str, str]] | None = None
    """Headers for the errors answered here (`EDGE_ERROR_HEADERS` of the app; a new request id each)."""

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A JSON error response that never quotes the request's bytes; the connection closes."""
        del message
        # X-Service-Limits and X-Request-Id, as on every response: this one never reaches the app's
        # on_response_prepare (aiohttp sends it only for a routed request). The id goes in the log line.
        headers = self._error_headers()
        if isinstance(exc, _UnsupportedHttpVersion):
            status, code, text = 505, "http_version_not_supported", "unsupported protocol version"
            log.info("refused a request in an unsupported HTTP version from %s (505, request id %s)",
                     escape_field(request.remote or "-"), headers.get("X-Request-Id", "-"))
        elif status >= 500:
            self._log_error("error handling a request", exc)  # a 500 is ours, whatever raised it
            code, text = "internal_error", "internal proxy error"
        else:
            if isinstance(exc, LineTooLong) or (
                    isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc.message)):
                status, code, text = 431, "request_header_fields_too_large", \
                    "a request header line is too large, or there are too many headers"
            elif isinstance(exc, (BadStatusLine, _NoHttpVersion)):
                code, text = "bad_request", "malformed request line"
            else:
                code, text = "bad_request", "malformed request head"
            log.info("refused a malformed request from %s: %s (%d, request id %s)",
                     escape_field(request.remote or "-"), type(exc).__name__ if exc is not None else "-",
                     status, headers.get("X-Request-Id", "-"))
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send the error")
        response = web.Response(status=status, body=error_body("ollama", status, code, text),
                                content_type="application/json", charset="utf-8")
        response.headers.update(headers)
        response.force_close()
        return response


EDGE_ERROR_HEADERS: web.AppKey[Callable[[], dict[str, str]]] = web.AppKey("sop_edge_error_headers")
"""Set on the proxy's application: the headers of an error `EdgeHandler.handle_error` answers (what
aiohttp's parser refused: a bad request line, a header over the cap), which the app's hooks never see."""

HeadDeadlineHandler = EdgeHandler
"""The former name (docs/ARCHITECTURE.md uses it)."""


class _EdgeServer(web.Server):
    def __init__(self, *args: Any, header_timeout_s: float, max_header_bytes: int,
                 max_connections: int, error_headers: Callable[[], dict[str, str]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_connections = max_connections
        self.open_connections = 0
        self.refused_connections = 0
        self.reclaimed_connections = 0
        self._no_idle_until = 0.0
        self._handler_class = type("BoundEdgeHandler", (EdgeHandler,),
                                   {"header_timeout_s": header_timeout_s,
                                    "max_header_bytes": max_header_bytes,
                                    "error_headers": error_headers})

    def __call__(self) -> RequestHandler:
        return self._handler_class(self, loop=self._loop, **self._kwargs)  # type: ignore[no-any-return]

    def reclaim_idle(self) -> bool:
        """Make room for a connection past `max_connections` by closing the oldest reusable keep-alive
        connection (`EdgeHandler.reusable`), as nginx reuses keep-alive connections when it runs out:
        otherwise a client holding the cap in idle keep-alive connections (one request each, then
        nothing) had every other client refused for `keepalive_timeout_s`. Whether one was closed.
        A scan that finds none is not repeated for `_RECLAIM_BACKOFF_S`: with every connection busy, a
        flood of new ones must not cost a walk over all of them each."""
        now = self._loop.time()
        if now < self._no_idle_until:
            return False
        for handler in self._connections:
            if isinstance(handler, EdgeHandler) and handler.reusable:
                handler.force_close()  # its connection_lost gives the slot back
                self.reclaimed_connections += 1
                if self.reclaimed_connections == 1 or self.reclaimed_connections % 1000 == 0:
                    log.warning("closing idle keep-alive connections to admit new ones past "
                                "server.max_connections=%d (%d so far)", self.max_connections,
                                self.reclaimed_connections)
                return True
        self._no_idle_until = now + _RECLAIM_BACKOFF_S
        return False


class ProxyRunner(web.AppRunner):
    """An AppRunner whose connections get the `EdgeHandler` protections."""

    def __init__(self, app: web.Application, *, header_timeout_s: float,
                 max_header_bytes: int = 64 * 1024, max_connections: int = 1 << 30,
                 **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._max_header_bytes = max_header_bytes
        self._max_connections = max_connections

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()
        return _EdgeServer(
            base.request_handler, request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation, loop=asyncio.get_running_loop(),
            header_timeout_s=self._header_timeout_s, max_header_bytes=self._max_header_bytes,
            max_connections=self._max_connections, error_headers=self.app.get(EDGE_ERROR_HEADERS),
            **base._kwargs)


async def start_site(app: web.Application, host: str, port: int, *, backlog: int = 2048,
                     header_timeout_s: float = 10.0, keepalive_timeout_s: float = 75.0,
                     max_header_bytes: int = 64 * 1024, max_connections: int = 8192,
                     reuse_port: bool = False) -> ProxyRunner:
    """Start serving `app` on host:port; stop it with `run_until_signalled` (or `runner.cleanup()`).
    `reuse_port`: SO_REUSEPORT, so that the workers of `serve --workers N` share the port (the kernel
    spreads connections over them).

    aiohttp's per-line caps are the head cap for a header line and 16 KiB for the request line (no
    Ollama call has a target that long; nginx allows 8 KiB): a longer line is a 431 from `EdgeHandler`.
    aiohttp's own shutdown wait is short (a last resort): `run_until_signalled` has drained by the time
    it runs."""
    runner = ProxyRunner(app, header_timeout_s=header_timeout_s, max_header_bytes=max_header_bytes,
                         max_connections=max_connections, handler_cancellation=True,
                         access_log=None, keepalive_timeout=keepalive_timeout_s, shutdown_timeout=0.25,
                         max_field_size=max_header_bytes, max_line_size=min(max_header_bytes, 16384),
                         lingering_time=_LINGER_S)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=backlog, reuse_address=True,
                       reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()  # the application started (its background tasks): stop it again
        raise
    return runner


def cannot_bind(host: str, port: int, exc: OSError) -> str:
    """The one line `serve`, `emulate` and `demo` print (then exit 2, as the supervisor of `serve
    --workers` does) when their listen address cannot be bound: taken by another process, not an
    address of this host, or a port the user may not bind. A traceback would bury the reason."""
    return f"cannot bind {host}:{port}: {os.strerror(exc.errno) if exc.errno else exc}"


def bound_port(runner: web.BaseRunner) -> int:
    """The TCP port `runner`'s first site is listening on: the one the system chose when the
    configured port was 0."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    raise RuntimeError("the runner is not listening on a TCP port")


def port_file_problem(path: str | None) -> str | None:
    """Why `write_port_file(path, ...)` would fail, checked before the server binds (None: it would
    not, or no port file was asked for): the port file is written once listening, and a server that
    binds, starts serving and then dies over a missing directory (or a path that is one) leaves its
    caller nothing to go on."""
    if not path:
        return None
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f"{path}: its directory {directory} does not exist"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"{path}: its directory {directory} is not writable"
    if os.path.isdir(path):  # the file is renamed onto the path, which a directory refuses
        return f"{path}: is a directory"
    return None


def write_port_file(path: str, port: int) -> None:
    """Write `port` (decimal, then a newline) to `path` atomically, once the server is listening: a
    reader that sees the file sees the whole number, and a connection to that port is accepted.

    A temporary file beside `path`, then a rename, so that the parent process (a test, a supervisor)
    never reads a half-written file; this is what lets tests start servers on port 0 instead of picking
    a free port and releasing it (a race with every other process on the machine)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="ascii") as handle:
        handle.write(f"{port}\n")
    os.replace(tmp, path)


def raise_nofile_limit() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to its hard limit; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft if soft != resource.RLIM_INFINITY else target
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise RLIMIT_NOFILE from %d to %d: %s", soft, target, exc)
        return soft
    return target


def fit_connections(max_connections: int, nofile: int) -> int:
    """The client-connection cap that fits `nofile` descriptors: each client connection may hold an
    upstream one too, and a reserve stays for everything else. Never below 1."""
    fits = max(1, (nofile - _FD_RESERVE) // 2)
    return min(max_connections, fits)


class GracefulStop:
    """The proxy's stop sequence, shared by ingress (every request in flight), the forwarder (every
    relay in flight) and `run_until_signalled`.

    Each request registers its task (ingress); a relayed stream registers its idle timer (forwarder).
    `expire()` fires, for each request, the relay's timer if it has one (the forwarder then ends the
    stream with one final `shutting_down` record), and otherwise cancels the request's task, marked as
    ending (ingress turns that cancellation into 503 `shutting_down`). Both unwind the normal way, so
    every step's `finally` releases what it holds. (A task rather than an `asyncio.timeout` per request:
    the latter cost 3 µs of every request's CPU for an event that happens once per process.)
    """

    def __init__(self) -> None:
        self.stopping = False
        """SIGTERM received: no new connections; responses say `Connection: close`."""
        self.expired = False
        """The grace period is over: what still runs is being ended."""
        self._requests: dict[str, asyncio.Task[Any]] = {}
        self._relays: dict[str, asyncio.Timeout] = {}
        self._ending: set[str] = set()
        self._idle = asyncio.Event()

    @property
    def in_flight(self) -> int:
        """Requests inside the chain (registered by ingress)."""
        return len(self._requests)

    def enter(self, key: str, task: asyncio.Task[Any]) -> None:
        """Register the request `key` handled by `task` (ended at once if the grace period is over)."""
        self._requests[key] = task
        if self.expired:
            self._ending.add(key)
            task.cancel()

    def ending(self, key: str) -> bool:
        """Whether a cancellation of `key`'s task is the stop sequence's (not the client leaving)."""
        return key in self._ending

    def leave(self, key: str) -> None:
        self._requests.pop(key, None)
        self._ending.discard(key)
        if not self._requests:
            self._idle.set()

    async def drained(self, timeout_s: float) -> bool:
        """Wait until no request is in flight, at most `timeout_s`; whether none is."""
        if not self._requests:
            return True
        self._idle.clear()
        try:
            async with asyncio.timeout(max(0.0, timeout_s)):
                await self._idle.wait()
        except TimeoutError:
            return not self._requests
        return True

    def relay(self, key: str, timer: asyncio.Timeout) -> None:
        """Register the relay of `key` with its (entered) idle timer; fired at once if already expired."""
        if self.expired:
            timer.reschedule(asyncio.get_running_loop().time())
        self._relays[key] = timer

    def relay_done(self, key: str) -> None:
        self._relays.pop(key, None)

    def expire(self) -> None:
        """End everything still in flight (see the class docstring)."""
        self.expired = True
        now = asyncio.get_running_loop().time()
        for key, task in list(self._requests.items()):
            timer = self._relays.get(key)
            if timer is not None:
                with contextlib.suppress(RuntimeError):  # it fired already: that relay is ending
                    timer.reschedule(now)
            else:
                self._ending.add(key)
                task.cancel()


STOP: web.AppKey[GracefulStop] = web.AppKey("sop_stop", GracefulStop)


async def _drain(runner: ProxyRunner, stop: GracefulStop, grace_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    stop.stopping = True
    for site in list(runner.sites):
        await site.stop()  # closes the listening socket: new connections are refused
    server = runner.server
    if server is not None:
        for connection in server.connections:
            # Idle keep-alive connections close now (their clients reconnect elsewhere instead of
            # sending a request no one will read); busy ones after their response. A head still
            # arriving is a request in flight: it is left to complete and is answered (with
            # `Connection: close`), or cut by the head deadline or at the end of the grace period.
            if isinstance(connection, EdgeHandler) and connection.mid_head:
                continue
            if isinstance(connection, EdgeHandler) and connection.idle:
                connection.force_close()
            else:
                connection.close()
    log.info("stopping: no longer accepting connections; %d request(s) in flight get %.1fs to finish",
             stop.in_flight, grace_s)
    # What is ended near the deadline needs a moment to write its final record and unwind, and the
    # cleanup after it (aiohttp's last-resort wait, the pools) a moment more: both come out of the grace
    # period so that the process is gone by the deadline.
    if not await stop.drained(deadline - min(1.5, grace_s * 0.3) - loop.time()):
        log.warning("stopping: ending %d request(s) still in flight (shutting_down)", stop.in_flight)
        stop.expire()
        if not await stop.drained(deadline - min(0.5, grace_s * 0.1) - loop.time()):
            log.warning("stopping: %d request(s) did not end in time; closing their connections",
                        stop.in_flight)


def _hurry(stop: GracefulStop) -> None:
    if not stop.expired:
        log.warning("stopping: second signal, ending %d request(s) in flight now", stop.in_flight)
        stop.expire()


async def run_until_signalled(runner: ProxyRunner, stop: GracefulStop | None = None,
                              grace_s: float = 30.0, on_sighup: Callable[[], None] | None = None,
                              ready: Callable[[], None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM; SIGHUP calls `on_sighup` (the proxy: reload the configuration),
    or is logged and ignored (Python's default for SIGHUP would end the process).

    `ready` is called once every handler is installed: what tells the world the process is up (its
    port file, which tests and the supervisor wait for before they signal it) belongs there. Told
    earlier, a SIGHUP sent at once would meet the SIG_IGN that covers start-up and be lost.

    With `stop`: refuse new connections, give requests in flight until `grace_s` after the signal, end
    what remains (final `shutting_down` record or 503), then clean up; the process can exit by then.
    A second SIGINT or SIGTERM ends what remains at once. Without `stop` (the emulator): aiohttp's own
    graceful cleanup.
    """
    signalled = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, signalled.set)
    if on_sighup is not None:
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
    else:
        loop.add_signal_handler(signal.SIGHUP, log.warning, "SIGHUP ignored: nothing to reload")
    try:
        if ready is not None:
            ready()
        await signalled.wait()
        if stop is not None:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, _hurry, stop)
            await _drain(runner, stop, grace_s)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # not the default (exit) while cleaning up
        await runner.cleanup()
