"""A least-recently-used map bounded in bytes, for plugins' caches (summaries, embedding vectors).

Not a plugin (no `PLUGIN`): a helper module of the `plugins` package. Keys are hashes the caller made
(never client text); values are bytes, whose length is what the bound counts.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["ByteLRU"]

_ENTRY_OVERHEAD_BYTES = 128
"""What one entry costs beyond its value (key, dict slot, bytes header): counted so that many tiny
values cannot exceed the bound."""


class ByteLRU:
    """`get`/`put` of bytes by string key; the least recently used entries go when the total exceeds
    `max_bytes`. A value larger than the bound is not stored."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size_bytes = 0
        self._entries: OrderedDict[str, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> bytes | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: bytes) -> None:
        cost = len(value) + len(key) + _ENTRY_OVERHEAD_BYTES
        if cost > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.size_bytes -= len(old) + len(key) + _ENTRY_OVERHEAD_BYTES
        self._entries[key] = value
        self.size_bytes += cost
        while self.size_bytes > self.max_bytes:
            old_key, old_value = self._entries.popitem(last=False)
            self.size_bytes -= len(old_value) + len(old_key) + _ENTRY_OVERHEAD_BYTES
