"""The `health` step: which replicas may take this request, from what the fleet's health service learned.

Per request (no probe on the hot path): the candidates are the serving replicas allowed to serve the
model; none -> 503 `no_healthy_upstream` with Retry-After from the next probe or backoff expiry. Probing,
the health state machine, restarts and pre-warming are the fleet's (proxy/fleet/health.py), owned by the
application; passive reports (a request's outcome on a replica) go there too, not to this step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import attrs
from aiohttp import web

from proxy.chain import Handler, Step
from proxy.context import RequestContext
from proxy.errors import NoHealthyUpstream
from proxy.fanout import REPLICA_HEADER, fleet_scope
from proxy.fleet.health import FleetHealth
from proxy.schema import Mode, RolloutConfig, positive, ratio
from proxy.telemetry import semconv
from proxy.telemetry.setup import Telemetry
from proxy.upstreams import Upstream, UpstreamSet

__all__ = ["HealthConfig", "HealthStep"]


@attrs.frozen
class HealthConfig:
    """chain.health: which replicas may take traffic (active probes, passive ejection, restarts)."""

    mode: Mode = "enforce"
    rollout: RolloutConfig = attrs.field(factory=RolloutConfig)
    """Canary for `enforce`: who it enforces for; the other tenants get shadow (see RolloutConfig)."""
    """enforce: unhealthy replicas get no traffic; shadow: probe and report only; off: no probes."""
    probe_interval_s: float = attrs.field(default=5.0, validator=positive)
    """Time between two probes of a replica (`GET /api/version`, then `GET /api/ps`), jittered."""
    probe_jitter: float = attrs.field(default=0.2, validator=ratio)
    """Each interval is drawn from +/- this fraction, so replicas are not probed in lockstep."""
    probe_timeout_s: float = attrs.field(default=2.0, validator=positive)
    """A probe that takes longer has failed."""
    eject_after_failures: int = attrs.field(default=3, validator=positive)
    """Consecutive gateway failures (connect refused, reset, no response, 502/504, failed probe) that
    eject a replica."""
    base_ejection_s: float = attrs.field(default=10.0, validator=positive)
    """First ejection time; it doubles with every ejection in a row (exponential backoff)."""
    max_ejection_s: float = attrs.field(default=300.0, validator=positive)
    """Longest ejection time; a replica healthy this long has its backoff reset."""
    max_ejection_ratio: float = attrs.field(default=0.5, validator=ratio)
    """Passive detection ejects at most this share of the replicas (at least one); failed probes always
    eject."""
    stuck_after_s: float = attrs.field(default=180.0, validator=positive)
    """A replica whose in-flight requests have all received nothing for this long is stuck: it gets no new
    traffic (and is restarted when it has a restart_command)."""
    restart_after_failures: int = attrs.field(default=3, validator=positive)
    """Failed probes in a row before the replica's restart_command runs."""
    restart_min_interval_s: float = attrs.field(default=300.0, validator=positive)
    """At most one restart of a replica per this many seconds."""
    restart_timeout_s: float = attrs.field(default=120.0, validator=positive)
    """A restart command still running after this long is killed."""
    warm_timeout_s: float = attrs.field(default=300.0, validator=positive)
    """Longest wait for one model to load when pre-warming a replica."""




class HealthStep(Step):
    """Filters the candidates to the replicas the fleet's health service says are serving."""

    name = "health"

    def __init__(self, config: HealthConfig, upstreams: UpstreamSet, fleet: FleetHealth,
                 telemetry: Telemetry) -> None:
        super().__init__(config.mode, telemetry, config.rollout)
        self.config = config
        self.upstreams = upstreams
        self.fleet = fleet

    def reconfigure(self, config: HealthConfig) -> None:
        super().reconfigure(config)
        self.config = config

    # the step ----------------------------------------------------------------------------------------
    def retry_after_s(self, model: str | None, without: Sequence[Upstream] = ()) -> float:
        """When a replica for `model` may serve again: the soonest backoff expiry or next probe, among
        the replicas that may serve it but those `without` it (serving, but lacking the model)."""
        now = time.monotonic()
        times = []
        for upstream in self.upstreams:
            if not self.upstreams.allows(upstream, model) or upstream in without:
                continue
            when = max(upstream.next_probe_at, upstream.ejected_until if upstream.status == "ejected"
                       else 0.0)
            times.append(when - now)
        return max(1.0, min(times, default=self.config.probe_interval_s))

    async def handle(self, request: web.Request, ctx: RequestContext,
                     handler: Handler) -> web.StreamResponse:
        model = ctx.model
        attributes = {semconv.ATTR_GEN_AI_REQUEST_MODEL: semconv.request_model(model)} if model else {}
        with self.span(**attributes) as span:
            candidates = self.upstreams.eligible(model)
            absent: Sequence[Upstream] = ()
            if model and request.headers.get(REPLICA_HEADER) is None \
                    and fleet_scope(request.method, request.path) is None \
                    and self.upstreams.held_only_out_of_service(model):
                # Only replicas out of service have it: a serving one would answer 404 "model not
                # found", which clients take as final (or pull the model). It exists: 503, retry.
                # Management (pull, create, delete: fanned out) and a named replica go on as asked.
                absent, candidates = candidates, []
            for upstream in self.upstreams:
                if upstream in candidates and upstream.serving:
                    continue
                reason = self.upstreams.why_not(upstream, model)
                if reason is None and upstream in absent:
                    reason = "model_absent"
                if reason is None and self.mode_of(ctx) == "shadow" and not upstream.serving:
                    reason = f"shadow_{upstream.status}"
                if reason is not None:
                    ctx.health.dropped[upstream.name] = reason
            if span.is_recording():
                span.set_attribute(self.telemetry.names.health_candidates, [u.name for u in candidates])
                if ctx.health.dropped:
                    span.set_attribute(self.telemetry.names.health_dropped,
                                       [f"{n}={r}" for n, r in ctx.health.dropped.items()])
            serving = [u for u in candidates if u.serving]
            if not serving:
                self.decide(ctx, span, "no_healthy_upstream", NoHealthyUpstream(
                    f"no healthy replica can serve {model or 'this request'} now"
                    + (f" ({'; '.join(f'{n}: {r}' for n, r in ctx.health.dropped.items())})"
                       if ctx.health.dropped else ""),
                    retry_after_s=self.retry_after_s(model, absent)))
            else:
                self.decide(ctx, span, "healthy")
            ctx.health.replicas = candidates
        return await handler(request)

    def snapshot(self) -> dict[str, Any]:
        """The fleet's per-replica health (for /system/profile)."""
        return self.fleet.snapshot()
