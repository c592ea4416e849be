"""`X-Service-Limits`: the limits a shared Ollama service applied to a request, parsed for apps that adapt.

The header looks like `v=1; max_body_bytes=33554432; max_prompt_tokens=4096; deadline_s=120;
requests_per_minute=600`. Versioning rules: within a version keys are only ever added, never renamed or
given a new meaning; a change of meaning is a new `v=`. So a reader ignores keys it does not know, and
trusts the typed fields only for versions it understands (`SUPPORTED_VERSIONS`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

__all__ = ["HEADER", "SUPPORTED_VERSIONS", "ServiceLimits", "limits", "parse_limits"]

HEADER = "X-Service-Limits"
SUPPORTED_VERSIONS = frozenset({1})
_MAX_HEADER_CHARS = 4096
_MAX_KEYS = 64
_KEY = re.compile(r"[a-z][a-z0-9_]{0,63}")
_VALUE = re.compile(r"[A-Za-z0-9_.:+-]{1,64}")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_VERSION = re.compile(r"[0-9]{1,15}")  # exact in a JavaScript number too
_OWS = " \t"
"""HTTP's optional whitespace, the only padding stripped (str.strip() would also take NBSP, NEL and the
separators \x1c-\x1f, which JavaScript's trim() leaves or takes differently)."""


def decimal(text: str) -> float | None:
    """`text` (padded with spaces or tabs at most) as a finite decimal number, else None: ASCII digits
    with an optional sign, fraction and exponent. One grammar for both helpers: Python's float() also
    reads `1_000`, `nan` and non-ASCII digits, JavaScript's Number() `0x10`, `0b11` and `0o7`."""
    text = text.strip(_OWS)
    if not _DECIMAL.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class ServiceLimits:
    """One parsed `X-Service-Limits` header.

    `version` is the `v=` value; `raw` holds every well-formed `key=value` (unknown keys included, as
    strings). The typed properties (the keys of v=1) read `raw` and are None when the key is absent, not
    a number, or the version is not one this package understands (`understood` is False then); `number`
    reads any other key the same way.
    """

    version: int
    raw: Mapping[str, str] = field(default_factory=dict)

    @property
    def understood(self) -> bool:
        """Whether the meanings of the keys below are known for this version."""
        return self.version in SUPPORTED_VERSIONS

    def number(self, key: str) -> float | None:
        """`key` as a finite number under a supported version, else None (`nan`, `inf` and `1e999` pass
        the value syntax but are no limit: None, as in the TypeScript helper)."""
        if not self.understood or key not in self.raw:
            return None
        return decimal(self.raw[key])

    def _int(self, key: str) -> int | None:
        """A count (bytes, tokens): None unless a whole number, as in the TypeScript helper."""
        value = self.number(key)
        return int(value) if value is not None and value.is_integer() else None

    @property
    def max_body_bytes(self) -> int | None:
        """Largest request body accepted, in bytes."""
        return self._int("max_body_bytes")

    @property
    def max_prompt_tokens(self) -> int | None:
        """Largest prompt accepted (counted with the model's tokenizer), in tokens."""
        return self._int("max_prompt_tokens")

    @property
    def deadline_s(self) -> float | None:
        """Time the service gives a request before abandoning it, in seconds."""
        return self.number("deadline_s")

    @property
    def requests_per_minute(self) -> float | None:
        """The caller's request rate limit."""
        return self.number("requests_per_minute")


def parse_limits(value: str) -> ServiceLimits | None:
    """Parse a header value; None when it has no integer `v=` first. Malformed parts are skipped and the
    input is bounded (4096 characters, 64 keys): the header comes from the network. Past 4096 characters
    the part the bound cuts through is dropped: `max_body_bytes=33554432` cut to `max_body_bytes=33`
    would be a wrong limit, not a shorter header."""
    parts = [p.strip(_OWS) for p in value[:_MAX_HEADER_CHARS].split(";")]
    if len(value) > _MAX_HEADER_CHARS:
        parts.pop()
    if not parts or not parts[0].startswith("v=") or not _VERSION.fullmatch(parts[0][2:]):
        return None
    version = int(parts[0][2:])
    raw: dict[str, str] = {}
    for part in parts[1:]:
        key, sep, item = part.partition("=")
        key, item = key.strip(_OWS), item.strip(_OWS)
        if sep and _KEY.fullmatch(key) and _VALUE.fullmatch(item) and key not in raw:
            raw[key] = item
            if len(raw) >= _MAX_KEYS:
                break
    return ServiceLimits(version, raw)


def limits(response: httpx.Response | Mapping[str, str] | Any) -> ServiceLimits | None:
    """The `X-Service-Limits` of an answer: an `httpx.Response`, anything with `.headers`, or a header
    mapping (case-insensitive ones such as `httpx.Headers`; a plain dict is searched case-insensitively).
    None when the header is absent or unparseable. The official clients hide response headers: read
    `RetryTransport.last_limits` instead, or an httpx event hook."""
    headers = getattr(response, "headers", response)
    value = headers.get(HEADER) if hasattr(headers, "get") else None
    if value is None and isinstance(headers, Mapping):
        value = next((v for k, v in headers.items() if str(k).lower() == HEADER.lower()), None)
    return parse_limits(value) if isinstance(value, str) else None
