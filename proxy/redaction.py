"""Secrets out of configuration data shown to operators (`GET /system/config`).

Admin and tenant keys, anonymous placeholders, passwords in URLs (`redis://:secret@host`), and any
field whose name says it holds a secret are replaced by `<redacted>`; a list of keys keeps its length,
so an operator can still see how many keys a tenant has.
"""

from __future__ import annotations

import re
from typing import Any

from yarl import URL

__all__ = ["REDACTED", "redact", "redact_url"]

REDACTED = "<redacted>"
_SECRET_NAMES = re.compile(r"(^|_)(keys?|password|secret|token|api_key|credentials?|headers|command)$",
                           re.I)
"""Fields shown as `<redacted>`; `command`: a replica's `restart_command` may carry a credential."""
_SECRET_QUERY = re.compile(r"pass|secret|token|key|auth|cred", re.I)
"""URL query parameters shown as `redacted` (ssl_keyfile too: a path, but nobody needs it here)."""


def redact_url(value: str) -> str:
    """`value` with the secrets of a URL replaced: the password (or a bare user part, often a token),
    and query parameters named like a secret (`redis://host/0?password=...`, which redis-py and the
    proxy's state URL accept)."""
    if "://" not in value or ("@" not in value and "?" not in value):
        return value
    try:
        url = URL(value)
    except ValueError:
        return REDACTED
    if url.password is not None:
        url = url.with_password("redacted")
    elif url.user is not None:  # a bare user part is often a token (https://TOKEN@host)
        url = url.with_user("redacted")
    if url.query and any(_SECRET_QUERY.search(name) for name in url.query):
        url = url.with_query([(name, "redacted" if _SECRET_QUERY.search(name) else text)
                              for name, text in url.query.items()])
    return str(url)


def redact(value: Any, name: str = "") -> Any:
    """A copy of plain data (dicts, lists, scalars) with secrets replaced; see the module docstring."""
    if _SECRET_NAMES.search(name):
        if isinstance(value, list | tuple):
            return [REDACTED for _ in value]
        if isinstance(value, dict):
            return {k: REDACTED for k in value}
        return REDACTED if value not in (None, "", False) else value
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, name) for v in value]
    if isinstance(value, str):
        return redact_url(value)
    return value
