"""How the emulator puts bytes on the wire the way Ollama's Go server does (reference §1, §4.4).

Go's net/http sends `Content-Length` only when the whole handler output fits its 2 KiB buffer before the
handler returns; larger bodies and every stream go out chunked. gin's `c.JSON` writes no trailing newline
with `application/json; charset=utf-8`; the OpenAI/Anthropic writers end with `\n` and no charset.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from proxy import gojson as goread

from . import gojson, gotypes
from .faults import FAULT_KEY, FAULTS, FaultyStream

__all__ = [
    "CT_JSON",
    "CT_JSON_PLAIN",
    "CT_NDJSON",
    "CT_SSE",
    "GoDecodeError",
    "decode_body",
    "go_time",
    "send_bytes",
    "send_error",
    "send_json",
    "start_stream",
]

CT_JSON = "application/json; charset=utf-8"
CT_JSON_PLAIN = "application/json"
CT_NDJSON = "application/x-ndjson"
CT_SSE = "text/event-stream"
_GO_PRECHUNK_BYTES = 2048


def go_time(ns: int) -> str:
    """RFC 3339 with nanoseconds, trailing zeros trimmed, `Z` for UTC (Go's time.Time JSON form)."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    base = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    frac = f"{nanos:09d}".rstrip("0")
    return f"{base}.{frac}Z" if frac else f"{base}Z"


async def send_bytes(request: web.Request, status: int, body: bytes, content_type: str | None,
                     extra_headers: dict[str, str] | None = None) -> web.StreamResponse:
    """Write a complete body with Go's framing: Content-Length up to 2 KiB, chunked beyond."""
    headers = dict(extra_headers or {})
    if content_type is not None:
        headers["Content-Type"] = content_type
    if len(body) <= _GO_PRECHUNK_BYTES or request.method == "HEAD":
        # aiohttp sends Content-Length but no body for HEAD, as Go does
        return web.Response(status=status, body=body, headers=headers)
    response = web.StreamResponse(status=status, headers=headers)
    response.enable_chunked_encoding()
    await response.prepare(request)
    await response.write(body)
    await response.write_eof()
    return response


async def send_json(request: web.Request, value: Any, status: int = 200,
                    content_type: str = CT_JSON, newline: bool = False) -> web.StreamResponse:
    """A gin `c.JSON` (no newline) or a json.Encoder body (`newline=True`)."""
    return await send_bytes(request, status, gojson.dumps_bytes(value, newline), content_type)


async def send_error(request: web.Request, status: int, message: str,
                     content_type: str = CT_JSON) -> web.StreamResponse:
    """Ollama's native error body `{"error": "..."}`."""
    return await send_json(request, {"error": message}, status, content_type)


async def start_stream(request: web.Request, content_type: str,
                       extra_headers: dict[str, str] | None = None) -> web.StreamResponse:
    """Begin a chunked 200 stream; the caller writes one flushed line or event at a time."""
    headers = {"Content-Type": content_type, **(extra_headers or {})}
    faults = request.get(FAULT_KEY)
    response = (web.StreamResponse(status=200, headers=headers) if faults is None
                else FaultyStream(faults, request.app[FAULTS], status=200, headers=headers))
    response.enable_chunked_encoding()
    await response.prepare(request)
    return response


class GoDecodeError(Exception):
    """A request body Go's decoder would refuse; `str()` is Go's error text."""


def _parse_int(text: str) -> Any:
    value = int(text)
    if -(2**63) <= value < 2**64:
        return value
    try:
        float(value)
    except OverflowError:
        return goread.BigNumber(text, overflow=True)
    return goread.BigNumber(text, overflow=False)


_LITERAL_DECODER = json.JSONDecoder(parse_float=gotypes.Literal, parse_int=_parse_int, strict=True)


def _literal_view(raw: bytes) -> Any:
    """The body again, floats keeping their text: only on the error path, to quote them as Go does."""
    text = raw.decode("utf-8", "sop-go-replace")
    start = len(text) - len(text.lstrip(" \t\r\n"))
    value, _ = _LITERAL_DECODER.raw_decode(text, start)
    return goread.request_view(value, raw, True)


def _plain(value: Any) -> Any:
    """Numbers as the handlers read them, in place: a BigNumber within float64's range is a float to Go
    (only the slow read makes BigNumbers; iterative, as bodies nest up to Go's limit)."""
    pending = [value]
    while pending:
        container = pending.pop()
        keys: Any = container.keys() if isinstance(container, dict) else range(len(container))
        for key in list(keys):
            item = container[key]
            if isinstance(item, goread.BigNumber):
                container[key] = float(item.text)
            elif isinstance(item, dict | list):
                pending.append(item)
    return value


def decode_body(raw: bytes, struct: str) -> dict[str, Any]:
    """Decode a JSON request body as gin's ShouldBindJSON would into `struct` (gotypes.SCHEMAS), with
    Go's error texts: syntax, nesting depth, NaN/Infinity, numbers out of range, wrong field types.

    Reads bytes the way proxy.gojson does (the proxy's own Go-faithful reader): invalid UTF-8 replaced,
    first value only, duplicate keys last-wins, field names matched case-insensitively.
    """
    try:
        return _decode(raw, struct)
    except RecursionError:
        # Python's recursion limit (about 1000 levels) comes before Go's 10000, reported the same way,
        # as the proxy's own reader does (proxy.gojson).
        raise GoDecodeError("exceeded max depth") from None


def _decode(raw: bytes, struct: str) -> dict[str, Any]:
    try:
        value, slow = goread.loads(raw)
    except goread.GoJSONError as exc:
        raise GoDecodeError(str(exc)) from None
    if value is None:
        return {}
    view = goread.request_view(value, raw, slow)
    schema = gotypes.SCHEMAS[struct]
    try:
        gotypes.check(view, schema)
    except gotypes.GoTypeError as first:
        try:  # the same error, with numbers quoted as written
            gotypes.check(_literal_view(raw), schema)
        except gotypes.GoTypeError as exc:
            raise GoDecodeError(str(exc)) from None
        except (ValueError, RecursionError):
            pass
        raise GoDecodeError(str(first)) from None
    return dict(_plain(view)) if slow else dict(view)
