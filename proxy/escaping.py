"""Escaping what a client sent before it reaches a log line or a response header: one scheme for both,
so a value can neither split a record or a header block nor forge a field of it."""

from __future__ import annotations

import traceback
from collections.abc import Callable

__all__ = ["escape", "escape_char", "withheld"]


def escape_char(char: str) -> str:
    """`\\xNN` for a code point below 256, else `\\uNNNN` (or `\\UNNNNNNNN` beyond the BMP)."""
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape(text: str, limit: int, keep: Callable[[str], bool]) -> str:
    """`text` with every character `keep` refuses escaped, cut at `limit` characters (then `...`)."""
    out = [char if keep(char) else escape_char(char) for char in text[:limit]]
    if len(text) > limit:
        out.append("...")
    return "".join(out)


def withheld(exc: BaseException) -> str:
    """`exc` for a log line: its type and its frames (the code's files, lines and source), never its
    message, which may quote what a client sent (a parser's raw bytes, `int()` of a client's text, a
    KeyError of its key)."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    return f"{type(exc).__name__} (message withheld)\n{frames}".rstrip("\n")
