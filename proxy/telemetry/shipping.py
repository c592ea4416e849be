"""SpanShipper: ended spans (already OTLP bytes) batched and sent to the collector from a daemon thread.

The event loop's part is `add()`: a deque append of one chunk (a turn's spans, joined by the tracer).
The thread wakes every `delay_s`, or at once when a batch is full, joins chunks of about `max_batch`
encoded spans (whole chunks: a batch may pass it by one chunk) into one ExportTraceServiceRequest (a
`bytes.join`: no Python per attribute, so the GIL is held for microseconds, not the milliseconds the
SDK's encoder holds it for) and sends it: OTLP/HTTP (protobuf, `{endpoint}/v1/traces`, keep-alive) or
OTLP/gRPC (`TraceService/Export` with the bytes as they are). Both release the GIL while they wait on
the network.

Bounded: at most `max_queue` spans wait; beyond that new chunks are dropped and their spans counted
(`dropped`), so a collector that is down costs memory up to the bound and nothing else. A failed export
is retried once after a second when the failure is transient (HTTP 429/502/503/504, gRPC UNAVAILABLE),
then dropped and logged (once a minute at most, with counts). The standard exporter settings the SDK
honoured stay honoured: OTEL_EXPORTER_OTLP[_TRACES]_HEADERS (`k=v,k2=v2`, URL-encoded), _COMPRESSION
(`gzip`) and _CERTIFICATE (a CA file for https).
"""

from __future__ import annotations

import gzip
import http.client
import logging
import os
import ssl
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from . import otlp_wire

__all__ = ["SpanShipper", "exporter_settings"]

log = logging.getLogger("proxy.telemetry")

_GRPC_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
_RETRYABLE_HTTP = frozenset({429, 502, 503, 504})


def exporter_settings(environ: Mapping[str, str]) -> tuple[dict[str, str], str | None, str | None]:
    """(headers, compression, CA file) from the standard OTEL_EXPORTER_OTLP_* variables, the
    traces-specific one first."""
    def setting(name: str) -> str | None:
        return environ.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or environ.get(
            f"OTEL_EXPORTER_OTLP_{name}")

    headers: dict[str, str] = {}
    for item in (setting("HEADERS") or "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            headers[unquote(key.strip()).lower()] = unquote(value.strip())
    compression = (setting("COMPRESSION") or "").strip().lower() or None
    if compression not in (None, "gzip", "none"):
        raise ValueError(f"OTEL_EXPORTER_OTLP_COMPRESSION: unsupported value {compression!r}")
    return headers, None if compression == "none" else compression, setting("CERTIFICATE")


class SpanShipper:
    """Encoded spans in, OTLP exports out; `add` is the only method the event loop calls."""

    def __init__(self, endpoint: str, protocol: str, resource: bytes, scope: bytes, *,
                 delay_s: float = 0.5, max_batch: int = 2048, max_queue: int = 65536,
                 timeout_s: float = 10.0, environ: Mapping[str, str] | None = None) -> None:
        self.endpoint = endpoint
        self.protocol = protocol
        self.delay_s = delay_s
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.headers, self.compression, self.ca_file = exporter_settings(
            os.environ if environ is None else environ)
        self._resource = resource
        self._scope = scope
        # deque: append (loop thread) and popleft (export thread) are atomic without a lock. The spans
        # waiting are _added - _taken: each counter is written by one thread only (no lost update).
        self._queue: deque[tuple[bytes, int]] = deque()
        self._added = 0
        self._taken = 0
        self._wake = threading.Event()
        self._stopping = False
        self.dropped = 0
        self.exported = 0
        self.failed = 0
        self._last_warning = 0.0
        self._http: http.client.HTTPConnection | None = None
        self._grpc_call: Any = None
        self._grpc_channel: Any = None
        self._thread = threading.Thread(target=self._run, name="otlp-spans", daemon=True)
        self._thread.start()

    def add(self, spans: bytes, count: int) -> None:
        """`count` encoded Span fields joined in `spans`, queued for export (dropped past `max_queue`)."""
        waiting = self._added - self._taken
        if waiting + count > self.max_queue:
            self.dropped += count
            return
        self._queue.append((spans, count))
        self._added += count
        if waiting < self.max_batch <= waiting + count:
            self._wake.set()

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (bounded by `timeout_s`) and stop the thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)

    # -- the export thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self.delay_s)
            self._wake.clear()
            self._drain()
        self._drain()
        self._close()

    def _drain(self) -> None:
        queue = self._queue
        while queue:
            batch: list[bytes] = []
            count = 0
            while queue and count < self.max_batch:
                chunk, size = queue.popleft()
                batch.append(chunk)
                count += size
            self._taken += count
            body = otlp_wire.encode_request(self._resource, self._scope, batch)
            if self._send_with_retry(body):
                self.exported += count
            else:
                self.failed += count

    def _send_with_retry(self, body: bytes) -> bool:
        for attempt in (0, 1):
            try:
                outcome = self._send(body)
            except Exception as exc:
                self._close()
                outcome = (True, type(exc).__name__)
            if outcome is None:
                return True
            retryable, reason = outcome
            if not retryable or attempt or self._stopping:
                self._warn(reason)
                return False
            time.sleep(1.0)
        return False

    def _warn(self, reason: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 60.0:
            self._last_warning = now
            log.warning("span export to the OTLP endpoint failed (%s); %d spans not exported, %d "
                        "dropped at the queue bound so far", reason, self.failed, self.dropped)

    def _send(self, body: bytes) -> tuple[bool, str] | None:
        """None when the collector took the batch, else (retryable, reason)."""
        if self.protocol == "grpc":
            return self._send_grpc(body)
        return self._send_http(body)

    def _send_http(self, body: bytes) -> tuple[bool, str] | None:
        parts = urlsplit(self.endpoint.rstrip("/") + "/v1/traces")
        if self._http is None:
            if parts.scheme == "https":
                context = ssl.create_default_context(cafile=self.ca_file)
                self._http = http.client.HTTPSConnection(parts.netloc, timeout=self.timeout_s,
                                                         context=context)
            else:
                self._http = http.client.HTTPConnection(parts.netloc, timeout=self.timeout_s)
        headers = {**self.headers, "Content-Type": "application/x-protobuf"}
        if self.compression == "gzip":
            body = gzip.compress(body, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        self._http.request("POST", parts.path, body=body, headers=headers)
        response = self._http.getresponse()
        response.read()
        if 200 <= response.status < 300:
            return None
        return response.status in _RETRYABLE_HTTP, f"HTTP {response.status}"

    def _send_grpc(self, body: bytes) -> tuple[bool, str] | None:
        import grpc  # type: ignore[import-untyped]

        if self._grpc_call is None:
            parts = urlsplit(self.endpoint if "://" in self.endpoint else f"http://{self.endpoint}")
            target = parts.netloc
            if parts.scheme == "https":
                ca = open(self.ca_file, "rb").read() if self.ca_file else None  # noqa: SIM115
                channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(ca))
            else:
                channel = grpc.insecure_channel(target)
            self._grpc_channel = channel
            # No serializers: the request is already protobuf bytes, the response is not needed.
            self._grpc_call = channel.unary_unary(_GRPC_METHOD)
        compression = grpc.Compression.Gzip if self.compression == "gzip" else None
        try:
            self._grpc_call(body, timeout=self.timeout_s,
                            metadata=tuple(self.headers.items()), compression=compression)
        except grpc.RpcError as exc:
            code = exc.code()
            retryable = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                 grpc.StatusCode.RESOURCE_EXHAUSTED)
            return retryable, f"gRPC {code.name}"
        return None

    def _close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        if self._grpc_channel is not None:
            self._grpc_channel.close()
            self._grpc_channel = None
            self._grpc_call = None
