"""The `balancer` step: which healthy replica serves a request, and a retry elsewhere before the first byte.

The choice is placement's (proxy/placement.py: residency, load, wait, affinity, learned load times),
shared with backpressure. With backpressure on, the choice is made when the request gets its slot (late
binding); this step then reports the choice, or re-chooses when health dropped the bound replica in
between. Without it, this step ranks the candidates itself. Either way it feeds placement what each
finished request taught (service and load times) and reports the outcome to the fleet's health service.

Retries: connect refused, reset before the response started, and Ollama's 503 are retried on another
candidate, at most `max_retries` times and within a retry budget (Envoy's: 20 % of requests in flight,
at least 3), only while nothing has reached the client; the forwarder holds the response headers back
until the first body byte so that a replica dying during prefill costs nothing. Routes that concern the
whole fleet (`/api/tags`, `/api/ps`, `/v1/models`, model management) go to every replica (proxy/fanout.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal

import attrs
from aiohttp import web

from proxy.chain import Handler, Step
from proxy.context import RequestContext
from proxy.errors import (
    InvalidRequest,
    ProxyError,
    UpstreamBusy,
    UpstreamConnectFailure,
    UpstreamResetBeforeResponseStarted,
)
from proxy.fanout import REPLICA_HEADER, FanOut, fleet_scope
from proxy.fleet.health import FleetHealth
from proxy.ollama import is_cloud_model, model_key
from proxy.placement import Placement
from proxy.schema import Mode, RolloutConfig, positive, ratio
from proxy.telemetry import semconv
from proxy.telemetry.setup import Telemetry
from proxy.upstreams import LoadedModel, Upstream, UpstreamSet

__all__ = ["BalancerConfig", "BalancerStep"]


@attrs.frozen
class BalancerConfig:
    """chain.balancer: which healthy replica serves a request, and retries before the first byte."""

    mode: Mode = "enforce"
    rollout: RolloutConfig = attrs.field(factory=RolloutConfig)
    """Canary for `enforce`: who it enforces for; the other tenants get shadow (see RolloutConfig)."""
    """enforce: choose by residency, load and affinity; shadow: round robin, the choice is only reported;
    off: round robin."""
    affinity: Literal["none", "prefix", "session"] = "none"
    """Among replicas of equal cost, prefer the one a hash points to: `prefix` hashes the tenant, the
    system prompt and the first `affinity_prefix_bytes` of the context; `session` uses the
    `X-Session-Id` header when present, else the same hash. Never overrides load."""
    affinity_prefix_bytes: int = attrs.field(default=4096, validator=positive)
    """How much of the system prompt and of the first message (or prompt) the prefix hash covers: the
    start of a conversation, which stays the same from turn to turn."""
    cold_load_s: float = attrs.field(default=10.0, validator=positive)
    """Assumed time to load a model a replica does not hold, until the replica's own load times are
    measured (from Ollama's load_duration)."""
    max_retries: int = attrs.field(default=2, validator=attrs.validators.ge(0))
    """Other replicas tried when one fails before the first response byte (connect refused, reset,
    Ollama's 503 server busy). Never after the first byte reached the client."""
    retry_budget_ratio: float = attrs.field(default=0.2, validator=ratio)
    """Retries in flight may be at most this share of the requests in flight (Envoy's retry budget)..."""
    min_retry_concurrency: int = attrs.field(default=3, validator=attrs.validators.ge(0))
    """...or this many, whichever is larger."""


_RETRYABLE = (UpstreamConnectFailure, UpstreamResetBeforeResponseStarted, UpstreamBusy)
_BUSY_S = 1.0
"""A replica that answered Ollama's `503 server busy` gets no new request for this long."""


class BalancerStep(Step):
    """Replica choice by residency, load and affinity; see the module docstring."""

    name = "balancer"
    runs_when_off = True
    """In `off` mode it still picks the replica, by plain round robin."""

    def __init__(self, config: BalancerConfig, upstreams: UpstreamSet, health: FleetHealth | None,
                 fanout: FanOut, telemetry: Telemetry, placement: Placement | None = None) -> None:
        super().__init__(config.mode, telemetry, config.rollout)
        self.config = config
        self.upstreams = upstreams
        self.health = health
        self.fanout = fanout
        self.placement = placement if placement is not None else Placement(config, upstreams)
        self.stats = self.placement.stats
        """Per model measurements (placement's), for /system/profile."""
        self.active = 0
        self.retrying = 0
        self.model_loads = telemetry.meter.create_counter(
            telemetry.names.metric_balancer_model_loads, unit="{load}",
            description="Responses whose Ollama load_duration shows a model load, per replica and model.")
        self.retries = telemetry.meter.create_counter(
            telemetry.names.metric_balancer_retries, unit="{retry}",
            description="Requests sent to another replica before the first byte, by failed replica and "
                        "error.")

    def reconfigure(self, config: BalancerConfig) -> None:
        super().reconfigure(config)
        self.config = config
        self.placement.reconfigure(config)

    # the step ----------------------------------------------------------------------------------------
    async def handle(self, request: web.Request, ctx: RequestContext,
                     handler: Handler) -> web.StreamResponse:
        model = ctx.model
        candidates = ctx.health.replicas
        if candidates is None:
            candidates = self.upstreams.eligible(model)
        if not candidates:  # health off, or in shadow mode with nothing serving
            candidates = [u for u in self.upstreams if self.upstreams.allows(u, model)] or \
                list(self.upstreams)
        named = request.headers.get(REPLICA_HEADER)
        scope = fleet_scope(request.method, request.path)
        if named is None and scope is not None and len(self.upstreams) > 1:
            with self.span(**{self.telemetry.names.balancer_scope: scope}) as span:
                span.set_attribute(self.telemetry.names.balancer_targets, list(self.upstreams.by_name))
                self.decide(ctx, span, "fan_out")
            ctx.routing.fan_out = True
            return await self.fanout.handle(request, ctx, scope, list(self.upstreams))
        placement = self.placement
        if model and self.upstreams.tracks(model):  # no measurements for names no replica has
            placement.wanted(model, ctx.route.operation)
        attributes = {semconv.ATTR_GEN_AI_REQUEST_MODEL: semconv.request_model(model)} if model else {}
        with self.span(**attributes) as span:
            ranked: list[tuple[float, str, Upstream]] = []
            bound = ctx.admission.replica
            if named is not None:
                target = self.upstreams.by_name.get(named)
                if target is None:
                    # Refused in every mode: shadow or off cannot guess which replica was meant. The
                    # name is the client's: it is not echoed.
                    span.set_attribute(self.telemetry.names.step_decision(self.name), "unknown_replica")
                    self.decision_counts["unknown_replica"] += 1
                    raise InvalidRequest(f"no replica by that name in {REPLICA_HEADER} (known: "
                                         f"{', '.join(self.upstreams.by_name)})")
                chosen, reason, candidates = target, "named", [target]
            elif bound is not None and bound in candidates:
                # Chosen by this step's cost when backpressure granted the slot; reported here.
                chosen, reason = bound, "bound"
                span.set_attribute(self.telemetry.names.balancer_late_bound, True)
                if self.mode_of(ctx) == "enforce":
                    ranked = ctx.admission.ranking or placement.rank(model, candidates,
                                                           placement.describe(ctx, request.headers))
                    reason = next((r for _, r, u in ranked if u is bound), reason)
            elif self.mode_of(ctx) == "enforce":
                ranked = placement.rank(model, candidates, placement.describe(ctx, request.headers))
                chosen, reason = ranked[0][2], ranked[0][1]
            else:
                chosen, reason = placement.round_robin(candidates), "round_robin"
                if self.mode_of(ctx) == "shadow":
                    span.set_attribute(self.telemetry.names.balancer_would_choose, placement.rank(
                        model, candidates, placement.describe(ctx, request.headers))[0][2].name)
            if ctx.admission.slot is not None and chosen is not bound:
                ctx.admission.slot.move(chosen)
            ctx.routing.upstream = chosen
            placement.chose(chosen)
            if span.is_recording():  # nothing to format for a span nobody records
                span.set_attribute(self.telemetry.names.upstream_name, chosen.name)
                if ranked:
                    span.set_attribute(self.telemetry.names.balancer_costs_s,
                                       [f"{u.name}={c:.2f}:{r}" for c, r, u in ranked])
                if ctx.health.dropped:
                    span.set_attribute(self.telemetry.names.balancer_dropped,
                                       [f"{n}={r}" for n, r in ctx.health.dropped.items()])
            self.decide(ctx, span, reason)
        return await self._attempts(request, ctx, handler, model, candidates)

    def _may_retry(self, ctx: RequestContext, tried: list[Upstream], candidates: Sequence[Upstream]) -> bool:
        if len(tried) > self.config.max_retries or ctx.route.streams_body_upload:
            return False
        if not any(u not in tried and self.upstreams.is_serving(u) for u in candidates):
            return False
        budget = max(self.config.min_retry_concurrency, self.config.retry_budget_ratio * self.active)
        return self.retrying < budget

    async def _attempts(self, request: web.Request, ctx: RequestContext, handler: Handler,
                        model: str | None, candidates: Sequence[Upstream]) -> web.StreamResponse:
        tried: list[Upstream] = []
        self.active += 1
        try:
            while True:
                upstream = ctx.routing.upstream
                assert upstream is not None
                tried.append(upstream)
                may_retry = self._may_retry(ctx, tried, candidates)
                # A cloud model's 503 is ollama.com's overload, the same on every replica: relay it.
                retry_busy = may_retry and not is_cloud_model(model)
                ctx.routing.retry_statuses = frozenset({503}) if retry_busy else frozenset()
                attempt = ctx.routing.attempt = upstream.begin(model)
                started = time.monotonic()
                try:
                    return await handler(request)
                except _RETRYABLE as exc:
                    self._observe(upstream, exc.code, 0, ctx)
                    if isinstance(exc, UpstreamBusy):
                        upstream.busy(_BUSY_S)
                    if not may_retry or ctx.exchange.first_byte_at is not None:
                        raise
                    self.retries.add(1, {self.telemetry.names.upstream_name: upstream.name,
                                         semconv.ATTR_ERROR_TYPE: exc.code})
                    if ctx.root_span is not None:
                        ctx.root_span.add_event(self.telemetry.names.balancer_retry_event, {
                            self.telemetry.names.upstream_name: upstream.name,
                            semconv.ATTR_ERROR_TYPE: exc.code})
                    remaining = [u for u in candidates if u not in tried and self.upstreams.is_serving(u)]
                    ranked = self.placement.rank(
                        model, remaining, self.placement.describe(ctx, request.headers)) \
                        if self.mode_of(ctx) == "enforce" else []
                    following = ranked[0][2] if ranked else remaining[0]
                    if ctx.admission.slot is not None:
                        ctx.admission.slot.move(following)
                    ctx.routing.upstream = following
                    self.placement.chose(following)
                    ctx.outcome = "ok"
                    if len(tried) == 1:
                        self.retrying += 1
                except ProxyError as exc:
                    self._observe(upstream, exc.code, 0, ctx)
                    raise
                finally:
                    upstream.end(attempt)
                    if ctx.routing.upstream is upstream:  # the attempt that answered
                        self._learn(upstream, ctx, time.monotonic() - started)
        finally:
            self.active -= 1
            if len(tried) > 1:
                self.retrying -= 1

    def _observe(self, upstream: Upstream, outcome: str, status: int, ctx: RequestContext) -> None:
        """Tell the fleet's health service how the replica did; a request that ran out of its own
        deadline says nothing about the replica."""
        if ctx.deadline_at is not None and time.monotonic() >= ctx.deadline_at - 0.05:
            return
        if self.health is not None and self.health.mode != "off":
            # A 500's request is fingerprinted (tenant and body; hashed only then): the same request
            # sent again, as SDKs retry a 500, is one failure of the replica, not three.
            request = hash((ctx.tenant.name, ctx.body)) if status == 500 else None
            self.health.observe(upstream, outcome, status, model=ctx.model, request=request)

    def _learn(self, upstream: Upstream, ctx: RequestContext, elapsed_s: float) -> None:
        """After an attempt: passive health, service time, load time, residency seen."""
        if ctx.outcome != "client_disconnect" and ctx.status:
            self._observe(upstream, ctx.outcome, ctx.status, ctx)
        if ctx.status == 503 and ctx.exchange.first_byte_at is not None \
                and not ctx.routing.fan_out and not is_cloud_model(ctx.model):
            upstream.busy(_BUSY_S)  # relayed (no other replica to try): busy all the same
        model = ctx.model
        if not model or ctx.route.operation is None or ctx.outcome != "ok" or ctx.status != 200:
            return
        key = model_key(model)
        usage = ctx.exchange.usage
        if (load_s := self.placement.learn(key, elapsed_s, usage)) is not None:
            self.model_loads.add(1, {self.telemetry.names.upstream_name: upstream.name,
                                     semconv.ATTR_GEN_AI_REQUEST_MODEL: self.upstreams.label(key)})
            self.telemetry.events.model_load(upstream.name, key, load_s, "request")
            if self.health is not None:
                self.health.probe_soon(upstream)  # it may have evicted another model: look now
        if key not in upstream.loaded:
            upstream.loaded[key] = LoadedModel(key)  # seen serving it; the next probe has the details

