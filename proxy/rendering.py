"""The one error renderer: every error the proxy itself writes, in the route's dialect, in both phases.

- Before the response headers (`render`, `error_body`): a real status, headers and one error object:
  the native `{"error": ..., "code": ...}` (plus `retry_after_s`), OpenAI's `{"error": {"message",
  "type", "param", "code"}}`, or Anthropic's `{"type": "error", "error": {"type", "message"}}`.
- After the headers (`stream_error_record`): the status is gone (200 was sent), so the stream ends with
  one final record in its own framing: an NDJSON line, an OpenAI SSE `data:` event, or Anthropic's
  `event: error` SSE event; a body that is not a stream cannot carry one (None: the caller aborts).

Both phases build the same error object (`error_object`), so a client's SDK reads one shape per dialect
whichever phase the failure met. Only ingress (before headers), the forwarder (after) and the edge
(refusals before aiohttp has a request, always native: no route is known yet) call this module.
"""

from __future__ import annotations

import datetime
import email.utils
import math
import time
from collections.abc import Mapping
from typing import Any

import orjson

from .errors import MAX_RETRY_AFTER_S, ProxyError

__all__ = ["error_body", "error_object", "render", "retry_headers", "status_of", "stream_error_record",
           "told_wait_s"]

_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error", 529: "overloaded_error"}


def _error_table() -> dict[str, int]:
    """Code -> status over the whole ProxyError tree (the first class to claim a code wins)."""
    table: dict[str, int] = {}
    pending: list[type[ProxyError]] = [ProxyError]
    while pending:
        cls = pending.pop(0)
        table.setdefault(cls.code, cls.status)
        pending.extend(cls.__subclasses__())
    return table


_STATUS_OF_CODE = _error_table()


def status_of(code: str) -> int:
    """The status the error table gives `code`; 502 for codes without a class (an upstream failure
    after the response started, `upstream_reset_after_response_started`)."""
    return _STATUS_OF_CODE.get(code, 502)


def _openai_type(status: int) -> str:
    """The OpenAI error object's `type` for a status, as Ollama's /v1 names it (reference section 7),
    except that every other 4xx of the proxy's own is `invalid_request_error` too."""
    if status == 404:
        return "not_found_error"
    return "invalid_request_error" if status < 500 else "api_error"


def error_object(dialect: str, status: int, code: str, message: str,
                 retry_after_s: float | None = None) -> dict[str, Any]:
    """The error object of `dialect` (`ollama`, `openai`, `anthropic`). `message` must be safe to show a
    client (ProxyError's contract). Native objects carry `retry_after_s` (whole seconds) when given;
    OpenAI's carries the code, and its `type` is `not_found_error` for a 404 (as on Ollama's /v1),
    `invalid_request_error` below 500, `api_error` above; Anthropic's type follows the status as the
    Anthropic API's does."""
    if dialect == "openai":
        return {"error": {"message": message, "type": _openai_type(status), "param": None, "code": code}}
    if dialect == "anthropic":
        return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"),
                                           "message": message}}
    value: dict[str, Any] = {"error": message, "code": code}
    if retry_after_s is not None:
        value["retry_after_s"] = math.ceil(retry_after_s)
    return value


def error_body(dialect: str, status: int, code: str, message: str,
               retry_after_s: float | None = None) -> bytes:
    """The body of an error sent before headers: the dialect's error object, newline-terminated on
    `/v1` (as OpenAI's and Anthropic's servers send it), bare on native routes (as Ollama's gin does)."""
    body = orjson.dumps(error_object(dialect, status, code, message, retry_after_s))
    return body if dialect == "ollama" else body + b"\n"


def retry_headers(retry_after_s: float) -> dict[str, str]:
    """`Retry-After` (whole seconds, at least 1, at most MAX_RETRY_AFTER_S) and `retry-after-ms` (the
    same wait, in milliseconds, which the OpenAI SDKs prefer); past the cap, `x-should-retry: false`."""
    capped = min(max(retry_after_s, 0.0), MAX_RETRY_AFTER_S)
    headers = {"Retry-After": str(max(1, math.ceil(capped))),
               "retry-after-ms": str(max(1, math.ceil(capped * 1000)))}
    if retry_after_s > MAX_RETRY_AFTER_S:
        headers["x-should-retry"] = "false"
    return headers


def told_wait_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The wait a replica's (or ollama.com's) answer asks for, in seconds: `retry-after-ms`, else
    `Retry-After` as seconds or an HTTP date (a past date is 0). None when absent or not a finite,
    non-negative value: the proxy then says its own."""
    for name, scale in (("retry-after-ms", 1000.0), ("Retry-After", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        value = value.strip()
        try:
            seconds = float(value) / scale
        except ValueError:
            if scale != 1.0:
                continue
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                continue
            if when.tzinfo is None:  # RFC 9110 dates are GMT
                when = when.replace(tzinfo=datetime.UTC)
            seconds = max(0.0, when.timestamp() - (time.time() if now is None else now))
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
    return None


def render(dialect: str, exc: ProxyError) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body for `exc` before the response started. `should_retry = False` gives
    `x-should-retry: false` (the header the OpenAI SDKs obey) and no Retry-After; otherwise a
    `retry_after_s` gives `Retry-After` and `retry-after-ms` (`retry_headers`)."""
    headers = {"Content-Type": "application/json; charset=utf-8"
               if dialect == "ollama" else "application/json"}
    if exc.should_retry is False:
        headers["x-should-retry"] = "false"
    elif exc.retry_after_s is not None:
        headers.update(retry_headers(exc.retry_after_s))
    headers.update(exc.extra_headers())
    return exc.status, headers, error_body(dialect, exc.status, exc.code, exc.message,
                                           exc.retry_after_s if exc.should_retry is not False else None)


def stream_error_record(content_type: str, message: str, code: str,
                        dialect: str = "openai") -> bytes | None:
    """The one final record that ends a broken stream in its own framing, or None when the body is not
    a stream (then the connection is aborted instead, so the client sees a truncated response). The
    framing follows the response's content type (the replica chose it); SSE streams get OpenAI's error
    object, or Anthropic's `event: error` on an Anthropic route. The object is `error_object`'s for the
    code's status, so it matches what the same failure before headers would have sent."""
    status = status_of(code)
    if content_type.startswith("application/x-ndjson"):
        return orjson.dumps(error_object("ollama", status, code, message)) + b"\n"
    if content_type.startswith("text/event-stream") and dialect == "anthropic":
        return b"event: error\ndata: " + orjson.dumps(
            error_object("anthropic", status, code, message)) + b"\n\n"
    if content_type.startswith("text/event-stream"):
        return b"data: " + orjson.dumps(error_object("openai", status, code, message)) + b"\n\n"
    return None
