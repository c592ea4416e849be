"""Redis trouble as an explicit mode (`state.failure_mode`): FailoverState wraps the Redis backend with a
circuit breaker and, while Redis cannot answer, serves calls from this process's memory (`open`) or
refuses them with 503 `state_unavailable` (`closed`). The one place where a Redis error is caught.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Literal, TypeVar

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from ..errors import StateUnavailable
from ..telemetry import semconv
from .base import Admission, BucketAsk, BucketResult, LeaseAsk, StateBackend
from .memory import MemoryState
from .redis import RedisState

__all__ = ["FailoverState"]

log = logging.getLogger("proxy.state")

T = TypeVar("T")

MAX_PENDING_RELEASES = 65536
"""Releases kept for after recovery; beyond this, a lease comes back by its TTL alone."""

_FAILURES = (Exception,)
"""What counts as a failed Redis call: any exception but cancellation. Besides RedisError, OSError and
timeouts, a reply that is not what the scripts return (another server on the port, a proxy in between)
surfaces as ValueError, TypeError or UnicodeDecodeError; none of them may become a 500."""


class _Down(Exception):
    """A Redis call failed (already counted and logged); the caller applies the failure mode."""


class FailoverState(StateBackend):
    """The Redis backend behind a circuit breaker.

    Contract:
    - Every Redis call is bounded by `timeout_s` (pool wait, connect and command included). A Redis
      error or timeout opens the circuit, unless another call succeeded while the failed one waited
      (then Redis is up and this process was too busy to read the answer in time: only that call takes
      the failure mode). With the circuit open, Redis is not called again until a background probe
      (one call every `retry_interval_s`) succeeds, so a frozen Redis costs one timeout per interval,
      not one per request. Transitions log one WARNING each (degraded, recovered) and show in the
      gauge `<prefix>.state.degraded` (0/1); failed calls count in `<prefix>.state.failures{operation}`.
      The probe runs one of the real scripts (TIME and a write) and a plain SET with a short expiry,
      not a bare PING, so a Redis that answers PING but cannot serve (loading, read-only replica, out
      of memory: Redis still runs that script then, but refuses the SET) stays out.
    - Meanwhile admission calls (`take`, `lease`, `level`, `holders`) are answered by a MemoryState of
      this process in `open` mode (admitted and counted locally, per proxy process), or raise
      StateUnavailable (503, Retry-After about `retry_interval_s`) in `closed` mode.
    - Bookkeeping calls (`adjust`, `renew`, `release`) never raise and never wait beyond `timeout_s`,
      so a step's `finally` cannot fail or hang because of Redis. A lease granted locally is renewed and
      released locally (and moved into Redis by its first renewal after recovery, so it counts for every
      replica again). A Redis lease whose release fails, and any lease call that failed (Redis may still
      run the command once it reads it, after a freeze), is released in Redis: at once when Redis is
      answering other calls, else when it recovers, before Redis is used again; until then it expires
      by its TTL. So after a restart or a freeze,
      `max_concurrent` holds exactly again.
    - Tokens counted locally during an outage are not copied into Redis: each proxy process admits at
      most one budget of its own while degraded (Envoy's rate-limit filter admits without any count).
      A bucket command that Redis runs after its caller gave up (a freeze) still counts there, so a
      bucket may be charged twice for one request around a freeze; leases are handled as above. A
      settle Redis did not answer is not sent again and not applied here: its refund is at most once.

    Start-up (`start`) never fails: with Redis unreachable both modes start degraded and the probe brings
    Redis in as soon as it answers. Refusing to start would turn a Redis restart into a crash loop of
    every proxy replica (a load balancer then sees refused connections, not a clear 503), and would
    need an orchestrator to bring the proxy back; `closed` answers 503 `state_unavailable` until then.
    """

    def __init__(self, remote: RedisState, *, failure_mode: Literal["open", "closed"] = "open",
                 timeout_s: float = 0.5, retry_interval_s: float = 1.0, meter: Meter | None = None,
                 metric_prefix: str = "sop") -> None:
        self.remote = remote
        self.local = MemoryState()
        self.failure_mode = failure_mode
        self.timeout_s = timeout_s
        self.retry_interval_s = retry_interval_s
        self.degraded = False
        self.failures: Counter[str] = Counter()
        self._degraded_at = 0.0
        self._last_success = 0.0
        self._local_leases: set[tuple[str, str]] = set()
        self._pending_releases: dict[tuple[str, str], None] = {}
        self._probe: asyncio.Task[None] | None = None
        self._verifying: asyncio.Task[None] | None = None
        """The probe `verify` runs, shared by its concurrent callers."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._calls = 0
        """Redis calls in flight (close() lets them finish); `_quiet` is set whenever none is."""
        self._quiet = asyncio.Event()
        self._closing = False
        self._recoveries = 0
        """Outages ended so far (part of `epoch`)."""
        if meter is not None:
            meter.create_observable_gauge(
                semconv.metric_name(metric_prefix, "state", "degraded"),
                callbacks=[self._observe_degraded],
                description="1 while Redis cannot answer and state.failure_mode applies, else 0.")
            meter.create_observable_counter(
                semconv.metric_name(metric_prefix, "state", "failures"),
                callbacks=[self._observe_failures], unit="{failure}",
                description="Failed or timed-out Redis calls of the state backend, by operation.")

    def _observe_degraded(self, options: CallbackOptions) -> Iterable[Observation]:
        del options
        yield Observation(1 if self.degraded else 0)

    def _observe_failures(self, options: CallbackOptions) -> Iterable[Observation]:
        del options
        for operation, count in list(self.failures.items()):
            yield Observation(count, {"operation": operation})

    # -- the circuit ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Check Redis once at start-up; unreachable means starting degraded (see the class doc)."""
        with contextlib.suppress(_Down):
            await self._remote("probe", self.remote.probe)

    async def verify(self) -> None:
        """Make `degraded` current before it is reported (/readyz): a process learns of an outage only
        from a call that fails, so an idle one would say Redis answers for as long as it is out. When
        no call has answered for `retry_interval_s` (and the circuit is closed), one probe through the
        breaker (a failure opens it, logged as any); callers meanwhile share it. Never raises; bounded
        by `timeout_s`, and at most one probe per `retry_interval_s` of idleness."""
        if self.degraded or self._closing or time.monotonic() - self._last_success < self.retry_interval_s:
            return
        if self._verifying is None or self._verifying.done():
            self._verifying = asyncio.get_running_loop().create_task(self._verify())
        await asyncio.shield(self._verifying)

    async def _verify(self) -> None:
        with contextlib.suppress(_Down):
            await self._remote("probe", self.remote.probe)

    async def call_remote(self, operation: str, call: Callable[[], Awaitable[T]]) -> T | None:
        """Run `call` (a Redis call of another module: shared slot leases, state/leases.py) through
        the breaker: its result, or None when the circuit is open or the call failed (counted under
        `operation`, logged, the circuit opened as for any call): the caller applies the failure
        mode. `call` must not return None."""
        if self.degraded:
            return None
        try:
            return await self._remote(operation, call)
        except _Down:
            return None

    async def _remote(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        started = time.monotonic()
        self._calls += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await call()
        except _FAILURES as exc:
            if self._closing:  # the proxy stopping, not Redis failing: no transition, no warning
                raise _Down from None
            self._failed(operation, exc, started)
            raise _Down from None
        finally:
            self._calls -= 1
            if not self._calls:
                self._quiet.set()
        self._last_success = time.monotonic()
        return result

    def _failed(self, operation: str, exc: BaseException, started: float) -> None:
        self.failures[operation] += 1
        if self.degraded:
            return
        if self._last_success > started:
            # Another call got its answer while this one waited: Redis is up, and this process was
            # too busy (a burst: pool wait, event-loop lag) to read the answer in time. Only this call
            # takes the failure mode; opening the circuit would send a whole burst to it.
            return
        self.degraded = True
        self._degraded_at = time.monotonic()
        log.warning("state degraded: Redis %s failed (%s); failure_mode=%s: %s until Redis answers "
                    "(retried every %gs)", operation, _describe(exc), self.failure_mode,
                    "admitting and counting in this process" if self.failure_mode == "open"
                    else "refusing with 503 state_unavailable", self.retry_interval_s)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_up())

    async def _probe_until_up(self) -> None:
        while True:
            await asyncio.sleep(self.retry_interval_s)
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self.remote.probe()
                await self._flush_releases()
            except _FAILURES:
                self.failures["probe"] += 1
                continue
            # No await since the flush found nothing pending: no release can slip in between.
            self.degraded = False
            self._recoveries += 1
            log.warning("state recovered: Redis answers again after %.1fs degraded",
                        time.monotonic() - self._degraded_at)
            return

    async def _flush_releases(self) -> None:
        while self._pending_releases:
            batch = list(self._pending_releases)[:1000]
            async with asyncio.timeout(self.timeout_s):
                await self.remote.release_many(batch)
            for pair in batch:
                self._pending_releases.pop(pair, None)

    def _pend_release(self, key: str, holder: str) -> None:
        if len(self._pending_releases) < MAX_PENDING_RELEASES:
            self._pending_releases[(key, holder)] = None

    def _fallback(self) -> MemoryState:
        """The local state in `open` mode; StateUnavailable in `closed` mode."""
        if self.failure_mode == "open":
            return self.local
        raise StateUnavailable("shared state (Redis) is unavailable: quotas cannot be checked",
                               retry_after_s=self.retry_interval_s)

    # -- StateBackend --------------------------------------------------------------------------------

    async def take(self, key: str, capacity: float, refill_per_s: float, amount: float) -> BucketResult:
        if not self.degraded:
            with contextlib.suppress(_Down):
                return await self._remote(
                    "take", lambda: self.remote.take(key, capacity, refill_per_s, amount))
        return await self._fallback().take(key, capacity, refill_per_s, amount)

    async def adjust(self, key: str, capacity: float, refill_per_s: float, delta: float) -> float:
        if not self.degraded:
            with contextlib.suppress(_Down):
                return await self._remote(
                    "adjust", lambda: self.remote.adjust(key, capacity, refill_per_s, delta))
        if self.failure_mode == "open":
            return await self.local.adjust(key, capacity, refill_per_s, delta)
        return 0.0  # closed: nothing is admitted while degraded; the adjustment is lost (counted)

    async def level(self, key: str, capacity: float, refill_per_s: float) -> float:
        if not self.degraded:
            with contextlib.suppress(_Down):
                return await self._remote(
                    "level", lambda: self.remote.level(key, capacity, refill_per_s))
        return await self._fallback().level(key, capacity, refill_per_s)

    async def lease(self, key: str, limit: int, holder: str, ttl_s: float) -> tuple[bool, int]:
        if not self.degraded:
            try:
                return await self._remote("lease", lambda: self.remote.lease(key, limit, holder, ttl_s))
            except _Down:  # Redis may still grant it once it reads the command: give it back
                if self.degraded:
                    self._pend_release(key, holder)
                else:  # Redis answers other calls: now, in the background
                    task = asyncio.get_running_loop().create_task(self._release_remote(key, holder))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        granted, holders = await self._fallback().lease(key, limit, holder, ttl_s)
        if granted:
            self._local_leases.add((key, holder))
        return granted, holders

    async def admit(self, lease: LeaseAsk | None, buckets: Sequence[BucketAsk]) -> Admission:
        if not self.degraded:
            try:
                return await self._remote("admit", lambda: self.remote.admit(lease, buckets))
            except _Down:  # Redis may still admit once it reads the command: give the lease back
                if lease is not None:
                    if self.degraded:
                        self._pend_release(lease.key, lease.holder)
                    else:
                        task = asyncio.get_running_loop().create_task(
                            self._release_remote(lease.key, lease.holder))
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
                # Not again through Redis with the same holder: the background release could land
                # after a new grant and delete it. The failure mode decides, as for `lease`.
                return await self._admit_locally(lease, buckets)
        # Degraded: one operation at a time, each through the breaker and the failure mode.
        return await StateBackend.admit(self, lease, buckets)

    async def _admit_locally(self, lease: LeaseAsk | None, buckets: Sequence[BucketAsk]) -> Admission:
        admission = await self._fallback().admit(lease, buckets)
        if lease is not None and admission.ok:
            self._local_leases.add((lease.key, lease.holder))
        return admission

    async def renew_many(self, leases: Sequence[tuple[str, str]], ttl_s: float,
                         held: Callable[[str, str], bool] | None = None) -> None:
        if not self.degraded and not any(pair in self._local_leases for pair in leases):
            with contextlib.suppress(_Down):
                await self._remote("renew", lambda: self.remote.renew_many(leases, ttl_s, held))
                return
        for key, holder in leases:  # each with the moves between local and Redis of `renew`
            # One round trip each: a request may end meanwhile, and its released lease must not be
            # re-added by a renewal sent after (it would count against max_concurrent until expiry).
            if held is None or held(key, holder):
                await self.renew(key, holder, ttl_s)

    async def settle(self, lease: tuple[str, str] | None, adjustments: Sequence[BucketAsk]) -> None:
        local = lease is not None and lease in self._local_leases
        if not self.degraded and not local:
            try:
                await self._remote("settle", lambda: self.remote.settle(lease, adjustments))
            except _Down:
                # Unanswered is not undone: Redis may run the script once it reads it (a freeze), or
                # has run it and this process was too busy to read the answer. Giving the lease back
                # is idempotent, so it goes again (or waits for recovery); the bucket adjustments are
                # not, so they go nowhere else: a refund may be lost, never given twice.
                if lease is not None:
                    await self.release(*lease)
            return
        await StateBackend.settle(self, lease, adjustments)

    async def renew(self, key: str, holder: str, ttl_s: float) -> None:
        local = (key, holder) in self._local_leases
        if not self.degraded:
            try:
                await self._remote("renew", lambda: self.remote.renew(key, holder, ttl_s))
            except _Down:
                pass
            else:
                if local:  # moved into Redis: it counts for every replica again
                    self._local_leases.discard((key, holder))
                    await self.local.release(key, holder)
                return
        if local:
            await self.local.renew(key, holder, ttl_s)
        # A Redis lease not renewed now expires by its TTL or is re-added by a renewal after recovery.

    async def release(self, key: str, holder: str) -> None:
        if (key, holder) in self._local_leases:
            self._local_leases.discard((key, holder))
            await self.local.release(key, holder)
            return
        if self.degraded:
            self._pend_release(key, holder)
        else:
            await self._release_remote(key, holder)

    async def _release_remote(self, key: str, holder: str) -> None:
        try:
            await self._remote("release", lambda: self.remote.release(key, holder))
        except _Down:
            self._pend_release(key, holder)

    async def holders(self, key: str) -> int:
        if not self.degraded:
            with contextlib.suppress(_Down):
                return await self._remote("holders", lambda: self.remote.holders(key))
        return await self._fallback().holders(key)

    async def epoch(self) -> str | None:
        """Redis' epoch and the outages ended so far: it changes when Redis lost its data, and when an
        outage ends (leases taken locally meanwhile, or expired in Redis, are then renewed at once).
        None while degraded."""
        if self.degraded:
            return None
        try:
            epoch = await self._remote("epoch", self.remote.epoch)
        except _Down:
            return None
        return f"{epoch}/{self._recoveries}"

    async def close(self) -> None:
        """Stop: the calls in flight finish first (each within its `timeout_s`), so that a request's
        settle that outlived its request (shielded from the client's leaving) still reaches Redis
        instead of failing on a closed pool; then background work stops and the pool closes."""
        self._closing = True
        if self._calls:
            self._quiet.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.timeout_s + 0.1):
                    await self._quiet.wait()
        for task in [*self._tasks, *(t for t in (self._probe, self._verifying) if t is not None)]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(*_FAILURES):
            await self.remote.close()


def _describe(exc: BaseException) -> str:
    """The error's type and a bounded, escaped message (Redis' own text, never request data)."""
    text = str(exc)[:200]
    return f"{type(exc).__name__}: {text!r}" if text else type(exc).__name__
