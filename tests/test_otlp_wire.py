"""The proxy's tracer and its hand-written OTLP encoding, read back with opentelemetry-proto's own classes;
the in-place histograms against the SDK's bucket rule (tests/test_telemetry.py covers both end to end, over
the wire and on /metrics)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from proxy.errors import RequestPayloadTooLarge
from proxy.telemetry import otlp_wire
from proxy.telemetry.histograms import CARDINALITY_LIMIT, HistogramSet
from proxy.telemetry.shipping import SpanShipper
from proxy.telemetry.tracing import FastTracer
from tests.support.otlp_receiver import OtlpReceiver, attributes_of


class _Sink:
    def __init__(self) -> None:
        self.spans: list[bytes] = []
        """The chunks handed over (each holds one turn's spans)."""
        self.count = 0

    def add(self, spans: bytes, count: int) -> None:
        self.spans.append(spans)
        self.count += count


def _decode(sink: _Sink) -> tuple[Any, list[Any]]:
    body = otlp_wire.encode_request(otlp_wire.encode_resource({"service.name": "svc", "n": 3}),
                                    otlp_wire.encode_scope("scope", "1.2"), sink.spans)
    message = ExportTraceServiceRequest()
    message.ParseFromString(body)
    (resource_spans,) = message.resource_spans
    (scope_spans,) = resource_spans.scope_spans
    assert scope_spans.scope.name == "scope" and scope_spans.scope.version == "1.2"
    return resource_spans, list(scope_spans.spans)


def test_a_trace_reads_back_field_by_field() -> None:
    sink = _Sink()
    tracer = FastTracer(sink, 1.0)
    root = tracer.start_span("POST /api/chat", kind=SpanKind.SERVER,
                             attributes={"http.request.method": "POST", "n": 7, "neg": -2,
                                         "ratio": 0.25, "flag": True, "list": ["a", "b"],
                                         "none": None, "long": "é" * 300})
    token = otel_context.attach(trace.set_span_in_context(root))
    try:
        child = tracer.start_span("sop.limits", attributes={"sop.step.mode": "enforce"})
        child.set_attribute("sop.limits.decision", "admitted")
        child.set_status(Status(StatusCode.ERROR, "prompt_too_long"))
        child.add_event("sop.truncation", {"tokens": 5})
        child.end()
        child.end()  # a second end records nothing
        client = tracer.start_span("chat llama3.2", kind=SpanKind.CLIENT)
        client.record_exception(ValueError("boom"))
        client.set_status(StatusCode.OK)
        client.set_status(StatusCode.ERROR, "ignored: OK is final")
        client.end()
    finally:
        otel_context.detach(token)
    root.set_attribute("http.response.status_code", 200)
    root.end()
    resource_spans, spans = _decode(sink)
    assert {kv.key: kv.value.string_value or kv.value.int_value
            for kv in resource_spans.resource.attributes} == {"service.name": "svc", "n": 3}
    by_name = {s.name: s for s in spans}
    assert list(by_name) == ["sop.limits", "chat llama3.2", "POST /api/chat"]
    server, limits, call = by_name["POST /api/chat"], by_name["sop.limits"], by_name["chat llama3.2"]
    context = root.get_span_context()
    assert server.trace_id == context.trace_id.to_bytes(16, "big")
    assert server.span_id == context.span_id.to_bytes(8, "big")
    assert server.parent_span_id == b""
    assert limits.trace_id == call.trace_id == server.trace_id
    assert limits.parent_span_id == call.parent_span_id == server.span_id
    assert len({server.span_id, limits.span_id, call.span_id}) == 3
    assert server.kind == 2 and limits.kind == 1 and call.kind == 3  # SERVER, INTERNAL, CLIENT
    assert 0 < server.start_time_unix_nano <= limits.start_time_unix_nano <= limits.end_time_unix_nano
    assert server.end_time_unix_nano >= call.end_time_unix_nano
    assert server.flags == 0x100
    assert attributes_of(server) == {
        "http.request.method": "POST", "n": 7, "neg": -2, "ratio": 0.25, "flag": True,
        "list": ["a", "b"], "long": "é" * 300, "http.response.status_code": 200}
    assert attributes_of(limits) == {"sop.step.mode": "enforce", "sop.limits.decision": "admitted"}
    assert limits.status.code == 2 and limits.status.message == "prompt_too_long"
    assert [(e.name, attributes_of(e)) for e in limits.events] == [("sop.truncation", {"tokens": 5})]
    assert call.status.code == 1 and call.status.message == ""
    (exception,) = call.events
    recorded = attributes_of(exception)
    assert exception.name == "exception" and recorded["exception.type"] == "ValueError"
    # Not a ProxyError: its message may quote a client's text, so only the type and frames are kept.
    assert "exception.message" not in recorded and "boom" not in recorded["exception.stacktrace"]
    assert recorded["exception.stacktrace"].endswith("ValueError\n")


def test_sampling_follows_the_parent_then_the_ratio() -> None:
    sink = _Sink()
    never = FastTracer(sink, 0.0)
    root = never.start_span("root")
    assert not root.is_recording() and root.get_span_context().is_valid  # the trace id propagates
    with trace.use_span(root):
        assert never.start_span("child") is root  # no work for a span nobody samples
    remote_unsampled = trace.set_span_in_context(NonRecordingSpan(SpanContext(
        0xABC, 0xDEF, True, TraceFlags(0))))
    always = FastTracer(sink, 1.0)
    assert not always.start_span("x", context=remote_unsampled).is_recording()
    remote_sampled = trace.set_span_in_context(NonRecordingSpan(SpanContext(
        0xABC, 0xDEF, True, TraceFlags(TraceFlags.SAMPLED))))
    kept = never.start_span("y", context=remote_sampled)  # parent-based: sampled upstream, kept
    assert kept.is_recording()
    kept.end()
    (span,) = _decode(sink)[1]
    assert span.trace_id == (0xABC).to_bytes(16, "big") and span.parent_span_id == (0xDEF).to_bytes(8, "big")
    assert span.flags == 0x300  # the parent is remote
    half = FastTracer(sink, 0.5)
    sampled = sum(half.start_span("z").is_recording() for _ in range(4000))
    assert 1700 < sampled < 2300


def test_histograms_bucket_as_the_sdk_does_and_bound_their_series() -> None:
    histograms = HistogramSet(Resource.create({}), InstrumentationScope("scope", "1"))
    duration = histograms.histogram("d", "s", "durations", (0.1, 1.0))
    assert histograms.histogram("d", "s", "durations", (0.1, 1.0)) is duration  # a reload's owner
    for value in (0.05, 0.1, 0.5, 1.0, 3.0):
        duration.record(value, {"route": "/api/chat"})
    duration.record(-1.0, {"route": "/api/chat"})  # dropped, as the SDK does
    for n in range(CARDINALITY_LIMIT + 5):
        duration.record(0.2, {"model": f"m{n}"})
    data = histograms.merged(None)
    assert data is not None
    (metric,) = data.resource_metrics[0].scope_metrics[0].metrics
    points = {tuple(sorted(p.attributes.items())): p for p in metric.data.data_points}
    chat = points[(("route", "/api/chat"),)]
    # Explicit buckets are (-inf, 0.1], (0.1, 1], (1, +inf): a value on a boundary goes below it.
    assert list(chat.bucket_counts) == [2, 2, 1] and chat.count == 5
    assert chat.min == 0.05 and chat.max == 3.0 and abs(chat.sum - 4.65) < 1e-9
    assert len(points) == CARDINALITY_LIMIT + 1
    overflow = points[(("otel.metric.overflow", True),)]
    assert overflow.count == 6  # the sets beyond the limit, folded into one


def test_one_attribute_set_named_in_two_orders_is_one_series() -> None:
    histograms = HistogramSet(Resource.create({}), InstrumentationScope("scope", "1"))
    tokens = histograms.histogram("t", "{token}", "tokens", (10.0,))
    tokens.record(1, {"type": "input", "model": "m"})
    tokens.record(20, {"model": "m", "type": "input"})
    data = histograms.merged(None)
    assert data is not None
    (point,) = data.resource_metrics[0].scope_metrics[0].metrics[0].data.data_points
    assert point.attributes == {"type": "input", "model": "m"}
    assert list(point.bucket_counts) == [1, 1] and point.count == 2 and point.sum == 21
    assert point.min == 1 and point.max == 20


def test_values_the_wire_cannot_carry_are_left_out_and_tracestate_is_kept() -> None:
    from opentelemetry.trace import TraceState

    sink = _Sink()
    tracer = FastTracer(sink, 1.0)
    remote = trace.set_span_in_context(NonRecordingSpan(SpanContext(
        0xABC, 0xDEF, True, TraceFlags(TraceFlags.SAMPLED), TraceState([("vendor", "x1")]))))
    span = tracer.start_span("s", context=remote, attributes={"big": 1 << 64, "ok": -(1 << 63)})
    span.end()
    (decoded,) = _decode(sink)[1]
    assert attributes_of(decoded) == {"ok": -(1 << 63)}  # an int64 out of range would spoil the batch
    assert decoded.trace_state == "vendor=x1"


def test_a_tracer_that_records_nothing_still_propagates_a_hop() -> None:
    sink = _Sink()
    quiet = FastTracer(sink, 0.0, records=False)
    remote = trace.set_span_in_context(NonRecordingSpan(SpanContext(
        0xABC, 0xDEF, True, TraceFlags(TraceFlags.SAMPLED))))
    hop = quiet.start_span("x", context=remote)
    context = hop.get_span_context()
    assert not hop.is_recording() and context.trace_id == 0xABC and context.span_id != 0xDEF
    assert context.trace_flags.sampled
    hop.end()
    assert sink.spans == []


def test_a_root_starts_a_trace_when_nothing_is_current() -> None:
    sink = _Sink()
    root = FastTracer(sink, 1.0).start_span("root")  # the current span is INVALID_SPAN here
    assert root.is_recording() and root.get_span_context().is_valid
    root.end()
    assert sink.count == 1


def test_spans_ended_on_a_loop_are_encoded_at_its_next_turn_in_one_batch() -> None:
    sink = _Sink()
    tracer = FastTracer(sink, 1.0)

    async def steps() -> list[int]:
        seen = []
        for name in ("sop.limits", "sop.quotas", "sop.backpressure"):
            tracer.start_span(name).end()
            seen.append(sink.count)  # nothing encoded while the request's code runs
        await asyncio.sleep(0)  # the loop's next turn
        seen.append(sink.count)
        return seen

    assert asyncio.run(steps()) == [0, 0, 0, 3]
    assert len(sink.spans) == 1  # the turn's spans in one chunk for the export thread
    assert [span.name for span in _decode(sink)[1]] == ["sop.limits", "sop.quotas", "sop.backpressure"]


def test_a_loop_that_stops_before_its_flush_keeps_nothing_waiting() -> None:
    sink = _Sink()
    tracer = FastTracer(sink, 1.0)
    loop = asyncio.new_event_loop()
    try:
        def end_and_stop() -> None:
            tracer.start_span("first").end()
            loop.stop()  # the flush it scheduled would run at the next turn: there is none

        loop.call_soon(end_and_stop)
        loop.run_forever()
    finally:
        loop.close()
    assert sink.spans == []

    async def end_one(name: str) -> None:
        tracer.start_span(name).end()

    asyncio.run(end_one("second"))  # a new loop flushes both, not waiting on the dead one
    assert [span.name for span in _decode(sink)[1]] == ["first", "second"]
    tracer.start_span("outside any loop").end()  # encoded at once
    assert sink.count == 3
    tracer.flush()  # the stop sequence's flush: with nothing pending, nothing happens
    assert sink.count == 3


def test_cached_attributes_keep_their_type() -> None:
    """`True == 1` for a dict: the encoding cache keys by type too, so neither takes the other's bytes."""
    sink = _Sink()
    tracer = FastTracer(sink, 1.0)
    for value in (True, 1, 1.0, "1", False, 0, 1023, 1024, -1):
        tracer.start_span("s", attributes={"v": value}).end()
        tracer.start_span("s", attributes={"v": value}).end()  # the second from the cache
    values = [attributes_of(span)["v"] for span in _decode(sink)[1]]
    expected = [v for v in (True, 1, 1.0, "1", False, 0, 1023, 1024, -1) for _ in (0, 1)]
    assert values == expected and [type(v) for v in values] == [type(v) for v in expected]


def _spans_chunk(tracer_names: list[str]) -> tuple[bytes, int]:
    sink = _Sink()
    tracer = FastTracer(sink, 1.0)
    for name in tracer_names:
        tracer.start_span(name).end()  # outside a loop: encoded at once, one chunk each
    return b"".join(sink.spans), sink.count


def test_the_shipper_sends_whole_chunks_and_drops_past_its_bound() -> None:
    """Chunks (a turn's spans each) reach a real OTLP/HTTP receiver whole and in order; past `max_queue`
    spans a chunk is dropped and its spans counted, never half queued."""
    first = _spans_chunk(["a1", "a2", "a3"])
    second = _spans_chunk(["b1", "b2"])
    third = _spans_chunk(["c1", "c2", "c3", "c4"])
    with OtlpReceiver() as receiver:
        shipper = SpanShipper(receiver.url, "http/protobuf", otlp_wire.encode_resource({}),
                              otlp_wire.encode_scope("s", "1"), delay_s=3600.0, max_batch=4,
                              max_queue=8, environ={})
        shipper.add(*first)  # 3 waiting: under max_batch, the thread sleeps on
        shipper.add(*second)  # 5: max_batch crossed, the thread wakes and sends both chunks whole
        deadline = time.monotonic() + 30
        while len(receiver.spans()) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [span.name for span in receiver.spans()] == ["a1", "a2", "a3", "b1", "b2"]
        assert shipper.exported == 5
        shipper.shutdown()
        bounded = SpanShipper(receiver.url, "http/protobuf", otlp_wire.encode_resource({}),
                              otlp_wire.encode_scope("s", "1"), delay_s=3600.0, max_batch=100,
                              max_queue=8, environ={})
        bounded.add(*third)  # 4 waiting (under max_batch: nothing is sent before the shutdown)
        bounded.add(*second)  # 6
        bounded.add(*first)  # 9 > 8: dropped whole
        assert bounded.dropped == 3
        bounded.shutdown()
        assert [span.name for span in receiver.spans()][5:] == ["c1", "c2", "c3", "c4", "b1", "b2"]
        assert bounded.exported == 6 and bounded.failed == 0


def _reference_varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


_EDGES = [0, 1, 127, 128, 2**14 - 1, 2**14, 2**21 - 1, 2**21, 2**28 - 1, 2**28, 2**35 - 1, 2**35,
          2**49, 2**63 - 1, -1, -(2**63)]


def test_varints_and_lengths_at_every_size_boundary() -> None:
    """The straight-line varint branches (up to 5 bytes) and the loop agree with the definition, and
    spans whose length needs 1, 2 or 3 bytes read back whole."""
    for value in _EDGES:
        assert otlp_wire.varint(value) == _reference_varint(value), value
    sink = _Sink()
    tracer = FastTracer(sink, 1.0)
    for value in _EDGES:
        tracer.start_span("s", attributes={"n": value}).end()
    for size in (10, 200, 20_000):  # the span's own length: one, two and three varint bytes
        tracer.start_span("s", attributes={"text": "x" * size}).end()
    spans = _decode(sink)[1]
    assert [attributes_of(span)["n"] for span in spans[:len(_EDGES)]] == _EDGES
    assert [len(attributes_of(span)["text"]) for span in spans[len(_EDGES):]] == [10, 200, 20_000]


def test_cached_list_and_string_attributes_read_back_as_set() -> None:
    """Lists of strings (finish reasons) and string pairs come from caches after their first use;
    each span still carries its own values."""
    sink = _Sink()
    tracer = FastTracer(sink, 1.0)
    sequence = [["stop"], ["length"], ["stop"], ["stop", "length"], [], ["stop"]]
    for reasons in sequence:
        tracer.start_span("s", attributes={"reasons": reasons, "mode": "enforce",
                                           "decision": reasons[0] if reasons else "none"}).end()
    read = [attributes_of(span) for span in _decode(sink)[1]]
    assert [list(a["reasons"]) if a.get("reasons") else [] for a in read] == sequence
    assert [a["decision"] for a in read] == [r[0] if r else "none" for r in sequence]
    assert {a["mode"] for a in read} == {"enforce"}


def _parse_count(text: str) -> int:
    return int(text)  # raises with the text quoted: "invalid literal for int() with base 10: '...'"


def test_an_exception_on_a_span_keeps_its_frames_but_no_client_text() -> None:
    """record_exception (also what `use_span` and `start_as_current_span` call for an exception that
    crosses them) keeps the type and the frames; the message only of a ProxyError, whose contract is a
    text safe for a client. Any other message may quote what a client sent."""
    sink = _Sink()
    tracer = FastTracer(sink, 1.0)
    secret = "SECRET-PROMPT-TEXT"
    span = tracer.start_span("plugin.summarize")
    try:
        with trace.use_span(span, end_on_exit=True):
            _parse_count(secret)
    except ValueError:
        pass
    refused = tracer.start_span("sop.limits")
    refused.record_exception(RequestPayloadTooLarge("request body is larger than 1048576 bytes"))
    refused.end()
    _, spans = _decode(sink)
    by_name = {s.name: s for s in spans}
    (event,) = by_name["plugin.summarize"].events
    recorded = attributes_of(event)
    assert recorded["exception.type"] == "ValueError" and "exception.message" not in recorded
    assert "_parse_count" in recorded["exception.stacktrace"]  # the frames: where it happened
    assert secret not in str(recorded) and secret.encode() not in b"".join(sink.spans)
    status = by_name["plugin.summarize"].status
    assert status.code == 2 and status.message == "ValueError"  # use_span's "Type: message", cut
    (event,) = by_name["sop.limits"].events
    recorded = attributes_of(event)
    assert recorded["exception.message"] == "request body is larger than 1048576 bytes"
    assert recorded["exception.stacktrace"].endswith(
        "RequestPayloadTooLarge: request body is larger than 1048576 bytes\n")
