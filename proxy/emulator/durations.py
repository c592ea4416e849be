"""Go `time.ParseDuration` and Ollama's `keep_alive` decoding, with the exact error texts (reference §4.1)."""

from __future__ import annotations

import re

__all__ = ["FOREVER_NS", "KeepAliveError", "parse_go_duration", "parse_keep_alive"]

FOREVER_NS = 2**63 - 1
_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "μs": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
          "m": 60_000_000_000, "h": 3_600_000_000_000}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


class KeepAliveError(ValueError):
    """A keep_alive value Ollama refuses with 400; `str()` is its message."""


def parse_go_duration(text: str) -> int:
    """Nanoseconds of a Go duration string such as `5m`, `1h30m`, `-1m`, `0`."""
    original = text
    sign = 1
    if text and text[0] in "+-":  # ("" is in every string: the empty text would index past its end)
        sign = -1 if text[0] == "-" else 1
        text = text[1:]
    if text == "0":
        return 0
    if not text:
        raise KeepAliveError(f'time: invalid duration "{original}"')
    total = 0.0
    pos = 0
    while pos < len(text):
        match = _PART.match(text, pos)
        if not match:
            if re.fullmatch(r"[0-9.]+", text[pos:]):
                raise KeepAliveError(f'time: missing unit in duration "{original}"')
            raise KeepAliveError(f'time: invalid duration "{original}"')
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if total > FOREVER_NS:  # Go's int64 nanoseconds overflow
        raise KeepAliveError(f'time: invalid duration "{original}"')
    return sign * int(total)


def parse_keep_alive(value: object) -> int | None:
    """Ollama's keep_alive: seconds as a number or a duration string; negative means forever.

    Returns nanoseconds, `None` when absent, `FOREVER_NS` for negative values.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise KeepAliveError("Unsupported type: 'bool'")
    if isinstance(value, int | float):
        seconds = float(value)
        # Go converts seconds x 1e9 to an int64; beyond its range the result is MinInt64 on amd64,
        # a negative duration: the model stays loaded, as for any negative keep_alive.
        if seconds < 0 or seconds * 1e9 >= FOREVER_NS:
            return FOREVER_NS
        ns = int(seconds * 1_000_000_000)
    elif isinstance(value, str):
        ns = parse_go_duration(value)
    else:
        go_type = "[]interface {}" if isinstance(value, list) else "map[string]interface {}"
        raise KeepAliveError(f"Unsupported type: '{go_type}'")
    return FOREVER_NS if ns < 0 else ns
