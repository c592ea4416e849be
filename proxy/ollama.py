"""Ollama wire knowledge the proxy needs: which routes are inference, their GenAI operation names and
stream defaults, and how to read usage from a response without re-encoding it.

Usage is read from bytes: the final `done` object (native), the `usage` object (OpenAI) or the
`message_delta` event (Anthropic) all sit at the end of the body, so a bounded tail is scanned with
anchored regexes. JSON string content cannot produce a false match: quotes inside strings are escaped.
"""

from __future__ import annotations

import re

import attrs

__all__ = ["RouteInfo", "Usage", "UsageScanner", "classify", "is_cloud_model", "model_key"]


def model_key(model: str) -> str:
    """Ollama's name matching: `llama3.2` and `LLaMA3.2:latest` are one model (tag `latest` by default,
    case-insensitive; a registry host's port is not a tag)."""
    name = model.strip().lower()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def is_cloud_model(model: object) -> bool:
    """Whether Ollama forwards a request for `model` to ollama.com instead of running it: the last
    `:`-suffix is `cloud` or ends with `-cloud` (`gpt-oss:120b-cloud`, `qwen3:cloud`), case-insensitive,
    as Ollama's model reference parser reads it. Such a request's errors are the cloud's, not the
    replica's."""
    if not isinstance(model, str):
        return False
    name = model.strip()
    colon = name.rfind(":")
    if colon < 0:
        return False
    suffix = name[colon + 1:].strip()
    lowered = suffix.lower()
    return lowered == "cloud" or ("/" not in suffix and lowered.endswith("-cloud"))


@attrs.frozen
class RouteInfo:
    """What the proxy knows about a request from its method and path alone."""

    operation: str | None
    """GenAI operation name (`chat`, `text_completion`, `embeddings`) or None for other routes."""
    dialect: str
    """Error and stream dialect of the route: `ollama`, `openai` or `anthropic`."""
    stream_default: bool
    """Whether the route streams when the body does not say (native true, /v1 false)."""
    streams_body_upload: bool = False
    """True for blob uploads, whose body is relayed as it arrives instead of being read first."""


_OPERATIONS = {
    "/api/chat": ("chat", "ollama", True),
    "/api/generate": ("text_completion", "ollama", True),
    "/api/embed": ("embeddings", "ollama", False),
    "/api/embeddings": ("embeddings", "ollama", False),
    "/v1/chat/completions": ("chat", "openai", False),
    "/v1/completions": ("text_completion", "openai", False),
    "/v1/embeddings": ("embeddings", "openai", False),
    "/v1/responses": ("chat", "openai", False),
    "/v1/messages": ("chat", "anthropic", False),
}
_OTHER_OLLAMA = RouteInfo(None, "ollama", True)
_OTHER_OPENAI = RouteInfo(None, "openai", False)
_BLOB_UPLOAD = RouteInfo(None, "ollama", False, streams_body_upload=True)


def classify(method: str, path: str) -> RouteInfo:
    """RouteInfo for a request line."""
    known = _OPERATIONS.get(path)
    if known is not None and method == "POST":
        return RouteInfo(*known)
    if method == "POST" and path.startswith("/api/blobs/"):
        return _BLOB_UPLOAD
    if path.startswith("/v1/"):
        return _OTHER_OPENAI
    return _OTHER_OLLAMA


@attrs.define
class Usage:
    """Token counts and timings reported by the upstream for one response (None when absent)."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    response_model: str | None = None
    finish_reason: str | None = None
    load_duration_ns: int | None = None
    prompt_eval_duration_ns: int | None = None
    eval_duration_ns: int | None = None


def _last_int(pattern: re.Pattern[bytes], data: bytes) -> int | None:
    found = pattern.findall(data)
    return int(found[-1]) if found else None


def _last_str(pattern: re.Pattern[bytes], data: bytes) -> str | None:
    found = pattern.findall(data)
    return found[-1].decode("utf-8", "replace") if found else None


_P = {name: re.compile(rb'"' + name.encode() + rb'":(\d+)') for name in (
    "prompt_eval_count", "eval_count", "load_duration", "prompt_eval_duration", "eval_duration",
    "prompt_tokens", "completion_tokens", "input_tokens", "output_tokens")}
_MODEL = re.compile(rb'"model":"((?:[^"\\]|\\.)*)"')
_REASONS = (re.compile(rb'"done_reason":"(\w+)"'), re.compile(rb'"finish_reason":"(\w+)"'),
            re.compile(rb'"stop_reason":"(\w+)"'))


class UsageScanner:
    """Fed every relayed chunk; keeps the first and last few KiB and reads usage from them at the end.

    Cost per chunk is a bounded slice copy, independent of the response size.
    """

    __slots__ = ("_head", "_tail", "bytes_seen")

    HEAD_BYTES = 1024
    TAIL_BYTES = 8192

    def __init__(self) -> None:
        self._head = b""
        self._tail = b""
        self.bytes_seen = 0

    def feed(self, chunk: bytes) -> None:
        """Account one relayed chunk."""
        if len(self._head) < self.HEAD_BYTES:
            self._head += chunk[: self.HEAD_BYTES - len(self._head)]
        self._tail = (self._tail + chunk)[-self.TAIL_BYTES:]
        self.bytes_seen += len(chunk)

    def usage(self) -> Usage:
        """What the response reported (fields left None when it did not say)."""
        tail = self._tail
        usage = Usage(
            input_tokens=_last_int(_P["prompt_eval_count"], tail),
            output_tokens=_last_int(_P["eval_count"], tail),
            load_duration_ns=_last_int(_P["load_duration"], tail),
            prompt_eval_duration_ns=_last_int(_P["prompt_eval_duration"], tail),
            eval_duration_ns=_last_int(_P["eval_duration"], tail),
        )
        if usage.input_tokens is None:
            usage.input_tokens = (_last_int(_P["prompt_tokens"], tail)
                                  or _last_int(_P["input_tokens"], tail))
        if usage.output_tokens is None:
            usage.output_tokens = (_last_int(_P["completion_tokens"], tail)
                                   or _last_int(_P["output_tokens"], tail))
        model = _MODEL.search(self._head)
        usage.response_model = model.group(1).decode("utf-8", "replace") if model else None
        for pattern in _REASONS:
            reason = _last_str(pattern, tail)
            if reason is not None:
                usage.finish_reason = reason
                break
        return usage
