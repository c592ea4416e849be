"""The memory backend: buckets and leases of one proxy process (the default)."""

from __future__ import annotations

import time

from .base import BucketResult, StateBackend

__all__ = ["MemoryState"]


class MemoryState(StateBackend):
    """Plain dictionaries; atomic because the event loop runs one coroutine at a time."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}
        self._leases: dict[str, dict[str, float]] = {}
        self._earliest: dict[str, float] = {}
        """Per lease key, a time no holder expires before: until it passes, nothing needs pruning."""

    def _refilled(self, key: str, capacity: float, refill_per_s: float) -> tuple[float, float]:
        now = time.monotonic()
        level, stamp = self._buckets.get(key, (capacity, now))
        return min(capacity, level + (now - stamp) * refill_per_s), now

    async def take(self, key: str, capacity: float, refill_per_s: float, amount: float) -> BucketResult:
        level, now = self._refilled(key, capacity, refill_per_s)
        ok = level >= amount
        if ok:
            level -= amount
        self._buckets[key] = (level, now)
        wait = 0.0 if ok else self.wait_s(level, amount, refill_per_s)
        return BucketResult(ok, level, wait)

    async def adjust(self, key: str, capacity: float, refill_per_s: float, delta: float) -> float:
        level, now = self._refilled(key, capacity, refill_per_s)
        level = min(capacity, level + delta)
        self._buckets[key] = (level, now)
        return level

    async def level(self, key: str, capacity: float, refill_per_s: float) -> float:
        return self._refilled(key, capacity, refill_per_s)[0]

    def _live(self, key: str) -> dict[str, float]:
        """The unexpired holders of `key`. Pruned only once the earliest expiry may have passed: a
        tenant with 10,000 streams open renews and releases in O(1), not by filtering them all each
        time (which made the event loop quadratic in open streams)."""
        holders = self._leases.get(key)
        if holders is None:
            holders = self._leases[key] = {}
            return holders
        now = time.monotonic()
        if now >= self._earliest.get(key, float("inf")):
            holders = {h: exp for h, exp in holders.items() if exp > now}
            self._leases[key] = holders
            # Every lease and renewal lowers the bound to its own expiry if earlier: a lower bound.
            self._earliest[key] = min(holders.values(), default=float("inf"))
        return holders

    async def lease(self, key: str, limit: int, holder: str, ttl_s: float) -> tuple[bool, int]:
        holders = self._live(key)
        if len(holders) >= limit and holder not in holders:
            return False, len(holders)
        expiry = time.monotonic() + ttl_s
        holders[holder] = expiry
        self._earliest[key] = min(self._earliest.get(key, float("inf")), expiry)
        return True, len(holders)

    async def renew(self, key: str, holder: str, ttl_s: float) -> None:
        holders = self._live(key)
        if holder in holders:
            expiry = time.monotonic() + ttl_s
            holders[holder] = expiry
            # A shorter TTL (after a reload) may expire before the bound: keep it a lower bound.
            self._earliest[key] = min(self._earliest.get(key, float("inf")), expiry)

    async def release(self, key: str, holder: str) -> None:
        self._live(key).pop(holder, None)

    async def holders(self, key: str) -> int:
        return len(self._live(key))
