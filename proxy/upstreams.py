"""Upstream replicas: their addresses and the state the health, backpressure and balancer steps share.

`health` writes each replica's status and what it has loaded (from `/api/ps`); `balancer` and
`backpressure` read them through `UpstreamSet.eligible(model)`. Every request sent to a replica is an
`Attempt` in its `attempts` set while it runs: the replica's load, and what stuck detection watches.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence

import attrs
from yarl import URL

from .ollama import model_key
from .schema import ModelConfig, UpstreamConfig

__all__ = ["DEFAULT_NUM_CTX", "OTHER_MODEL", "PROVISIONAL_LABELS", "SERVING_STATUSES", "Attempt",
           "LoadedModel", "ModelFailures", "Upstream", "UpstreamSet"]

_ELIGIBLE_CACHE = 4096
OTHER_MODEL = "other"
"""The metric label of every model no replica lists and no configuration names."""
PROVISIONAL_LABELS = 32
"""Model labels given, at most, to names seen while no replica's model listing is known."""
DEFAULT_NUM_CTX = 4096
"""Ollama's default context when a request sets no num_ctx (OLLAMA_CONTEXT_LENGTH unset)."""
SERVING_STATUSES = frozenset({"unknown", "healthy"})
"""Statuses in which a replica takes new requests (`unknown`: not probed yet)."""
COMING_BACK_STATUSES = frozenset({"restarting", "warming"})
"""Statuses of a replica that will serve again without anyone's help (the queue waits for it)."""


@attrs.frozen
class LoadedModel:
    """One model a replica has in memory, as its `/api/ps` reports it."""

    name: str
    digest: str = ""
    context_length: int | None = None
    """The per-request context of the loaded runner (None: not reported / not probed yet)."""
    expires_at: str = ""
    size_vram: int | None = None


@attrs.define(eq=False)
class Attempt:
    """One request in flight on a replica; `last_progress` is moved by every byte the replica sends."""

    upstream: Upstream
    model: str | None
    started: float = attrs.field(factory=time.monotonic)
    last_progress: float = attrs.field(factory=time.monotonic)


class ModelFailures:
    """One model's run of 500 answers on one replica (see `Upstream.failing`)."""

    __slots__ = ("avoid_until", "avoidances", "in_a_row", "last_request")

    def __init__(self) -> None:
        self.in_a_row = 0
        self.last_request: int | None = None
        """The fingerprint of the last request counted (its retries count once)."""
        self.avoidances = 0
        """Avoidances in a row (the backoff exponent), reset by a success."""
        self.avoid_until = 0.0


@attrs.define(eq=False)
class Upstream:
    """One Ollama replica: where it is, and what the health step last learned about it."""

    name: str
    url: URL
    num_parallel: int = 1
    weight: int = 1
    restart_command: str | None = None
    status: str = "unknown"
    """unknown, healthy, ejected, stuck, down, restarting or warming; see SERVING_STATUSES."""
    reason: str = ""
    """Why the replica is not serving (the last failure), for /system/profile and spans."""
    consecutive_failures: int = 0
    suspect: bool = False
    """A real request failed here since the last success: a failed probe now confirms it."""
    ejections: int = 0
    """Ejections in a row: the backoff exponent."""
    ejected_until: float = 0.0
    healthy_since: float = 0.0
    next_probe_at: float = 0.0
    version: str | None = None
    loaded: dict[str, LoadedModel] = attrs.field(factory=dict)
    """Model key -> what `/api/ps` reported (plus models seen loading since the last probe)."""
    models: frozenset[str] | None = None
    """Model keys the replica has on disk (`/api/tags`), None until known."""
    digests: dict[str, str] = attrs.field(factory=dict)
    """Model key -> digest, as the last `/api/tags` listed them."""
    busy_until: float = 0.0
    """Until then (monotonic) it gets no new request: it answered Ollama's `503 server busy` (its own
    queue is full, with work the proxy does not see), and a replica that refuses at once would
    otherwise always look free and take every request placed."""
    returning: bool = False
    """Its restart command or pre-warming runs now (set by the health service): it will serve soon."""
    failing: dict[str, ModelFailures] = attrs.field(factory=dict)
    """Model key -> its run of 500s here (health's `server_error`): while `avoid_until` lies ahead,
    other replicas that may serve the model take it (`UpstreamSet.eligible`). Bounded by health."""
    attempts: set[Attempt] = attrs.field(factory=set)
    by_model: Counter[str] = attrs.field(factory=Counter)

    @classmethod
    def from_config(cls, config: UpstreamConfig) -> Upstream:
        url = URL(config.url)
        return cls(name=config.name or f"{url.host}:{url.port}", url=url,
                   num_parallel=config.num_parallel, weight=config.weight,
                   restart_command=config.restart_command)

    @property
    def serving(self) -> bool:
        return self.status in SERVING_STATUSES

    def avoids(self, key: str, now: float) -> bool:
        """Should another replica take model `key` now (a run of 500s for it here, see `failing`)?"""
        failures = self.failing.get(key)
        return failures is not None and failures.avoid_until > now

    @property
    def host_header(self) -> str:
        """The `Host` to send: the replica's own address, which Ollama's loopback guard accepts."""
        host = self.url.host or "localhost"
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.url.port}" if self.url.explicit_port else host

    def target(self, path_qs: str) -> URL:
        """Absolute URL for a request path (+query), keeping any base path of the replica URL."""
        base = str(self.url).rstrip("/")
        return URL(base + path_qs, encoded=True)

    def busy(self, seconds: float) -> None:
        """It answered Ollama's `server busy`: no new request for `seconds`."""
        self.busy_until = max(self.busy_until, time.monotonic() + seconds)

    def begin(self, model: str | None) -> Attempt:
        """Count a request sent to this replica; pair with `end`."""
        attempt = Attempt(self, model_key(model) if model else None)
        self.attempts.add(attempt)
        if attempt.model:
            self.by_model[attempt.model] += 1
        return attempt

    def end(self, attempt: Attempt) -> None:
        if attempt in self.attempts:
            self.attempts.discard(attempt)
            if attempt.model:
                self.by_model[attempt.model] -= 1
                if self.by_model[attempt.model] <= 0:
                    del self.by_model[attempt.model]

    def residency(self, model: str, tokens: int | None = None, num_ctx: int | None = None) -> str:
        """`resident` (loaded, and its context fits `tokens`), `short` (loaded, context smaller than
        `tokens`: Ollama would truncate), `reload` (loaded with another context than the `num_ctx` the
        request asks for: Ollama reloads it) or `absent`. Unknown values never count against it."""
        loaded = self.loaded.get(model_key(model))
        if loaded is None:
            return "absent"
        context = loaded.context_length
        if num_ctx is not None and context is not None and num_ctx != context:
            return "reload"
        if tokens is not None and context is not None and tokens > context:
            return "short"
        return "resident"


class UpstreamSet:
    """The configured replicas: weighted round robin, model placement rules, and change listeners."""

    def __init__(self, upstreams: Sequence[Upstream],
                 models: Mapping[str, ModelConfig] | None = None) -> None:
        if not upstreams:
            raise ValueError("at least one upstream is required")
        self.upstreams = list(upstreams)
        self.by_name = {u.name: u for u in self.upstreams}
        order = [u for u in self.upstreams for _ in range(u.weight)]
        self._cycle: Iterator[Upstream] = itertools.cycle(order)
        self.allowed: dict[str, frozenset[str]] = {}
        """Model key -> the replicas `models.<name>.replicas` lets serve it (absent: any)."""
        self.configured: frozenset[str] = frozenset()
        """Model keys named under `models:` in the configuration."""
        self._set_models(models)
        self.enforce_health = True
        """False when health is in shadow or off mode: every replica counts as serving."""
        self._provisional: set[str] = set()
        self._listeners: list[Callable[[], None]] = []
        self._eligible: dict[str | None, list[Upstream]] = {}

    @classmethod
    def from_config(cls, configs: Sequence[UpstreamConfig],
                    models: Mapping[str, ModelConfig] | None = None) -> UpstreamSet:
        return cls([Upstream.from_config(c) for c in configs], models)

    def _set_models(self, models: Mapping[str, ModelConfig] | None) -> None:
        self.allowed = {
            model_key(name): frozenset(profile.replicas)
            for name, profile in (models or {}).items() if profile.replicas and "*" not in profile.replicas}
        self.configured = frozenset(model_key(name) for name in (models or {}))

    def reconcile(self, configs: Sequence[UpstreamConfig], models: Mapping[str, ModelConfig] | None
                  ) -> tuple[list[Upstream], list[Upstream]]:
        """Make the set what `configs` says (a configuration reload) and return (added, removed).

        A replica that stays (same name) keeps everything the health step learned; its address, slots,
        weight and restart command take the new values. A removed one leaves the set at once, so nothing
        new is sent to it, while the requests it is serving hold it and finish (they end their attempts
        on the object, not through the set). Synchronous: callers apply a whole reload in one step."""
        if not configs:
            raise ValueError("at least one upstream is required")
        fresh = [Upstream.from_config(c) for c in configs]
        kept: list[Upstream] = []
        added: list[Upstream] = []
        for new in fresh:
            old = self.by_name.get(new.name)
            if old is None:
                added.append(new)
                kept.append(new)
                continue
            if old.url != new.url:  # another daemon under the old name: nothing learned holds for it
                old.loaded, old.models, old.digests, old.version = {}, None, {}, None
                old.status, old.reason = "unknown", ""
            old.url, old.num_parallel = new.url, new.num_parallel
            old.weight, old.restart_command = new.weight, new.restart_command
            kept.append(old)
        names = {u.name for u in kept}
        removed = [u for u in self.upstreams if u.name not in names]
        self.upstreams = kept
        self.by_name = {u.name: u for u in kept}
        self._cycle = itertools.cycle([u for u in kept for _ in range(u.weight)])
        self._set_models(models)
        self.changed()
        return added, removed

    def next(self) -> Upstream:
        """The next replica in weighted round-robin order."""
        return next(self._cycle)

    def next_among(self, candidates: Sequence[Upstream]) -> Upstream | None:
        """The next of `candidates` in weighted round-robin order (None when none is configured here)."""
        for _ in range(sum(u.weight for u in self.upstreams)):
            upstream = self.next()
            if upstream in candidates:
                return upstream
        return None

    def next_serving(self) -> Upstream:
        """The next serving replica in round-robin order (any replica when none serves)."""
        return self.next_among(self.eligible(None)) or self.next()

    def is_serving(self, upstream: Upstream) -> bool:
        return upstream.serving or not self.enforce_health

    def allows(self, upstream: Upstream, model: str | None) -> bool:
        """May `upstream` serve `model` under the model profiles (`models.<name>.replicas`)?"""
        if not model:
            return True
        names = self.allowed.get(model_key(model))
        return names is None or upstream.name in names

    def eligible(self, model: str | None) -> list[Upstream]:
        """Serving replicas allowed to serve `model`; when some of them are known to have it on disk,
        only those (and replicas whose list is not known yet). Cached until the next `changed()`: every
        step asks, several times per request. The list is shared: read it, never modify it."""
        cached = self._eligible.get(model)
        if cached is not None:
            return cached
        serving = [u for u in self.upstreams if self.is_serving(u) and self.allows(u, model)]
        if model:
            key = model_key(model)
            if any(u.models is not None and key in u.models for u in serving):
                serving = [u for u in serving if u.models is None or key in u.models]
            if self.enforce_health and any(u.failing for u in serving):
                # A replica answering 500 to every request for the model fails at once, so it always
                # looks free and would take them all: the others serve it while it is avoided. When
                # every one is avoided (the requests' own fault, likely), nothing changes. The
                # health service calls changed() when an avoidance starts and when it ends.
                now = time.monotonic()
                preferred = [u for u in serving if not u.avoids(key, now)]
                if preferred:
                    serving = preferred
        if len(self._eligible) > _ELIGIBLE_CACHE:
            self._eligible.clear()
        self._eligible[model] = serving
        return serving

    def held_only_out_of_service(self, model: str) -> bool:
        """Is `model` known only on replicas out of service now (ejected, restarting...)? True when one
        that may serve it has it on disk or loaded, and every serving one that may serve it has a
        known listing without it (so it would answer 404 "model not found"). A listing is at most
        a few probes old: a model added to a replica behind the proxy's back counts once listed."""
        key = model_key(model)
        allowed = [u for u in self.upstreams if self.allows(u, model)]
        if any(self.is_serving(u) and (u.models is None or key in u.models or key in u.loaded)
               for u in allowed):
            return False
        return any(key in u.loaded or (u.models is not None and key in u.models) for u in allowed)

    def coming_back(self, model: str | None) -> bool:
        """Is a replica that may serve `model` coming back: its restart command or its pre-warming is
        running right now, or its restart command succeeded and the probes have not decided yet? (Not
        merely in status `restarting`: a restart that did not bring the daemon back keeps that status
        until a probe succeeds.)"""
        return any(u.returning and u.status in COMING_BACK_STATUSES and self.allows(u, model)
                   for u in self.upstreams)

    def why_not(self, upstream: Upstream, model: str | None) -> str | None:
        """Why `upstream` is not eligible for `model` (None when it is)."""
        if not self.allows(upstream, model):
            return "not_allowed"
        if not self.is_serving(upstream):
            return upstream.status
        if upstream not in self.eligible(model):
            return "model_absent"
        return None

    # which models are real: the one place that answers it ----------------------------------------------
    def knows(self, model: str) -> bool:
        """Is `model` a model of this fleet: configured under `models:`, listed by some replica's
        /api/tags, or loaded on one (/api/ps, or seen served)? Anything a client merely names is not."""
        key = model_key(model)
        if key in self.configured:
            return True
        return any(key in u.loaded or (u.models is not None and key in u.models) for u in self.upstreams)

    def digest(self, model: str) -> str | None:
        """The digest of `model` as the replicas hold it (loaded, or listed on disk), None when no replica
        reported one, or when they report more than one (a re-pull under way on some replicas, or a
        runner still loaded from the model a pull replaced): a request may then be served by either
        model, and what is keyed by this digest (cached vectors) must not be taken for the other's."""
        key = model_key(model)
        found: set[str] = set()
        for upstream in self.upstreams:
            loaded = upstream.loaded.get(key)
            if loaded is not None and loaded.digest:
                found.add(loaded.digest)
            listed = upstream.digests.get(key)
            if listed:
                found.add(listed)
        return next(iter(found)) if len(found) == 1 else None

    def tracks(self, model: str) -> bool:
        """May per-model state (queues, measurements, tokenizers) be created for `model`? Yes for a known
        model; also while no replica's listing is known yet (health off, or before the first probe),
        when such structures must keep themselves under a cap. No for a name no listing has."""
        return self.knows(model) or self._no_listing()

    def label(self, model: str | None) -> str:
        """The metric label for `model`: its key without `:latest` when the fleet knows it, else `other`,
        so a client cannot create label values (empty when there is no model). While no replica's
        listing is known (health off, or before its first probe), the first PROVISIONAL_LABELS names
        seen keep their own label too: bounded, and the proxy's first requests are not all `other`."""
        if not model:
            return ""
        key = model_key(model)
        if self.knows(model):
            return key.removesuffix(":latest")
        if self._no_listing() and (key in self._provisional
                                   or len(self._provisional) < PROVISIONAL_LABELS):
            self._provisional.add(key)
            return key.removesuffix(":latest")
        return OTHER_MODEL

    def _no_listing(self) -> bool:
        return all(u.models is None for u in self.upstreams)

    def loaded_context(self, model: str) -> int | None:
        """The context `model` is loaded with (/api/ps), the largest where replicas differ; None when it
        is loaded nowhere the proxy could send it, or the context is not reported yet."""
        key = model_key(model)
        contexts = [loaded.context_length for u in self.upstreams if self.allows(u, model)
                    if (loaded := u.loaded.get(key)) is not None and loaded.context_length]
        return max(contexts) if contexts else None

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` whenever a replica's status or residency changes."""
        self._listeners.append(listener)

    def changed(self) -> None:
        """A replica's status, residency or model list changed: tell every listener."""
        self._eligible.clear()
        for listener in self._listeners:
            listener()

    def __iter__(self) -> Iterator[Upstream]:
        return iter(self.upstreams)

    def __len__(self) -> int:
        return len(self.upstreams)
