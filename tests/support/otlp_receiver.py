"""A minimal OTLP/HTTP receiver on loopback: decodes ExportTraceServiceRequest with opentelemetry-proto, so
tests see the spans the proxy really exported over the wire."""

from __future__ import annotations

import threading
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.support.threaded import ThreadedApp

__all__ = ["OtlpReceiver", "attributes_of"]


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


def attributes_of(span: Any) -> dict[str, Any]:
    """A span's attributes as a plain dict."""
    return {kv.key: _value(kv.value) for kv in span.attributes}


class OtlpReceiver(ThreadedApp):
    """An OTLP/HTTP endpoint (`/v1/traces`, `/v1/metrics`); `spans()` lists every span received."""

    def __init__(self) -> None:
        self._spans: list[Any] = []
        self.headers: list[dict[str, str]] = []
        """The headers of every traces export, lower-cased names."""
        self._lock = threading.Lock()
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/v1/metrics", self._metrics)
        super().__init__(app)

    def spans(self) -> list[Any]:
        with self._lock:
            return list(self._spans)

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()  # aiohttp undoes a Content-Encoding: gzip
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        with self._lock:
            self.headers.append({k.lower(): v for k, v in request.headers.items()})
            for resource_spans in message.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    self._spans.extend(scope_spans.spans)
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def _metrics(self, request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b"", content_type="application/x-protobuf")
