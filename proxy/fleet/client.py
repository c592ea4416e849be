"""The one HTTP client of the proxy core: every call to a replica goes through `FleetClient`.

It owns the connection pools and their lifetime (an aiohttp cleanup context), the `Host` header a replica
accepts (Ollama's loopback guard refuses foreign hosts, reference §3.2), the connect timeout, and the
mapping of client exceptions to the proxy's errors (`UpstreamConnectFailure`,
`UpstreamResetBeforeResponseStarted`, `UpstreamResponseTimeout`). Its users: the forwarder's relay, the
fan-out, health probes, warm-up loads and the tokenizer's `/api/show` fetch.

Four pools, made in one place: the relay's (proxy/fleet/wire.py: forwarded client requests,
`forwarding.pool_size`, bytes relayed as sent), the data session (aiohttp: the fan-out's listings and the
proxy's own fetches, at most `DATA_POOL_PER_REPLICA` connections per replica and `DATA_POOL_LIMIT` in
all, no automatic decompression), the management session (aiohttp: model management fanned out,
`pool_size`) and the control session (aiohttp: probes and warm-up loads, unlimited). A probe must
never wait behind `pool_size` busy client streams: a saturated fleet would look dead and be ejected
exactly when it is busiest.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..errors import (
    DeadlinePassed,
    InvalidRequest,
    OutOfDescriptors,
    ProxyError,
    UpstreamConnectFailure,
    UpstreamResetBeforeResponseStarted,
    UpstreamResponseTimeout,
)
from ..schema import ForwardingConfig
from ..upstreams import Upstream, UpstreamSet
from .wire import ConnectFailed, WirePool, WireResponse, exhausted, warn_exhausted

__all__ = ["DATA_POOL_LIMIT", "DATA_POOL_PER_REPLICA", "FleetClient", "ProbeFailed"]

DATA_POOL_PER_REPLICA = 8
DATA_POOL_LIMIT = 32
"""Connections the data pool (listings, the proxy's own fetches) holds at most: DATA_POOL_PER_REPLICA
to one replica, DATA_POOL_LIMIT in all (both in use or idle: aiohttp reuses an idle connection before
it opens another, so open ones never exceed the most in use at once). Unbounded, a burst of listings
(one connection per replica each) ran the process out of descriptors, and new clients were then reset
unanswered; the total fits in the descriptors serving keeps aside (serving._FD_RESERVE) whatever the
fleet's size. Per replica too: a replica that hangs holds only its own share, and the others' answers
do not wait behind it. These calls are short: past a bound they wait for a connection, within their
own timeout."""

class ProbeFailed(Exception):
    """A probe got an answer, but not a healthy one."""


class FleetClient:
    """Connections to the replicas, for as long as the application runs."""

    def __init__(self, upstreams: UpstreamSet, config: ForwardingConfig) -> None:
        self.upstreams = upstreams
        self.config = config
        self._data: aiohttp.ClientSession | None = None
        self._manage: aiohttp.ClientSession | None = None
        self._control: aiohttp.ClientSession | None = None
        self._wire: WirePool | None = None

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: the pools live exactly as long as the application."""
        del app
        timeout = aiohttp.ClientTimeout(total=None, connect=None,
                                        sock_connect=self.config.connect_timeout_s, sock_read=None)
        self._data = self._session(
            connector=aiohttp.TCPConnector(limit=min(self.config.pool_size or DATA_POOL_LIMIT,
                                                     DATA_POOL_LIMIT),
                                           limit_per_host=DATA_POOL_PER_REPLICA,
                                           keepalive_timeout=self.config.keepalive_s,
                                           enable_cleanup_closed=True),
            auto_decompress=False, timeout=timeout)
        # Model management (pull, push, create, copy, delete) apart: a streamed pull holds its
        # connection for minutes, and in the data pool a few of them made every listing wait for one.
        # Only admins (or tenants allowed to manage) send these.
        self._manage = self._session(
            connector=aiohttp.TCPConnector(limit=self.config.pool_size,
                                           keepalive_timeout=self.config.keepalive_s,
                                           enable_cleanup_closed=True),
            auto_decompress=False, timeout=timeout)
        self._control = self._session(connector=aiohttp.TCPConnector(limit=0))
        self._wire = WirePool(limit=self.config.pool_size, keepalive_s=self.config.keepalive_s,
                              connect_timeout_s=self.config.connect_timeout_s)
        try:
            yield
        finally:
            await self._wire.close()
            await self._data.close()
            await self._manage.close()
            await self._control.close()
            self._data = self._manage = self._control = self._wire = None

    @staticmethod
    def _session(**kwargs: Any) -> aiohttp.ClientSession:
        # The only ClientSession the proxy core creates. No cookies: replicas must not see one client's.
        return aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), **kwargs)

    @property
    def running(self) -> bool:
        """Whether the pools are open (inside the application's lifetime)."""
        return self._data is not None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The data pool. Only inside the application's lifetime."""
        session = self._data
        assert session is not None, "fleet client used outside the application lifecycle"
        return session

    @property
    def control_session(self) -> aiohttp.ClientSession | None:
        """The control pool (probes, warm-up, plugins' sub-requests to this proxy): unlimited, so these
        never wait behind client streams. None outside the application's lifetime."""
        return self._control

    def request(self, upstream: Upstream, method: str, path_qs: str, *,
                headers: dict[str, str] | None = None, **kwargs: Any) -> Any:
        """A model-management call on `upstream` (management pool) with its `Host` header: an async
        context manager for the fan-out's calls, which read the answer themselves and map failures to
        their summaries."""
        session = self._manage
        assert session is not None, "fleet client used outside the application lifecycle"
        return session.request(method, upstream.target(path_qs),
                               headers={**(headers or {}), "Host": upstream.host_header}, **kwargs)

    @property
    def wire(self) -> WirePool:
        """The relay's pool (proxy/fleet/wire.py). Only inside the application's lifetime."""
        wire = self._wire
        assert wire is not None, "fleet client used outside the application lifecycle"
        return wire

    async def open(self, upstream: Upstream, method: str, path_qs: str, *,
                   headers: Sequence[tuple[str, str]] | Mapping[str, str], data: Any,
                   first_byte_s: float,
                   remaining_s: float, deadline_label: object = None,
                   upload_error: Sequence[ProxyError] = (),
                   on_sent: Callable[[], None] | None = None) -> WireResponse:
        """Send a client's request to `upstream` and return the response once its head arrived.

        `headers` are sent as given, in order (the caller's header policy sets `Host`); only the
        framing (Content-Length or chunked coding, from `data`) is added. Waits at most `first_byte_s`,
        or `remaining_s` of the request's deadline when that is shorter. Failures come out as
        ProxyErrors: an upload error the body iterator put in `upload_error` (the client's fault, not
        the replica's), else a response timeout, a connect failure, or a reset before the response
        started. `on_sent` is called once the request's head is written to the replica."""
        lines = list(headers.items()) if isinstance(headers, Mapping) else headers
        url = upstream.url
        credentials = aiohttp.BasicAuth.from_url(url) if url.user is not None else None
        if credentials is not None:
            # Credentials in the replica's URL (`http://user:pass@host`) answer for every request to
            # it, as they do for the probes: they replace whatever Authorization the client sent.
            lines = [(name, value) for name, value in lines if name.lower() != "authorization"]
            lines.append(("Authorization", credentials.encode()))
        head = "".join([f"{name}: {value}\r\n" for name, value in lines])
        if head.count("\n") != len(lines) or head.count("\r") != len(lines):
            # A CR or LF inside a name or value would split the head: never sent.
            raise InvalidRequest("a request header carries a line break")
        base = url.raw_path.rstrip("/")
        try:
            try:
                async with asyncio.timeout(min(first_byte_s, remaining_s)):
                    return await self.wire.request(
                        url.raw_host or "localhost", url.port or 80, url.scheme == "https", method,
                        base + path_qs if base else path_qs, head, data, on_sent)
            except (TimeoutError, ConnectionError, HttpProcessingError):
                if upload_error:  # the client's upload failed, not the replica
                    raise upload_error[0] from None
                raise
        except TimeoutError:
            if remaining_s < first_byte_s:
                raise DeadlinePassed(
                    f"the request's deadline of {deadline_label}s passed "
                    "before the upstream answered") from None
            raise UpstreamResponseTimeout(
                f"upstream {upstream.name} sent no response within {first_byte_s:g}s") from None
        except ConnectFailed as exc:
            if exc.exhausted:
                warn_exhausted(f"a connection to upstream {upstream.name}")
                raise OutOfDescriptors("the proxy is out of connections; retry shortly",
                                       retry_after_s=1) from None
            if exc.timed_out:
                raise UpstreamConnectFailure(
                    f"timed out connecting to upstream {upstream.name}") from None
            raise UpstreamConnectFailure(f"cannot connect to upstream {upstream.name}: {exc}") from None
        except ConnectionError as exc:  # UpstreamLost, or the socket's own error
            raise UpstreamResetBeforeResponseStarted(
                f"upstream {upstream.name} closed the connection before responding "
                f"({type(exc).__name__})") from None

    async def fetch_json(self, path: str, body: dict[str, Any] | None = None, *,
                         upstream: Upstream | None = None, timeout_s: float = 60.0
                         ) -> dict[str, Any] | None:
        """POST `body` (GET without one) to `path` on `upstream` (default: a replica that holds the body's
        model, else the next serving one) and return its JSON object, or None on any failure. For the
        proxy's own needs (a model's vocabulary, the merged fleet listings), not for client requests."""
        session = self._data
        if session is None:
            return None
        if upstream is None:
            model = body.get("model") if body is not None else None
            holders = self.upstreams.eligible(model if isinstance(model, str) else None)
            upstream = holders[0] if holders else self.upstreams.next_serving()
        try:
            async with session.request("GET" if body is None else "POST", upstream.target(path),
                                       json=body, headers={"Host": upstream.host_header},
                                       timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                if response.status != 200:
                    return None
                value = await response.json(loads=orjson.loads, content_type=None)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            if exhausted(exc):
                warn_exhausted(f"a call to upstream {upstream.name}")
            return None
        return value if isinstance(value, dict) else None

    async def probe(self, upstream: Upstream, path: str, timeout_s: float) -> Any:
        """GET `path` on `upstream` (control pool) and return its JSON. Raises ProbeFailed for a non-200
        answer; aiohttp.ClientError, TimeoutError, OSError or orjson.JSONDecodeError when there was none
        or it was not JSON."""
        session = self._control
        assert session is not None, "fleet client used outside the application lifecycle"
        async with session.get(upstream.target(path), headers={"Host": upstream.host_header},
                               timeout=aiohttp.ClientTimeout(total=timeout_s)) as reply:
            if reply.status != 200:
                raise ProbeFailed(f"{path} answered {reply.status}")
            return orjson.loads(await reply.read())

    async def post_status(self, upstream: Upstream, path: str, body: dict[str, Any],
                          timeout_s: float) -> int:
        """POST `body` to `path` on `upstream` (control pool), read the whole answer and return its
        status (warm-up loads). Raises aiohttp.ClientError, TimeoutError or OSError when none came."""
        session = self._control
        if session is None:
            raise aiohttp.ClientConnectionError("fleet client is closed")
        async with session.post(upstream.target(path), data=orjson.dumps(body),
                                headers={"Host": upstream.host_header},
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as reply:
            await reply.read()
            return reply.status
