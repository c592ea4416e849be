"""Placement: which replica a request should run on, and what that choice learned. One object, built by
the application, shared by the steps that place requests (backpressure binds a queued request to a slot
when one frees; the balancer reports, re-chooses or retries), so that neither calls the other.

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
wait would be longer than the load.

Configured by `chain.balancer` (its `mode`: only `enforce` ranks by cost; otherwise round robin).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from .chain import Canary
from .context import RequestContext
from .ollama import model_key
from .profiles import ModelStats
from .prompts import int_option
from .telemetry import semconv
from .upstreams import Upstream, UpstreamSet

if TYPE_CHECKING:  # the balancer step's module holds its config class; no import cycle
    from middlewares.balancer import BalancerConfig

__all__ = ["Placement", "Placing", "Ranking"]

Ranking = list[tuple[float, str, Upstream]]
"""(cost in seconds, reason, replica), best first."""

_DEMAND_WINDOW_S = 120.0
"""A model requested this recently is still wanted: evicting it costs its next load."""
_NEAR = 0.05
_SHORT_PENALTY_S = 0.5
"""Preference for a replica whose loaded context fits the prompt over one where Ollama would truncate."""
_DEFAULT_SERVICE_S = 1.0


@attrs.define(slots=True, eq=False)
class Placing:
    """What placement may look at of one request (the queue carries it and never reads it).

    `body` is the request's parsed JSON as the limits step left it (a reference, not a copy): the
    requested num_ctx and the affinity key are read from it only when a ranking needs them."""

    tenant: str
    model: str | None
    prompt_tokens: int | None = None
    body: Any = None
    session: str | None = None
    """The client's `X-Session-Id`, for `affinity: session`."""
    started: float = 0.0
    """When the request arrived (monotonic): how long it has waited."""
    routing: Ranking | None = None
    """Out: the ranking that chose the replica when a slot was granted (the balancer's span shows it)."""


class Placement:
    """The cost model and the per-model measurements it learns from finished requests."""

    def __init__(self, config: BalancerConfig, upstreams: UpstreamSet) -> None:
        self.config = config
        self.upstreams = upstreams
        self.enforce = config.mode == "enforce"
        self.canary = Canary.of(config.mode, config.rollout)
        """The balancer's rollout: only its tenants are placed by cost (None: every request is)."""
        self.stats: dict[str, ModelStats] = {}
        self.max_resident: dict[str, int] = {}
        self._picks = itertools.count(1)
        self._last_pick: dict[str, int] = {}

    def reconfigure(self, config: BalancerConfig) -> None:
        """A reload of `chain.balancer`."""
        self.config = config
        self.enforce = config.mode == "enforce"
        self.canary = Canary.of(config.mode, config.rollout)

    def ranks(self, placing: Placing | None) -> bool:
        """Is this request placed by cost? Only when the balancer enforces, and, under its rollout,
        for the canary's tenants: the others are placed round robin, as the balancer's shadow mode
        places them."""
        if not self.enforce:
            return False
        return self.canary is None or placing is None or self.canary.enforces(placing.tenant)

    def describe(self, ctx: RequestContext, headers: Mapping[str, str]) -> Placing:
        """The request as placement sees it (the session header is read only for `affinity: session`)."""
        session = headers.get("X-Session-Id") if self.config.affinity == "session" else None
        return Placing(ctx.tenant.name, ctx.model, ctx.prompt.tokens, ctx.json(), session, ctx.started)

    # measurements ------------------------------------------------------------------------------------
    def stat(self, key: str) -> ModelStats:
        stat = self.stats.get(key)
        if stat is None:
            stat = self.stats[key] = ModelStats()
        return stat

    def wanted(self, model: str, operation: str | None) -> None:
        """A request for `model` arrived (only for names the fleet tracks: no stats for random names)."""
        stat = self.stat(model_key(model))
        stat.last_wanted = time.monotonic()
        stat.arrivals.append(stat.last_wanted)
        if operation is not None:
            stat.operation = operation

    def learn(self, key: str, elapsed_s: float, usage: Any) -> float | None:
        """A request for `key` was served in `elapsed_s`: smooth its service time and token totals, and
        its load time when Ollama reported a load. Returns the load in seconds, or None without one."""
        stat = self.stat(key)
        previous = stat.service_s
        stat.service_s = elapsed_s if previous is None else 0.8 * previous + 0.2 * elapsed_s
        if usage is not None and (usage.input_tokens or usage.output_tokens):
            stat.totals.append((usage.input_tokens or 0) + (usage.output_tokens or 0))
        load_ns = usage.load_duration_ns if usage is not None else None
        if load_ns is None or load_ns < semconv.COLD_LOAD_THRESHOLD_NS:
            return None
        seconds: float = load_ns / 1e9
        stat.loads += 1
        stat.load_s = seconds if stat.load_s is None else 0.7 * stat.load_s + 0.3 * seconds
        return seconds

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

    # the cost model ----------------------------------------------------------------------------------
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

    def _affinity_key(self, placing: Placing | None) -> bytes | None:
        if placing is None or self.config.affinity == "none":
            return None
        if self.config.affinity == "session" and placing.session:
            return f"{placing.tenant}\0{placing.session}".encode()
        body = placing.body
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
        return "\0".join((placing.tenant, system[:limit], start[:limit])).encode()

    def rank(self, model: str | None, candidates: Sequence[Upstream], placing: Placing | None,
             free: Sequence[Upstream] | None = None, position: int = 0) -> Ranking:
        """Candidates with their cost and reason, best first. With `free` (backpressure's view), those
        replicas start at once and the others after their next slot frees for this request."""
        key = model_key(model) if model else None
        tokens = placing.prompt_tokens if placing is not None else None
        num_ctx = _requested_num_ctx(placing.body if placing is not None else None)
        rows: Ranking = []
        for upstream in candidates:
            if free is None:
                wait = self._wait(upstream, key)
            elif upstream in free:
                wait = 0.0
            else:
                wait = (position + 0.5) / max(1, upstream.num_parallel) * self._service(key)
            # A replica that just said `server busy` takes nothing before its pause ends.
            wait += max(0.0, upstream.busy_until - time.monotonic())
            cost, reason = self.cost(upstream, key, tokens, wait, num_ctx)
            rows.append((cost, reason, upstream))
        if len(rows) <= 1:
            return rows  # nothing to choose between (one replica: most requests of a small fleet)
        best = min(c for c, _, _ in rows)
        near = [r for r in rows if r[0] <= best + max(0.05, _NEAR * best)]
        affinity = self._affinity_key(placing)
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
                  position: int, placing: Placing | None) -> Upstream | None:
        """Backpressure's late binding: the replica to take a free slot on now, or None when waiting
        for a busy one (that holds the model) is cheaper than loading the model on a free one. The
        ranking that chose goes to `placing.routing`."""
        if not self.ranks(placing):
            # Under the balancer's rollout, a tenant outside the canary got cost placement here all
            # the same (the balancer then reported the bound replica): the rollout did nothing.
            return self.round_robin(free)
        ranked = self.rank(model, eligible, placing, free, position)
        if not ranked:
            return None
        best = ranked[0][2]
        if best not in free:
            # Waiting for the replica that holds the model is cheaper, as far as we can tell; but once
            # the request has waited as long as the load would have taken, it takes the free replica.
            cheapest = min((row for row in ranked if row[2] in free), key=lambda row: row[0])
            waited = time.monotonic() - placing.started if placing is not None else 0.0
            if waited < cheapest[0]:
                return None
            best = cheapest[2]
        self.chose(best)
        if placing is not None:
            placing.routing = ranked
        return best

    def round_robin(self, candidates: Sequence[Upstream]) -> Upstream:
        return self.upstreams.next_among(candidates) or candidates[0]

    def chose(self, upstream: Upstream) -> None:
        """`upstream` was chosen: among equal costs, the next choice prefers the others."""
        self._last_pick[upstream.name] = next(self._picks)


def _requested_num_ctx(body: Any) -> int | None:
    """The num_ctx the request (as the limits step left it) asks Ollama for, if any."""
    # As limits and Ollama read it: a float num_ctx (512.0, how Python's json writes it) is truncated.
    return int_option(body.get("options") if isinstance(body, dict) else None, "num_ctx")
