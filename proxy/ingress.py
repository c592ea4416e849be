"""The outermost middleware: creates the RequestContext, checks the request head (size, target form), reads
the body under the size limit and the body idle timeout, opens the root SERVER span, renders every
ProxyError in the route's dialect, and writes the one access-log line (every client-influenced field
escaped). Also the `Expect: 100-continue` handler and the hook that puts (sanitised) step headers on
every response.

Errors are rendered before the first byte with their real status (`{"error": ...}` for native routes,
OpenAI's and Anthropic's error objects on `/v1`), with `Retry-After` when the error carries one, by the
one renderer (proxy/rendering.py). What the route is (its template, dialect, whether its body streams)
comes from the route table (proxy/ollama.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from contextvars import Token
from typing import Any

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .access import TenantDirectory, is_preflight
from .accesslog import AccessLog
from .context import CONTEXT, DEADLINE_REQUEST_HEADER, RequestContext
from .cors import OriginPolicy
from .errors import (
    ExpectationFailed,
    InternalProxyError,
    InvalidRequest,
    MalformedBody,
    MethodNotAllowed,
    ProxyError,
    RequestHeaderFieldsTooLarge,
    RequestPayloadTooLarge,
    RequestTimeout,
    ShuttingDown,
    UnsupportedTransferCoding,
)
from .escaping import escape, withheld
from .ollama import classify, path_model
from .rendering import render
from .schema import OLLAMA_DEFAULT_ORIGINS
from .serving import STOP, GracefulStop, escape_field
from .telemetry import semconv
from .telemetry.setup import Telemetry

__all__ = ["INGRESS", "Ingress", "add_context_headers", "header_value"]

log = logging.getLogger("proxy.ingress")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_PROPAGATOR = TraceContextTextMapPropagator()
_MAX_TRACEPARENT = 512
# The propagator and TraceState log a WARNING for each malformed `tracestate` member, quoting the
# client's text, and for an oversized header: one log line of client data per request, on demand.
# The proxy never edits a TraceState itself, so these loggers only ever speak about what clients sent.
for _name in ("opentelemetry.trace.span", "opentelemetry.trace.propagation.tracecontext"):
    logging.getLogger(_name).setLevel(logging.ERROR)
_HEADER_VALUE_LIMIT = 1024
_SPAN_TEXT_LIMIT = 1024


_CLOSE_AFTER = (RequestPayloadTooLarge, RequestHeaderFieldsTooLarge, RequestTimeout, ShuttingDown,
                MalformedBody)
"""Errors after which the connection cannot (or should not) carry another request."""


def _absolute_form(target: str) -> bool:
    return target[:8].lower().startswith(("http://", "https://"))


def header_value(value: object, limit: int = _HEADER_VALUE_LIMIT) -> str:
    """`value` safe to put in a response header: anything but printable ASCII (CR, LF and other control
    characters above all, which would split the header block or make aiohttp refuse the response after
    the replica did the work) escaped as `\\xNN`/`\\uNNNN`, and at most `limit` characters."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit and text.isascii() and text.isprintable():
        return text
    return escape(text, limit, _header_safe)[:limit + 3]  # escapes grow it: the header stays bounded


def _header_safe(char: str) -> bool:
    return char.isascii() and char.isprintable()


_SAFE_NAMES: set[str] = set()
"""Header names `header_value` returned unchanged (bounded)."""


async def add_context_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare` hook: what the steps asked for, plus X-Service-Limits and X-Request-Id
    (the access line's id, unless the replica sent its own), on every response
    (forwarded, error or the proxy's own), just before its headers go out. Values are sanitised
    (`header_value`): a step may echo something a client sent. While the proxy is stopping, responses
    say `Connection: close`.

    A routed request the middleware never saw (aiohttp's expect handlers answer an `Expect` other than
    100-continue with 417 before any middleware runs) gets its context here, from the app's ingress
    (`INGRESS`). What aiohttp's parser refuses (a bad method or request line, a line too long, a
    malformed chunk that came with the head) never reaches this hook: it has no route, and aiohttp
    sends on_response_prepare only for routed requests; serving.EdgeHandler.handle_error answers it."""
    ctx = request.get(CONTEXT)
    if ctx is None:
        ingress = request.app.get(INGRESS)
        if ingress is None:  # an app built without the proxy's ingress
            return
        ctx = ingress.answered_before_middleware(request, response)
    ctx.prepared = response
    add = response.headers.add
    for key, value in ctx.response_headers.items():
        if key not in _SAFE_NAMES:
            safe = header_value(key, 128)
            if safe != key or len(_SAFE_NAMES) >= 512:
                add(safe, header_value(value))
                continue
            _SAFE_NAMES.add(key)  # the steps' names are a few constants: checked once each
        add(key, header_value(value))
    response.headers["X-Service-Limits"] = header_value(ctx.service_limits_header())
    if "X-Request-Id" not in response.headers:  # a replica's own id is relayed as it is
        # The access line's id: what an SDK reports with an error (openai's `request_id`), so a
        # refusal can be tied to its log line.
        response.headers["X-Request-Id"] = ctx.request_id
    if "Origin" in request.headers:
        ingress = request.app.get(INGRESS)
        if ingress is not None:
            ingress.origins.apply(request, response.headers, own=not ctx.exchange.relayed)
    stop = request.app.get(STOP)
    if stop is not None and stop.stopping:
        response.force_close()
        # aiohttp chose the Connection header before this hook runs: force_close alone closes the
        # connection after the response without saying so, and a client pooling it would send its
        # next request into the close.
        response.headers["Connection"] = "close"


class Ingress:
    """The outermost aiohttp middleware; register `Ingress(...).middleware`."""

    def __init__(self, telemetry: Telemetry, max_body_bytes: int, directory: TenantDirectory, *,
                 max_header_bytes: int = 64 * 1024, body_timeout_s: float = 60.0,
                 stop: GracefulStop | None = None, default_deadline_s: float = 120.0,
                 cors_origins: Iterable[str] = OLLAMA_DEFAULT_ORIGINS) -> None:
        self.telemetry = telemetry
        self.default_deadline_s = default_deadline_s
        """chain.limits.deadline_s: a tenant without its own deadline gets this one."""
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.body_timeout_s = body_timeout_s
        self.directory = directory
        self.stop = stop
        self._ids = itertools.count(1)
        self.access_log = AccessLog()
        self.origins = OriginPolicy(cors_origins)
        """server.cors_origins: which browser origins may read the proxy's own answers."""
        self.own_routes: dict[str, tuple[str, ...]] = {}
        """The proxy's own paths and the methods it answers there (app.own_routes, set once the routes
        are registered): another method there is a 405, not forwarded."""
        self._id_prefix = f"{os.getpid():x}-{int(time.time()):x}"

    def new_context(self, request: web.BaseRequest) -> RequestContext:
        """The context a request starts with: the id of its access line (unique in this process), its
        row of the route table, and the one limit every request has (`max_body_bytes`)."""
        row = classify(request.method, request.path)
        ctx = RequestContext(request_id=f"{self._id_prefix}-{next(self._ids)}", route=row,
                             path_model=path_model(row, request.path))
        ctx.service_limits["max_body_bytes"] = self.max_body_bytes
        return ctx

    def answered_before_middleware(self, request: web.Request,
                                   response: web.StreamResponse) -> RequestContext:
        """The context of a response aiohttp prepared for a routed request before this middleware ran
        (an expect handler's 417): made and attached now, with its access line (and duration metric)
        written at once, so the response's X-Request-Id names a line of the log like any other's."""
        ctx = self.new_context(request)
        request[CONTEXT] = ctx
        ctx.status = response.status
        attributes = {semconv.ATTR_HTTP_METHOD: request.method}
        if ctx.route.template:
            attributes[semconv.ATTR_HTTP_ROUTE] = ctx.route.template
        self._finish(request, ctx, None, attributes, response)
        return ctx

    def edge_error_headers(self) -> dict[str, str]:
        """X-Service-Limits (the limit every request has) and a new X-Request-Id, for the errors the
        edge answers before a request exists (serving.EDGE_ERROR_HEADERS)."""
        return {"X-Service-Limits": f"v=1; max_body_bytes={self.max_body_bytes}",
                "X-Request-Id": f"{self._id_prefix}-{next(self._ids)}"}

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = self.new_context(request)
        request[CONTEXT] = ctx
        route = ctx.route.template
        metrics = self.telemetry.metrics
        base_attributes = {semconv.ATTR_HTTP_METHOD: request.method}
        if route:
            base_attributes[semconv.ATTR_HTTP_ROUTE] = route
        active_key = (request.method, route or "")
        metrics.active[active_key] += 1
        span: trace.Span | None = None
        token: Token[Context] | None = None
        # Over 512 characters a traceparent cannot be valid (W3C; version 00 is 55): ignored here, as
        # OpenTelemetry would ignore it, but without its WARNING, one log line per request any client
        # could ask for.
        incoming = 0 < len(request.headers.get("traceparent", "")) <= _MAX_TRACEPARENT
        if self.telemetry.recording or incoming:
            # The SERVER span, current for the steps and the forwarder. Without an exporter it is only
            # made to continue an incoming trace: otherwise the forwarder's span starts a fresh
            # (unsampled) trace of its own, and the request pays for no context switching.
            parent = _PROPAGATOR.extract(request.headers) if incoming else None
            span = self.telemetry.tracer.start_span(
                f"{request.method} {route}" if route else request.method, context=parent,
                kind=SpanKind.SERVER, attributes={
                    # Client-chosen strings on spans are bounded (a head may carry 64 KiB of them)
                    # and escaped: the path is percent-decoded, so %1b%0d%0a arrive as ESC CR LF.
                    **base_attributes,
                    semconv.ATTR_URL_PATH: semconv.span_text(request.path, _SPAN_TEXT_LIMIT),
                    semconv.ATTR_URL_SCHEME: request.scheme,
                    semconv.ATTR_USER_AGENT: semconv.span_text(request.headers.get("User-Agent", ""),
                                                               _SPAN_TEXT_LIMIT)})
            ctx.root_span = span
            token = otel_context.attach(trace.set_span_in_context(span, parent))
        response: web.StreamResponse | None = None
        try:
            response = await self._handle(request, ctx, handler)
            return response
        except asyncio.CancelledError:
            ctx.outcome = "client_disconnect"
            raise
        finally:
            if token is not None:
                otel_context.detach(token)
            metrics.active[active_key] -= 1
            self._finish(request, ctx, span, base_attributes, response)
            # The response holds the request, which holds the context: for a response cut short
            # aiohttp keeps that link, and this one made a cycle only the collector would break.
            ctx.prepared = None

    @staticmethod
    def head_bytes(request: web.BaseRequest) -> int:
        """The size of the request head as received (request line and header lines with their CRLFs),
        from the parsed message: a sum over the headers, no re-parse."""
        size = len(request.method) + len(request.raw_path) + 13
        for name, value in request.raw_headers:
            size += len(name) + len(value) + 4
        return size + 2

    def _refusal(self, request: web.BaseRequest) -> ProxyError | None:
        """The refusal due before anything else, authentication included: a head over the cap, a target
        that is neither a path, an absolute http(s) URL, nor `OPTIONS *`, an `Expect` other than
        `100-continue`, or a transfer coding other than `chunked`; None otherwise."""
        if self.head_bytes(request) > self.max_header_bytes:
            return RequestHeaderFieldsTooLarge(
                f"request head exceeds server.max_header_bytes ({self.max_header_bytes} bytes)")
        target = request.raw_path
        if (target[:1] != "/" and not _absolute_form(target)
                and not (target == "*" and request.method == "OPTIONS")):
            return InvalidRequest("the request target must be a path (origin-form) or an absolute "
                                  "http(s) URL")
        # An empty Expect is no expectation: Go's net/http ignores it, and aiohttp never asks the route.
        expect = request.headers.get("Expect")
        if expect and expect.lower() != "100-continue":
            return ExpectationFailed("only Expect: 100-continue is supported")
        # aiohttp refuses several Transfer-Encoding lines and `chunked` anywhere but last; what it
        # lets through before `chunked` it does not decode.
        coding = request.headers.get("Transfer-Encoding")
        if coding is not None and coding.strip(" \t").lower() != "chunked":
            return UnsupportedTransferCoding("only Transfer-Encoding: chunked is supported")
        return None

    def _not_allowed(self, request: web.BaseRequest) -> MethodNotAllowed | None:
        """The 405 due, once the caller is authorized, to a method the proxy does not answer on one of
        its own routes (a CORS preflight aside: it goes where it went); None otherwise. The path is
        the one the router matches (`path_safe`: an encoded `/` stays encoded), so a target no own route
        serves (`/system%2Fqueue`) is forwarded whatever its method, as its GET is."""
        path = request.rel_url.path_safe
        allowed = self.own_routes.get(path)
        if allowed is None or request.method in allowed or is_preflight(request.method, request.headers):
            return None
        return MethodNotAllowed(f"{path} answers only {', '.join(allowed)}", allow=allowed)

    async def expect_handler(self, request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue`: send `100 Continue` only when the request will be read. When it will
        be refused (head, target, another expectation, declared size, authentication, a method the proxy
        does not answer on its own route), send nothing: the middleware answers with the final status
        without reading the body, and closes the connection."""
        if request.version != HttpVersion11:
            return None
        if self._refusal(request) is not None:
            return None
        declared = request.content_length
        if (declared is not None and declared > self.max_body_bytes
                and not classify(request.method, request.path).streams_body_upload):
            return None
        try:
            self.directory.identify(request.method, request.path, request.headers)
        except ProxyError:
            return None
        if self._not_allowed(request) is not None:
            return None
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return None

    async def _handle(self, request: web.Request, ctx: RequestContext,
                      handler: Handler) -> web.StreamResponse:
        try:
            refusal = self._refusal(request)
            if refusal is not None:
                raise refusal
            if request.raw_path == "*":
                ctx.status = 200  # `OPTIONS *`, answered as Go's net/http does
                return web.Response(status=200)
            if request.raw_path[:1] != "/":
                # Absolute-form target (RFC 9112 §3.2.2): routed (by aiohttp) and forwarded by its
                # path, as nginx does; the steps and the forwarder see an origin-form request.
                request = request.clone(rel_url=request.rel_url)
                request[CONTEXT] = ctx
            ctx.identity = self.directory.authenticate(request.path, request.headers, request.method)
            # Set before authorizing, so a refused request is logged under the tenant it came from.
            self.directory.authorize(ctx.identity, request.method, request.path, request.headers)
            # After authorizing: a caller without a key learns nothing of the admin routes' methods.
            if (not_allowed := self._not_allowed(request)) is not None:
                raise not_allowed
            ctx.set_deadline(self.default_deadline_s, request.headers.get(DEADLINE_REQUEST_HEADER))
            if ctx.root_span is not None and not ctx.identity.tenant.anonymous:
                ctx.root_span.set_attribute(self.telemetry.names.tenant, ctx.identity.tenant.name)
            response = await self._call(request, ctx, handler)
            if not ctx.status:
                ctx.status = response.status
            return response
        except ProxyError as exc:
            return self._render(request, ctx, exc)
        except web.HTTPException as exc:
            ctx.status = exc.status
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Not log.exception: the exception's message may quote what the client sent.
            log.error("internal error handling %s %s: %s", escape_field(request.method),
                      ctx.route.template or "(other)", withheld(exc))
            if ctx.root_span is not None:
                ctx.root_span.record_exception(exc)
            if request.transport is None or request.transport.is_closing():
                raise
            return self._render(request, ctx, InternalProxyError("internal proxy error"))

    async def _call(self, request: web.Request, ctx: RequestContext,
                    handler: Handler) -> web.StreamResponse:
        """Body and chain, registered with the stop sequence: at the end of the grace period a request
        that has not started its response gets 503 `shutting_down` (streams are ended by the
        forwarder). One frame for both: every frame of the request's await chain is walked at each
        resumption."""
        stop = self.stop
        key = ctx.request_id
        task = asyncio.current_task()
        assert task is not None
        if stop is not None:
            stop.enter(key, task)
        try:
            if not ctx.route.streams_body_upload and request.body_exists:
                ctx.body = await self._read_body(request)
            return await handler(request)
        except asyncio.CancelledError:
            # Ours (the stop sequence's) and nobody else's: then it becomes a response, not a cancel.
            if stop is None or not stop.ending(key) or task.uncancel() > 0:
                raise
            raise ShuttingDown("the proxy is shutting down; retry on another instance or shortly",
                               retry_after_s=1.0) from None
        finally:
            if stop is not None:
                stop.leave(key)

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole body, refusing with 413 as soon as it is known to be too large and with 408 when
        nothing arrives for `body_timeout_s`. What has arrived already is taken without waiting (most
        bodies come with the head), so the timer is only armed for bodies still in transit."""
        limit = self.max_body_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            raise RequestPayloadTooLarge(
                f"request body of {declared} bytes exceeds the limit of {limit} bytes")
        content = request.content
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                chunk = content.read_nowait()
            except HttpProcessingError:
                raise MalformedBody("malformed request body (chunked framing)") from None
            except RequestPayloadError:  # aiohttp could not decode the Content-Encoding it names
                raise MalformedBody(MalformedBody.UNDECODABLE) from None
            if not chunk:
                if content.is_eof():
                    break
                try:
                    async with asyncio.timeout(self.body_timeout_s):
                        chunk = await content.readany()
                except TimeoutError:
                    raise RequestTimeout(f"the request body stopped arriving for "
                                         f"{self.body_timeout_s:g}s") from None
                except HttpProcessingError:
                    raise MalformedBody("malformed request body (chunked framing)") from None
                except RequestPayloadError:
                    raise MalformedBody(MalformedBody.UNDECODABLE) from None
                if not chunk:
                    break
            size += len(chunk)
            if size > limit:
                raise RequestPayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _render(self, request: web.Request, ctx: RequestContext, exc: ProxyError) -> web.Response:
        ctx.outcome = exc.code
        ctx.status = exc.status
        if self.telemetry.events.active:  # /system/events; nothing is built while nobody listens
            self.telemetry.events.rejection(exc, ctx.model, ctx.tenant.name, ctx.route.template,
                                            identified=ctx.identity is not None)
        status, headers, body = render(ctx.route.dialect, exc)
        response = web.Response(status=status, body=body, headers=headers)
        if isinstance(exc, _CLOSE_AFTER) or (request.body_exists and not request.content.is_eof()):
            # The rest of the body was not read (or the client is slow or the proxy stopping): the
            # connection cannot be reused.
            response.force_close()
        return response

    def _finish(self, request: web.Request, ctx: RequestContext, span: trace.Span | None,
                base_attributes: dict[str, Any], response: web.StreamResponse | None) -> None:
        duration = time.monotonic() - ctx.started
        status = ctx.status or (response.status if response is not None else 499)
        if ctx.outcome == "client_disconnect":
            status = 499
        attributes: dict[str, Any] = {**base_attributes, semconv.ATTR_HTTP_STATUS: status}
        if ctx.outcome != "ok":
            attributes[semconv.ATTR_ERROR_TYPE] = ctx.outcome
        if span is not None:
            span.set_attribute(semconv.ATTR_HTTP_STATUS, status)
            if ctx.outcome != "ok":
                span.set_attribute(semconv.ATTR_ERROR_TYPE, ctx.outcome)
            if status >= 500 or ctx.outcome != "ok":
                span.set_status(Status(StatusCode.ERROR, ctx.outcome))
            span.end()
        metrics = self.telemetry.metrics
        metrics.request_duration.record(duration, attributes)
        if self.telemetry.config.access_log:
            usage = ctx.exchange.usage
            self.access_log.line(
                '%s %s "%s %s" %d %s %.3fs tenant=%s upstream=%s model=%s in_tokens=%s out_tokens=%s '
                "bytes=%d", ctx.request_id, escape_field(request.remote or "-", 64),
                escape_field(request.method, 32), ctx.route.template or "(other)", status,
                ctx.outcome, duration, escape_field(ctx.tenant.name, 64),
                escape_field("*" if ctx.routing.fan_out else ctx.exchange.upstream_name or "-", 64),
                escape_field(ctx.model or "-", 128),
                usage.input_tokens if usage and usage.input_tokens is not None else "-",
                usage.output_tokens if usage and usage.output_tokens is not None else "-",
                ctx.exchange.bytes_out)


INGRESS: web.AppKey[Ingress] = web.AppKey("sop_ingress", Ingress)
"""The app's ingress, for `add_context_headers` (a response prepared before the middleware ran)."""
