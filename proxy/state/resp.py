"""A lean Redis client for the state's hot path: commands and Lua scripts pipelined over a few connections.

Why not redis-py's client for these calls: each of its calls takes a connection from a pool (a lock and
a condition), arms a timeout around every read, goes through its retry wrapper and its command
dispatch; measured in the running proxy (issue 16, `serve` with `state.backend: redis`, c=32 unary
requests), ~120 us of CPU per call, two to four calls per request. Here a call is one RESP frame
written to a connection and a future resolved when its answer is parsed (hiredis, the C parser
redis-py itself uses when installed): many calls in flight on one connection, answered in order.
redis-py stays for what is not per request (the grant listener's pub/sub, leases.py).

Semantics kept from the pooled client:
- Bounded calls: the caller bounds each call (failover.FailoverState's timeout); a connect is bounded
  by `connect_timeout_s` on its own.
- A connection that answered nothing for twice `timeout_s` when a call on it is abandoned (timed out
  or cancelled) is closed, as redis-py disconnects a connection whose read timed out: every call still
  waiting on it fails with ConnectionError and the next call opens a new one. A connection that did
  answer lately keeps its calls: one caller giving up (a busy process) does not fail the others.
- Replies as redis-py gives them with decode_responses: str, int, lists; an error reply raises
  redis.exceptions.ResponseError (NoScriptError for NOSCRIPT), so `failover` counts the same failures.

Invariants: answers come in the order requests were written on a connection (RESP, no pub/sub on these
connections), so each connection keeps a FIFO of futures, one per request written, and pops one per
reply; a future whose caller left stays in the FIFO and its reply is dropped. A closed connection fails
every future in its FIFO and is never written to again.

Order of calls about one thing: a call that takes something (a lease, a slot) may still be on its way
when the call that gives it back is sent: in flight, or given up by its caller (timed out, cancelled)
before its answer, when Redis may still run it later. Calls on different connections have no order in
Redis, so the give-back could run first and the take stay. So a call may name an `order` key (a lease
holder, a ticket): while a call with that key that takes (`takes`) is unanswered on an open
connection, the next calls with the key are written to that connection, behind it. (A connection
closed as stuck may still have delivered it: that case is left to the lease's expiry.)
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis.asyncio.connection import (
    RedisSSLContext,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

__all__ = ["RespClient", "RespScript", "url_settings"]

_TLS_OPTIONS = {"ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs",
                "ssl_check_hostname"}
_CERT_REQS = ("none", "optional", "required")
_MAX_BEHIND = 4096
"""Unanswered taking calls remembered for `order` (beyond this, those answered since are forgotten,
then the oldest)."""
_CONNECT_BACKOFF_S = 1.0
"""A slot whose connect failed is not tried again for this long while a connection is open (the calls
use it meanwhile); with none open, every call tries (it has nothing else)."""


def url_settings(url: str) -> dict[str, Any]:
    """What this client takes from a `redis://`, `rediss://` or `unix://` URL (as redis-py reads it: user,
    password, db, socket path, and for TLS `ssl_ca_certs`, `ssl_ca_path`, `ssl_certfile`, `ssl_keyfile`,
    `ssl_cert_reqs` none/optional/required, `ssl_check_hostname`). ValueError names any other option:
    the configuration check refuses it rather than the client ignoring it."""
    params: dict[str, Any] = dict(parse_url(url))
    kind = params.pop("connection_class", None)
    tls = kind is SSLConnection
    allowed = {"host", "port", "db", "username", "password", "path"} | (_TLS_OPTIONS if tls else set())
    unknown = set(params) - allowed
    if kind not in (None, SSLConnection, UnixDomainSocketConnection) or unknown:
        raise ValueError(f"options the state's Redis client does not take: {', '.join(sorted(unknown))}"
                         " (TLS options need rediss://)")
    reqs = params.get("ssl_cert_reqs")
    if reqs is not None and str(reqs).lower() not in _CERT_REQS:
        raise ValueError("ssl_cert_reqs: expected none, optional or required")
    params["tls"] = tls
    return params


def _tls_context(params: dict[str, Any]) -> ssl.SSLContext:
    """The TLS context of `rediss://`, built by redis-py from the same options and defaults as its own
    SSLConnection's (certificates required, host names checked unless `ssl_cert_reqs=none`)."""
    check = params.get("ssl_check_hostname")
    return RedisSSLContext(
        keyfile=params.get("ssl_keyfile"), certfile=params.get("ssl_certfile"),
        cert_reqs=str(params.get("ssl_cert_reqs") or "required").lower(),
        ca_certs=params.get("ssl_ca_certs"), ca_path=params.get("ssl_ca_path"),
        check_hostname=True if check is None else bool(check)).get()


def encode(args: Sequence[object]) -> bytes:
    """One command as a RESP array of bulk strings (numbers as redis-py writes them: repr of a float)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode("utf-8")
        elif isinstance(arg, bool):
            raise TypeError("a boolean is not a Redis argument (send '1' or '0')")
        elif isinstance(arg, int):
            data = b"%d" % arg
        elif isinstance(arg, float):
            data = repr(arg).encode()
        else:
            raise TypeError(f"a {type(arg).__name__} is not a Redis argument")
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


class _Connection(asyncio.Protocol):
    """One connection: requests written in order, replies matched to their futures in that order."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(encoding="utf-8", replyError=ResponseError)
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.closed = False
        self.last_answer = time.monotonic()
        """When a reply last arrived, or the connection opened."""
        self.sent = 0
        self.answered = 0
        """Requests written and replies read: request n (1-based) is answered once answered >= n."""
        self.scripts: set[str] = set()
        """Scripts (SHA1) loaded ahead of their first EVALSHA on this connection (see RespScript)."""

    # -- asyncio.Protocol ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiting = self.waiting
        while True:
            try:
                reply = reader.gets()
            except Exception as exc:  # not RESP, or a string that is not UTF-8: not our Redis
                self.close(RedisConnectionError(f"not a Redis reply ({type(exc).__name__})"))
                return
            if reply is False:
                return
            self.last_answer = time.monotonic()
            if not waiting:  # a reply nobody asked for: whatever is on the port is not Redis
                self.close(RedisConnectionError("a reply no request was waiting for"))
                return
            self.answered += 1
            future = waiting.popleft()
            if future.done():
                continue  # its caller left (timed out or cancelled): the answer is dropped
            if isinstance(reply, ResponseError):
                text = str(reply)
                future.set_exception(NoScriptError(text) if text.startswith("NOSCRIPT") else reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(RedisConnectionError(f"Connection closed by server ({exc})" if exc
                                        else "Connection closed by server."))

    # -- use ----------------------------------------------------------------------------------------
    def send(self, frame: bytes) -> asyncio.Future[Any]:
        """Write one request; its reply's future (resolved in order with the others)."""
        if self.closed or self.transport is None:
            raise RedisConnectionError("the connection to Redis is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self.waiting:
            self.last_answer = time.monotonic()  # the clock of an idle connection starts now
        self.waiting.append(future)
        self.sent += 1
        self.transport.write(frame)
        return future

    def pending(self, number: int) -> bool:
        """Is request `number` (its `sent` count) still unanswered on this open connection?"""
        return not self.closed and self.answered < number

    def stuck(self, timeout_s: float) -> bool:
        """True when calls wait and nothing was answered for `timeout_s`."""
        return bool(self.waiting) and time.monotonic() - self.last_answer >= timeout_s

    def close(self, error: Exception) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)


class RespClient:
    """Calls to one Redis (`redis://`, `rediss://` or `unix://` URL, with user, password and db) over up to
    `connections` pipelined connections; a call goes to the connection with the fewest calls waiting."""

    def __init__(self, url: str, *, timeout_s: float = 0.5, connect_timeout_s: float | None = None,
                 connections: int = 4) -> None:
        params = url_settings(url)
        self._host = str(params.get("host", "localhost"))
        self._port = int(params.get("port", 6379))
        self._path: str | None = params.get("path")
        self._tls = _tls_context(params) if params["tls"] else None
        self._db = int(params.get("db", 0))
        self._username: str | None = params.get("username")
        self._password: str | None = params.get("password")
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s or timeout_s
        self._slots: list[_Connection | None] = [None] * max(1, connections)
        self._opening: list[asyncio.Task[_Connection] | None] = [None] * len(self._slots)
        self._failed_at = [0.0] * len(self._slots)
        """When each slot's last connect failed (its backoff)."""
        self._behind: dict[str, tuple[_Connection, int]] = {}
        """`order` key -> the connection and number of the last call with that key that takes, until
        its answer (see the module docstring)."""
        self._closed = False

    def register_script(self, text: str) -> RespScript:
        """A Lua script run by EVALSHA (EVAL when Redis does not have it yet)."""
        return RespScript(self, text)

    async def execute(self, *args: object, order: str | None = None, takes: bool = False,
                      script: RespScript | None = None) -> Any:
        """One command's reply (see the module docstring for its types and errors). `order`: runs in
        Redis after an unanswered call with the same key that `takes` (see the module docstring).
        `script`: the script an EVALSHA runs, loaded first if this connection has not loaded it."""
        frame = encode(args)
        connection = self._after(order) if order is not None else None
        if connection is None:
            connection = await self._connection()
        if script is not None and script.sha not in connection.scripts:
            # Written right before the EVALSHA, on its connection: Redis has the script when the
            # EVALSHA runs. (Without it, NOSCRIPT and then EVAL: a second round trip, during which a
            # call sent later, such as a lease given back, could run before this one's take.)
            connection.scripts.add(script.sha)
            connection.send(script.load).add_done_callback(_ignore)
        future = connection.send(frame)
        number = connection.sent
        if order is not None and takes:
            self._remember(order, connection, number)
        try:
            result = await future
        except asyncio.CancelledError:
            # The caller left before the answer. A connection that answered nothing for twice the
            # timeout is closed (Redis frozen, or the peer gone without a word); one that answered
            # recently keeps its other calls: this process was busy, Redis was not. A taking call
            # stays remembered (`order`): Redis may still run it.
            if connection.stuck(2 * self.timeout_s):
                connection.close(RedisConnectionError("Redis answered nothing in time"))
            raise
        except BaseException:
            self._forget(order, connection, number)
            raise
        self._forget(order, connection, number)
        return result

    def _after(self, order: str) -> _Connection | None:
        """The connection of an unanswered taking call with key `order`, if any."""
        entry = self._behind.get(order)
        if entry is None:
            return None
        if entry[0].pending(entry[1]):
            return entry[0]
        del self._behind[order]
        return None

    def _forget(self, order: str | None, connection: _Connection, number: int) -> None:
        """The call `number` on `connection` was answered: calls with its key need not follow it."""
        if order is not None and self._behind.get(order) == (connection, number):
            del self._behind[order]

    def _remember(self, order: str, connection: _Connection, number: int) -> None:
        behind = self._behind
        behind[order] = (connection, number)
        if len(behind) > _MAX_BEHIND:
            for key, (known, at) in list(behind.items()):
                if not known.pending(at):
                    del behind[key]
            # Down to three quarters, so that a backlog of unanswered calls is not scanned again at
            # every call (the oldest lose their order: the case is left to the leases' expiry).
            while len(behind) > _MAX_BEHIND * 3 // 4:
                del behind[next(iter(behind))]

    async def close(self) -> None:
        """Close every connection (their waiting calls fail). A connect under way is not cancelled (its
        waiters would see a cancellation that is not theirs): it closes what it opens, bounded by
        connect_timeout_s."""
        self._closed = True
        for index, connection in enumerate(self._slots):
            if connection is not None:
                connection.close(RedisConnectionError("the client is closed"))
                self._slots[index] = None

    # -- connections ----------------------------------------------------------------------------------
    async def _connection(self) -> _Connection:
        if self._closed:
            raise RedisConnectionError("the client is closed")
        best: _Connection | None = None
        free = ready = -1
        now = time.monotonic()
        for index, connection in enumerate(self._slots):
            if connection is None or connection.closed:
                if free < 0:
                    free = index
                if ready < 0 and now - self._failed_at[index] >= _CONNECT_BACKOFF_S:
                    ready = index
                continue
            if best is None or len(connection.waiting) < len(best.waiting):
                best = connection
        if best is not None:
            if not best.waiting or ready < 0:
                return best
            free = ready  # another connection, but not on a slot whose connect just failed
        # Invariant: free >= 0 here (no usable connection means every slot is free).
        task = self._opening[free]
        if task is None or task.done():
            task = self._opening[free] = asyncio.ensure_future(self._open(free))
            task.add_done_callback(_retrieve)
        # Every open connection has calls waiting (one may be stalled): this call waits for a new one,
        # and takes the best of the open ones if the connect fails (Redis at maxclients, a refused
        # AUTH): a failed connect must not fail calls a working connection can carry.
        try:
            return await asyncio.shield(task)  # shielded: the connect serves the calls after this one
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this call was cancelled (its caller's timeout)
            error: Exception = RedisConnectionError("the connect was abandoned")
        except Exception as exc:
            error = exc
        if best is not None and not best.closed:
            return best
        raise error

    async def _open(self, index: int) -> _Connection:
        """Connect slot `index` (AUTH, SELECT and a PING answered), bounded by connect_timeout_s; a
        failure starts the slot's backoff."""
        loop = asyncio.get_running_loop()
        connection: _Connection | None = None
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if self._path is not None:
                    _, connection = await loop.create_unix_connection(_Connection, self._path)
                else:
                    _, connection = await loop.create_connection(
                        _Connection, self._host, self._port, ssl=self._tls)
                if self._password is not None:
                    credentials = ([self._username] if self._username else []) + [self._password]
                    await connection.send(encode(["AUTH", *credentials]))
                if self._db:
                    await connection.send(encode(["SELECT", self._db]))
                # A Redis at maxclients (or loading, or not Redis) accepts the connection and
                # answers its first command with an error: found here, it is a failed connect.
                if await connection.send(encode(["PING"])) != "PONG":
                    raise RedisConnectionError("the server did not answer PING with PONG")
            if self._closed:
                raise RedisConnectionError("the client is closed")
        except BaseException:
            if connection is not None:
                connection.close(RedisConnectionError("the connection could not be set up"))
            self._failed_at[index] = time.monotonic()
            raise
        self._slots[index] = connection
        return connection


def _ignore(future: asyncio.Future[Any]) -> None:
    """A reply nobody reads (a script loaded ahead: its EVALSHA says if that failed)."""
    if not future.cancelled():
        future.exception()


def _retrieve(task: asyncio.Task[_Connection]) -> None:
    """A connect nobody awaited (opened ahead for later calls) fails silently: the next call retries."""
    if not task.cancelled():
        task.exception()


class RespScript:
    """`await script(keys=[...], args=[...])`: the script's reply (as redis-py's Script call)."""

    def __init__(self, client: RespClient, text: str) -> None:
        self.client = client
        self.text = text
        self.sha = hashlib.sha1(text.encode("utf-8")).hexdigest()
        self.load = encode(["SCRIPT", "LOAD", text])

    async def __call__(self, keys: Sequence[object] = (), args: Sequence[object] = (),
                       order: str | None = None, takes: bool = False) -> Any:
        """`order`, `takes`: as for RespClient.execute."""
        try:
            return await self.client.execute("EVALSHA", self.sha, len(keys), *keys, *args,
                                             order=order, takes=takes, script=self)
        except NoScriptError:
            # Loaded on this connection, but not in this Redis any more (SCRIPT FLUSH): EVAL runs it
            # and caches it for the next EVALSHA.
            return await self.client.execute("EVAL", self.text, len(keys), *keys, *args, order=order,
                                             takes=takes)
