"""The outermost middleware: creates the RequestContext, reads the body under the size limit, opens the root
SERVER span, renders every ProxyError in the route's dialect, and writes the one access-log line.

Errors are rendered before the first byte with their real status (`{"error": ...}` for native routes,
OpenAI's and Anthropic's error objects on `/v1`), with `Retry-After` when the error carries one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .access import TenantDirectory
from .context import CONTEXT, RequestContext
from .errors import InternalProxyError, ProxyError, RequestPayloadTooLarge
from .ollama import classify
from .telemetry import semconv
from .telemetry.setup import Telemetry

__all__ = ["Ingress", "add_context_headers", "error_body", "known_route"]

log = logging.getLogger("proxy.ingress")
access_log = logging.getLogger("proxy.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_PROPAGATOR = TraceContextTextMapPropagator()
_KNOWN_ROUTES = frozenset((
    "/", "/api/version", "/api/status", "/api/pull", "/api/push", "/api/tags", "/api/show",
    "/api/delete", "/api/create", "/api/copy", "/api/ps", "/api/generate", "/api/chat", "/api/embed",
    "/api/embeddings", "/api/me", "/api/signout", "/api/experimental/web_search",
    "/api/experimental/web_fetch", "/api/experimental/model-recommendations", "/v1/chat/completions",
    "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/responses", "/v1/audio/transcriptions",
    "/v1/messages", "/metrics", "/healthz", "/readyz"))
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error", 529: "overloaded_error"}
_BODY_CHUNK = 1 << 16


def known_route(path: str) -> str | None:
    """The route template for span names and metrics, or None for paths Ollama does not define."""
    if path in _KNOWN_ROUTES:
        return path
    if path.startswith("/api/blobs/"):
        return "/api/blobs/{digest}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return None


def error_body(dialect: str, status: int, code: str, message: str,
               retry_after_s: float | None) -> bytes:
    """The error object for a route dialect; `code` and `retry_after_s` ride along as extra keys."""
    if dialect == "openai":
        error: dict[str, Any] = {"message": message,
                                 "type": "invalid_request_error" if status < 500 else "api_error",
                                 "param": None, "code": code}
        return orjson.dumps({"error": error}) + b"\n"
    if dialect == "anthropic":
        return orjson.dumps({"type": "error", "error": {
            "type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}) + b"\n"
    value: dict[str, Any] = {"error": message, "code": code}
    if retry_after_s is not None:
        value["retry_after_s"] = math.ceil(retry_after_s)
    return orjson.dumps(value)


async def add_context_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare` hook: what the steps asked for, plus X-Service-Limits, on every response
    (forwarded, error or the proxy's own), just before its headers go out."""
    ctx = request.get(CONTEXT)
    if ctx is None:
        return
    for key, value in ctx.response_headers.items():
        response.headers.add(key, value)
    response.headers["X-Service-Limits"] = ctx.service_limits_header()


class Ingress:
    """The outermost aiohttp middleware; register `Ingress(...).middleware`."""

    def __init__(self, telemetry: Telemetry, max_body_bytes: int, directory: TenantDirectory) -> None:
        self.telemetry = telemetry
        self.max_body_bytes = max_body_bytes
        self.directory = directory
        self._ids = itertools.count(1)
        self._id_prefix = f"{os.getpid():x}-{int(time.time()):x}"

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = RequestContext(request_id=f"{self._id_prefix}-{next(self._ids)}",
                             route=classify(request.method, request.path))
        ctx.service_limits["max_body_bytes"] = self.max_body_bytes
        request[CONTEXT] = ctx
        route = known_route(request.path)
        metrics = self.telemetry.metrics
        base_attributes = {semconv.ATTR_HTTP_METHOD: request.method}
        if route:
            base_attributes[semconv.ATTR_HTTP_ROUTE] = route
        active_key = (request.method, route or "")
        metrics.active[active_key] += 1
        parent = _PROPAGATOR.extract(request.headers)
        span = self.telemetry.tracer.start_span(
            f"{request.method} {route}" if route else request.method, context=parent,
            kind=SpanKind.SERVER, attributes={
                **base_attributes, semconv.ATTR_URL_PATH: request.path,
                semconv.ATTR_URL_SCHEME: request.scheme,
                semconv.ATTR_USER_AGENT: request.headers.get("User-Agent", "")})
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
            otel_context.detach(token)
            metrics.active[active_key] -= 1
            self._finish(request, ctx, span, base_attributes, response)

    async def _handle(self, request: web.Request, ctx: RequestContext,
                      handler: Handler) -> web.StreamResponse:
        try:
            ctx.identity = self.directory.authenticate(request.path, request.headers)
            # Set before authorizing, so a refused request is logged under the tenant it came from.
            self.directory.authorize(ctx.identity, request.method, request.path, request.headers)
            if ctx.root_span is not None and not ctx.identity.tenant.anonymous:
                ctx.root_span.set_attribute("sop.tenant", ctx.identity.tenant.name)
            if not ctx.route.streams_body_upload and request.body_exists:
                ctx.body = await self._read_body(request)
            response = await handler(request)
            if not ctx.status:
                ctx.status = response.status
            return response
        except ProxyError as exc:
            return self._render(request, ctx, exc)
        except web.HTTPException:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("internal error handling %s %s", request.method, known_route(request.path)
                          or "(other)")
            if ctx.root_span is not None:
                ctx.root_span.record_exception(exc)
            if request.transport is None or request.transport.is_closing():
                raise
            return self._render(request, ctx, InternalProxyError("internal proxy error"))

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole body, refusing with 413 as soon as it is known to be too large."""
        limit = self.max_body_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            raise RequestPayloadTooLarge(
                f"request body of {declared} bytes exceeds the limit of {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_chunked(_BODY_CHUNK):
            size += len(chunk)
            if size > limit:
                raise RequestPayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _render(self, request: web.Request, ctx: RequestContext, exc: ProxyError) -> web.Response:
        ctx.outcome = exc.code
        ctx.status = exc.status
        headers = {"Content-Type": "application/json; charset=utf-8"
                   if ctx.route.dialect == "ollama" else "application/json"}
        if exc.should_retry is False:
            headers["x-should-retry"] = "false"
        elif exc.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
        body = error_body(ctx.route.dialect, exc.status, exc.code, exc.message, exc.retry_after_s)
        response = web.Response(status=exc.status, body=body, headers=headers)
        if isinstance(exc, RequestPayloadTooLarge):
            # The rest of the body was not read: the connection cannot be reused.
            response.force_close()
        return response

    def _finish(self, request: web.Request, ctx: RequestContext, span: trace.Span,
                base_attributes: dict[str, Any], response: web.StreamResponse | None) -> None:
        duration = time.monotonic() - ctx.started
        status = ctx.status or (response.status if response is not None else 499)
        if ctx.outcome == "client_disconnect":
            status = 499
        attributes: dict[str, Any] = {**base_attributes, semconv.ATTR_HTTP_STATUS: status}
        span.set_attribute(semconv.ATTR_HTTP_STATUS, status)
        if ctx.outcome != "ok":
            attributes[semconv.ATTR_ERROR_TYPE] = ctx.outcome
            span.set_attribute(semconv.ATTR_ERROR_TYPE, ctx.outcome)
        if status >= 500 or ctx.outcome not in ("ok",):
            span.set_status(Status(StatusCode.ERROR, ctx.outcome))
        span.end()
        metrics = self.telemetry.metrics
        metrics.request_duration.record(duration, attributes)
        if self.telemetry.config.access_log:
            usage = ctx.usage
            access_log.info(
                '%s %s "%s %s" %d %s %.3fs tenant=%s upstream=%s model=%s in_tokens=%s out_tokens=%s '
                "bytes=%d", ctx.request_id, request.remote, request.method,
                known_route(request.path) or "(other)", status, ctx.outcome, duration,
                ctx.tenant.name, ctx.upstream_name or "-", ctx.model or "-",
                usage.input_tokens if usage and usage.input_tokens is not None else "-",
                usage.output_tokens if usage and usage.output_tokens is not None else "-",
                ctx.bytes_out)
