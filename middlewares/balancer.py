"""The `balancer` step: which healthy replica serves a request, and a retry elsewhere before the first byte.

Cost model, in seconds until the request could start on a replica (lowest wins):
- load: the wait for one of the replica's slots for this model (its in-flight requests of the model
  against `num_parallel`, times the model's measured service time);
- residency: nothing when `/api/ps` shows the model loaded with a context that fits the counted prompt,
  else the model's load time (Ollama's measured `load_duration`, `cold_load_s` until measured), plus,
  when loading it would evict a model still in demand (the replica has never held more models at once
  than it holds now), that model's own load time;
- affinity (optional): among replicas within 5 % of the best cost only, the one a hash of the tenant, the
  system prompt and the start of the context points to (rendezvous hashing). It never overrides load.
With backpressure on, the choice is made when the request gets its slot (late binding: the same cost,
where waiting for a busy replica that holds the model costs the expected wait for its next slot), so a
request waits for the replica that holds its model rather than make an idle one swap models, unless the
wait would be longer than the load. This step then reports the choice, or re-chooses when health dropped
the bound replica in between.

Retries: connect refused, reset before the response started, and Ollama's 503 are retried on another
candidate, at most `max_retries` times and within a retry budget (Envoy's: 20 % of requests in flight,
at least 3), only while nothing has reached the client; the forwarder holds the response headers back
until the first body byte so that a replica dying during prefill costs nothing. Routes that concern the
whole fleet (`/api/tags`, `/api/ps`, `/v1/models`, model management) go to every replica (proxy/fanout.py).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from proxy.chain import Handler, Step
from proxy.config import BalancerConfig
from proxy.context import CONTEXT, RequestContext
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
from proxy.profiles import ModelStats
from proxy.telemetry import semconv
from proxy.telemetry.setup import Telemetry
from proxy.upstreams import LoadedModel, Upstream, UpstreamSet

__all__ = ["BalancerStep"]

_RETRYABLE = (UpstreamConnectFailure, UpstreamResetBeforeResponseStarted, UpstreamBusy)
_DEMAND_WINDOW_S = 120.0
"""A model requested this recently is still wanted: evicting it costs its next load."""
_NEAR = 0.05
_SHORT_PENALTY_S = 0.5
"""Preference for a replica whose loaded context fits the prompt over one where Ollama would truncate."""
_DEFAULT_SERVICE_S = 1.0


class BalancerStep(Step):
    """Replica choice by residency, load and affinity; see the module docstring."""

    name = "balancer"
    runs_when_off = True
    """In `off` mode it still picks the replica, by plain round robin."""

    def __init__(self, config: BalancerConfig, upstreams: UpstreamSet, health: FleetHealth | None,
                 fanout: FanOut, telemetry: Telemetry) -> None:
        super().__init__(config.mode, telemetry)
        self.config = config
        self.upstreams = upstreams
        self.health = health
        self.fanout = fanout
        self.stats: dict[str, ModelStats] = {}
        self.max_resident: dict[str, int] = {}
        self.active = 0
        self.retrying = 0
        self._picks = itertools.count(1)
        self._last_pick: dict[str, int] = {}
        prefix = telemetry.config.metric_prefix
        self.model_loads = telemetry.meter.create_counter(
            semconv.metric_name(prefix, "balancer", "model_loads"), unit="{load}",
            description="Responses whose Ollama load_duration shows a model load, per replica and model.")
        self.retries = telemetry.meter.create_counter(
            semconv.metric_name(prefix, "balancer", "retries"), unit="{retry}",
            description="Requests sent to another replica before the first byte, by failed replica and "
                        "error.")

    # the cost model ----------------------------------------------------------------------------------
    def stat(self, key: str) -> ModelStats:
        stat = self.stats.get(key)
        if stat is None:
            stat = self.stats[key] = ModelStats()
        return stat

    def _service(self, key: str | None) -> float:
        stat = self.stats.get(key or "")
        return stat.service_s if stat is not None and stat.service_s is not None else _DEFAULT_SERVICE_S

    def _load(self, key: str) -> float:
        stat = self.stats.get(key)
        return stat.load_s if stat is not None and stat.load_s is not None else self.config.cold_load_s

    def _wanted(self, key: str) -> float:
        stat = self.stats.get(key)
        return stat.last_wanted if stat is not None else -math.inf

    def _wait(self, upstream: Upstream, key: str | None) -> float:
        """Expected wait for a slot when the request is sent now (Ollama queues what exceeds slots)."""
        slots = max(1, upstream.num_parallel)
        busy = upstream.by_model.get(key, 0) if key else len(upstream.attempts)
        return max(0, busy + 1 - slots) / slots * self._service(key)

    def cost(self, upstream: Upstream, key: str | None, tokens: int | None, wait_s: float,
             num_ctx: int | None = None) -> tuple[float, str]:
        """(seconds until the request could start on `upstream`, `resident` | `short` | `reload` |
        `cold` | `any`). `short`: loaded with a context smaller than the prompt, which a replica whose
        context fits beats by a little (`_SHORT_PENALTY_S`); `reload`: loaded with another num_ctx than
        the request asks for, so Ollama reloads it (a load, but nothing else is evicted)."""
        if key is None:
            return wait_s, "any"
        self.max_resident[upstream.name] = max(self.max_resident.get(upstream.name, 1),
                                               len(upstream.loaded))
        residency = upstream.residency(key, tokens, num_ctx)
        if residency == "resident":
            return wait_s, "resident"
        if residency == "short":
            return wait_s + _SHORT_PENALTY_S, "short"
        if residency == "reload":
            return wait_s + self._load(key), "reload"
        cost = wait_s + self._load(key)
        others = [m for m in upstream.loaded if m != key]
        if others and len(others) >= self.max_resident[upstream.name]:
            now = time.monotonic()
            victim = min(others, key=self._wanted)
            if now - self._wanted(victim) < _DEMAND_WINDOW_S:
                cost += self._load(victim)
            if upstream.by_model.get(victim):
                cost += self._service(victim)  # Ollama evicts a runner only once it is idle
        return cost, "cold"

    def _affinity_key(self, ctx: RequestContext | None, request: web.Request | None) -> bytes | None:
        if ctx is None or self.config.affinity == "none":
            return None
        if self.config.affinity == "session" and request is not None:
            session = request.headers.get("X-Session-Id")
            if session:
                return f"{ctx.tenant.name}\0{session}".encode()
        body = ctx.json()
        if not isinstance(body, dict):
            return None
        # The start of the conversation: stable from turn to turn, and where RAG puts its context.
        raw_system = body.get("system")
        system = raw_system if isinstance(raw_system, str) else ""
        start = ""
        messages = body.get("messages")
        if isinstance(messages, list):
            for message in messages:
                if not isinstance(message, dict):
                    continue
                if message.get("role") == "system":
                    system = system or str(message.get("content", ""))
                else:
                    start = str(message.get("content", ""))
                    break
        else:
            start = str(body.get("prompt") or body.get("input") or "")
        limit = self.config.affinity_prefix_bytes
        return "\0".join((ctx.tenant.name, system[:limit], start[:limit])).encode()

    def rank(self, model: str | None, candidates: Sequence[Upstream], ctx: RequestContext | None,
             request: web.Request | None = None, free: Sequence[Upstream] | None = None,
             position: int = 0) -> list[tuple[float, str, Upstream]]:
        """Candidates with their cost and reason, best first. With `free` (backpressure's view), those
        replicas start at once and the others after their next slot frees for this request."""
        key = model_key(model) if model else None
        tokens = ctx.prompt_tokens if ctx is not None else None
        num_ctx = _requested_num_ctx(ctx)
        rows: list[tuple[float, str, Upstream]] = []
        for upstream in candidates:
            if free is None:
                wait = self._wait(upstream, key)
            elif upstream in free:
                wait = 0.0
            else:
                wait = (position + 0.5) / max(1, upstream.num_parallel) * self._service(key)
            cost, reason = self.cost(upstream, key, tokens, wait, num_ctx)
            rows.append((cost, reason, upstream))
        if not rows:
            return rows
        best = min(c for c, _, _ in rows)
        near = [r for r in rows if r[0] <= best + max(0.05, _NEAR * best)]
        affinity = self._affinity_key(ctx, request)
        if affinity is not None:
            def pull(u: Upstream) -> bytes:
                return hashlib.blake2b(affinity + u.name.encode(), digest_size=8).digest()
            pick = max(near, key=lambda r: pull(r[2]))
            pick = (pick[0], "affinity" if len(near) > 1 else pick[1], pick[2])
        else:
            # Equal cost: the least utilised, then the least recently chosen, so that ties spread.
            pick = min(near, key=lambda r: (len(r[2].attempts) / max(1, r[2].num_parallel),
                                            self._last_pick.get(r[2].name, 0)))
        rest = sorted((r for r in rows if r[2] is not pick[2]), key=lambda r: r[0])
        return [pick, *rest]

    def pick_slot(self, model: str, free: Sequence[Upstream], eligible: Sequence[Upstream],
                  position: int, hint: Any) -> Upstream | None:
        """Backpressure's late binding: the replica to take a free slot on now, or None when waiting
        for a busy one (that holds the model) is cheaper than loading the model on a free one."""
        if self.mode != "enforce":
            return self._round_robin(free)
        request = hint if isinstance(hint, web.Request) else None
        ctx = request[CONTEXT] if request is not None else None
        ranked = self.rank(model, eligible, ctx, request, free, position)
        if not ranked:
            return None
        best = ranked[0][2]
        if best not in free:
            # Waiting for the replica that holds the model is cheaper, as far as we can tell; but once
            # the request has waited as long as the load would have taken, it takes the free replica.
            cheapest = min((row for row in ranked if row[2] in free), key=lambda row: row[0])
            waited = time.monotonic() - ctx.started if ctx is not None else 0.0
            if waited < cheapest[0]:
                return None
            best = cheapest[2]
        self._last_pick[best.name] = next(self._picks)
        if ctx is not None:
            ctx.routing = ranked
        return best

    # the step ----------------------------------------------------------------------------------------
    async def handle(self, request: web.Request, ctx: RequestContext,
                     handler: Handler) -> web.StreamResponse:
        model = ctx.model
        candidates = ctx.candidates if ctx.candidates is not None else self.upstreams.eligible(model)
        if not candidates:  # health off, or in shadow mode with nothing serving
            candidates = [u for u in self.upstreams if self.upstreams.allows(u, model)] or \
                list(self.upstreams)
        named = request.headers.get(REPLICA_HEADER)
        scope = fleet_scope(request.method, request.path)
        if named is None and scope is not None and len(self.upstreams) > 1:
            with self.span(**{"sop.balancer.scope": scope}) as span:
                span.set_attribute("sop.balancer.targets", list(self.upstreams.by_name))
                self.decide(ctx, span, "fan_out")
            ctx.upstream_name = "*"
            return await self.fanout.handle(request, ctx, scope, list(self.upstreams))
        if model and self.upstreams.tracks(model):  # no measurements for names no replica has
            stat = self.stat(model_key(model))
            stat.last_wanted = time.monotonic()
            stat.arrivals.append(stat.last_wanted)
            if ctx.route.operation is not None:
                stat.operation = ctx.route.operation
        attributes = {semconv.ATTR_GEN_AI_REQUEST_MODEL: model} if model else {}
        with self.span(**attributes) as span:
            ranked: list[tuple[float, str, Upstream]] = []
            bound = ctx.upstream
            if named is not None:
                target = self.upstreams.by_name.get(named)
                if target is None:
                    # Refused in every mode: shadow or off cannot guess which replica was meant. The
                    # name is the client's: it is not echoed.
                    span.set_attribute(f"sop.{self.name}.decision", "unknown_replica")
                    self.decision_counts["unknown_replica"] += 1
                    raise InvalidRequest(f"no replica by that name in {REPLICA_HEADER} (known: "
                                         f"{', '.join(self.upstreams.by_name)})")
                chosen, reason, candidates = target, "named", [target]
            elif bound is not None and bound in candidates:
                # Chosen by this step's cost when backpressure granted the slot; reported here.
                chosen, reason = bound, "bound"
                span.set_attribute("sop.balancer.late_bound", True)
                if self.mode == "enforce":
                    ranked = ctx.routing or self.rank(model, candidates, ctx, request)
                    reason = next((r for _, r, u in ranked if u is bound), reason)
            elif self.mode == "enforce":
                ranked = self.rank(model, candidates, ctx, request)
                chosen, reason = ranked[0][2], ranked[0][1]
            else:
                chosen, reason = self._round_robin(candidates), "round_robin"
                if self.mode == "shadow":
                    span.set_attribute("sop.balancer.would_choose",
                                       self.rank(model, candidates, ctx, request)[0][2].name)
            if ctx.slot is not None and chosen is not bound:
                ctx.slot.move(chosen)
            ctx.upstream = chosen
            self._last_pick[chosen.name] = next(self._picks)
            if span.is_recording():  # nothing to format for a span nobody records
                span.set_attribute(semconv.ATTR_UPSTREAM_NAME, chosen.name)
                if ranked:
                    span.set_attribute("sop.balancer.costs_s",
                                       [f"{u.name}={c:.2f}:{r}" for c, r, u in ranked])
                if ctx.dropped:
                    span.set_attribute("sop.balancer.dropped",
                                       [f"{n}={r}" for n, r in ctx.dropped.items()])
            self.decide(ctx, span, reason)
        return await self._attempts(request, ctx, handler, model, candidates)

    def _round_robin(self, candidates: Sequence[Upstream]) -> Upstream:
        return self.upstreams.next_among(candidates) or candidates[0]

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
                upstream = ctx.upstream
                assert upstream is not None
                tried.append(upstream)
                may_retry = self._may_retry(ctx, tried, candidates)
                # A cloud model's 503 is ollama.com's overload, the same on every replica: relay it.
                retry_busy = may_retry and not is_cloud_model(model)
                ctx.retry_statuses = frozenset({503}) if retry_busy else frozenset()
                attempt = ctx.attempt = upstream.begin(model)
                started = time.monotonic()
                try:
                    return await handler(request)
                except _RETRYABLE as exc:
                    self._observe(upstream, exc.code, 0, ctx)
                    if not may_retry or ctx.first_byte_at is not None:
                        raise
                    self.retries.add(1, {semconv.ATTR_UPSTREAM_NAME: upstream.name,
                                         semconv.ATTR_ERROR_TYPE: exc.code})
                    if ctx.root_span is not None:
                        ctx.root_span.add_event("sop.balancer.retry", {
                            semconv.ATTR_UPSTREAM_NAME: upstream.name, semconv.ATTR_ERROR_TYPE: exc.code})
                    remaining = [u for u in candidates if u not in tried and self.upstreams.is_serving(u)]
                    ranked = self.rank(model, remaining, ctx, request) if self.mode == "enforce" else []
                    following = ranked[0][2] if ranked else remaining[0]
                    if ctx.slot is not None:
                        ctx.slot.move(following)
                    ctx.upstream = following
                    self._last_pick[following.name] = next(self._picks)
                    ctx.outcome = "ok"
                    if len(tried) == 1:
                        self.retrying += 1
                except ProxyError as exc:
                    self._observe(upstream, exc.code, 0, ctx)
                    raise
                finally:
                    upstream.end(attempt)
                    if ctx.upstream is upstream:  # the attempt that answered
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
            self.health.observe(upstream, outcome, status, model=ctx.model)

    def _learn(self, upstream: Upstream, ctx: RequestContext, elapsed_s: float) -> None:
        """After an attempt: passive health, service time, load time, residency seen."""
        if ctx.outcome != "client_disconnect" and ctx.status:
            self._observe(upstream, ctx.outcome, ctx.status, ctx)
        model = ctx.model
        if not model or ctx.route.operation is None or ctx.outcome != "ok" or ctx.status != 200:
            return
        key = model_key(model)
        stat = self.stat(key)
        previous = stat.service_s
        stat.service_s = elapsed_s if previous is None else 0.8 * previous + 0.2 * elapsed_s
        usage = ctx.usage
        if usage is not None and (usage.input_tokens or usage.output_tokens):
            stat.totals.append((usage.input_tokens or 0) + (usage.output_tokens or 0))
        load_ns = usage.load_duration_ns if usage is not None else None
        if load_ns is not None and load_ns >= semconv.COLD_LOAD_THRESHOLD_NS:
            seconds = load_ns / 1e9
            stat.loads += 1
            stat.load_s = seconds if stat.load_s is None else 0.7 * stat.load_s + 0.3 * seconds
            self.model_loads.add(1, {semconv.ATTR_UPSTREAM_NAME: upstream.name,
                                     semconv.ATTR_GEN_AI_REQUEST_MODEL: self.upstreams.label(key)})
            if self.health is not None:
                self.health.probe_soon(upstream)  # it may have evicted another model: look now
        if key not in upstream.loaded:
            upstream.loaded[key] = LoadedModel(key)  # seen serving it; the next probe has the details


def _requested_num_ctx(ctx: RequestContext | None) -> int | None:
    """The num_ctx the request (as the limits step left it) asks Ollama for, if any."""
    body = ctx.json() if ctx is not None else None
    options = body.get("options") if isinstance(body, dict) else None
    value = options.get("num_ctx") if isinstance(options, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None
