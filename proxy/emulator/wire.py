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

from . import gojson
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


_TYPE_NAMES = {str: "string", bool: "bool", int: "number", float: "number", list: "array",
               dict: "object", type(None): "null"}


def decode_body(raw: bytes, struct: str, types: dict[str, tuple[type, str]]) -> dict[str, Any]:
    """Decode a JSON request body as gin's ShouldBindJSON would, with Go's error texts.

    `types` maps a field to (python type, Go type name) for the type checks that matter on the wire, e.g.
    `{"stream": (bool, "bool")}` ->
    `json: cannot unmarshal string into Go struct field X.stream of type bool`.
    """
    if not raw.strip():
        raise GoDecodeError("missing request body")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        if exc.pos >= len(raw.rstrip()):
            raise GoDecodeError("unexpected EOF") from None
        char = raw.decode("utf-8", "replace")[exc.pos]
        where = "looking for beginning of value" if exc.msg.startswith("Expecting value") else (
            "after object key" if "':'" in exc.msg else
            "after object key:value pair" if "','" in exc.msg and "object" in exc.msg.lower() else
            "looking for beginning of object key string" if "property name" in exc.msg else
            "after top-level value" if exc.msg.startswith("Extra data") else
            "looking for beginning of value")
        raise GoDecodeError(f"invalid character {char!r} {where}") from None
    if value is None:
        return {}
    # `struct` may name its package (`openai.ChatCompletionRequest`); native ones are package api.
    qualified = struct if "." in struct else f"api.{struct}"
    struct = qualified.rpartition(".")[2]
    if not isinstance(value, dict):
        raise GoDecodeError(
            f"json: cannot unmarshal {_TYPE_NAMES.get(type(value), 'value')} into Go value of type "
            f"{qualified}")
    for field, (expected, go_type) in types.items():
        item = value.get(field)
        if item is None:
            continue
        ok = isinstance(item, expected) and not (expected is int and isinstance(item, bool))
        if expected is float:
            ok = isinstance(item, int | float) and not isinstance(item, bool)
        if not ok:
            raise GoDecodeError(
                f"json: cannot unmarshal {_TYPE_NAMES.get(type(item), 'value')} into Go struct field "
                f"{struct}.{field} of type {go_type}")
    return value
