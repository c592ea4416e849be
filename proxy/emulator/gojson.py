"""JSON encoding exactly as Go's `encoding/json` writes it, so emulated responses match Ollama byte for byte.

Go differs from Python's `json` in four ways that show on the wire (reference §1): `<`, `>`, `&`, U+2028 and
U+2029 are escaped; non-ASCII is written as UTF-8; floats use the shortest representation in fixed notation
unless the magnitude is below 1e-6 or at least 1e21 (then `1e-7`, exponent without zero padding); float32
values (embeddings) use the shortest repr that round-trips through 32 bits.
"""

from __future__ import annotations

import json
import math
import struct
from decimal import Decimal
from typing import Any

__all__ = ["F32", "dumps", "dumps_bytes", "go_float"]

_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
                          "\u2028": "\\u2028", "\u2029": "\\u2029"})


class F32(float):
    """A float that Go holds as float32: it is written with the shortest repr that round-trips in 32 bits."""

    __slots__ = ()


def _string(s: str) -> str:
    return json.dumps(s, ensure_ascii=False).translate(_ESCAPES)


def _shortest32(value: float) -> str:
    target = struct.unpack("<f", struct.pack("<f", value))[0]
    for precision in range(6, 10):
        text = f"{target:.{precision}g}"
        if struct.unpack("<f", struct.pack("<f", float(text)))[0] == target:
            break
    for precision in range(5, 0, -1):  # rarely fewer digits suffice
        shorter = f"{target:.{precision}g}"
        if struct.unpack("<f", struct.pack("<f", float(shorter)))[0] != target:
            break
        text = shorter
    return text


def go_float(value: float, bits: int = 64) -> str:
    """Render a float as Go's encoding/json does for float64 (`bits=64`) or float32 (`bits=32`)."""
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"json: unsupported value: {value}")
    if value == 0:
        return "-0" if str(value).startswith("-") else "0"
    digits = _shortest32(value) if bits == 32 else repr(value)
    number = Decimal(digits).normalize()
    magnitude = abs(float(digits))
    if magnitude < 1e-6 or magnitude >= 1e21:
        sign, coefficient, exponent = number.as_tuple()
        assert isinstance(exponent, int)
        mantissa = "".join(map(str, coefficient))
        exp10 = exponent + len(mantissa) - 1
        body = mantissa[0] + ("." + mantissa[1:] if len(mantissa) > 1 else "")
        return f"{'-' if sign else ''}{body}e{'-' if exp10 < 0 else '+'}{abs(exp10):02d}".replace(
            "e-0", "e-").replace("e+0", "e+")
    return format(number, "f")


def _encode(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(_string(value))
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, F32):
        out.append(go_float(value, 32))
    elif isinstance(value, float):
        out.append(go_float(value, 64))
    elif isinstance(value, dict):
        out.append("{")
        first = True
        for key, item in value.items():
            if not first:
                out.append(",")
            first = False
            out.append(_string(str(key)))
            out.append(":")
            _encode(item, out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _encode(item, out)
        out.append("]")
    else:
        raise TypeError(f"cannot encode {type(value).__name__}")


def dumps(value: Any) -> str:
    """Encode `value` as Go's json.Marshal would. Dict order is kept: build dicts in Go's field order,
    and sort map-typed values' keys before passing them (Go sorts map keys)."""
    out: list[str] = []
    _encode(value, out)
    return "".join(out)


def dumps_bytes(value: Any, newline: bool = False) -> bytes:
    """`dumps` as UTF-8 bytes, with a trailing newline for NDJSON lines and json.Encoder output."""
    text = dumps(value)
    return (text + "\n").encode() if newline else text.encode()
