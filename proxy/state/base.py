"""The state interface the chain uses: token buckets (reserve, settle, refund) and concurrency leases
with expiry. Two backends implement it: memory (one proxy process) and redis (several proxy replicas).

Bucket semantics: capacity C refills continuously at `refill_per_s`, starting full. `take` removes
`amount` only if that many are there (all or nothing) and otherwise says how long until they will be;
`adjust` adds (refund) or removes (settle a larger actual use) without condition, capped at C, and may
leave the bucket in debt. Leases: at most `limit` holders per key; each expires `ttl_s` after its last
renewal, so the holdings of a proxy that died come back by themselves.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import attrs

__all__ = ["BucketResult", "StateBackend"]


@attrs.frozen
class BucketResult:
    """The outcome of a take: whether it succeeded, what is left, and the wait until `amount` fits."""

    ok: bool
    remaining: float
    retry_after_s: float


class StateBackend(ABC):
    """Atomic operations on shared counters. Every method is safe to call concurrently."""

    @abstractmethod
    async def take(self, key: str, capacity: float, refill_per_s: float, amount: float) -> BucketResult:
        """Remove `amount` from the bucket if it holds that much."""

    @abstractmethod
    async def adjust(self, key: str, capacity: float, refill_per_s: float, delta: float) -> float:
        """Add `delta` (negative: remove) unconditionally; returns the new level."""

    @abstractmethod
    async def level(self, key: str, capacity: float, refill_per_s: float) -> float:
        """The bucket's current level (after refill), without changing it."""

    @abstractmethod
    async def lease(self, key: str, limit: int, holder: str, ttl_s: float) -> tuple[bool, int]:
        """Become one of at most `limit` holders; returns (granted, holders now)."""

    @abstractmethod
    async def renew(self, key: str, holder: str, ttl_s: float) -> None:
        """Push a held lease's expiry `ttl_s` into the future."""

    @abstractmethod
    async def release(self, key: str, holder: str) -> None:
        """Give a lease back (no-op if it already expired)."""

    @abstractmethod
    async def holders(self, key: str) -> int:
        """Unexpired holders of `key`."""

    async def start(self) -> None:  # noqa: B027 - optional hook, a no-op for memory
        """Called once the event loop runs, before serving; must not fail (nothing to do for memory)."""

    async def close(self) -> None:  # noqa: B027 - optional hook, a no-op for memory
        """Release connections (nothing to do for memory)."""

    @staticmethod
    def wait_s(level: float, amount: float, refill_per_s: float) -> float:
        """Seconds until a bucket at `level` holds `amount`."""
        if level >= amount:
            return 0.0
        return (amount - level) / refill_per_s if refill_per_s > 0 else float("inf")
