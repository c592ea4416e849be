"""Turning cattrs structuring errors into messages that name the key path of every problem, for the
configuration file and the emulator's profiles alike."""

from __future__ import annotations

import re
from typing import Any

import cattrs

__all__ = ["format_validation_error"]


def _describe(exc: BaseException, type_: Any) -> str:
    """One error in words; our validators already say `field: problem`."""
    if isinstance(exc, KeyError):
        return "required key missing"
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        # YAML keys need not be strings (`1: 2`, `true: x`): each is named as the file spells it
        # (cattrs' own str() of this error joins them as strings and raises TypeError for others).
        return "unknown key(s) " + ", ".join(sorted(str(field) for field in exc.extra_fields))
    text = str(exc)
    if " not in literal " in text:
        _, _, allowed = text.partition(" not in literal ")
        # Not the value itself: a key pasted into the wrong field must not reach a log line.
        return f"not one of {allowed.removeprefix('typing.Literal')}"
    if isinstance(exc, ValueError) and re.match(r"^[\w.\[\]]+: ", text):
        return text
    if isinstance(exc, TypeError) and text.startswith(("expected ", "not one of ")):
        return text
    return f"expected {getattr(type_, '__name__', type_)}"


def format_validation_error(exc: cattrs.BaseValidationError) -> str:
    """Every error in `exc` as `path: problem`, joined with `; ` (`server.max_body_bytes: must be > 0`)."""
    messages = []
    for line in cattrs.transform_error(exc, path="", format_exception=_describe):
        text, _, where = line.rpartition(" @ ")
        # Mapping keys read as config keys (`models.llama3.2.options`), not Python (`models['llama3.2']`).
        path = re.sub(r"\['((?:[^'\\]|\\.)*)'\]", r".\1", where.lstrip("$")).lstrip(".")
        field, sep, rest = text.partition(": ")
        if sep and re.fullmatch(r"[A-Za-z_]\w*(\[\d+\])*", field):
            # A validator names its own field: fold it into the path.
            path, text = (f"{path}.{field}" if path else field), rest
        messages.append(f"{path}: {text}" if path else text)
    return "; ".join(messages)
