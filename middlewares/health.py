"""The `health` step: which replicas may take this request, from what the fleet's health service learned.

Per request (no probe on the hot path): the candidates are the serving replicas allowed to serve the
model; none -> 503 `no_healthy_upstream` with Retry-After from the next probe or backoff expiry. Probing,
the health state machine, restarts and pre-warming are the fleet's (proxy/fleet/health.py), owned by the
application; passive reports (a request's outcome on a replica) go there too, not to this step.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from proxy.chain import Handler, Step
from proxy.config import HealthConfig
from proxy.context import RequestContext
from proxy.errors import NoHealthyUpstream
from proxy.fleet.health import FleetHealth
from proxy.telemetry import semconv
from proxy.telemetry.setup import Telemetry
from proxy.upstreams import UpstreamSet

__all__ = ["HealthStep"]


class HealthStep(Step):
    """Filters the candidates to the replicas the fleet's health service says are serving."""

    name = "health"

    def __init__(self, config: HealthConfig, upstreams: UpstreamSet, fleet: FleetHealth,
                 telemetry: Telemetry) -> None:
        super().__init__(config.mode, telemetry)
        self.config = config
        self.upstreams = upstreams
        self.fleet = fleet

    # the step ----------------------------------------------------------------------------------------
    def retry_after_s(self, model: str | None) -> float:
        """When a replica for `model` may serve again: the soonest backoff expiry or next probe."""
        now = time.monotonic()
        times = []
        for upstream in self.upstreams:
            if not self.upstreams.allows(upstream, model):
                continue
            when = max(upstream.next_probe_at, upstream.ejected_until if upstream.status == "ejected"
                       else 0.0)
            times.append(when - now)
        return max(1.0, min(times, default=self.config.probe_interval_s))

    async def handle(self, request: web.Request, ctx: RequestContext,
                     handler: Handler) -> web.StreamResponse:
        model = ctx.model
        attributes = {semconv.ATTR_GEN_AI_REQUEST_MODEL: model} if model else {}
        with self.span(**attributes) as span:
            candidates = self.upstreams.eligible(model)
            for upstream in self.upstreams:
                if upstream in candidates and upstream.serving:
                    continue
                reason = self.upstreams.why_not(upstream, model)
                if reason is None and self.mode == "shadow" and not upstream.serving:
                    reason = f"shadow_{upstream.status}"
                if reason is not None:
                    ctx.dropped[upstream.name] = reason
            if span.is_recording():
                span.set_attribute("sop.health.candidates", [u.name for u in candidates])
                if ctx.dropped:
                    span.set_attribute("sop.health.dropped",
                                       [f"{n}={r}" for n, r in ctx.dropped.items()])
            serving = [u for u in candidates if u.serving]
            if not serving:
                self.decide(ctx, span, "no_healthy_upstream", NoHealthyUpstream(
                    f"no healthy replica can serve {model or 'this request'} now"
                    + (f" ({'; '.join(f'{n}: {r}' for n, r in ctx.dropped.items())})" if ctx.dropped
                       else ""),
                    retry_after_s=self.retry_after_s(model)))
            else:
                self.decide(ctx, span, "healthy")
            ctx.candidates = candidates
        return await handler(request)

    def snapshot(self) -> dict[str, Any]:
        """The fleet's per-replica health (for /system/profile)."""
        return self.fleet.snapshot()
