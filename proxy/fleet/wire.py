"""The forwarder's data path to the replicas: HTTP/1.1 over pooled keep-alive connections, one asyncio
protocol per connection and llhttp (through httptools) to parse what the replica sends.

Why not aiohttp's client here: measured on this machine (`python -m tests.bench.overhead` and the two
floors in docs/ARCHITECTURE.md), an aiohttp server relaying through `ClientSession.request` costs 142 us
of CPU per request, and through this path about 50 us. A relay needs none of what the difference pays for
(cookies, redirects, decompression, URL building, per-request timers and trace signals). Probes, warm-up
loads, the fan-out and plugins keep aiohttp's client (proxy/fleet/client.py): they are few, and use what
it offers.

Contract:
- `WirePool.request()` sends one request and returns a `WireResponse` once the response head arrived
  (1xx heads skipped). It raises `ConnectFailed` (could not connect, or not within `connect_timeout_s`)
  or `UpstreamLost` (the connection closed or broke framing before the head). Callers bound the wait
  for the head themselves (`asyncio.timeout`); cancelling the wait resets the connection. A pooled
  connection the replica had dropped is replaced once, for idempotent requests with a body in hand.
- `WireResponse.readany()` returns the body bytes buffered so far (at least one byte), b"" once the body
  is complete, or raises `UpstreamLost`. Reading is paused while more than `_HIGH_WATER` bytes wait, so a
  slow client holds back the replica instead of the proxy's memory.
- Every response ends with `release()` (body complete: the connection may go back to the pool) or
  `close()` (anything else: the connection is closed, reset if the response was unfinished: the cancel
  signal Ollama understands).
  Both are idempotent, and either frees the pool permit (`forwarding.pool_size`).
- A connection goes back to the pool only after a complete response that allows keep-alive; an idle
  connection is closed after `keepalive_s`, and one the replica closed is never handed out.
- A connect that fails because this process (or the system) is out of file descriptors or socket
  buffers (`exhausted`) is not the replica's failure: the idle pooled connections are closed to give
  descriptors back and the connect is tried once more; if it fails again, `ConnectFailed.exhausted` is
  set, so that callers neither blame the replica nor retry on another (`warn_exhausted` says it in
  the log, at most every `_EXHAUSTED_LOG_S`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import resource
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterable, Callable
from typing import Any, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

__all__ = ["ConnectFailed", "UpstreamLost", "WirePool", "WireResponse", "exhausted", "warn_exhausted"]

log = logging.getLogger("proxy.fleet")

_HIGH_WATER = 256 * 1024
"""Buffered response bytes above which the connection stops reading (until the relay catches up)."""
_MAX_HEAD_BYTES = 64 * 1024
"""A response head larger than this is refused, and so are this many bytes without the parser showing
progress (llhttp itself bounds neither)."""
_MAX_HEADERS = 256
_LINGER_RESET = struct.pack("ii", 1, 0)
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_EXHAUSTED_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_EXHAUSTED_LOG_S = 10.0
"""At most one log line per this many seconds about running out of descriptors (a flood of them would
make the condition worse: each line is a write, and the log may be what the operator needs to read)."""
_exhausted_log = {"at": float("-inf"), "since": 0}


def exhausted(exc: BaseException) -> bool:
    """Whether `exc` (an OSError, aiohttp's connector errors included, or one it was raised from) says
    this process or the system ran out of file descriptors or socket buffers: the proxy's condition,
    not the replica's."""
    current: BaseException | None = exc
    for _ in range(8):
        if current is None:
            return False
        if isinstance(current, OSError) and current.errno in _EXHAUSTED_ERRNOS:
            return True
        if isinstance(current, ConnectFailed) and current.exhausted:
            return True
        current = current.__cause__ or current.__context__
    return False


def warn_exhausted(what: str) -> None:
    """Log that `what` failed for want of file descriptors, at most once per `_EXHAUSTED_LOG_S` (with
    how many more were suppressed meanwhile), with the limit and the descriptors open."""
    now = time.monotonic()
    state = _exhausted_log
    if now - state["at"] < _EXHAUSTED_LOG_S:
        state["since"] += 1
        return
    suppressed, state["at"], state["since"] = state["since"], now, 0
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:  # none left even for that (or no /proc): all of them
        in_use = soft
    log.warning("out of file descriptors (RLIMIT_NOFILE=%s, %s open): %s failed; not counted against "
                "the replica (%d more since the last such line). Lower server.max_connections or "
                "raise the limit", soft, in_use, what, suppressed)


class UpstreamLost(ConnectionError):
    """The replica's connection closed, reset or broke HTTP framing."""


class _Unanswered(UpstreamLost):
    """The replica closed the connection before any byte of the answer (a pooled connection it had
    already dropped looks like this)."""


class ConnectFailed(ConnectionError):
    """No connection to the replica: refused, unreachable, or not within the connect timeout;
    `exhausted`: not for the replica's sake, this process is out of descriptors (see the module doc)."""

    def __init__(self, message: str, *, timed_out: bool = False, exhausted: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out
        self.exhausted = exhausted


class WireResponse:
    """One response from a replica: status, reason, headers, and its body as it arrives."""

    __slots__ = ("_buffered", "_chunks", "_connection", "_done", "_error", "_head_size", "_keep_alive",
                 "_pool", "_raw_headers", "_skip", "_waiter", "head", "headers", "reason", "silent",
                 "status", "upload")

    def __init__(self, pool: WirePool, connection: _Connection, head_only: bool) -> None:
        self._pool = pool
        self._connection: _Connection | None = connection
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDictProxy[str] = _EMPTY_HEADERS
        self._raw_headers: list[tuple[str, str]] = []
        self._head_size = 0
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._done = False
        """The whole body is in `_chunks` (or there is none)."""
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._keep_alive = False
        """The replica allows another request on the connection (set when the message completes)."""
        self._skip = head_only
        """A HEAD request: the response ends with its head, whatever Content-Length says."""
        self.head: asyncio.Future[None] = connection.loop.create_future()
        """Resolved when the head arrived; failed with UpstreamLost when the connection went first."""
        self.upload: asyncio.Task[None] | None = None
        """The task writing a streamed body; it may outlive the head (the replica may answer first)."""
        self.silent = 0
        """Bytes received since the parser last showed progress (a head, body bytes): llhttp
        accumulates a header line (or trailer, or chunk extension) of any length before any
        callback, so this is what bounds one."""

    # parser callbacks (httptools) ---------------------------------------------------------------------
    def on_status(self, status: bytes) -> None:
        # llhttp hands the reason over in fragments when it spans TCP segments.
        if not self.status:
            self.reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > _MAX_HEAD_BYTES or len(self._raw_headers) >= _MAX_HEADERS:
            raise UpstreamLost("the upstream's response head is too large")
        self._raw_headers.append((name.decode("utf-8", "surrogateescape"),
                                  value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        connection = self._connection
        assert connection is not None
        if self._done:
            raise UpstreamLost("the upstream sent more than one response")
        status = connection.parser.get_status_code()
        self.silent = 0
        if 100 <= status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the final head follows.
            self._raw_headers = []
            self._head_size = 0
            self.reason = ""
            return
        self.status = status
        self.headers = CIMultiDictProxy(CIMultiDict(self._raw_headers))
        if self._skip:
            # A HEAD answer ends with its head: nothing more may come on the connection (bytes that
            # do while it is idle close it: data_received), and the next request starts a parser of
            # its own, so the connection is reusable when the head says keep-alive, as Go's and
            # aiohttp's clients reuse it. Not when it announced a body to be ended by the close (no
            # length, not chunked): llhttp then says not keep-alive. (A replica that sends a body
            # after a HEAD head anyway breaks HTTP; the replicas are the operator's, not a client's.)
            self._done = True
            self._keep_alive = connection.parser.should_keep_alive()
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.silent = 0
        if self._skip:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER:
            connection = self._connection
            if connection is not None:
                connection.pause()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.status:  # the end of an interim (1xx) message
            return
        self._done = True
        connection = self._connection
        # Asked here: once the callback returns, llhttp resets its state for the next message.
        self._keep_alive = connection is not None and connection.parser.should_keep_alive()
        self._wake()

    # connection events ---------------------------------------------------------------------------------
    def _lost(self, reason: str, clean: bool = False) -> None:
        """The connection closed (or broke framing) before the message was complete. `clean`: the
        replica closed it in order (a FIN, not a reset, and not the proxy closing it)."""
        if self._done:
            return
        connection = self._connection
        if clean and self.status and connection is not None and _until_close(self.headers):
            self._done = True  # a body delimited by the connection's close ended normally
        else:
            self._error = UpstreamLost(reason)
            if not self.head.done():
                self.head.set_exception(self._error)
                self.head.exception()  # retrieved: nobody may be waiting any more (cancelled)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # the reader's side ---------------------------------------------------------------------------------
    def is_eof(self) -> bool:
        """Whether the whole body was read (nothing buffered, the message complete)."""
        return self._done and not self._chunks

    async def readany(self) -> bytes:
        """Everything buffered (at least one byte, waiting for it), or b"" once the body is complete.
        Raises UpstreamLost when the connection went before the body was complete."""
        chunks = self._chunks
        while not chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            connection = self._connection
            if connection is None:
                raise UpstreamLost("the response was closed")
            self._waiter = waiter = connection.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        connection = self._connection
        if connection is not None and connection.paused:
            connection.resume()  # nothing is buffered any more
        return data

    def release(self) -> None:
        """Done with the response: a complete one returns its connection to the pool, any other closes
        it. Idempotent."""
        connection = self._connection
        if connection is None:
            return
        self._connection = None
        reusable = (self._done and self._keep_alive and self._error is None
                    and (self.upload is None or self.upload.done()))
        self._stop_upload()
        self._pool._give_back(connection, reusable)

    def close(self) -> None:
        """Done with the response, whatever its state: the connection is closed, reset when the
        response was not complete (the replica must stop at once, whatever it still reads or
        sends). Idempotent."""
        connection = self._connection
        if connection is None:
            return
        self._connection = None
        self._stop_upload()
        self._pool._give_back(connection, False, reset=not self._done)

    def _stop_upload(self) -> None:
        upload = self.upload
        if upload is not None and not upload.done():
            upload.cancel()


_EMPTY_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


def _until_close(headers: CIMultiDictProxy[str]) -> bool:
    """Whether a response's body is delimited by the connection's close (no length, not chunked)."""
    return "Content-Length" not in headers and "chunked" not in headers.get(
        "Transfer-Encoding", "").lower()


class _Connection(asyncio.Protocol):
    """One keep-alive connection to a replica; carries one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, key: tuple[str, int, bool]) -> None:
        self.loop = loop
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.open = False
        self.idle_since = 0.0
        self.response: WireResponse | None = None
        self.parser: Any = None
        self.paused = False
        self._drain: asyncio.Future[None] | None = None
        self._writing_paused = False
        self.closed_by_us = False
        self.received = False
        """Any byte arrived on this connection (a pooled connection that got none may be stale)."""

    # asyncio.Protocol ----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its interface.
        self.transport = cast(asyncio.Transport, transport)
        self.open = True

    def data_received(self, data: bytes) -> None:
        self.received = True
        response = self.response
        if response is None:
            # Bytes while no request is out: the replica is confused; the connection cannot be trusted.
            self.close()
            return
        response.silent += len(data)
        try:
            self.parser.feed_data(data)
            if response.silent > _MAX_HEAD_BYTES:
                raise UpstreamLost("a response head, trailer or chunk header is too large")
        except httptools.HttpParserUpgrade:
            self._fail(response, "the upstream switched protocols")
        except UpstreamLost as exc:
            self._fail(response, str(exc))
        except httptools.HttpParserError as exc:
            cause = exc.__context__  # a callback's own refusal (a head over the bound) says why
            self._fail(response, str(cause) if isinstance(cause, UpstreamLost)
                       else f"malformed response from the upstream ({type(exc).__name__})")

    def connection_lost(self, exc: BaseException | None) -> None:
        self.open = False
        response = self.response
        if response is not None:
            response._lost("the upstream closed the connection"
                           + (f" ({type(exc).__name__})" if exc is not None else ""),
                           clean=exc is None and not self.closed_by_us)
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_exception(UpstreamLost("the upstream closed the connection"))
            drain.exception()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    # ours ------------------------------------------------------------------------------------------------
    def _fail(self, response: WireResponse, reason: str) -> None:
        response._lost(reason)
        self.close()

    def start(self, response: WireResponse) -> None:
        self.response = response
        self.received = False
        self.parser = httptools.HttpResponseParser(response)

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and self.open:
            self.paused = False
            self.transport.resume_reading()

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark (streamed uploads)."""
        if not self.open:
            raise UpstreamLost("the upstream closed the connection")
        if self._writing_paused:
            self._drain = self.loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    def close(self, reset: bool = False) -> None:
        """Close now; `reset` (an exchange given up unfinished) or request bytes still unsent: a
        reset. A graceful close would queue a FIN behind bytes the replica may never read, keeping the
        socket, and a replica reading a complete request then a FIN may start the work before it
        notices (closing is Ollama's cancel signal)."""
        self.open = False
        self.closed_by_us = True
        transport = self.transport
        if transport is not None:
            if reset or transport.get_write_buffer_size():
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    # A reset, not a FIN queued behind the unsent bytes: the kernel would otherwise
                    # keep the connection (FIN-WAIT-1) for as long as the replica does not read.
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                transport.abort()
            else:
                transport.close()


class WirePool:
    """Keep-alive connections to the replicas, at most `limit` in use at once (0: no limit)."""

    def __init__(self, *, limit: int, keepalive_s: float, connect_timeout_s: float) -> None:
        self.limit = limit
        self.keepalive_s = keepalive_s
        self.connect_timeout_s = connect_timeout_s
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._permits = asyncio.Semaphore(limit) if limit > 0 else None
        self._sweep: asyncio.TimerHandle | None = None
        self._ssl: ssl.SSLContext | None = None
        self._closed = False
        self.in_use = 0
        """Connections carrying a request now (for tests and /system views)."""
        self._holding: set[_Connection] = set()

    async def request(self, host: str, port: int, tls: bool, method: str, target: str,
                      head: str, body: bytes | AsyncIterable[bytes] | None,
                      on_sent: Callable[[], None] | None = None) -> WireResponse:
        """Send `method target` with the header block `head` (`Name: value\r\n` lines, Host included,
        framing headers excluded: they are added here) and `body`; return the response once its head
        arrived. `body` bytes go with a Content-Length, an async iterable as chunked transfer coding.

        A pooled connection that turns out closed before any byte of the answer (the replica's, or a
        load balancer's, idle timeout) is replaced by a new one once, for idempotent methods with a
        body in hand: aiohttp's rule, since a POST may have reached the replica."""
        if self._closed:
            raise UpstreamLost("the fleet client is closed")
        permits = self._permits
        if permits is not None:
            await permits.acquire()
            if self._closed:  # closed while this request waited for a permit
                permits.release()
                raise UpstreamLost("the fleet client is closed")
        # Invariant: the permit is this call's until a response exists; from then on the response's
        # release()/close() gives it back (_give_back), so every path below returns it exactly once.
        try:
            connection, reused = await self._connection(host, port, tls, pooled=True)
            try:
                return await self._send(connection, method, target, head, body, on_sent)
            except _Unanswered:
                if not (reused and not self._closed and method in _IDEMPOTENT
                        and (body is None or isinstance(body, bytes | bytearray))):
                    raise
            connection, _ = await self._connection(host, port, tls, pooled=False)
            return await self._send(connection, method, target, head, body, on_sent)
        except BaseException:
            if permits is not None:
                permits.release()
            raise

    async def _send(self, connection: _Connection, method: str, target: str, head: str,
                    body: bytes | AsyncIterable[bytes] | None,
                    on_sent: Callable[[], None] | None) -> WireResponse:
        """One request on `connection`, the response once its head arrived; `on_sent` is called once
        its head is written (the replica may be working on it from then on). On any failure the
        connection is closed (the caller still holds the permit)."""
        response = WireResponse(self, connection, method == "HEAD")
        connection.start(response)
        self._holding.add(connection)
        self.in_use += 1
        writer: asyncio.Task[None] | None = None
        try:
            transport = connection.transport
            assert transport is not None
            if body is None or isinstance(body, bytes | bytearray):
                data = body or b""
                framing = f"Content-Length: {len(data)}\r\n" if data or method in (
                    "POST", "PUT", "PATCH") else ""
                transport.write(f"{method} {target} HTTP/1.1\r\n{head}{framing}\r\n".encode(
                    "utf-8", "surrogateescape") + data)
            else:
                transport.write(f"{method} {target} HTTP/1.1\r\n{head}Transfer-Encoding: chunked\r\n"
                                "\r\n".encode("utf-8", "surrogateescape"))
                writer = response.upload = asyncio.ensure_future(self._upload(connection, body))
                writer.add_done_callback(_retrieve)
            if on_sent is not None:
                on_sent()
            try:
                await response.head
            except UpstreamLost:
                if writer is not None and writer.done() and not writer.cancelled():
                    error = writer.exception()
                    if error is not None:  # the client's upload failed first: that is the cause
                        raise error from None
                if not connection.received and not connection.closed_by_us:
                    # Gone before a byte of the answer, and not by our doing: maybe a stale one.
                    raise _Unanswered(str(response._error or "the upstream closed the connection")
                                      ) from None
                raise
            return response
        except BaseException:
            if writer is not None and not writer.done():
                writer.cancel()
            response._connection = None
            self._give_back(connection, False, permit=False, reset=True)
            raise

    async def _upload(self, connection: _Connection, body: AsyncIterable[bytes]) -> None:
        """Write a streamed body in chunked coding. Its iterator's errors (the client's upload failing)
        close the connection, so the response wait fails; the forwarder reports the client's error."""
        transport = connection.transport
        assert transport is not None
        try:
            async for chunk in body:
                if chunk:
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                    await connection.drain()
            transport.write(b"0\r\n\r\n")
        except BaseException:
            connection.close()
            raise

    async def _connection(self, host: str, port: int, tls: bool,
                          pooled: bool) -> tuple[_Connection, bool]:
        """A connection to (host, port), and whether it came from the pool."""
        if self._closed:
            raise UpstreamLost("the fleet client is closed")
        key = (host, port, tls)
        idle = self._idle.get(key) if pooled else None
        if idle:
            now = time.monotonic()
            while idle:
                connection = idle.pop()  # the most recently used: the warmest, least likely closed
                if connection.open and now - connection.idle_since < self.keepalive_s:
                    return connection, True
                connection.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout_s
        shed = False
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    _, protocol = await loop.create_connection(
                        lambda: _Connection(loop, key), host, port,
                        ssl=self._tls_context() if tls else None, server_hostname=host if tls else None)
            except TimeoutError:
                raise ConnectFailed(f"timed out after {self.connect_timeout_s:g}s",
                                    timed_out=True) from None
            except OSError as exc:
                if exc.errno not in _EXHAUSTED_ERRNOS:
                    raise ConnectFailed(exc.strerror or str(exc) or type(exc).__name__) from None
                closed = 0 if shed else self.shed_idle()
                if closed:
                    # Idle connections (to any replica) hold descriptors a request needs now.
                    warn_exhausted(f"a connection to {host}:{port} (closed {closed} idle upstream "
                                   "connections, tried again)")
                    shed = True
                    await asyncio.sleep(0)  # let the closed transports give their descriptors back
                    continue
                raise ConnectFailed(exc.strerror or "out of file descriptors", exhausted=True) from None
            return protocol, False

    def shed_idle(self) -> int:
        """Close every idle pooled connection (descriptors are short); how many there were."""
        count = 0
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
                count += 1
        self._idle.clear()
        return count

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _give_back(self, connection: _Connection, reusable: bool, *, permit: bool = True,
                   reset: bool = False) -> None:
        """A response is done with its connection: pool it (reusable) or close it (`reset`: abort it);
        free the permit (unless `permit` is False: `request` still holds it)."""
        if connection not in self._holding:
            return
        self._holding.discard(connection)
        self.in_use -= 1
        connection.response = None
        connection.parser = None
        connection.resume()
        if reusable and connection.open and not self._closed:
            connection.idle_since = time.monotonic()
            self._idle.setdefault(connection.key, []).append(connection)
            if self._sweep is None:
                self._sweep = asyncio.get_running_loop().call_later(self.keepalive_s, self._expire)
        else:
            connection.close(reset)
        if permit and self._permits is not None:
            self._permits.release()

    def _expire(self) -> None:
        """Close the connections idle for `keepalive_s`; come back while any stay idle."""
        self._sweep = None
        deadline = time.monotonic() - self.keepalive_s
        waiting = False
        for key, idle in list(self._idle.items()):
            keep = [c for c in idle if c.open and c.idle_since > deadline]
            for connection in idle:
                if connection not in keep:
                    connection.close()
            if keep:
                self._idle[key] = keep
                waiting = True
            else:
                del self._idle[key]
        if waiting and not self._closed:
            self._sweep = asyncio.get_running_loop().call_later(self.keepalive_s / 2, self._expire)

    def idle_count(self) -> int:
        """Pooled idle connections (for tests)."""
        return sum(len(idle) for idle in self._idle.values())

    async def close(self) -> None:
        """Close every connection, idle or in use; further requests fail."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
        for connection in list(self._holding):
            connection.close()
        await asyncio.sleep(0)  # let the transports run their connection_lost


def _retrieve(task: asyncio.Task[None]) -> None:
    """An upload's error matters only while the head is awaited (`request` reads it then); after that
    the response shows the replica's side of it. Retrieved here so asyncio does not log it."""
    if not task.cancelled():
        task.exception()
