"""The `quotas` step: per-tenant requests per minute, tokens per minute and requests in flight, held in
the state backend so they apply across every proxy replica that shares it (Redis).

Reserve, then settle: before admission a request takes one unit of its tenant's request bucket, its
counted prompt tokens plus the output it may produce (num_predict / max_tokens, or
`chain.quotas.default_output_tokens`) from the token bucket, and a concurrency lease. A refusal gives back
whatever was already taken and answers 429 (`rate_limited` for requests and concurrency,
`quota_exceeded` for tokens) with `Retry-After`: the time until the bucket holds enough, or for
concurrency the measured mean duration of the tenant's requests divided by its leases. A request that
reserves more than the whole token budget can never fit: 400 `request_exceeds_quota`, not retryable.
After the response the token reservation is settled against Ollama's real counts; a request that
produced nothing (rejected downstream, a replica that failed, the client gone before its request reached
a replica) is refunded, and one the client left after it reached a replica but before the first byte is
charged its prompt (`RequestContext.served_tokens`). Leases are renewed
while a request runs and released in `finally`; a dead proxy's leases expire after `lease_ttl_s`.
Listing and metadata routes (`is_exempt`) take nothing: they cost the fleet nothing worth a quota.

Every decision carries the headers of the limits it checked: `X-RateLimit-Limit/-Remaining/-Reset`
(request bucket, seconds) and the per-limit forms of OpenAI's API, `x-ratelimit-{limit,remaining,reset}-
{requests,tokens}` (reset as a Go duration, `1m30s`), plus `x-ratelimit-{limit,remaining}-concurrent`;
`X-Service-Limits` names each limit of the tenant. When Redis fails, `state.failure_mode` applies
(proxy/state/failover.py); the `finally` path never raises and is bounded by the state's timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import math
import os
import time
from collections.abc import Coroutine
from typing import Any

import attrs
from aiohttp import web

from proxy.access import Tenant
from proxy.chain import Handler, Step
from proxy.context import RequestContext, plain_number
from proxy.errors import DeadlinePassed, ProxyError, QuotaExceeded, RateLimited, RequestExceedsQuota
from proxy.ollama import classify
from proxy.prompts import request_cost
from proxy.schema import Mode, RolloutConfig, positive
from proxy.state.base import Admission, BucketAsk, LeaseAsk, StateBackend
from proxy.state.memory import MemoryState
from proxy.telemetry.setup import Telemetry

__all__ = ["QuotasConfig", "QuotasStep", "go_duration", "is_exempt"]


@attrs.frozen
class QuotasConfig:
    """chain.quotas: per-tenant rate, token and concurrency limits."""

    mode: Mode = "enforce"
    rollout: RolloutConfig = attrs.field(factory=RolloutConfig)
    """Canary for `enforce`: who it enforces for; the other tenants get shadow (see RolloutConfig)."""
    default_output_tokens: int = attrs.field(default=256, validator=positive)
    """Output tokens reserved when a request does not set num_predict / max_tokens."""
    lease_ttl_s: float = attrs.field(default=30.0, validator=positive)
    """A concurrency lease expires this long after its last renewal (a dead proxy's leases come back)."""


log = logging.getLogger("proxy.quotas")

_EWMA_ALPHA = 0.2
_RENEW_BATCH = 500
_EPOCH_CHECK_S = 0.5
"""While leases are held, how often the state's epoch is read (renewed at once when it changed)."""
_SETTLE_PAST_DEADLINE_S = 0.1
"""How long an answer waits for its request's settle once the deadline has passed (a Redis that
answers takes far less; one that hangs is not waited for longer)."""


def is_exempt(method: str, path: str) -> bool:
    """Listing and metadata routes, which spend no quota: GET/HEAD `/`, `/api/tags`, `/api/ps`,
    `/api/version`, `/v1/models`, `/v1/models/{model}`, and POST `/api/show` (the route table's
    `quota_exempt`, proxy/ollama.py)."""
    return classify(method, path).quota_exempt


def go_duration(seconds: float) -> str:
    """Whole seconds as a Go duration, the form of OpenAI's `x-ratelimit-reset-*`: `0s`, `45s`, `1m5s`."""
    minutes, whole = divmod(max(0, math.ceil(seconds)), 60)
    return f"{minutes}m{whole}s" if minutes else f"{whole}s"


class QuotasStep(Step):
    """Per-tenant buckets and leases; see the module docstring."""

    name = "quotas"

    def __init__(self, config: QuotasConfig, state: StateBackend, telemetry: Telemetry) -> None:
        super().__init__(config.mode, telemetry, config.rollout)
        self.config = config
        self.state = state
        self._holder_prefix = f"{os.getpid()}-{time.time_ns()}"
        self._holders = itertools.count()
        self._mean_duration_s: dict[str, float] = {}
        self._held: dict[str, str] = {}
        """holder -> lease key of every concurrency lease held by a request in flight here."""
        self._background: set[asyncio.Task[None]] = set()
        """Settles waiting for the answer of an admit whose client left (`_abandoned`), and settles
        that outlived their request's deadline."""
        self._renewer: asyncio.Task[None] | None = None
        self._epoch: str | None = None
        """The state's epoch as last read (`_state_lost`)."""
        # A local state answers without suspending: nothing can cancel its settling halfway, and a
        # shield (one more task per request) would buy nothing.
        self._local_state = isinstance(state, MemoryState)

    def reconfigure(self, config: QuotasConfig) -> None:
        super().reconfigure(config)
        changed_ttl = config.lease_ttl_s != self.config.lease_ttl_s
        self.config = config
        if changed_ttl and self._renewer is not None and not self._renewer.done():
            # The running round sleeps for the old TTL's third: leases granted with a shorter one
            # would expire before it wakes. Start the rounds again at the new pace.
            self._renewer.cancel()
            self._start_renewer()

    @staticmethod
    def keys(tenant: Tenant) -> tuple[str, str, str]:
        """State keys of a tenant's request bucket, token bucket and lease set."""
        return (f"rpm:{tenant.name}", f"tpm:{tenant.name}", f"inflight:{tenant.name}")

    def _reservation(self, request: web.Request, ctx: RequestContext) -> int:
        return request_cost(request.path, ctx.json(), ctx.route.operation, ctx.prompt.tokens,
                            len(ctx.body or b""), self.config.default_output_tokens)

    async def handle(self, request: web.Request, ctx: RequestContext,
                     handler: Handler) -> web.StreamResponse:
        tenant = ctx.tenant
        if (tenant.requests_per_minute is None and tenant.tokens_per_minute is None
                and tenant.max_concurrent is None):
            self.record(ctx, "unlimited", **{self.telemetry.names.tenant: tenant.name})
            return await handler(request)
        if ctx.route.quota_exempt:
            with self.span(**{self.telemetry.names.tenant: tenant.name}) as span:
                self.decide(ctx, span, "exempt")
            return await handler(request)
        rpm_key, tpm_key, lease_key = self.keys(tenant)
        holder = f"{self._holder_prefix}-{next(self._holders)}"
        took_request = leased = False
        reserved = 0
        admit: asyncio.Future[Admission] | None = None
        with self.span(**{self.telemetry.names.tenant: tenant.name}) as span:
            try:
                wanted = 0
                lease: LeaseAsk | None = None
                buckets: list[BucketAsk] = []
                if tenant.tokens_per_minute is not None:
                    tpm = tenant.tokens_per_minute
                    ctx.service_limits["tokens_per_minute"] = tpm
                    ctx.response_headers["x-ratelimit-limit-tokens"] = plain_number(float(tpm))
                    wanted = self._reservation(request, ctx)
                    if wanted > tpm:  # checked first: nothing is taken for a request that never fits
                        raise RequestExceedsQuota(
                            f"request reserves {wanted} tokens, more than tenant {tenant.name}'s "
                            f"whole budget of {tpm:g} tokens per minute")
                if tenant.max_concurrent is not None:
                    ctx.service_limits["max_concurrent"] = tenant.max_concurrent
                    lease = LeaseAsk(lease_key, tenant.max_concurrent, holder, self.config.lease_ttl_s)
                if tenant.requests_per_minute is not None:
                    rpm = tenant.requests_per_minute
                    ctx.service_limits["requests_per_minute"] = rpm
                    buckets.append(BucketAsk(rpm_key, rpm, rpm / 60, 1))
                if tenant.tokens_per_minute is not None:
                    tpm = tenant.tokens_per_minute
                    buckets.append(BucketAsk(tpm_key, tpm, tpm / 60, wanted))
                # One round trip for all three (state.admit: all or nothing; Redis runs one script).
                # Its own task, awaited through a shield: a client that leaves meanwhile must not stop
                # us reading the answer, because the lease is released only once the admit has landed.
                if self._local_state:
                    admission = await self.state.admit(lease, buckets)
                else:
                    admit = asyncio.ensure_future(self.state.admit(lease, buckets))
                    # Within the request's deadline, too: a Redis that hangs holds each call up to
                    # `state.socket_timeout_s`, which may be longer than what the client asked for.
                    async with asyncio.timeout(None if ctx.deadline_at is None
                                               else max(0.0, ctx.deadline_at - time.monotonic())):
                        admission = await asyncio.shield(admit)
                # Held only when admitted: a refusal holds nothing (the lease part may say "grantable").
                leased = admission.ok and admission.lease is not None
                self._admission_headers(ctx, tenant, admission)
                self._refuse_unless_admitted(tenant, admission, wanted)
                took_request = tenant.requests_per_minute is not None
                reserved = wanted if tenant.tokens_per_minute is not None else 0
                span.set_attribute(self.telemetry.names.quotas_reserved_tokens, reserved)
                self.decide(ctx, span, "allowed")
            except ProxyError as error:
                # Refused before admit or by it: admit is all or nothing, so nothing is held.
                self.decide(ctx, span, "rejected", error)  # raises in enforce mode
            except BaseException as exc:
                # Cancelled (the client left), or past the request's deadline, during the state call:
                # a lease may have been granted without our knowing, so the holder is released
                # whatever `leased` says, after the admit's answer is in. Sent earlier, the release
                # could overtake the admit (another
                # pipelined connection, or the script still queued) and the grant nobody waits for
                # would stay in flight until its TTL ran out.
                # Also when the admit has just landed: its answer may not have reached us (a
                # cancellation takes precedence over the result), and what it granted goes back.
                if admit is not None:
                    refund = [BucketAsk(tpm_key, tenant.tokens_per_minute,
                                        tenant.tokens_per_minute / 60, wanted)
                              ] if tenant.tokens_per_minute is not None and wanted else []
                    self._spawn(self._abandoned(admit, tenant, lease_key, holder, refund))
                elif tenant.max_concurrent is not None:
                    await asyncio.shield(self._release_lease(tenant, lease_key, holder))
                if isinstance(exc, TimeoutError) and admit is not None:
                    # The deadline's answer, as when it passes before the replica answers.
                    raise DeadlinePassed(
                        f"the request's deadline of {ctx.deadline_s}s passed before its quotas could "
                        "be checked (the shared state did not answer)") from None
                raise
        if leased:
            self._hold(lease_key, holder)
        started = time.monotonic()
        refund_request = False
        try:
            return await handler(request)
        except ProxyError as refusal:
            # A later step refused for lack of capacity (queue full, no replica, shutting down) and
            # told the client when to come back: that retry must not meet a 429 for the attempt the
            # proxy itself turned away.
            refund_request = took_request and refusal.status == 503
            raise
        finally:
            if leased:
                self._held.pop(holder, None)
            if self._local_state:
                await self._settle(ctx, tenant, holder, leased, reserved, refund_request)
            else:
                # Shielded: it runs to its end whatever becomes of the request. The answer (an error
                # is rendered after this) waits for it within the request's deadline only: a Redis
                # that hangs holds a call up to `state.socket_timeout_s`, and past the deadline the
                # settle finishes in the background.
                settle = asyncio.ensure_future(self._settle(ctx, tenant, holder, leased, reserved,
                                                            refund_request))
                self._background.add(settle)
                settle.add_done_callback(self._background.discard)
                remaining = None if ctx.deadline_at is None else max(
                    _SETTLE_PAST_DEADLINE_S, ctx.deadline_at - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await asyncio.shield(settle)
            self._observe_duration(tenant, time.monotonic() - started)

    def _admission_headers(self, ctx: RequestContext, tenant: Tenant, admission: Admission) -> None:
        """The rate-limit headers of every limit admit looked at."""
        results = iter(admission.buckets)
        if admission.lease is not None and tenant.max_concurrent is not None:
            granted, holders = admission.lease
            self._concurrency_headers(ctx, tenant.max_concurrent,
                                      holders if granted else tenant.max_concurrent)
        if tenant.requests_per_minute is not None and (taken := next(results, None)) is not None:
            self._request_headers(ctx, tenant.requests_per_minute, taken.remaining)
        if tenant.tokens_per_minute is not None and (taken := next(results, None)) is not None:
            self._token_headers(ctx, tenant.tokens_per_minute, taken.remaining)

    def _refuse_unless_admitted(self, tenant: Tenant, admission: Admission, wanted: int) -> None:
        """The refusal of the first limit that did not fit, if any, with the wait until every one of
        them fits: a client told only the first limit's wait comes back to meet the next one (3
        requests a minute and 100 tokens: told 18 s for the requests, then refused 10 s more for the
        tokens, where 27 s would have done)."""
        refusals: list[RateLimited | QuotaExceeded] = []
        if admission.lease is not None and not admission.lease[0]:
            refusals.append(RateLimited(
                f"tenant {tenant.name} has {admission.lease[1]} requests in flight "
                f"(max_concurrent {tenant.max_concurrent})", retry_after_s=self._lease_wait_s(tenant)))
        results = iter(admission.buckets)
        if tenant.requests_per_minute is not None and (taken := next(results, None)) is not None \
                and not taken.ok:
            refusals.append(RateLimited(f"tenant {tenant.name} is over {tenant.requests_per_minute:g} "
                                        "requests per minute", retry_after_s=taken.retry_after_s))
        if tenant.tokens_per_minute is not None and (taken := next(results, None)) is not None \
                and not taken.ok:
            refusals.append(QuotaExceeded(
                f"tenant {tenant.name} is over {tenant.tokens_per_minute:g} tokens per minute "
                f"(this request reserves {wanted})", retry_after_s=taken.retry_after_s))
        if refusals:
            first = refusals[0]
            first.retry_after_s = max(r.retry_after_s or 0.0 for r in refusals)
            raise first

    @staticmethod
    def _request_headers(ctx: RequestContext, limit: float, remaining: float) -> None:
        headers = ctx.response_headers
        left = str(max(0, math.floor(remaining)))
        reset_s = max(0.0, limit - remaining) / (limit / 60)
        headers["X-RateLimit-Limit"] = headers["x-ratelimit-limit-requests"] = plain_number(
            float(limit))
        headers["X-RateLimit-Remaining"] = headers["x-ratelimit-remaining-requests"] = left
        headers["X-RateLimit-Reset"] = str(math.ceil(reset_s))
        headers["x-ratelimit-reset-requests"] = go_duration(reset_s)

    @staticmethod
    def _token_headers(ctx: RequestContext, limit: float, remaining: float) -> None:
        headers = ctx.response_headers
        headers["x-ratelimit-remaining-tokens"] = str(max(0, math.floor(remaining)))
        headers["x-ratelimit-reset-tokens"] = go_duration(max(0.0, limit - remaining) / (limit / 60))

    @staticmethod
    def _concurrency_headers(ctx: RequestContext, limit: int, holders: int) -> None:
        ctx.response_headers["x-ratelimit-limit-concurrent"] = str(limit)
        ctx.response_headers["x-ratelimit-remaining-concurrent"] = str(max(0, limit - holders))

    def _lease_wait_s(self, tenant: Tenant) -> float:
        mean = self._mean_duration_s.get(tenant.name)
        if mean is None or not tenant.max_concurrent:
            return 1.0
        return max(1.0, mean / tenant.max_concurrent)

    def _observe_duration(self, tenant: Tenant, seconds: float) -> None:
        previous = self._mean_duration_s.get(tenant.name)
        self._mean_duration_s[tenant.name] = seconds if previous is None else (
            previous + _EWMA_ALPHA * (seconds - previous))

    def _hold(self, lease_key: str, holder: str) -> None:
        """Keep `holder`'s lease renewed until the request leaves (`_held` loses it). One renewer task
        for every lease held here, not one per request: a task per request cost more than the lease."""
        self._held[holder] = lease_key
        if self._renewer is None or self._renewer.done():
            self._start_renewer()

    def _start_renewer(self) -> None:
        # A context of its own: started from some request, it must not keep that request's spans.
        self._renewer = asyncio.get_running_loop().create_task(self._renew_all(),
                                                               context=contextvars.Context())

    async def _renew_all(self) -> None:
        # Ends when no lease is held; the next `_hold` starts another (no await between this check
        # and the task's end, so a hold cannot slip in unseen).
        while self._held:
            # Read every round: a reload may change the TTL (and restarts this task, `reconfigure`).
            ttl = self.config.lease_ttl_s
            due = time.monotonic() + ttl / 3
            while self._held and (left := due - time.monotonic()) > 0:
                await asyncio.sleep(min(left, _EPOCH_CHECK_S))
                if await self._state_lost():
                    break  # Redis lost the leases, or took none while it was down: renew now
            held = [(lease_key, holder) for holder, lease_key in self._held.items()]
            for start in range(0, len(held), _RENEW_BATCH):
                # One round trip per batch (a Redis pipeline), not one per lease: 10,000 open streams
                # renew within the round.
                with contextlib.suppress(Exception):  # a missed renewal only shortens the lease
                    await self.state.renew_many(held[start:start + _RENEW_BATCH], ttl,
                                                held=self._still_held)

    async def _state_lost(self) -> bool:
        """Has the state's epoch changed since it was last read (Redis lost its data, or an outage
        ended)? The leases of the requests running here must then be renewed at once: until then
        they are missing, and max_concurrent admits as many again."""
        try:
            epoch = await self.state.epoch()
        except Exception:  # a missed look only delays the renewal to its time
            return False
        if epoch is None:
            return False
        changed = epoch != self._epoch  # also the first read: the loss may have come before it
        self._epoch = epoch
        return changed

    def _still_held(self, lease_key: str, holder: str) -> bool:
        del lease_key
        return holder in self._held

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` past the request that started it (a strong reference until it ends)."""
        task = asyncio.get_running_loop().create_task(coro, context=contextvars.Context())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abandoned(self, admit: asyncio.Future[Admission], tenant: Tenant, lease_key: str,
                         holder: str, refund: list[BucketAsk]) -> None:
        """The client left while `admit` ran: once its answer is in, what it granted goes back (the
        lease, and the token reservation, as for a request that never reached a replica). An admit
        that failed may still have run: its lease is released all the same."""
        await asyncio.wait([admit])
        admitted = not admit.cancelled() and admit.exception() is None and admit.result().ok
        try:
            await self.state.settle((lease_key, holder) if tenant.max_concurrent is not None else None,
                                    refund if admitted else [])
        except Exception as exc:
            log.warning("quotas: giving back tenant %s's admission failed (%s)", tenant.name,
                        type(exc).__name__)

    async def _release_lease(self, tenant: Tenant, lease_key: str, holder: str) -> None:
        try:
            await self.state.release(lease_key, holder)
        except Exception as exc:  # the cancellation must stay what ends the request
            log.warning("quotas: giving back tenant %s's lease failed (%s)", tenant.name,
                        type(exc).__name__)

    async def _settle(self, ctx: RequestContext, tenant: Tenant, holder: str, leased: bool,
                      reserved: int, refund_request: bool = False) -> None:
        try:
            await self._settle_all(ctx, tenant, holder, leased, reserved, refund_request)
        except Exception as exc:  # the response is out: nothing may raise into it
            log.warning("quotas: settling tenant %s's request failed (%s)", tenant.name,
                        type(exc).__name__)

    async def _settle_all(self, ctx: RequestContext, tenant: Tenant, holder: str, leased: bool,
                          reserved: int, refund_request: bool = False) -> None:
        rpm_key, tpm_key, lease_key = self.keys(tenant)
        adjustments: list[BucketAsk] = []
        if refund_request and tenant.requests_per_minute is not None:
            rpm = tenant.requests_per_minute
            adjustments.append(BucketAsk(rpm_key, rpm, rpm / 60, 1))
        if reserved and tenant.tokens_per_minute is not None:
            # Ollama's counts; nothing when nothing came back (refund everything); a response cut
            # short: its prompt and one token per record relayed (RequestContext.served_tokens).
            used = ctx.served_tokens()
            if used != reserved:
                tpm = tenant.tokens_per_minute
                adjustments.append(BucketAsk(tpm_key, tpm, tpm / 60, reserved - used))
        # One round trip: the lease back and the buckets trued up (state.settle).
        await self.state.settle((lease_key, holder) if leased else None, adjustments)

    async def snapshot(self, tenants: list[Tenant]) -> dict[str, Any]:
        """Usage and remaining per tenant, for /system/quotas."""
        out: dict[str, Any] = {}
        for tenant in tenants:
            rpm_key, tpm_key, lease_key = self.keys(tenant)
            entry: dict[str, Any] = {"lane": tenant.lane, "weight": tenant.weight}
            if tenant.requests_per_minute is not None:
                rpm = tenant.requests_per_minute
                entry["requests_per_minute"] = {
                    "limit": rpm, "remaining": round(await self.state.level(rpm_key, rpm, rpm / 60), 3)}
            if tenant.tokens_per_minute is not None:
                tpm = tenant.tokens_per_minute
                entry["tokens_per_minute"] = {
                    "limit": tpm, "remaining": round(await self.state.level(tpm_key, tpm, tpm / 60), 1)}
            entry["in_flight"] = await self.state.holders(lease_key)
            entry["max_concurrent"] = tenant.max_concurrent
            out[tenant.name] = entry
        return out
