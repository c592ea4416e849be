"""The proxy's tracer: OpenTelemetry API spans that cost a few microseconds, encoded to OTLP once ended.

A request meets seven spans (the SERVER span, one per step, the CLIENT span to the replica). The SDK's
span (locks, attribute validation, resource and scope objects, a processor fan-out, then the OTLP encoder
in the export thread) costs ~30 us each; issue 16 measured tracing at as much as the rest of the proxy.
This tracer keeps the API (steps, plugins and the forwarder use `opentelemetry.trace` types only:
`Span.set_attribute`, `set_status`, `add_event`, `record_exception`, `trace.set_span_in_context`, the
W3C propagator), the sampling rule (parent-based, then a trace-id ratio, as the SDK's
`ParentBased(TraceIdRatioBased)`), and the wire format (OTLP, checked against opentelemetry-proto).
What it drops is what the proxy never used: span processors, links, and span limits (the proxy bounds
every client-chosen string it puts on a span itself).

Invariants: a span is encoded once, at the event loop's turn after its `end()` (proxy/nextturn.py;
later `end()` calls and setters are ignored, as in the SDK, so what is encoded is what it held at
`end()`); an unsampled span is the API's NonRecordingSpan, and its children are the same object: no
id, no dict, no clock read for a trace nobody samples.
"""

from __future__ import annotations

import logging
import random
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.util import types
from opentelemetry.util._decorator import _agnosticcontextmanager

from ..errors import ProxyError
from ..nextturn import NextTurn
from . import otlp_wire

__all__ = ["FastSpan", "FastTracer", "SpanSink"]

log = logging.getLogger("proxy.telemetry")

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_EXCEPTION_TEXT_LIMIT = 4096
_STATUS_CODE = {StatusCode.UNSET: 0, StatusCode.OK: 1, StatusCode.ERROR: 2}


class SpanSink(Protocol):
    """Where ended spans go: `add` takes `count` encoded Span fields (otlp_wire.encode_span) joined in
    one chunk (a ScopeSpans' repeated field: chunks concatenate), and must not block."""

    def add(self, spans: bytes, count: int) -> None: ...


class FastSpan(trace.Span):
    """A sampled span: its data in slots until, once ended, it is encoded and its bytes go to the sink."""

    __slots__ = ("_attributes", "_context", "_end_ns", "_ended", "_events", "_flags", "_kind", "_name",
                 "_parent_id", "_sink", "_span_id", "_start_ns", "_status_code", "_status_message",
                 "_trace_bytes", "_trace_flags", "_trace_id", "_trace_state", "_withheld")

    def __init__(self, sink: NextTurn[FastSpan], name: str, trace_id: int, span_id: int,
                 trace_flags: TraceFlags, trace_state: TraceState | None, trace_bytes: bytes,
                 parent_id: bytes | None, kind: int, attributes: dict[str, Any], start_ns: int,
                 flags: int) -> None:
        self._sink = sink
        self._name = name
        self._trace_id = trace_id
        self._span_id = span_id
        self._trace_flags = trace_flags
        self._trace_state = trace_state
        self._context: SpanContext | None = None
        """Built when asked for (propagation, a foreign child): the API's SpanContext validates its
        fields in Python, and most spans are never asked."""
        self._trace_bytes = trace_bytes
        self._parent_id = parent_id
        self._kind = kind
        self._attributes = attributes
        self._events: list[bytes] = []
        self._start_ns = start_ns
        self._status_code = 0
        self._status_message: str | None = None
        self._flags = flags
        self._ended = False
        self._end_ns = 0

    # -- the API ---------------------------------------------------------------------------------
    def get_span_context(self) -> SpanContext:
        if self._context is None:
            self._context = SpanContext(self._trace_id, self._span_id, False, self._trace_flags,
                                        self._trace_state)
        return self._context

    def is_recording(self) -> bool:
        return not self._ended

    def set_attribute(self, key: str, value: types.AttributeValue) -> None:
        if not self._ended:
            self._attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, types.AttributeValue]) -> None:
        if not self._ended:
            self._attributes.update(attributes)

    def add_event(self, name: str, attributes: types.Attributes = None,
                  timestamp: int | None = None) -> None:
        if not self._ended:
            self._events.append(otlp_wire.encode_event(
                name, timestamp if timestamp is not None else time.time_ns(), attributes or {}))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        del context, attributes  # the proxy records no links

    def update_name(self, name: str) -> None:
        if not self._ended:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._ended or self._status_code == 1:  # OK is final, as in the SDK
            return
        if isinstance(status, Status):
            code, description = status.status_code, status.description
        else:
            code = status
        if description is not None and description == getattr(self, "_withheld", None):
            # `use_span` follows record_exception with set_status(ERROR, "Type: message"): the
            # message withheld from the event is withheld from the status too.
            description = description.partition(":")[0]
        self._status_code = _STATUS_CODE[code]
        self._status_message = description if code is StatusCode.ERROR else None

    def record_exception(self, exception: BaseException, attributes: types.Attributes = None,
                         timestamp: int | None = None, escaped: bool = False) -> None:
        # Only a ProxyError's message is recorded: its contract is a text safe to show a client. Any
        # other exception's message may quote what a client sent (int('<prompt text>'), a KeyError of a
        # client's key, a plugin's f-string), and nothing of a request goes on a span: the trace keeps
        # the type and the frames (file, line, function, source line: the code's, not the request's).
        safe = isinstance(exception, ProxyError)
        frames = "".join(traceback.format_tb(exception.__traceback__))
        head = ("".join(traceback.format_exception_only(exception)) if safe
                else f"{type(exception).__name__}\n")
        recorded: dict[str, types.AttributeValue] = {
            "exception.type": type(exception).__qualname__,
            "exception.stacktrace": ("Traceback (most recent call last):\n" + frames + head
                                     )[-_EXCEPTION_TEXT_LIMIT:],
            "exception.escaped": escaped}
        if safe:
            recorded["exception.message"] = str(exception)[:_EXCEPTION_TEXT_LIMIT]
        else:
            # Set only here (not in __init__: most spans never record an exception); read by getattr.
            self._withheld = f"{type(exception).__name__}: {exception}"
        self.add_event("exception", {**recorded, **(attributes or {})}, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        self._end_ns = end_time if end_time is not None else time.time_ns()
        self._sink.add(self)  # encoded at the loop's next turn, with the others ended meanwhile

    def encode(self) -> bytes:
        """The ended span as OTLP bytes (otlp_wire.encode_span)."""
        return otlp_wire.encode_span(
            self._trace_bytes, self._span_id.to_bytes(8, "big"), self._parent_id, self._name,
            self._kind, self._start_ns, self._end_ns, self._attributes, self._events,
            self._status_code, self._status_message, self._flags,
            self._trace_state.to_header() if self._trace_state else "")

    def __enter__(self) -> FastSpan:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.end()


class FastTracer(trace.Tracer):
    """`start_span` as the SDK's tracer with `ParentBased(TraceIdRatioBased(ratio))`, into `sink`."""

    def __init__(self, sink: SpanSink, ratio: float, *, records: bool = True) -> None:
        self.sink = sink
        self._ended: NextTurn[FastSpan] = NextTurn(self._encode, "spans")
        self.ratio = ratio
        self.records = records
        """False when spans go nowhere: even a trace sampled upstream is only propagated."""
        self._bound = round(ratio * (1 << 64))
        self._random = random.Random()
        self._bits = self._random.getrandbits

    def start_span(self, name: str, context: otel_context.Context | None = None,
                   kind: SpanKind = SpanKind.INTERNAL,
                   attributes: types.Attributes = None,
                   links: Sequence[trace.Link] | None = None, start_time: int | None = None,
                   record_exception: bool = True, set_status_on_exception: bool = True
                   ) -> trace.Span:
        del links, record_exception, set_status_on_exception
        parent = trace.get_current_span(context)
        if type(parent) is NonRecordingSpan:
            parent_context = parent.get_span_context()
            if parent_context.is_valid and not parent_context.trace_flags.sampled:
                return parent  # an unsampled trace: no id, no clock, no attributes for its children
        start_ns = start_time if start_time is not None else time.time_ns()
        fields = dict(attributes) if attributes else {}
        if type(parent) is FastSpan:
            # The common case, a child of the request's span: its trace, sampled, parent local
            # (SpanFlags HAS_IS_REMOTE only). OTLP numbers span kinds from 1, the API from 0.
            return FastSpan(self._ended, name, parent._trace_id, self._bits(64) or 1,
                            parent._trace_flags, parent._trace_state, parent._trace_bytes,
                            parent._span_id.to_bytes(8, "big"), kind.value + 1, fields, start_ns,
                            0x100)
        parent_context = parent.get_span_context()
        if parent_context.is_valid:
            if not parent_context.trace_flags.sampled:
                # Not sampled upstream: nothing to record, and the children are this same span.
                return parent if isinstance(parent, NonRecordingSpan) else NonRecordingSpan(
                    parent_context)
            if not self.records:
                # Sampled upstream, but spans go nowhere here: a hop of its own in what is propagated.
                return NonRecordingSpan(SpanContext(
                    parent_context.trace_id, self._bits(64) or 1, False, parent_context.trace_flags,
                    parent_context.trace_state))
            return FastSpan(self._ended, name, parent_context.trace_id, self._bits(64) or 1,
                            parent_context.trace_flags, parent_context.trace_state,
                            parent_context.trace_id.to_bytes(16, "big"),
                            parent_context.span_id.to_bytes(8, "big"), kind.value + 1, fields,
                            start_ns, 0x300 if parent_context.is_remote else 0x100)
        trace_id = self._bits(128) or 1
        if (trace_id & 0xFFFFFFFFFFFFFFFF) >= self._bound:
            return NonRecordingSpan(SpanContext(trace_id, self._bits(64) or 1, False))
        return FastSpan(self._ended, name, trace_id, self._bits(64) or 1, _SAMPLED, None,
                        trace_id.to_bytes(16, "big"), None, kind.value + 1, fields, start_ns, 0x100)

    def _encode(self, spans: list[FastSpan]) -> None:
        """A turn's ended spans to the sink, as one chunk; a span that cannot be encoded is dropped,
        logged, and the others go."""
        encoded = []
        for span in spans:
            try:
                encoded.append(span.encode())
            except Exception:
                log.exception("a span dropped: it could not be encoded")
        if encoded:
            self.sink.add(b"".join(encoded), len(encoded))

    def child(self, parent: FastSpan, name: str, attributes: dict[str, Any]) -> FastSpan:
        """`start_span(name, attributes=attributes)` for an INTERNAL child of `parent`, the current
        span, which the caller already looked up: one context lookup less. `attributes` becomes the
        span's own (the caller hands over a dict it built for it)."""
        return FastSpan(self._ended, name, parent._trace_id, self._bits(64) or 1, parent._trace_flags,
                        parent._trace_state, parent._trace_bytes, parent._span_id.to_bytes(8, "big"),
                        SpanKind.INTERNAL.value + 1, attributes, time.time_ns(), 0x100)

    def flush(self) -> None:
        """Encode and hand to the sink every span that ended and is still pending."""
        self._ended.flush()

    @_agnosticcontextmanager
    def start_as_current_span(self, name: str, context: otel_context.Context | None = None,
                              kind: SpanKind = SpanKind.INTERNAL,
                              attributes: types.Attributes = None,
                              links: Sequence[trace.Link] | None = None,
                              start_time: int | None = None, record_exception: bool = True,
                              set_status_on_exception: bool = True, end_on_exit: bool = True
                              ) -> Iterator[trace.Span]:
        span = self.start_span(name, context, kind, attributes, links, start_time)
        with trace.use_span(span, end_on_exit=end_on_exit, record_exception=record_exception,
                            set_status_on_exception=set_status_on_exception) as current:
            yield current

