"""OTLP trace data in protobuf wire format, written directly: one ended span becomes its `Span` message bytes.

Why by hand: the SDK's encoder builds a tree of protobuf objects per span, attribute by attribute, and
then serialises it, ~20 us of Python per span, in the export thread but under the GIL, so the event loop
stalls while a batch of thousands is encoded (issue 16 measured a p99 of 18 ms from it). A span here is a
few byte strings joined, most of them cached (names, keys, repeated string attributes): done when the
span ends, it spreads the cost over requests, and the export thread only joins bytes and writes them.

Field numbers are opentelemetry-proto's (trace/v1/trace.proto, common/v1/common.proto,
resource/v1/resource.proto, collector/trace/v1/trace_service.proto); tests/test_otlp_wire.py parses
the output with opentelemetry-proto's generated classes and compares every field.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["encode_attributes", "encode_event", "encode_request", "encode_resource", "encode_scope",
           "encode_span", "length_delimited"]

_TIMES = struct.Struct("<BQBQ")  # fields 7 and 8 of Span: start and end, fixed64 each
_DOUBLE = struct.Struct("<d")
_FIXED64 = struct.Struct("<Q")
_CACHE_LIMIT = 4096
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_strings: dict[tuple[int, str], bytes] = {}
"""(tag, text) -> the whole field: span names, attribute keys and the string values that repeat (modes,
decisions, routes, model labels). Bounded: cleared when full, so client-chosen values cannot grow it."""


def varint(value: int) -> bytes:
    """Protobuf base-128 varint; negative int64 values as their 64-bit two's complement."""
    if value < 0:
        value += 1 << 64
    if value < 0x80:
        return bytes((value,))
    # Straight-line up to 5 bytes (34 s in nanoseconds): sizes, token counts and Ollama's durations.
    if value < 0x4000:
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    if value < 0x200000:
        return bytes(((value & 0x7F) | 0x80, ((value >> 7) & 0x7F) | 0x80, value >> 14))
    if value < 0x10000000:
        return bytes(((value & 0x7F) | 0x80, ((value >> 7) & 0x7F) | 0x80,
                      ((value >> 14) & 0x7F) | 0x80, value >> 21))
    if value < 0x800000000:
        return bytes(((value & 0x7F) | 0x80, ((value >> 7) & 0x7F) | 0x80,
                      ((value >> 14) & 0x7F) | 0x80, ((value >> 21) & 0x7F) | 0x80, value >> 28))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(tag: int, payload: bytes) -> bytes:
    """Field `tag` (its key byte: number << 3 | 2) holding `payload`."""
    size = len(payload)
    if size < 0x80:
        return bytes((tag, size)) + payload
    if size < 0x4000:
        return bytes((tag, (size & 0x7F) | 0x80, size >> 7)) + payload
    return bytes((tag,)) + varint(size) + payload


def _string_field(tag: int, text: str) -> bytes:
    key = (tag, text)
    field = _strings.get(key)
    if field is None:
        field = length_delimited(tag, text.encode("utf-8", "replace"))
        if len(_strings) >= _CACHE_LIMIT:
            _strings.clear()
        _strings[key] = field
    return field


def _any_value(value: object) -> bytes | None:
    """AnyValue's bytes, or None for a value OTLP attributes cannot hold (the SDK drops those too)."""
    kind = type(value)
    if kind is str:
        return _string_field(0x0A, value)  # type: ignore[arg-type]
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if kind is int:
        if not _INT64_MIN <= value <= _INT64_MAX:  # type: ignore[operator]
            return None  # not an int64: one bad value would make the collector refuse the batch
        return b"\x18" + varint(value)  # type: ignore[arg-type]
    if kind is float:
        return b"\x21" + _DOUBLE.pack(value)
    if isinstance(value, (list, tuple)):
        items = [_any_value(item) for item in value]
        array = b"".join(length_delimited(0x0A, item) for item in items if item is not None)
        return length_delimited(0x2A, array)
    if isinstance(value, str):  # a str subclass
        return _string_field(0x0A, str(value))
    if isinstance(value, int) and _INT64_MIN <= value <= _INT64_MAX:
        return b"\x18" + varint(int(value))
    return None


_pairs: dict[tuple[int, str, object, type], bytes] = {}
"""(tag, key, value, type) -> the whole KeyValue field, for values that repeat: strings, booleans and
small integers (statuses, positions). The type is part of the key: True == 1 for a dict. Bounded like
`_strings`."""


def _key_value(tag: int, key: str, value: object) -> bytes:
    kind = type(value)
    cache_key: tuple[int, str, object, type] | None = None
    if kind is str or kind is bool or (kind is int and 0 <= value < 1024):  # type: ignore[operator]
        cache_key = (tag, key, value, kind)
    elif kind is list and len(value) <= 4 and all(  # type: ignore[arg-type]
            type(item) is str for item in value):  # type: ignore[attr-defined]
        cache_key = (tag, key, tuple(value), kind)  # type: ignore[arg-type]  # finish reasons
    if cache_key is not None:
        field = _pairs.get(cache_key)
        if field is not None:
            return field
    encoded = _any_value(value)
    if encoded is None:
        return b""
    field = length_delimited(tag, _string_field(0x0A, key) + length_delimited(0x12, encoded))
    if cache_key is not None:
        if len(_pairs) >= _CACHE_LIMIT:
            _pairs.clear()
        _pairs[cache_key] = field
    return field


def encode_attributes(tag: int, attributes: Mapping[str, object]) -> bytes:
    """Every attribute as a repeated KeyValue field `tag` (None values left out)."""
    return b"".join([_key_value(tag, key, value) for key, value in attributes.items()
                     if value is not None])


def encode_event(name: str, time_ns: int, attributes: Mapping[str, object]) -> bytes:
    """A Span.Event message (without its own field key)."""
    return (b"\x09" + _FIXED64.pack(time_ns) + _string_field(0x12, name)
            + encode_attributes(0x1A, attributes))


_KINDS = tuple(bytes((0x30, kind)) for kind in range(8))
"""Span field 6, by OTLP span kind (0-5; the API's kinds are 1-5 there)."""
_span_fields: dict[tuple[str, str], bytes] = {}
"""(key, text) -> a span's whole KeyValue field (field 9) for a string attribute: the pairs a step
span carries (modes, decisions, tenants, model labels) are found by the attribute item itself, no call
and no key tuple. Only string values are put here (True == 1 would otherwise share a slot). Bounded
like `_strings`."""
_flag_fields: dict[int, bytes] = {}


def encode_span(trace_id: bytes, span_id: bytes, parent_id: bytes | None, name: str, kind: int,
                start_ns: int, end_ns: int, attributes: Mapping[str, object],
                events: Sequence[bytes], status_code: int, status_message: str | None,
                flags: int, trace_state: str = "") -> bytes:
    """One Span message, as the `spans` field (2) of a ScopeSpans: ready to be concatenated."""
    parts = [b"\x0a\x10", trace_id, b"\x12\x08", span_id]
    if trace_state:
        parts.append(_string_field(0x1A, trace_state))  # W3C tracestate, as received
    if parent_id is not None:
        parts += (b"\x22\x08", parent_id)
    parts += (_string_field(0x2A, name), _KINDS[kind], _TIMES.pack(0x39, start_ns, 0x41, end_ns))
    cached = _span_fields.get
    for item in attributes.items():
        try:
            field = cached(item)  # type: ignore[arg-type]
        except TypeError:  # an unhashable value (a list)
            field = None
        if field is None:
            key, value = item
            if value is None:
                continue
            field = _key_value(0x4A, key, value)
            if type(value) is str:
                if len(_span_fields) >= _CACHE_LIMIT:
                    _span_fields.clear()
                _span_fields[item] = field  # type: ignore[index]
        parts.append(field)
    for event in events:
        parts.append(length_delimited(0x5A, event))
    if status_code:
        status = b"\x18" + bytes((status_code,))
        if status_message:
            status = _string_field(0x12, status_message) + status
        parts.append(length_delimited(0x7A, status))
    # Field 16 (fixed32): W3C trace flags, with bit 8 set: "has_is_remote" for the parent.
    flag_field = _flag_fields.get(flags)
    if flag_field is None:
        flag_field = b"\x85\x01" + struct.pack("<I", flags)
        if len(_flag_fields) < 64:
            _flag_fields[flags] = flag_field
    parts.append(flag_field)
    return length_delimited(0x12, b"".join(parts))


def encode_request(resource: bytes, scope: bytes, spans: Iterable[bytes]) -> bytes:
    """An ExportTraceServiceRequest holding `spans` (each from encode_span) under one resource and one
    instrumentation scope. `resource` is a Resource message, `scope` an InstrumentationScope message."""
    scope_spans = length_delimited(0x0A, scope) + b"".join(spans)
    resource_spans = length_delimited(0x0A, resource) + length_delimited(0x12, scope_spans)
    return length_delimited(0x0A, resource_spans)


def encode_resource(attributes: Mapping[str, object]) -> bytes:
    """A Resource message."""
    return encode_attributes(0x0A, attributes)


def encode_scope(name: str, version: str) -> bytes:
    """An InstrumentationScope message."""
    return _string_field(0x0A, name) + _string_field(0x12, version)
