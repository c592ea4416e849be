"""The `backpressure` step: a bounded, token-fair waiting room per model in front of the replicas' slots.

Ollama queues requests for a loaded model without bound (ollama#7758); here they wait in the proxy, where
the wait is bounded, ordered fairly, visible and cancellable. Per model, each replica admits at most
`max_in_flight` requests (`auto`, the default: learned from Ollama's timings, see
ModelGate.learn_slots); a request takes a free slot at once when nobody
waits, else joins the model's FairQueue (lanes + VTC, proxy/fairqueue.py) and is bound, when a slot frees,
to a replica when a slot frees (late binding). Which replica is placement's choice (proxy/placement.py,
shared with the balancer): it may prefer to keep a request waiting for the busy replica that holds its
model over an idle one that would have to load it; otherwise a slot never idles while anyone waits. Only
replicas health lets serve the model count; when none is left, waiters are let through at once to get
health's 503.

Refusals, all 503 with `Retry-After` from the time the queue needs to drain at the fleet's capacity (its
slots divided by the measured service time), never a constant:
- `overload`: the queue is full, or the estimated wait (requests ahead x service time / slots, from
  capacity, never from recent demand) already exceeds the request's deadline; never while a slot is free;
- `queue_timeout`: it waited `queue_timeout_s` (or its deadline) without getting a slot; a request
  waiting on a model load or on a replica restarting or warming has `cold_queue_timeout_s` instead.
Admitted responses carry `X-Queue-Wait-Ms`. A client that leaves while queued leaves the queue at once;
one that leaves while running frees its slot (the forwarder closes the upstream). With `adaptive: true`
each (replica, model) limit follows a gradient on Ollama's own time per output token
(`eval_duration / eval_count`), between 1 and `adaptive_max_in_flight`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import attrs
from aiohttp import web
from opentelemetry.metrics import CallbackOptions, Observation

from proxy.chain import Handler, Step
from proxy.context import RequestContext
from proxy.errors import Overload, QueueTimeout
from proxy.fairqueue import FairQueue, Waiter
from proxy.ollama import Usage, is_cloud_model, model_key
from proxy.placement import Placement, Placing
from proxy.prompts import request_cost
from proxy.schema import Mode, RolloutConfig, positive, ratio
from proxy.telemetry import semconv
from proxy.telemetry.metrics import DURATION_BUCKETS_S
from proxy.telemetry.setup import Telemetry
from proxy.upstreams import Upstream, UpstreamSet

if TYPE_CHECKING:  # only with state.backend redis
    from proxy.shared_admission import SharedAdmission
    from proxy.state.leases import Ticket

__all__ = ["BackpressureConfig", "BackpressureStep", "ModelGate", "SlotLease"]


def _in_flight(instance: Any, attribute: Any, value: int | str) -> None:
    del instance
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"{attribute.name}: must be `auto` or a number > 0")


def _cold_budget(instance: Any, attribute: Any, value: float) -> None:
    del instance
    if not 0 < value <= _HEADER_TIMEOUT_S:
        raise ValueError(f"{attribute.name}: must be > 0 and <= {_HEADER_TIMEOUT_S:g} (clients' header "
                         "timeout)")


_HEADER_TIMEOUT_S = 300.0
"""The header timeout common clients use (Ollama's Go client and OpenAI's SDKs wait longer, browsers
and many HTTP libraries about this long): no queue budget may exceed it."""

@attrs.frozen
class BackpressureConfig:
    """chain.backpressure: the bounded, fair queue in front of the replicas' slots."""

    mode: Mode = "enforce"
    rollout: RolloutConfig = attrs.field(factory=RolloutConfig)
    """Canary for `enforce`: who it enforces for; the other tenants get shadow (see RolloutConfig)."""
    max_queue_size: int = attrs.field(default=256, validator=positive)
    """Requests that may wait per model; beyond it, 503 overload."""
    queue_timeout_s: float = attrs.field(default=30.0, validator=positive)
    """Longest wait for a slot while a replica holding the model is ready, before 503 queue_timeout
    (the request's deadline may cut it shorter)."""
    cold_queue_timeout_s: float = attrs.field(default=120.0, validator=_cold_budget)
    """Longest wait for the first request in line behind a model load in progress (a request for the
    model runs on a replica that has not finished loading it), and for requests waiting on a replica
    coming back (its restart or warm-up is running, or its restart succeeded and no probe found it
    back yet, for at most `restart_after_failures` failed probes): a load takes tens of seconds, and
    a client turned away would only come back to wait for the same load. At most 300 s, the common client
    header timeout (a non-streaming request sends its headers when the answer is complete)."""
    max_in_flight: int | Literal["auto"] = attrs.field(default="auto", validator=_in_flight)
    """Requests per replica and model past this step. `auto`: start from the replica's declared
    `num_parallel` and learn how many slots it really has from Ollama's own timings (see
    ModelGate.learn_slots); a number: exactly that many."""
    auto_max_in_flight: int = attrs.field(default=16, validator=positive)
    """Upper bound of a learned limit."""
    fair: bool = True
    """Weighted fair queuing by token cost with interactive/bulk lanes; false: one FIFO."""
    bulk_share: float = attrs.field(default=0.1, validator=ratio)
    """Share of dispatches that go to the bulk lane while interactive requests also wait."""
    adaptive: bool = False
    """Adapt each (replica, model) limit to Ollama's time per output token (gradient limiter)."""
    adaptive_max_in_flight: int | None = attrs.field(default=None, validator=positive)
    """Upper bound of the adaptive limit; default twice max_in_flight."""
    adaptive_tolerance: float = attrs.field(default=0.5, validator=positive)
    """How far (as a fraction) time per token may rise above its no-load baseline before the limit
    shrinks."""


_DRAIN_WINDOW_S = 60.0
_DEFAULT_OUTPUT_TOKENS = 256
"""Expected output of a request that sets no limit, for ordering only (quotas has its own setting)."""
_WAIT_SAMPLES = 1024
_RECHECK_S = 1.0
# Learned parallelism (ModelGate.learn_slots).
_QUEUED_FLOOR_S = 0.05
"""Time queued inside Ollama below which a request did not wait for a slot (scheduling noise)..."""
_QUEUED_SHARE = 0.15
"""...or below this share of the request's own service time: Ollama's time outside prompt and eval also
holds tokenizing, templating and its HTTP hops, which on llama.cpp under load reached ~10 % of a request
(bench-burst-real); a slot wait that short is caught by the span check instead (no proof)."""
_PROOFS = 3
"""Requests at the limit that did not queue inside Ollama, with none that queued in between, before one
more slot is tried."""
_REPROBE_S = 60.0
"""How long a limit at which Ollama queued a request is not tried again."""
_BESIDE_S = 0.015
"""How long a neighbour must have run past a request's start, by Ollama's timings placed on the proxy's
clock, to count as running beside it (the placement errs by the requests' network delays)."""
_SPANS = 64
"""Finished requests per replica kept to count, by Ollama's timings, how many ran at once."""
_MAX_GATES = 256
"""Gates kept while the fleet's models are unknown; past it idle ones are dropped."""


class ModelGate:
    """Slots, queue and measurements of one model across the replicas."""

    def __init__(self, model: str, fleet: UpstreamSet, config: BackpressureConfig,
                 placement: Placement | None = None) -> None:
        self.model = model
        self.config = config
        self.fleet = fleet
        self.placement = placement
        self.queue = FairQueue(config.fair, config.bulk_share)
        # Per replica name, created on first use: replicas come and go with reloads. A removed replica
        # keeps its in_flight entry until the requests it serves release their slots.
        self.in_flight: Counter[str] = Counter()
        self.limits: dict[str, float] = {}
        self.ceilings: dict[str, int] = {}
        self.baselines: dict[str, float] = {}
        # Learned parallelism (learn_slots), per replica name.
        self.proofs: Counter[str] = Counter()
        self.too_high: dict[str, tuple[int, float]] = {}
        self.ollama_queued: Counter[str] = Counter()
        self.identity: dict[str, tuple[Any, int]] = {}
        self.running: defaultdict[str, set[SlotLease]] = defaultdict(set)
        """The leases holding a slot, per replica (a lease adds and removes itself)."""
        self.spans: defaultdict[str, deque[tuple[float, float]]] = defaultdict(
            lambda: deque(maxlen=_SPANS))
        """Recent finished requests per replica: (start, end) on the replica, by Ollama's durations."""
        self.pending: defaultdict[str, deque[tuple[float, int, list[SlotLease]]]] = defaultdict(
            lambda: deque(maxlen=_SPANS))
        """Proofs waiting for the requests that ran beside them to finish (learn_slots)."""
        self.completions: deque[float] = deque()
        self.waits: deque[float] = deque(maxlen=_WAIT_SAMPLES)
        self.rejections: Counter[str] = Counter()
        self.service_s: float | None = None
        self._recheck: asyncio.TimerHandle | None = None
        for upstream in fleet:
            self.limit(upstream)

    def limit(self, upstream: Upstream) -> float:
        """The (replica, model) limit: `max_in_flight` or the replica's slots, or what the adaptive
        limiter learned since."""
        limit = self.limits.get(upstream.name)
        if limit is None:
            config = self.config
            declared = upstream.num_parallel if config.max_in_flight == "auto" \
                else int(config.max_in_flight)
            limit = self.limits[upstream.name] = float(declared)
            # What the limit was learned for: another daemon or another declared slot count behind
            # the same name (a reload) starts again from the declaration.
            self.identity[upstream.name] = (upstream.url, upstream.num_parallel)
            if config.adaptive:
                ceiling = config.adaptive_max_in_flight or 2 * declared
            elif config.max_in_flight == "auto":
                ceiling = max(declared, config.auto_max_in_flight)
            else:
                ceiling = declared
            self.ceilings[upstream.name] = ceiling
        return limit

    @property
    def learning(self) -> bool:
        """Is the limit learned from Ollama's timings (`max_in_flight: auto`, not `adaptive`)?"""
        return self.config.max_in_flight == "auto" and not self.config.adaptive

    def learn_slots(self, lease: SlotLease, queued_s: float, busy_s: float) -> None:
        """Learned parallelism, from one finished request: `queued_s`, the time it queued inside Ollama
        for a slot (`total_duration` minus load, prompt and eval), and `busy_s`, its whole
        `total_duration`, both by Ollama's own clock.

        Queued: the replica has fewer slots than the requests the proxy had on it when this one got its
        slot (`lease.level`), so the limit drops below that level, which is not tried again for
        `_REPROBE_S`. Not queued: if, by Ollama's own timings, as many requests as the limit were
        running when this one started (each request's span on the replica is its send time plus its
        reported durations; the proxy's own release comes later, after the last byte crossed the
        network, so counting the proxy's in-flight requests would see slots that were already free),
        and requests wait here, that limit is proven; after `_PROOFS` such proofs with no queued request
        between them, one more slot is tried. So at most one request beyond the real slots is ever
        inside Ollama, and only while probing."""
        name = lease.replica.name
        limit = self.limits.get(name)
        if limit is None:  # the replica left the set (a reload) while this request ran on it
            return
        now = time.monotonic()
        start = lease.granted_at + queued_s
        self.spans[name].append((start, lease.granted_at + busy_s))
        if queued_s > max(_QUEUED_FLOOR_S, _QUEUED_SHARE * busy_s):
            self.ollama_queued[name] += 1
            self.proofs[name] = 0
            if lease.level <= 1:
                # Alone on the replica as far as this proxy knows: it queued behind someone else's
                # requests (another proxy, a direct client), which says nothing about the slots.
                return
            failed = self.too_high.get(name)
            if failed is None or lease.level <= failed[0] or now - failed[1] >= _REPROBE_S:
                self.too_high[name] = (lease.level, now)  # the lowest level that failed, for a while
            if lease.level - 1 < limit:
                self.limits[name] = float(max(1, lease.level - 1))
            return
        top = max(1, math.floor(limit))
        if lease.level < top or not len(self.queue):
            return
        # Judged once the requests that ran beside it have finished too: then every span is Ollama's.
        beside = [o for o in self.running[name] if o is not lease and o.granted_at <= start]
        self.pending[name].append((start, top, beside))

    def _judge(self, name: str) -> None:
        """Settle the pending proofs of `name` whose neighbours have all finished (in the order they
        were made; one still waiting for a long stream beside it does not hold up the others)."""
        pending = self.pending[name]
        ready = [entry for entry in pending if all(o.finished for o in entry[2])]
        for entry in ready:
            pending.remove(entry)
        for start, top, _ in ready:
            limit = self.limits.get(name)
            if limit is None or max(1, math.floor(limit)) != top:
                continue  # the limit moved since: this says nothing about the current one
            # A neighbour counts only if it was still running `_BESIDE_S` after this one started.
            # Each span is placed on the proxy's clock from its grant time, so spans of requests
            # that followed each other through one slot (the later one queued, briefly, behind the
            # earlier) can overlap by their difference in network delay: counted, that made a
            # request waiting for a slot look like proof of one more slot (a 4-slot replica was
            # seen probing 6).
            if sum(1 for s, e in self.spans[name] if s <= start and start + _BESIDE_S < e) < top:
                # Fewer ran at once inside Ollama than the limit: not exercised. Not a failure either
                # (only a request that queued inside Ollama resets the proofs).
                continue
            self.proofs[name] += 1
            if self.proofs[name] < _PROOFS or top + 1 > self.ceilings.get(name, top):
                continue
            failed = self.too_high.get(name)
            if failed is not None and top + 1 >= failed[0] \
                    and time.monotonic() - failed[1] < _REPROBE_S:
                continue
            self.proofs[name] = 0
            self.limits[name] = float(top + 1)

    def reconfigure(self, config: BackpressureConfig) -> None:
        """A reload: new settings; limits are derived again from them and the replicas' slots (limits
        the adaptive limiter learned are kept while the adaptive settings stay the same); replicas gone
        from the set drop out once their requests released their slots."""
        old = self.config
        self.config = config
        self.queue.configure(config.fair, config.bulk_share)
        keep_learned = (config.adaptive or config.max_in_flight == "auto") and (
            config.adaptive, config.max_in_flight, config.adaptive_max_in_flight,
            config.auto_max_in_flight) == (old.adaptive, old.max_in_flight, old.adaptive_max_in_flight,
                                           old.auto_max_in_flight)
        present = {u.name: u for u in self.fleet}
        for name in list(self.limits):
            if name not in present or not keep_learned \
                    or self.identity.get(name) != (present[name].url, present[name].num_parallel):
                del self.limits[name]
                self.ceilings.pop(name, None)
                self.baselines.pop(name, None)
                self.proofs.pop(name, None)
                self.too_high.pop(name, None)
                self.spans.pop(name, None)
                self.pending.pop(name, None)
        for name in [n for n, count in self.in_flight.items() if count <= 0 and n not in present]:
            del self.in_flight[name]
        for upstream in present.values():
            self.limit(upstream)
        self.dispatch()

    # capacity ----------------------------------------------------------------------------------------
    def _free(self, eligible: Sequence[Upstream]) -> list[Upstream]:
        """Replicas with a slot free for this model, and not busy (Upstream.busy_until)."""
        now = time.monotonic()
        return [u for u in eligible if self.in_flight[u.name] < max(1, math.floor(self.limit(u)))
                and u.busy_until <= now]

    def has_free_slot(self) -> bool:
        """Is a slot free on some replica that may serve the model?"""
        return bool(self._free(self.fleet.eligible(self.model)))

    def pick(self, placing: Placing | None = None, position: int = 0) -> Upstream | None:
        """The replica to take a free slot on for this model now, if any (placement's choice; without
        placement, the least loaded)."""
        eligible = self.fleet.eligible(self.model)
        free = self._free(eligible)
        if not free:
            now = time.monotonic()
            busy = [u.busy_until for u in eligible if u.busy_until > now]
            if busy:  # a slot frees when that ends too, with no release to dispatch then
                self._recheck_later(min(busy) - now + 0.01)
            return None
        if self.placement is not None:
            replica = self.placement.pick_slot(self.model, free, eligible, position, placing)
            if replica is None:
                self._recheck_later()
            return replica
        return min(free, key=lambda u: self.in_flight[u.name] / max(1.0, self.limit(u)))

    def drain_rate(self) -> float | None:
        """Completions per second over the last minute (None before two completions): what the fleet
        did recently, shown in /system/queue. Never used for admission: after a quiet minute it says
        what the demand was, not what the replicas can do."""
        now = time.monotonic()
        while self.completions and now - self.completions[0] > _DRAIN_WINDOW_S:
            self.completions.popleft()
        if len(self.completions) < 2:
            return None
        span = max(now - self.completions[0], 1.0)
        return len(self.completions) / span

    def capacity(self) -> int:
        """Slots for this model on the replicas that may serve it now (at least one)."""
        eligible = self.fleet.eligible(self.model)
        return max(1, sum(max(1, math.floor(self.limit(u))) for u in eligible))

    def estimated_wait_s(self, ahead: int) -> float:
        """Expected wait of a request with `ahead` requests before it, from capacity: the queue drains
        `capacity` requests per measured service time (0 until a service time is measured, so nothing
        is refused on a guess)."""
        if self.service_s is None:
            return 0.0
        return (ahead + 1) * self.service_s / self.capacity()
    def retry_after_s(self) -> float:
        """When to come back: the time to drain what waits now."""
        return max(1.0, self.estimated_wait_s(len(self.queue)))

    def dispatch(self) -> None:
        """Hand free slots to the next waiters; with no replica left for the model, let them all go."""
        if len(self.queue) and not self.fleet.eligible(self.model) \
                and not self.fleet.coming_back(self.model):
            while (waiter := self.queue.pop()) is not None:
                if not waiter.future.done():
                    waiter.future.set_result(None)
            return
        while (head := self.queue.peek()) is not None:
            if head.future.done():  # its client left; it is being removed
                self.queue.remove(head)
                continue
            replica = self.pick(head.placing)
            if replica is None:
                return
            waiter = self.queue.pop()
            assert waiter is head
            self.in_flight[replica.name] += 1
            waiter.future.set_result(replica)

    def _recheck_later(self, delay_s: float = _RECHECK_S) -> None:
        """Dispatch again in `delay_s` (the earliest of the rechecks asked for): free slots were passed
        over (waiting for a replica that holds the model was cheaper, a choice that changes as the
        wait grows even when nothing else happens), or a busy replica's pause ends."""
        loop = asyncio.get_running_loop()
        when = loop.time() + delay_s
        if self._recheck is None or self._recheck.when() <= loop.time() or self._recheck.when() > when:
            if self._recheck is not None:
                self._recheck.cancel()
            self._recheck = loop.call_at(when, self.dispatch)

    def move(self, old: Upstream, new: Upstream) -> None:
        """A request holding a slot on `old` goes to `new` instead (the balancer retried)."""
        self._slot_freed(old.name)
        self.in_flight[new.name] += 1
        self.dispatch()

    def release(self, replica: Upstream, service_s: float, per_token_s: float | None,
                lease: SlotLease | None = None, usage: Usage | None = None) -> None:
        """A request on `replica` finished (any way): free its slot, learn, and dispatch. `lease` and
        `usage` (what Ollama reported) feed learned parallelism."""
        self._slot_freed(replica.name)
        self.completions.append(time.monotonic())
        self.service_s = service_s if self.service_s is None else 0.8 * self.service_s + 0.2 * service_s
        if lease is not None:
            lease.finished = True
            self.running[lease.replica.name].discard(lease)
        if self.config.adaptive and per_token_s:
            self._adapt(replica.name, per_token_s)
        elif lease is not None and self.learning:
            queued = usage.queued_s() if usage is not None and not is_cloud_model(self.model) \
                else None
            if queued is not None and usage is not None and usage.total_duration_ns:
                self.learn_slots(lease, queued, usage.total_duration_ns / 1e9)
            self._judge(lease.replica.name)
        self.dispatch()

    def give_back(self, replica: Upstream) -> None:
        """A slot handed to a request that never used it (it gave up in the same turn): free it for the
        next waiter. Nothing is learned: no request ran, so no service time or completion is counted."""
        self._slot_freed(replica.name)
        self.dispatch()

    def _slot_freed(self, name: str) -> None:
        """One slot of replica `name` freed. A replica a reload removed (or renamed) leaves the books
        with its last request: its entry would otherwise stay in /system/queue and in the in-flight
        gauge, at 0, until another reload."""
        count = self.in_flight[name] - 1
        if count > 0:
            self.in_flight[name] = count
        elif any(upstream.name == name for upstream in self.fleet):
            self.in_flight[name] = 0
        else:
            del self.in_flight[name]

    def _adapt(self, name: str, per_token_s: float) -> None:
        """Gradient limiter: shrink while per-token latency exceeds the no-load baseline by more than the
        tolerance, grow by one while it does not; smoothed, bounded by [1, ceiling]. The baseline is the
        best time per token seen (learned in quieter moments, like Envoy's minRTT), drifting up 0.2 % per
        sample so that a lasting change of the replica is learned too."""
        baseline = self.baselines.get(name)
        # The baseline is the best latency seen, drifting up slowly so a permanent change is learned.
        baseline = per_token_s if baseline is None else min(per_token_s, baseline * 1.002)
        self.baselines[name] = baseline
        gradient = min(1.0, max(0.5, baseline * (1 + self.config.adaptive_tolerance) / per_token_s))
        limit = self.limits.get(name)
        if limit is None:  # the replica left the set (a reload) while this request ran on it
            return
        target = limit * gradient + (1.0 if gradient >= 1.0 else 0.0)
        self.limits[name] = min(float(self.ceilings[name]), max(1.0, 0.8 * limit + 0.2 * target))

    def snapshot(self, tenant: str | None = None) -> dict[str, Any]:
        waits = sorted(self.waits)

        def pct(q: float) -> float | None:
            return round(waits[min(len(waits) - 1, int(q * len(waits)))] * 1000, 1) if waits else None

        depth = self.queue.depth()
        if tenant is not None:
            depth = {lane: {t: n for t, n in d.items() if t == tenant} for lane, d in depth.items()}
            return {"depth": depth}
        rate = self.drain_rate()
        return {"depth": depth, "queued": len(self.queue), "in_flight": dict(self.in_flight),
                "limits": {k: round(v, 2) for k, v in self.limits.items()},
                "wait_ms": {"p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99)},
                "drain_rate_per_s": round(rate, 3) if rate else None,
                "service_s": round(self.service_s, 3) if self.service_s is not None else None,
                "capacity": self.capacity(),
                "ollama_queued": dict(self.ollama_queued),
                "rejections": dict(self.rejections)}


class SlotLease:
    """The slot a request holds on one replica for one model; moved when the balancer retries."""

    def __init__(self, gate: ModelGate, replica: Upstream) -> None:
        self.gate = gate
        self.replica = replica
        self.level = gate.in_flight[replica.name]
        """Requests on the replica for this model, this one included, when it got the slot."""
        self.granted_at = time.monotonic()
        """When it got the slot (it is sent right after): where its span on the replica begins."""
        self.finished = False
        self.ticket: Ticket | None = None
        """The shared lease (state.backend redis) that moves and is released with this slot."""
        gate.running[replica.name].add(self)

    def retry_after_s(self) -> float:
        return self.gate.retry_after_s()

    def move(self, upstream: Upstream) -> None:
        if upstream is not self.replica:
            self.gate.move(self.replica, upstream)
            self.gate.running[self.replica.name].discard(self)
            self.replica = upstream
            self.level = self.gate.in_flight[upstream.name]
            self.granted_at = time.monotonic()
            self.gate.running[upstream.name].add(self)
            if self.ticket is not None:
                self.ticket.move(upstream.name)


class BackpressureStep(Step):
    """Admission per (replica, model); see the module docstring."""

    name = "backpressure"

    def __init__(self, config: BackpressureConfig, upstreams: UpstreamSet, telemetry: Telemetry,
                 placement: Placement | None = None, shared: SharedAdmission | None = None) -> None:
        super().__init__(config.mode, telemetry, config.rollout)
        self.config = config
        self.shared = shared
        """Admission through Redis, shared by proxy processes (proxy/shared_admission.py)."""
        self.fleet = upstreams
        self.placement = placement
        self.gates: dict[str, ModelGate] = {}
        upstreams.on_change(self._fleet_changed)
        meter = telemetry.meter
        self.wait_histogram = meter.create_histogram(
            telemetry.names.metric_queue_wait, unit="s",
            description="Time requests waited in the proxy's queue before getting a slot.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S)
        meter.create_observable_gauge(
            telemetry.names.metric_queue_depth, callbacks=[self._observe_depth],
            unit="{request}", description="Requests waiting, per model and lane.")
        meter.create_observable_gauge(
            telemetry.names.metric_upstream_in_flight, callbacks=[self._observe_in_flight],
            unit="{request}", description="Requests holding a slot, per replica and model.")
        meter.create_observable_gauge(
            telemetry.names.metric_upstream_max_in_flight, callbacks=[self._observe_limits],
            unit="{request}", description="Slots the proxy uses per replica and model: max_in_flight, "
                                          "or what it learned (auto) or adapted.")

    def reconfigure(self, config: BackpressureConfig) -> None:
        super().reconfigure(config)
        self.config = config
        for gate in list(self.gates.values()):
            gate.reconfigure(config)

    def gate(self, model: str) -> ModelGate:
        key = model_key(model)
        gate = self.gates.get(key)
        if gate is None:
            if len(self.gates) >= _MAX_GATES:
                # Only while the fleet's models are not known (UpstreamSet.tracks): drop idle gates.
                for idle in [k for k, g in self.gates.items()
                             if not len(g.queue) and not any(g.in_flight.values())]:
                    del self.gates[idle]
            gate = self.gates[key] = ModelGate(key, self.fleet, self.config, self.placement)
        return gate

    def _fleet_changed(self) -> None:
        """A replica came, went or changed what it holds: slots may be usable (or gone) now."""
        for gate in list(self.gates.values()):
            gate.dispatch()

    def _observe_depth(self, options: CallbackOptions) -> Iterable[Observation]:
        del options
        depth: Counter[tuple[str, str]] = Counter()  # summed: models no replica lists share `other`
        for model, gate in list(self.gates.items()):
            label = self.fleet.label(model)
            for lane, tenants in gate.queue.depth().items():
                depth[label, lane] += sum(tenants.values())
        for (label, lane), count in depth.items():
            yield Observation(count, {semconv.ATTR_GEN_AI_REQUEST_MODEL: label,
                                      self.telemetry.names.lane: lane})

    def _observe_in_flight(self, options: CallbackOptions) -> Iterable[Observation]:
        del options
        in_flight: Counter[tuple[str, str]] = Counter()
        for model, gate in list(self.gates.items()):
            label = self.fleet.label(model)
            for replica, count in gate.in_flight.items():
                in_flight[label, replica] += count
        for (label, replica), count in in_flight.items():
            yield Observation(count, {semconv.ATTR_GEN_AI_REQUEST_MODEL: label,
                                      self.telemetry.names.upstream_name: replica})

    def _observe_limits(self, options: CallbackOptions) -> Iterable[Observation]:
        del options
        limits: dict[tuple[str, str], float] = {}
        for model, gate in list(self.gates.items()):
            label = self.fleet.label(model)
            for replica, limit in gate.limits.items():
                # Models no replica lists share `other`: report the largest limit among them.
                limits[label, replica] = max(limits.get((label, replica), 0.0), math.floor(limit))
        for (label, replica), limit in limits.items():
            yield Observation(limit, {semconv.ATTR_GEN_AI_REQUEST_MODEL: label,
                                      self.telemetry.names.upstream_name: replica})

    def slots(self) -> dict[str, dict[str, Any]]:
        """Per replica and model: the slots in use, how they were set (declared, learned, adaptive)
        and how often Ollama queued a request internally (for /system/profile)."""
        out: dict[str, dict[str, Any]] = {}
        how = "adaptive" if self.config.adaptive else (
            "learned" if self.config.max_in_flight == "auto" else "fixed")
        for model, gate in list(self.gates.items()):
            for upstream in self.fleet:
                if upstream.name in gate.limits:
                    out.setdefault(upstream.name, {})[self.fleet.label(model)] = {
                        "max_in_flight": math.floor(gate.limits[upstream.name]), "how": how,
                        "declared": upstream.num_parallel,
                        "ollama_queued": gate.ollama_queued[upstream.name]}
        return out

    def _cost(self, request: web.Request, ctx: RequestContext) -> float:
        return float(request_cost(request.path, ctx.json(), ctx.route.operation, ctx.prompt.tokens,
                                  len(ctx.body or b""), _DEFAULT_OUTPUT_TOKENS))

    async def handle(self, request: web.Request, ctx: RequestContext,
                     handler: Handler) -> web.StreamResponse:
        model = ctx.model
        if ctx.route.operation is None or not model:
            self.record(ctx, "not_applicable")
            return await handler(request)
        if not self.fleet.tracks(model):
            # No replica has it: the replica's own 404 answers at once, and a client's random names
            # must not create queues (or metric labels).
            self.record(ctx, "unknown_model")
            return await handler(request)
        gate = self.gate(model)
        tenant = ctx.tenant
        lane = "bulk" if tenant.lane == "bulk" or ctx.route.operation == "embeddings" else "interactive"
        cost = self._cost(request, ctx)
        entered = time.monotonic()
        shared = self.shared
        ticket = None
        if shared is not None and not self.fleet.knows(model):
            # A name no replica confirmed yet (health off, or before the first probe): this process's
            # own gate. Shared books are Redis keys kept an hour, and a client's made-up names must not
            # create them; a real model is known from its first answer (balancer) or probe.
            shared = None
        with self.span(**{semconv.ATTR_GEN_AI_REQUEST_MODEL: semconv.request_model(model),
                          self.telemetry.names.lane: lane}) as span:
            if shared is None:
                replica = await self._admit(request, ctx, gate, span, tenant.name, tenant.weight,
                                            lane, cost)
            else:
                replica, ticket = await shared.admit(self, request, ctx, gate, span, lane, cost)
        if replica is None:  # no replica may serve the model: health answers
            return await handler(request)
        waited = time.monotonic() - entered
        gate.waits.append(waited)
        self.wait_histogram.record(waited, {semconv.ATTR_GEN_AI_REQUEST_MODEL: self.fleet.label(model),
                                            self.telemetry.names.lane: lane})
        ctx.response_headers["X-Queue-Wait-Ms"] = str(round(waited * 1000))
        lease = SlotLease(gate, replica)
        if ticket is not None:
            lease.ticket = ticket
            lease.level = max(lease.level, ticket.holders)  # the fleet's holders, not this process's
        ctx.admission.replica = replica
        ctx.admission.slot = lease
        started = time.monotonic()
        try:
            return await handler(request)
        finally:
            replica = lease.replica
            ctx.admission.slot = None
            usage = ctx.exchange.usage
            per_token = None
            if usage is not None and usage.eval_duration_ns and usage.output_tokens:
                per_token = usage.eval_duration_ns / 1e9 / usage.output_tokens
            # What was served (Ollama's counts; nothing; or, cut short, the prompt and one token per
            # record relayed), so that the charge is settled on every path.
            actual = ctx.served_tokens()
            if ticket is None or ticket.local:
                gate.queue.reconcile(tenant.name, tenant.weight, actual - cost)
            gate.release(replica, time.monotonic() - started, per_token, lease, usage)
            if shared is not None and ticket is not None:
                shared.finish(gate, replica, ticket, actual - cost)

    async def _admit(self, request: web.Request, ctx: RequestContext, gate: ModelGate, span: Any,
                     tenant: str, weight: float, lane: str, cost: float) -> Upstream | None:
        """A replica slot for this request, waiting fairly if need be; raises Overload/QueueTimeout.
        None: no replica may serve the model (now, or any more while it waited)."""
        eligible = self.fleet.eligible(gate.model)
        if not eligible and not self.fleet.coming_back(gate.model):
            self.decide(ctx, span, "no_replica")
            return None
        # Waiting on a replica coming back, or first in line behind a model load in progress (a request
        # for the model runs on a replica that does not list it as loaded yet), takes its own, longer
        # budget. Not a model that is merely absent, nor the requests queued behind that first one:
        # they wait for capacity, and the ready budget (and its 503 with Retry-After) applies.
        cold = not eligible or (not len(gate.queue) and any(
            u.by_model.get(gate.model) and gate.model not in u.loaded for u in eligible))
        placement = self.placement
        # Described only when placement ranks by cost: round robin looks at nothing.
        placing = placement.describe(ctx, request.headers) if placement is not None \
            and placement.enforce else None
        replica = gate.pick(placing) if not len(gate.queue) else None
        if replica is not None:
            if placing is not None:
                ctx.admission.ranking = placing.routing
            gate.in_flight[replica.name] += 1
            gate.queue.charge(tenant, weight, cost)
            span.set_attribute(self.telemetry.names.queue_position, 0)
            self.decide(ctx, span, "admitted")
            return replica
        if self.mode_of(ctx) == "shadow":
            return self._shadow(ctx, gate, span, cost)
        remaining = (ctx.deadline_at - time.monotonic()) if ctx.deadline_at else math.inf
        displaced: Waiter | None = None
        if len(gate.queue) >= self.config.max_queue_size and not gate.has_free_slot():
            displaced = gate.queue.displaceable(tenant, weight)
            if displaced is None:
                gate.rejections["overload"] += 1
                self.decide(ctx, span, "overload", Overload(
                    f"the queue for {gate.model} is full ({self.config.max_queue_size} waiting)",
                    retry_after_s=gate.retry_after_s()))
        future: asyncio.Future[Upstream | None] = asyncio.get_running_loop().create_future()
        waiter = Waiter(tenant, weight, lane, cost, future, placing=placing)
        ahead = gate.queue.push(waiter)
        span.set_attribute(self.telemetry.names.queue_position, ahead + 1)
        estimate = gate.estimated_wait_s(ahead)
        # A free slot passed over (the balancer waits for a replica holding the model) is capacity
        # about to be used: never refuse on an estimate while one exists.
        if estimate > remaining and not gate.has_free_slot():
            gate.queue.remove(waiter)
            gate.rejections["overload"] += 1
            self.decide(ctx, span, "overload", Overload(
                f"the estimated wait for {gate.model} ({estimate:.0f}s) exceeds the request's deadline",
                retry_after_s=gate.retry_after_s()))
        if displaced is not None and gate.queue.remove(displaced) and not displaced.future.done():
            # The newcomer keeps its place, taken from the tenant holding the most: that tenant's
            # newest request gives it up (503, as if it had found the queue full).
            displaced.future.set_exception(Overload(
                f"the queue for {gate.model} is full ({self.config.max_queue_size} waiting) and "
                "this tenant held the most places", retry_after_s=gate.retry_after_s()))
            displaced.future.exception()  # retrieved: its waiter may have just left
        gate.dispatch()  # a longer queue may make an idle replica worth a model load now
        budget = self.config.cold_queue_timeout_s if cold else self.config.queue_timeout_s
        span.set_attribute(self.telemetry.names.queue_cold, cold)
        try:
            async with asyncio.timeout(min(budget, remaining)):
                replica = await future
        except Overload as displaced:  # its place went to a tenant holding fewer (fairqueue.push_out)
            gate.rejections["overload"] += 1
            self.decide(ctx, span, "overload", displaced, mode="enforce")  # queued in enforce mode
            raise AssertionError("unreachable") from None  # decide raised in enforce mode
        except TimeoutError:
            # The slot may have been handed over in the very turn the timer fired: given back.
            self._give_up(gate, waiter, future, tenant, weight, cost)
            gate.rejections["queue_timeout"] += 1
            waited_for = "a model load or a replica coming back" if cold else "a slot"
            self.decide(ctx, span, "queue_timeout", QueueTimeout(
                f"no slot for {gate.model} within {min(budget, remaining):.0f}s (waiting for "
                f"{waited_for})", retry_after_s=gate.retry_after_s()), mode="enforce")
            raise AssertionError("unreachable") from None  # decide raised in enforce mode
        except asyncio.CancelledError:
            self._give_up(gate, waiter, future, tenant, weight, cost)  # the client left
            self.decide(ctx, span, "cancelled")  # counted: abandoned waits are a load signal too
            raise
        if replica is None:
            gate.queue.reconcile(tenant, weight, -cost)  # popped (and charged) without being served
            self.decide(ctx, span, "no_replica")
            return None
        if placing is not None:
            ctx.admission.ranking = placing.routing
        self.decide(ctx, span, "queued")
        return replica

    @staticmethod
    def _give_up(gate: ModelGate, waiter: Waiter, future: asyncio.Future[Upstream | None],
                 tenant: str, weight: float, cost: float) -> None:
        """A queued request stops waiting (its timer fired, or its client left): out of the queue, or,
        when it was dispatched in the same turn (the slot counted in flight and the tenant charged, but
        the request never resumed to use them), the slot to the next waiter and the charge back:
        nothing was served. Either way nothing stays held. A waiter pushed out in that turn (its future
        holds Overload) was taken out of the queue without being popped: never charged, nothing to give
        back, and its Overload is not raised here over the cancellation or the timeout."""
        # Invariant: a waiter's future holds a result only if `pop` dispatched (and charged) it.
        if (not gate.queue.remove(waiter) and future.done() and not future.cancelled()
                and future.exception() is None):
            gate.queue.reconcile(tenant, weight, -cost)  # popped, so charged
            granted = future.result()
            if granted is not None:
                gate.give_back(granted)
        future.cancel()

    def _shadow(self, ctx: RequestContext, gate: ModelGate, span: Any, cost: float) -> Upstream:
        """Shadow mode: report that the request would have waited (or been refused), let it through."""
        eligible = self.fleet.eligible(gate.model) or list(self.fleet)
        # Shadowed requests never wait: those in flight beyond the replicas' slots are the ones enforce
        # would have queued, so they fill the queue the decision reads (else a canary's shadowed
        # tenants reported `queue` for ever and never `overload`, whatever the burst).
        beyond = sum(gate.in_flight[u.name] for u in eligible) - sum(gate.limit(u) for u in eligible)
        full = len(gate.queue) + max(0.0, beyond) >= self.config.max_queue_size
        error = Overload("the queue would be full", retry_after_s=gate.retry_after_s()) if full else None
        if error is None:
            ctx.response_headers.add("X-Shadow-Decision", f"{self.name}=queue")
        self.decide(ctx, span, "shadow_queue" if error is None else "overload", error)
        replica = min(eligible, key=lambda u: gate.in_flight[u.name])
        gate.in_flight[replica.name] += 1
        gate.queue.charge(ctx.tenant.name, ctx.tenant.weight, cost)
        return replica

    def snapshot(self, tenant: str | None = None) -> dict[str, Any]:
        """Per model: queue depth by lane and tenant, in-flight and limits per replica, wait percentiles,
        drain rate and rejections; a tenant sees only its own queue entries."""
        return {model: gate.snapshot(tenant) for model, gate in sorted(self.gates.items())}
