"""The state interface the chain uses: token buckets (reserve, settle, refund) and concurrency leases
with expiry. Two backends implement it: memory (one proxy process) and redis (several proxy replicas).

Bucket semantics: capacity C refills continuously at `refill_per_s`, starting full. `take` removes
`amount` only if that many are there (all or nothing) and otherwise says how long until they will be;
`adjust` adds (refund) or removes (settle a larger actual use) without condition, capped at C, and may
leave the bucket in debt. Leases: at most `limit` holders per key; each expires `ttl_s` after its last
renewal, so the holdings of a proxy that died come back by themselves.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import attrs

__all__ = ["Admission", "BucketAsk", "BucketResult", "LeaseAsk", "StateBackend"]


@attrs.frozen
class BucketResult:
    """The outcome of a take: whether it succeeded, what is left, and the wait until `amount` fits."""

    ok: bool
    remaining: float
    retry_after_s: float


@attrs.frozen
class LeaseAsk:
    """Become one of at most `limit` holders of `key`, for `ttl_s` after each renewal."""

    key: str
    limit: int
    holder: str
    ttl_s: float


@attrs.frozen
class BucketAsk:
    """`amount` from the bucket `key` (capacity, refill per second): taken by `admit`, or added back
    (negative: removed) unconditionally by `settle`."""

    key: str
    capacity: float
    refill_per_s: float
    amount: float


@attrs.frozen
class Admission:
    """What `admit` decided. `lease`: (granted, holders), None when none was asked; when a bucket
    refused, (True, the holders without this request): it could have had the lease but holds nothing.
    `buckets`: one result per bucket asked, in order: after the take when admitted; when refused
    (lease or bucket), each bucket as it stands with nothing taken, so that every limit the request
    does not fit is known with its wait (a refusal's Retry-After is the longest of them)."""

    lease: tuple[bool, int] | None
    buckets: tuple[BucketResult, ...]

    @property
    def ok(self) -> bool:
        return (self.lease is None or self.lease[0]) and all(b.ok for b in self.buckets)


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

    async def admit(self, lease: LeaseAsk | None, buckets: Sequence[BucketAsk]) -> Admission:
        """All or nothing: the lease, then every bucket in order; the first that cannot be had refuses
        and nothing is held. A refusal reports every bucket as it stands (`Admission`), so the caller
        can say when all of them will fit. The Redis backend does it in one round trip (one script);
        this composition serves the in-process state, which never suspends in between."""
        granted = None
        if lease is not None:
            granted = await self.lease(lease.key, lease.limit, lease.holder, lease.ttl_s)
            if not granted[0]:
                return Admission(granted, tuple([await self._peek(ask) for ask in buckets]))
        results: list[BucketResult] = []
        try:
            for ask in buckets:
                result = await self.take(ask.key, ask.capacity, ask.refill_per_s, ask.amount)
                results.append(result)
                if not result.ok:
                    break
        except BaseException:
            await asyncio.shield(self._undo(lease, buckets[:len(results)]))
            raise
        if results and not results[-1].ok:
            await self._undo(lease, buckets[:len(results) - 1])
            if granted is not None:
                granted = (True, granted[1] - 1)  # grantable, but not held: the others only
            # Every bucket as it is now that nothing is held (the undo put the earlier ones back).
            return Admission(granted, tuple([await self._peek(ask) for ask in buckets]))
        return Admission(granted, tuple(results))

    async def _peek(self, ask: BucketAsk) -> BucketResult:
        """Whether `ask` would fit its bucket now, its level and the wait until it fits; nothing taken."""
        return self.standing(ask, await self.level(ask.key, ask.capacity, ask.refill_per_s))

    @classmethod
    def standing(cls, ask: BucketAsk, level: float) -> BucketResult:
        """`ask` against a bucket at `level`, nothing taken: whether it fits and the wait until it does."""
        fits = ask.amount == 0 or level >= ask.amount
        return BucketResult(fits, level, 0.0 if fits else cls.wait_s(level, ask.amount, ask.refill_per_s))

    async def _undo(self, lease: LeaseAsk | None, taken: Sequence[BucketAsk]) -> None:
        for ask in taken:
            await self.adjust(ask.key, ask.capacity, ask.refill_per_s, ask.amount)
        if lease is not None:
            await self.release(lease.key, lease.holder)

    async def renew_many(self, leases: Sequence[tuple[str, str]], ttl_s: float,
                         held: Callable[[str, str], bool] | None = None) -> None:
        """`renew` every (key, holder); Redis sends them in one pipeline. `held(key, holder)`, asked
        right before each renewal is sent, leaves out a lease released since the list was made: a
        renewal re-adds a lease Redis lost, and must not re-add one given back."""
        for key, holder in leases:
            if held is None or held(key, holder):
                await self.renew(key, holder, ttl_s)

    async def settle(self, lease: tuple[str, str] | None, adjustments: Sequence[BucketAsk]) -> None:
        """Release the lease (key, holder) and add each adjustment's `amount` to its bucket, without
        condition (refunds positive, extra use negative). One round trip on Redis."""
        if lease is not None:
            await self.release(*lease)
        for ask in adjustments:
            await self.adjust(ask.key, ask.capacity, ask.refill_per_s, ask.amount)

    async def epoch(self) -> str | None:
        """A token that changes when the shared state lost what it held (Redis restarted without
        persistence, flushed) or comes back from an outage: then the leases of requests running here
        must be renewed at once, since a renewal adds back a lease that is missing. None when there
        is nothing to say (in-process state) or it cannot be asked now (Redis down)."""
        return None

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
