"""The terminal handler: one upstream call per request, relayed byte for byte.

Header policy: hop-by-hop headers (and those named in `Connection`) are dropped both ways; `Host` is the
replica's own address (Ollama's loopback guard refuses foreign hosts, reference §3.2); `X-Forwarded-For`
and `-Proto` are set by the proxy (the client's X-Forwarded-For lines continued), `X-Forwarded-Host` is
added when the client sent none (one set by a load balancer in front is kept); `traceparent` is the GenAI
CLIENT span's; `Expect` is answered by the proxy and not passed on. Nothing else is added
(proxy/fleet/wire.py adds only the body's framing), so the replica sees what the client sent.

Relay: bytes are written as they arrive (`readany`), never decoded, re-encoded or compressed; the response
keeps the upstream's framing (Content-Length when it sent one, chunked otherwise; for an HTTP/1.0 client,
which knows no chunked coding, delimited by closing the connection). The response headers
go out with the first body byte, not before: until then nothing has reached the client, so a replica that
dies or stalls in between is an error the balancer can still retry elsewhere (or a real 502/504).
Timeouts are by phase: connect, first byte, idle gap between the replica's chunks (not the time a slow
client takes to read one: that only the request's deadline bounds); there is no total timeout. A client
that goes away cancels the handler, and the `finally` below closes the upstream connection at once:
Ollama's only cancel signal. A streamed upload (blob) that stops arriving for `server.body_timeout_s` is
a 408. When the proxy stops (`serving.GracefulStop`), a stream still running at the end of the grace
period ends with one final `shutting_down` record.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .access import INTERNAL_HEADER
from .context import CONTEXT, RequestContext
from .errors import (
    DeadlinePassed,
    MalformedBody,
    ProxyError,
    RequestTimeout,
    ShuttingDown,
    UpstreamBusy,
    UpstreamConnectFailure,
    UpstreamResetBeforeResponseStarted,
    UpstreamResponseTimeout,
)
from .fleet.client import FleetClient
from .fleet.wire import UpstreamLost, WireResponse
from .ollama import UsageScanner
from .rendering import retry_headers, stream_error_record, told_wait_s
from .schema import ForwardingConfig
from .serving import GracefulStop
from .telemetry import semconv
from .telemetry.setup import Telemetry
from .upstreams import Upstream, UpstreamSet

__all__ = ["HOP_BY_HOP", "Forwarder"]

log = logging.getLogger("proxy.forwarding")

HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Connection", "TE",
    "Trailer", "Transfer-Encoding", "Upgrade"))
"""Lower-case names: compare `name.lower()` (a header keeps the spelling its sender chose, and aiohttp's
istr spellings do not make a set lookup case-insensitive)."""
_DROP_REQUEST = HOP_BY_HOP | {h.lower() for h in (
    "Host", "Content-Length", "traceparent", "tracestate", "X-Ollama-Replica", INTERNAL_HEADER,
    # The proxy answered the client's 100-continue itself and sends the body at once.
    "Expect",
    # Set by the proxy (the client's X-Forwarded-For continues in the proxy's).
    "X-Forwarded-For", "X-Forwarded-Proto")}
DECODED_ENCODINGS = frozenset({"gzip", "deflate", "br", "zstd"})
"""Request Content-Encodings aiohttp's server decodes before the proxy reads the body: the replica gets
the decoded body, so the header is not passed on (any other encoding reaches it as it came)."""
_DROP_RESPONSE = HOP_BY_HOP | {"content-length"}
_PROPAGATOR = TraceContextTextMapPropagator()
_NO_BODY_STATUSES = frozenset({204, 304})
_RETRY_AFTER_STATUSES = frozenset({429, 503})
_GENERATION = frozenset({"chat", "text_completion"})
"""Route operations whose streams end with a final record (`UsageScanner.ended_whole`)."""
_MAX_HELD_BYTES = 1 << 20
"""The most of an unfinished NDJSON/SSE record the relay holds back (past it, bytes go out as they come)."""
_LAST_WRITE_WAIT_S = 1.0
"""How long a stream's final error record may wait for a client that is not reading (a client that reads
takes it at once); past it the connection is closed, the record still queued for it."""
_CLOSE_GRACE_S = 5.0
"""How long a connection closed mid-stream (`Forwarder._fail_mid_stream`) may wait for its client to take
what is still queued for it; past it the connection is dropped (a no-op when it is already gone)."""
_DEFAULT_RETRY_AFTER_S = 5
"""Retry-After for a relayed 429/503 when the upstream sent none and no queue measured a drain (a cloud
model's usage limit or overload: the proxy cannot see ollama.com's capacity)."""


def _connection_tokens(headers: Any) -> set[str]:
    return {token.strip().lower() for value in headers.getall("Connection", ())
            for token in value.split(",") if token.strip()}


class _RelayResponse(web.StreamResponse):
    """A relayed response whose head leaves with its first body chunk, in one write (one syscall
    instead of two for a unary answer). The relay prepares the response only once the upstream's
    first chunk is in hand and writes it at once, so holding the head back delays nothing.
    (`_send_headers_immediately` is aiohttp's own switch, False for web.Response; were it to go away,
    the head would simply be sent on its own again.)"""

    _send_headers_immediately = False


def _records_end(data: bytearray, sse: bool, start: int) -> int:
    """Where the last complete record of `data` ends (0: none does), searching from `start`: after a
    newline for NDJSON, after a blank line (LF or CRLF) for SSE."""
    if not sse:
        return data.rfind(b"\n", start) + 1
    end = data.rfind(b"\n\n", start)
    crlf = data.rfind(b"\r\n\r\n", start)
    return max(end + 2 if end >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def _reason(phrase: str) -> str | None:
    """The replica's reason phrase, relayed when it is printable ASCII (HTTP allows more, aiohttp
    refuses control characters and the head would fail after the replica did the work); else None:
    the standard phrase of the status."""
    return phrase if phrase.isascii() and phrase.isprintable() else None


class Forwarder:
    """Relays requests to the replica the chain chose, over the fleet client's connections."""

    def __init__(self, upstreams: UpstreamSet, config: ForwardingConfig, telemetry: Telemetry,
                 fleet: FleetClient, *, body_timeout_s: float = 60.0,
                 stop: GracefulStop | None = None) -> None:
        self.upstreams = upstreams
        self.config = config
        self.telemetry = telemetry
        self.fleet = fleet
        self.body_timeout_s = body_timeout_s
        self.stop = stop

    # request side ------------------------------------------------------------------------------------
    def _request_headers(self, request: web.Request, upstream: Upstream, span: Span,
                         ctx: RequestContext) -> list[tuple[str, str]]:
        """The header lines for the replica, in the client's order, then the proxy's own."""
        client = request.headers
        named = _connection_tokens(client) if "Connection" in client else set()
        if ctx.identity is not None:
            for header in ctx.identity.key_headers:
                named.add(header.lower())  # the proxy's API keys stay with the proxy
        headers: list[tuple[str, str]] = []
        for key, value in client.items():
            lower = key.lower()
            if lower not in _DROP_REQUEST and lower not in named and not (
                    lower == "content-encoding" and value.lower() in DECODED_ENCODINGS):
                headers.append((key, value))
        headers.append(("Host", upstream.host_header))
        peer = request.remote or ""
        # Every X-Forwarded-For line the client sent, in order, then the peer (RFC 7239's chain).
        prior = ", ".join(client.getall("X-Forwarded-For", ()))
        headers.append(("X-Forwarded-For", f"{prior}, {peer}" if prior else peer))
        headers.append(("X-Forwarded-Proto", request.scheme))
        host = client.get("Host")
        if host is not None and "X-Forwarded-Host" not in client:
            headers.append(("X-Forwarded-Host", host))
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        headers.extend(carrier.items())
        return headers

    def _request_data(self, request: web.Request, ctx: RequestContext,
                      body_error: list[ProxyError]) -> Any:
        if ctx.route.streams_body_upload:
            return self._streamed_body(request, body_error)
        return ctx.body

    async def _streamed_body(self, request: web.Request,
                             body_error: list[ProxyError]) -> AsyncIterator[bytes]:
        """The client's body as it arrives. When nothing came for `body_timeout_s`, or its framing
        broke, the error is put in `body_error` and the upload stops (the upstream call then fails and
        `_exchange` reports the client's error, not the replica's)."""
        content = request.content
        while True:
            try:
                async with asyncio.timeout(self.body_timeout_s):
                    chunk = await content.read(1 << 16)
            except TimeoutError:
                body_error.append(RequestTimeout(
                    f"the request body stopped arriving for {self.body_timeout_s:g}s"))
                raise
            except HttpProcessingError:
                body_error.append(MalformedBody("malformed request body (chunked framing)"))
                raise
            except RequestPayloadError:
                body_error.append(MalformedBody(MalformedBody.UNDECODABLE))
                raise
            if not chunk:
                return
            yield chunk

    def _start_client_span(self, ctx: RequestContext, request: web.Request,
                           upstream: Upstream) -> Span:
        operation = ctx.route.operation
        model = ctx.model
        attributes: dict[str, Any] = {
            semconv.ATTR_SERVER_ADDRESS: upstream.url.host or "",
            semconv.ATTR_SERVER_PORT: upstream.url.port or 0,
            self.telemetry.names.upstream_name: upstream.name,
            semconv.ATTR_HTTP_METHOD: request.method,
        }
        if operation is not None:
            # The span name is what tracing backends index: the bounded label, not the client's text.
            name = f"{operation} {self.upstreams.label(model)}" if model else operation
            attributes[semconv.ATTR_GEN_AI_OPERATION] = operation
            attributes[semconv.ATTR_GEN_AI_PROVIDER] = semconv.PROVIDER_OLLAMA
            if model:
                attributes[semconv.ATTR_GEN_AI_REQUEST_MODEL] = semconv.request_model(model)
        else:
            name = f"{request.method} upstream"
        return self.telemetry.tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)

    # the handler -------------------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Forward `request` to the next replica and relay its response."""
        ctx = request[CONTEXT]
        upstream = ctx.routing.upstream or self.upstreams.next_serving()
        exchange = ctx.exchange
        exchange.upstream_name = upstream.name
        exchange.sent = False  # this attempt's (the balancer may retry after a failed one)
        span = self._start_client_span(ctx, request, upstream)
        started = time.monotonic()
        # How this attempt failed before it could set `ctx.outcome` (an error raised before the first
        # byte, the client leaving): the CLIENT span and the GenAI duration record it as an error.
        failure: str | None = None
        try:
            return await self._exchange(request, ctx, upstream, span, started)
        except (asyncio.CancelledError, DeadlinePassed) as exc:
            if isinstance(exc, DeadlinePassed):
                failure = exc.code
            else:
                stopping = self.stop is not None and self.stop.ending(ctx.request_id)
                failure = ShuttingDown.code if stopping else "client_disconnect"
            # The client left, or its request's deadline passed (not the stop sequence's doing, nor a
            # replica too slow for its first-byte timeout). Sent and unanswered: the replica worked
            # for it, and quotas and the fair queue charge the prompt.
            if (exchange.sent and exchange.first_byte_at is None
                    and not (isinstance(exc, asyncio.CancelledError) and self.stop is not None
                             and self.stop.ending(ctx.request_id))):
                exchange.abandoned = True
            raise
        except (UpstreamConnectFailure, UpstreamResetBeforeResponseStarted, UpstreamResponseTimeout) as exc:
            failure = exc.code
            # A replica that failed before answering (the balancer may retry elsewhere; a deadline
            # that passed is the request's, caught above): counted per replica and error type, as the
            # mid-stream failures are, where operators look for the 502/504s.
            self._count_upstream_error(upstream.name, exc.code)
            raise
        except ProxyError as exc:
            failure = exc.code
            raise
        finally:
            self._finish(ctx, span, started, failure)

    async def _exchange(self, request: web.Request, ctx: RequestContext, upstream: Upstream,
                        span: Span, started: float) -> web.StreamResponse:
        headers = self._request_headers(request, upstream, span, ctx)
        body_error: list[ProxyError] = []
        upstream_response = await self.fleet.open(
            upstream, request.method, request.raw_path, headers=headers,
            data=self._request_data(request, ctx, body_error),
            first_byte_s=self.config.first_byte_timeout_s, remaining_s=self._remaining(ctx),
            deadline_label=ctx.service_limits.get("deadline_s"), upload_error=body_error,
            on_sent=ctx.exchange.mark_sent)
        if upstream_response.status in ctx.routing.retry_statuses:
            upstream_response.close()
            raise UpstreamBusy(f"upstream {upstream.name} answered {upstream_response.status}",
                               retry_after_s=1.0)
        try:
            return await self._relay(request, ctx, upstream, upstream_response, span, started)
        finally:
            # Not fully read (client gone, timeout, error): closing drops the connection, which is the
            # cancel signal Ollama understands. After a complete read, release returns it to the pool.
            if upstream_response.is_eof():
                upstream_response.release()
            else:
                upstream_response.close()

    async def _relay(self, request: web.Request, ctx: RequestContext, upstream: Upstream,
                     upstream_response: WireResponse, span: Span,
                     started: float) -> web.StreamResponse:
        headers: CIMultiDict[str] = CIMultiDict()
        named = _connection_tokens(upstream_response.headers)
        for key, value in upstream_response.headers.items():
            lower = key.lower()
            if lower in _DROP_RESPONSE or lower in named:
                continue
            headers.add(key, value)
        if upstream_response.status in _RETRY_AFTER_STATUSES:
            # Every 429 and 503 the proxy sends says when to come back, in its own bounds (1-60 s,
            # `x-should-retry: false` past them): Ollama's "server busy" and ollama.com's usage-limit
            # 429 / overloaded 503 (relayed for cloud models) carry none, and a told wait of 0 or an
            # hour would turn the clients' retries into a storm or a hang.
            told = told_wait_s(headers)
            slot = ctx.admission.slot
            # At least 1 s, in both headers: clients read retry-after-ms first, and a replica's 0 (or
            # a date already past) would have them retry at once.
            wait_s = max(1.0, told) if told is not None else \
                slot.retry_after_s() if slot is not None else float(_DEFAULT_RETRY_AFTER_S)
            for name in ("Retry-After", "retry-after-ms"):
                headers.popall(name, None)
            headers.update(retry_headers(wait_s))
        response = _RelayResponse(status=upstream_response.status,
                                  reason=_reason(upstream_response.reason), headers=headers)
        length = upstream_response.headers.get("Content-Length")
        if length is not None:
            response.content_length = int(length)
        elif (request.method != "HEAD" and upstream_response.status not in _NO_BODY_STATUSES
              and upstream_response.status >= 200):
            if request.version >= HttpVersion11:
                response.enable_chunked_encoding()
            else:
                # HTTP/1.0 has no chunked coding (aiohttp raises on it): a 1.0 client's body is
                # delimited by the connection's close instead, as Go's net/http answers it. Said
                # here: aiohttp drops only the header for it, and kept a connection the client asked
                # to keep alive open after the body, the client waiting for an end that never came.
                response.force_close()
        scanner = UsageScanner()
        # A record stream (NDJSON, SSE) is relayed whole records at a time: the end of a chunk that
        # splits a record waits for the rest, so a stream cut mid-record ends at a record boundary and
        # its final error record is read as one (not glued onto half a line, which clients cannot
        # parse). A record longer than _MAX_HELD_BYTES goes out as it comes.
        content_type = upstream_response.headers.get("Content-Type", "")
        sse = content_type.startswith("text/event-stream")
        boundary = b"\n\n" if sse else b"\n" if content_type.startswith("application/x-ndjson") else b""
        held = bytearray()
        passing = False  # a record longer than _MAX_HELD_BYTES is going out as it comes, until it ends
        loop = asyncio.get_running_loop()
        idle = self.config.idle_timeout_s
        # One timer for both limits: the idle gap (re-armed per chunk) and the request's deadline.
        hard_stop = loop.time() + self._remaining(ctx)
        timer = asyncio.timeout_at(min(loop.time() + idle, hard_stop))
        attempt = ctx.routing.attempt
        observers = ctx.observers
        stop = self.stop
        try:
            try:
                async with timer:
                    # Registered only while the timer is entered: the stop sequence may fire it then.
                    if stop is not None:
                        stop.relay(ctx.request_id, timer)
                    try:
                        while True:
                            if stop is not None and stop.expired:
                                # The stop fired the timer (reschedule to now) while this task was
                                # already woken: its reschedule below then cancelled that firing, and
                                # a busy stream ran on past the grace period without its final record.
                                raise TimeoutError
                            chunk = await upstream_response.readany()
                            if not response.prepared:
                                ctx.status = ctx.exchange.status = upstream_response.status
                                span.set_attribute(semconv.ATTR_HTTP_STATUS, upstream_response.status)
                                for hook in ctx.header_hooks:
                                    hook(ctx, chunk)
                                ctx.exchange.relayed = True
                                await response.prepare(request)
                            if not chunk:
                                ctx.exchange.complete = True
                                if held:  # a last record without its terminator: as it came
                                    await response.write(bytes(held))
                                if boundary and ctx.route.operation in _GENERATION \
                                        and not scanner.ended_whole(sse):
                                    # Ended cleanly after an ordinary record: a client would take
                                    # the text so far for the whole answer (the Python clients
                                    # raise nothing), so it is told the stream was cut.
                                    await self._fail_mid_stream(
                                        request, response, ctx, "upstream_reset_after_response_started",
                                        "upstream stream ended without its final record", False)
                                break
                            if ctx.exchange.first_byte_at is None:
                                ctx.exchange.first_byte_at = time.monotonic()
                                self._record_first_chunk(ctx, started)
                            if attempt is not None:
                                attempt.last_progress = time.monotonic()
                            scanner.feed(chunk)
                            if observers:
                                self._feed(observers, chunk)
                            if boundary and (held or passing or not chunk.endswith(boundary)):
                                start = len(held)
                                held += chunk
                                # Only the new bytes are searched (and the 3 before them, where a
                                # terminator may straddle): what was held ends no record.
                                cut = _records_end(held, sse, max(0, start - 3))
                                if cut:
                                    chunk = bytes(held[:cut])
                                    del held[:cut]
                                    passing = False
                                elif passing or len(held) > _MAX_HELD_BYTES:
                                    chunk = bytes(held)
                                    held.clear()
                                    passing = True
                                else:  # no record ends here yet
                                    timer.reschedule(min(loop.time() + idle, hard_stop))
                                    continue
                            # The idle limit is the replica's silence: while a slow client
                            # holds the write (its buffers full), only the deadline applies. Else
                            # a client that reads slowly was cut as "upstream sent nothing", and
                            # the replica charged with a gateway failure (health, metrics).
                            timer.reschedule(hard_stop)
                            await response.write(chunk)
                            timer.reschedule(min(loop.time() + idle, hard_stop))
                    finally:
                        if stop is not None:
                            stop.relay_done(ctx.request_id)
            except TimeoutError:
                if stop is not None and stop.expired:
                    message = "the proxy is shutting down; the response was cut short"
                    if not response.prepared:
                        raise ShuttingDown(message, retry_after_s=1.0) from None
                    await self._fail_mid_stream(request, response, ctx, ShuttingDown.code, message,
                                                passing, replica_failed=False)
                else:
                    # Which limit the timer was set for, not the clock: asyncio may fire it a hair early.
                    deadline = timer.when() == hard_stop
                    reason = (f"the request's deadline of {ctx.service_limits.get('deadline_s')}s passed"
                              if deadline else f"upstream sent nothing for {idle:g}s")
                    if not response.prepared:
                        raise (DeadlinePassed if deadline else UpstreamResponseTimeout)(
                            f"{reason} (upstream {upstream.name})") from None
                    # The request's own deadline is not the replica's failure (as before the first
                    # byte): else any client could charge a replica with errors by asking for tiny
                    # deadlines. The code stays the timeout's, which the SLO rules count.
                    await self._fail_mid_stream(request, response, ctx, "upstream_response_timeout",
                                                reason, passing, replica_failed=not deadline)
            except ConnectionError as exc:
                # Either side: UpstreamLost is the replica's connection; anything else (aiohttp's
                # ClientConnectionResetError, "Cannot write to closing transport") is our write to a
                # client that went away, which is neither an error of the replica nor of the proxy.
                if not isinstance(exc, UpstreamLost):
                    ctx.outcome = "client_disconnect"
                elif not response.prepared:
                    raise UpstreamResetBeforeResponseStarted(
                        f"upstream {upstream.name} closed the connection before its response started "
                        f"({type(exc).__name__})") from None
                elif request.transport is None or request.transport.is_closing():
                    ctx.outcome = "client_disconnect"  # both went: the client's leaving comes first
                else:
                    await self._fail_mid_stream(
                        request, response, ctx, "upstream_reset_after_response_started",
                        f"upstream connection lost mid-response ({type(exc).__name__})", passing)
        finally:
            # However the relay ended (a client that leaves cancels it mid-await), what went out is
            # accounted: quotas and the fair queue charge a response cut short by it.
            ctx.exchange.bytes_out = scanner.bytes_seen
            ctx.exchange.usage = scanner.usage()
            ctx.exchange.records_out = scanner.records(
                upstream_response.headers.get("Content-Type", "").startswith("text/event-stream"))
        if ctx.outcome == "ok":
            await response.write_eof()
        return response

    def _count_upstream_error(self, upstream_name: str, code: str) -> None:
        """`sop_upstream_errors_total`, by `error.type` (the error code) and replica (a configured
        name, so the label set stays bounded)."""
        self.telemetry.metrics.upstream_errors.add(1, {
            semconv.ATTR_ERROR_TYPE: code, self.telemetry.names.upstream_name: upstream_name})

    async def _fail_mid_stream(self, request: web.Request, response: web.StreamResponse,
                               ctx: RequestContext, code: str, message: str, mid_record: bool, *,
                               replica_failed: bool = True) -> None:
        """End a response whose headers are already sent: a final error record, or an abort (a body
        that cannot carry one, or `mid_record`: part of a record went out, and an error record glued
        onto it would be one unparseable line; a broken connection is the clearer error).
        `replica_failed`: the replica's doing (reset, silence, a stream ended without its final record),
        logged and counted in `sop_upstream_errors_total` against it; False for an end that is not
        (the proxy's stop, the request's own deadline), recorded only as the request's outcome."""
        ctx.outcome = code
        if replica_failed:
            self._count_upstream_error(ctx.exchange.upstream_name or "", code)
            log.warning("upstream %s failed mid-response: %s", ctx.exchange.upstream_name, code)
        record = stream_error_record(response.headers.get("Content-Type", ""), message, code,
                                     ctx.route.dialect)
        # The record can end a chunked body, or one delimited by the close (an HTTP/1.0 client's);
        # never one whose Content-Length is already sent.
        delimited = response.chunked or (response.content_length is None
                                         and request.version < HttpVersion11)
        if record is not None and delimited and not mid_record and await self._write_last(response, record):
            return
        transport = request.transport
        if transport is not None:
            # Closing sends what is queued first (the final record, when it was written): a client
            # that reads nothing gets it if it reads within `_CLOSE_GRACE_S`, without holding this
            # handler meanwhile. asyncio's close waits for the queue to drain, without bound: past the
            # grace the connection is dropped, else a client that never reads kept it (its slot under
            # server.max_connections, a file descriptor) for as long as it stayed connected.
            transport.close()
            asyncio.get_running_loop().call_later(_CLOSE_GRACE_S, transport.abort)

    @staticmethod
    async def _write_last(response: web.StreamResponse, record: bytes) -> bool:
        """Write a stream's final error record and its end; False when the client is not reading (its
        buffers full): the bytes are queued, but the proxy does not wait past `_LAST_WRITE_WAIT_S`
        for a client to take them (the stream's end, or the request's deadline, has passed), and
        the caller closes the connection (dropped past `_CLOSE_GRACE_S`).

        A client whose buffers were full when the deadline's (or the stop's) timer fired left aiohttp's
        wait for them cancelled, and aiohttp keeps that cancelled wait until the client reads: the
        next wait, in `write_eof`, raises CancelledError at once, though nothing cancelled this task.
        That is told apart from a real cancellation (the client leaving), which is propagated, by
        the task's pending cancel requests."""
        task = asyncio.current_task()
        try:
            async with asyncio.timeout(_LAST_WRITE_WAIT_S):
                await response.write(record)
                await response.write_eof()
        except TimeoutError:
            return False
        except asyncio.CancelledError:
            if task is None or task.cancelling():
                raise
            return False
        return True

    @staticmethod
    def _remaining(ctx: RequestContext) -> float:
        """Seconds left before the request's deadline (infinite without one)."""
        if ctx.deadline_at is None:
            return float("inf")
        return max(0.0, ctx.deadline_at - time.monotonic())

    def _record_first_chunk(self, ctx: RequestContext, started: float) -> None:
        if ctx.route.operation is None:
            return
        attributes = self._metric_attributes(ctx)
        self.telemetry.metrics.time_to_first_chunk.record(time.monotonic() - started, attributes)

    def _metric_attributes(self, ctx: RequestContext) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            semconv.ATTR_GEN_AI_OPERATION: ctx.route.operation or "",
            semconv.ATTR_GEN_AI_PROVIDER: semconv.PROVIDER_OLLAMA,
            semconv.ATTR_GEN_AI_REQUEST_MODEL: self.upstreams.label(ctx.model),  # bounded: known or other
            self.telemetry.names.upstream_name: ctx.exchange.upstream_name or "",
        }
        return attributes

    @staticmethod
    def _feed(observers: list[Any], chunk: bytes) -> None:
        """Show a relayed chunk to the plugins' observers; one that raises is dropped (fail open)."""
        for observer in list(observers):
            try:
                observer.feed(chunk)
            except Exception as exc:
                observers.remove(observer)
                log.warning("a response observer failed (%s) and was dropped", type(exc).__name__)

    def _finish(self, ctx: RequestContext, span: Span, started: float, failure: str | None = None) -> None:
        """Close the CLIENT span and record GenAI metrics once the last byte is out (or the request died:
        `failure` is the error type of an attempt that ended before `ctx.outcome` could say so)."""
        usage = ctx.exchange.usage
        if usage is not None:
            if usage.response_model:
                span.set_attribute(semconv.ATTR_GEN_AI_RESPONSE_MODEL, usage.response_model)
            if usage.finish_reason:
                span.set_attribute(semconv.ATTR_GEN_AI_RESPONSE_FINISH_REASONS, [usage.finish_reason])
            if usage.input_tokens is not None:
                span.set_attribute(semconv.ATTR_GEN_AI_USAGE_INPUT, usage.input_tokens)
            if usage.output_tokens is not None:
                span.set_attribute(semconv.ATTR_GEN_AI_USAGE_OUTPUT, usage.output_tokens)
            for attribute, value in ((semconv.ATTR_OLLAMA_LOAD_DURATION, usage.load_duration_ns),
                                     (semconv.ATTR_OLLAMA_PROMPT_EVAL_DURATION,
                                      usage.prompt_eval_duration_ns),
                                     (semconv.ATTR_OLLAMA_EVAL_DURATION, usage.eval_duration_ns)):
                if value is not None:
                    span.set_attribute(attribute, value)
            if (usage.load_duration_ns or 0) >= semconv.COLD_LOAD_THRESHOLD_NS:
                span.add_event(semconv.COLD_LOAD_EVENT,
                               {semconv.ATTR_OLLAMA_LOAD_DURATION: usage.load_duration_ns or 0})
        error_type = ctx.outcome if ctx.outcome != "ok" else failure
        if error_type is None and ctx.status >= 500:
            error_type = str(ctx.status)
        if error_type is not None:
            span.set_attribute(semconv.ATTR_ERROR_TYPE, error_type)
            span.set_status(Status(StatusCode.ERROR, error_type))
        span.end()
        if ctx.route.operation is None:
            return
        attributes = self._metric_attributes(ctx)
        if error_type is not None:
            attributes[semconv.ATTR_ERROR_TYPE] = error_type
        metrics = self.telemetry.metrics
        metrics.operation_duration.record(time.monotonic() - started, attributes)
        if usage is not None and error_type is None:
            if usage.input_tokens is not None:
                metrics.token_usage.record(usage.input_tokens,
                                           {**attributes, semconv.ATTR_GEN_AI_TOKEN_TYPE: "input"})
            if usage.output_tokens is not None:
                metrics.token_usage.record(usage.output_tokens,
                                           {**attributes, semconv.ATTR_GEN_AI_TOKEN_TYPE: "output"})

