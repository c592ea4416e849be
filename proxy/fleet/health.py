"""Replica health, owned by the application: probes, the health state machine, restarts, pre-warming.

Active: every replica is probed on a jittered interval with `GET /api/version` (alive) and `GET /api/ps`
(what it has loaded: name, digest, context length, expiry); `GET /api/tags` every few probes (what it
has on disk). Probes never load a model. Passive: consecutive gateway failures of real requests
(connect refused, reset, no response, 502/504, a stream cut off) eject a replica for
`base_ejection_s x 2^(ejections-1)` (capped); once that expires the replica is half-open and the next
successful probe takes it back. A replica whose in-flight requests all went silent for `stuck_after_s` is
stuck. A replica with a `restart_command` is restarted (rate-limited) after `restart_after_failures`
failed probes or when stuck, and its profile models (`models.<name>.warm_on`) are loaded before it takes
traffic again.

A request's gateway failure also triggers an immediate probe; if that fails too, the replica is ejected
without waiting for more failures. Requests report their outcome here (`observe`), not to a step.

The `health` step (middlewares/health.py) only reads what this learned, per request. Configured by
`chain.health` (its `mode`: `off` runs no probes; only `enforce` runs restart commands).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
import orjson
from aiohttp import web
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode

from ..ollama import is_cloud_model, model_key
from ..prompts import canonicalize
from ..redaction import redact_url
from ..schema import ModelConfig, restart_fields
from ..telemetry.setup import Telemetry
from ..upstreams import LoadedModel, ModelFailures, Upstream, UpstreamSet
from .client import FleetClient, ProbeFailed
from .wire import exhausted, warn_exhausted

if TYPE_CHECKING:  # the step module holds the config class (config beside code); no import cycle
    from middlewares.health import HealthConfig

__all__ = ["GATEWAY_FAILURES", "FleetHealth"]

LoadOutcome = Literal["loaded", "failed", "unreachable"]
"""What a pre-warm load came to (FleetHealth.load)."""

log = logging.getLogger("proxy.health")

GATEWAY_FAILURES = frozenset({"upstream_connect_failure", "upstream_reset_before_response_started",
                              "upstream_response_timeout", "upstream_reset_after_response_started"})
"""Outcomes that count against a replica. Ollama's 500s do not: it answers 500 for request-specific
runner errors too, and one client's bad requests must not eject a healthy replica (a run of them for
one model has the other replicas take that model for a while: `FleetHealth.server_error`)."""
_FAILING_STATUSES = frozenset({502, 504})
_MAX_FAILING_MODELS = 64
"""Models whose run of 500s one replica keeps (see `FleetHealth.server_error`)."""
_TAGS_EVERY_PROBES = 6
_PIN_RETRY_S = 60.0
"""A pinned model found missing is loaded again at most this often (it may not fit, or be gone)."""
_OUTPUT_LOG_BYTES = 4096
_OUTPUT_GRACE_S = 1.0
"""How long a restart command's output is still read once the command exited, before it is logged."""
_MAX_CONTEXT_TOKENS = 1 << 24
"""The largest context length a replica's /api/ps is believed for (16M tokens; models today stop at
~10M); a larger or non-positive one is treated as unknown."""


class FleetHealth:
    """Replica health: probes, passive ejection, stuck detection, restarts and pre-warming."""

    def __init__(self, config: HealthConfig, upstreams: UpstreamSet, models: Mapping[str, ModelConfig],
                 telemetry: Telemetry, client: FleetClient | None = None) -> None:
        self.config = config
        self.mode = config.mode
        self.telemetry = telemetry
        self.client = client
        self.upstreams = upstreams
        upstreams.enforce_health = config.mode == "enforce"
        upstreams.changed()
        self.warm: dict[str, list[tuple[str, ModelConfig]]] = {}
        self._set_warm(models)
        self.last_restart: dict[str, float] = {}
        self._restarting: set[str] = set()
        self._after_restart: dict[str, int] = {}
        """Replica -> its failed probes when its restart command succeeded: until a probe finds it back,
        or `restart_after_failures` more fail, it is still coming back (the queue keeps its waiters)."""
        self._tags_due: set[str] = set()
        self._pin_attempts: dict[tuple[str, str], float] = {}
        # Counters (a missing replica counts 0): a replica added or removed by a reload needs no entry.
        self.probe_failures: Counter[str] = Counter()
        self.restarts: Counter[str] = Counter()
        self._wake = {u.name: asyncio.Event() for u in upstreams}
        self._warming: dict[str, asyncio.Task[None]] = {}
        self._outputs: set[asyncio.Task[None]] = set()
        """Readers of restart commands' output left open by a daemon they started (see `restart`)."""
        self._watches: dict[str, asyncio.Task[None]] = {}
        self._running = False
        """Between the start and the end of `lifecycle`: watches run for the replicas of the set."""
        meter = telemetry.meter
        meter.create_observable_gauge(
            telemetry.names.metric_upstream_healthy, callbacks=[self._observe_healthy],
            unit="1", description="1 when the replica takes traffic, 0 when it does not, per replica.")
        self.ejections = meter.create_counter(
            telemetry.names.metric_health_ejections, unit="{ejection}",
            description="Replicas taken out of service (ejected or stuck), by replica.")
        self.probes = meter.create_counter(
            telemetry.names.metric_health_probes, unit="{probe}",
            description="Health probes, by replica and outcome.")
        self.restart_counter = meter.create_counter(
            telemetry.names.metric_health_restarts, unit="{restart}",
            description="Restart commands run, by replica and outcome.")

    # lifecycle ---------------------------------------------------------------------------------------
    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: probe every replica for as long as the application runs."""
        del app
        self._running = True
        self._sync_watches()
        try:
            yield
        finally:
            self._running = False
            tasks = [*self._watches.values(), *self._warming.values(), *self._outputs]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._watches.clear()

    def _set_warm(self, models: Mapping[str, ModelConfig]) -> None:
        self.warm = {u.name: [(name, profile) for name, profile in models.items()
                              if "*" in profile.warm_on or u.name in profile.warm_on]
                     for u in self.upstreams}

    def _sync_watches(self) -> None:
        """One watch per replica of the set while running and not `off`; none for the others."""
        wanted = {u.name: u for u in self.upstreams} if self._running and self.mode != "off" else {}
        for name in [n for n in self._watches if n not in wanted]:
            self._watches.pop(name).cancel()
            if self._after_restart.pop(name, None) is not None and name in self.upstreams.by_name:
                self.upstreams.by_name[name].returning = False  # no probe will decide any more
            warming = self._warming.pop(name, None)
            if warming is not None:
                warming.cancel()
        for name, upstream in wanted.items():
            if name not in self._watches:
                self._wake.setdefault(name, asyncio.Event())
                self._watches[name] = asyncio.create_task(self._watch(upstream), name=f"health-{name}")

    def reconfigure(self, config: HealthConfig, models: Mapping[str, ModelConfig]) -> None:
        """A reload: new settings and profiles, and a watch for each replica the set now has (the set
        was reconciled first; a removed replica's watch ends, a new one's starts probing at once)."""
        self.config = config
        self.mode = config.mode
        self.upstreams.enforce_health = config.mode == "enforce"
        self._set_warm(models)
        self._sync_watches()
        for name in [n for n in self._wake if n not in self._watches]:
            del self._wake[name]
        self.upstreams.changed()

    def refresh(self, upstream: Upstream) -> None:
        """Probe `upstream` now, its model list included (after a pull, create, copy or delete)."""
        self._tags_due.add(upstream.name)
        self.probe_soon(upstream)

    def probe_soon(self, upstream: Upstream) -> None:
        """Probe `upstream` now instead of at its next interval (e.g. after it loaded a model)."""
        event = self._wake.get(upstream.name)
        if event is not None:
            event.set()

    async def _watch(self, upstream: Upstream) -> None:
        count = 0
        wake = self._wake.setdefault(upstream.name, asyncio.Event())
        while True:
            try:
                tags = count % _TAGS_EVERY_PROBES == 0 or upstream.models is None \
                    or upstream.name in self._tags_due
                self._tags_due.discard(upstream.name)
                await self._probe(upstream, tags=tags)
            except Exception:  # a bug in one probe must not end the replica's watch
                log.exception("probe of %s failed unexpectedly", upstream.name)
            count += 1
            jitter = self.config.probe_jitter
            delay = self.config.probe_interval_s * random.uniform(1 - jitter, 1 + jitter)
            if upstream.status == "ejected":
                # Half-open as soon as the backoff ends: probe right then, not an interval later.
                delay = min(delay, max(0.05, upstream.ejected_until - time.monotonic()))
            upstream.next_probe_at = time.monotonic() + delay
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await wake.wait()
            wake.clear()

    # probing -----------------------------------------------------------------------------------------
    async def _get(self, upstream: Upstream, path: str) -> Any:
        assert self.client is not None, "probing needs the fleet client"
        return await self.client.probe(upstream, path, self.config.probe_timeout_s)

    async def _probe(self, upstream: Upstream, tags: bool) -> None:
        try:
            version = await self._get(upstream, "/api/version")
            ps = await self._get(upstream, "/api/ps")
            listing = await self._get(upstream, "/api/tags") if tags else None
        except (aiohttp.ClientError, TimeoutError, ProbeFailed, orjson.JSONDecodeError, OSError) as exc:
            if exhausted(exc):  # this process is out of descriptors: nothing learned of the replica
                warn_exhausted(f"a probe of {upstream.name}")
                return
            reason = str(exc) if isinstance(exc, ProbeFailed) else (type(exc).__name__ if not str(exc)
                                                                    else f"{type(exc).__name__}: {exc}")
            self.probes.add(1, {self.telemetry.names.upstream_name: upstream.name, "outcome": "failure"})
            self.probe_failures[upstream.name] += 1
            self.failure(upstream, f"probe failed ({reason})", probe=True)
            since = self._after_restart.get(upstream.name)
            if since is not None and self.probe_failures[upstream.name] - since >= \
                    self.config.restart_after_failures:
                # The restart did not bring it back: its waiters go (health's 503) rather than wait on.
                del self._after_restart[upstream.name]
                upstream.returning = False
                self.upstreams.changed()
            await self._maybe_restart(upstream)
            return
        self.probes.add(1, {self.telemetry.names.upstream_name: upstream.name, "outcome": "success"})
        self.probe_failures[upstream.name] = 0
        if isinstance(version, dict):
            upstream.version = str(version.get("version", ""))
        before = (set(upstream.loaded), upstream.models)
        upstream.loaded = _loaded_models(ps)
        if listing is not None:
            models = listing.get("models") if isinstance(listing, dict) else None
            entries = [m for m in models if isinstance(m, dict)] if isinstance(models, list) else []
            upstream.models = frozenset(model_key(str(m.get("name") or m.get("model"))) for m in entries)
            upstream.digests = {model_key(str(m.get("name") or m.get("model"))): str(m["digest"])
                                for m in entries if isinstance(m.get("digest"), str)}
        self._success(upstream)
        if self._after_restart.pop(upstream.name, None) is not None and upstream.status != "warming":
            upstream.returning = False  # serving now (a warm-up, if any, holds it until it serves)
        if self._stale(upstream):
            self._mark_stuck(upstream)
            await self._maybe_restart(upstream)
        if (set(upstream.loaded), upstream.models) != before:
            self.upstreams.changed()
        if upstream.serving and self.mode != "off":
            self._keep_pinned(upstream)

    # state transitions -------------------------------------------------------------------------------
    def _success(self, upstream: Upstream) -> None:
        now = time.monotonic()
        self.success(upstream)
        status = upstream.status
        if status == "ejected" and now < upstream.ejected_until:
            return  # still backing off; half-open once it expires
        if status == "stuck" and not self._stale(upstream):
            self._set(upstream, "healthy", "")
        elif status in ("ejected", "restarting", "down"):
            missing = self._missing_warm(upstream)
            if missing:
                self._set(upstream, "warming", f"loading {', '.join(missing)}")
                self._start_warm(upstream, missing, then_serve=True)
            else:
                self._set(upstream, "healthy", "")
        elif status == "unknown":
            self._set(upstream, "healthy", "")
            missing = self._missing_warm(upstream)
            if missing:  # at start-up it serves while its profile models load
                self._start_warm(upstream, missing, then_serve=False)
        elif status == "warming" and not self._warm_running(upstream):
            # Nothing will take it back: it was set warming while a warm-up that does not serve (the
            # start-up's, or a pinned model's) ran, and `_start_warm` left that one alone. Without
            # this it stayed `warming`, out of service, for good.
            missing = self._missing_warm(upstream)
            if missing:
                self._start_warm(upstream, missing, then_serve=True)
            else:
                self._set(upstream, "healthy", "")
        elif status == "healthy" and now - upstream.healthy_since > self.config.max_ejection_s:
            upstream.ejections = 0

    def failure(self, upstream: Upstream, reason: str, *, probe: bool = False) -> None:
        """A gateway failure on `upstream` (a failed probe, or a real request's): eject it after
        `eject_after_failures` in a row, or at once when a probe confirms a request's failure (the probe
        is sent right after it). Passive ejections respect `max_ejection_ratio`."""
        upstream.consecutive_failures += 1
        upstream.reason = reason
        if upstream.status == "restarting" or (upstream.status == "warming"
                                               and self._warm_running(upstream)):
            # The restart or the warm-up in progress decides (a warm-up that finds the daemon gone
            # ejects it). A `warming` replica with none running is probed as any other: nothing
            # else would ever take it out of `warming`.
            return
        if upstream.status == "ejected" and time.monotonic() < upstream.ejected_until:
            return
        never_answered = probe and upstream.status == "unknown"
        confirmed = probe and upstream.suspect
        if not probe and upstream.serving:
            upstream.suspect = True
            self.probe_soon(upstream)
        if upstream.consecutive_failures < self.config.eject_after_failures \
                and upstream.status != "ejected" and not never_answered and not confirmed:
            return
        if not probe:
            out = sum(1 for u in self.upstreams if not u.serving)
            allowed = max(1, int(self.config.max_ejection_ratio * len(self.upstreams)))
            if upstream.serving and out >= allowed:
                return  # keep the rest of the fleet in service; the probes will tell
        self._eject(upstream, reason)

    def success(self, upstream: Upstream) -> None:
        """A real request on `upstream` (or a probe) went through: the failure run is over, and a
        healthy replica's `reason` (the last failure, shown in `/system/profile`) with it."""
        upstream.consecutive_failures = 0
        upstream.suspect = False
        if upstream.status == "healthy":
            # `failure` records why below the ejection threshold too; once a call went through that
            # reason is history, and a healthy replica showing it for good reads as a failing one.
            upstream.reason = ""

    def observe(self, upstream: Upstream, outcome: str, status: int, model: str | None = None,
                request: int | None = None) -> None:
        """Passive detection: the outcome of one request for `model` sent to `upstream`; `request`
        fingerprints a request answered 500 (its tenant and body), so that a client's retries of
        one failing request count once.

        A status the replica answered for a cloud model (`*:cloud`, `*-cloud`) is ollama.com's (its
        usage-limit 429, overloaded 503, or a 502 when the daemon cannot reach it), relayed by a replica
        that is working: it never counts against the replica. Failing to reach the replica at all does."""
        if outcome == "ok" and status >= 500 and is_cloud_model(model):
            return
        if outcome in GATEWAY_FAILURES or (outcome == "ok" and status in _FAILING_STATUSES):
            self.failure(upstream, outcome if outcome != "ok" else f"HTTP {status}")
        elif outcome == "ok" and 0 < status < 500:
            self.success(upstream)
            if model and upstream.failing:
                self._model_recovered(upstream, model_key(model))
        elif outcome == "ok" and status == 500 and model:
            self.server_error(upstream, model_key(model), request)

    def server_error(self, upstream: Upstream, key: str, request: int | None = None) -> None:
        """`upstream` answered 500 to a request for model `key`. A 500 does not count against the
        replica (Ollama answers it for one request's runner error too), but `eject_after_failures` of
        them in a row for one model, with no success between, have the other replicas that may serve
        the model take it for `base_ejection_s` x 2^(n-1) (capped at `max_ejection_s`; n: avoidances
        in a row). Why: a replica that fails every request for a model at once (its runner crashes, the
        model no longer fits) always looks free and took every request for it. The same request again
        (`request`: an SDK retries a 500 twice) counts once, so one client's one bad request moves
        nothing; 500s while the replica is avoided are not counted (only requests no other replica
        could take reach it). Only models the fleet knows are tracked (a client names any string), at
        most _MAX_FAILING_MODELS per replica (one not avoided makes room for a new one)."""
        if not self.upstreams.knows(key):
            return
        now = time.monotonic()
        failures = upstream.failing.get(key)
        if failures is None:
            if len(upstream.failing) >= _MAX_FAILING_MODELS:
                stale = next((k for k, f in upstream.failing.items() if f.avoid_until <= now), None)
                if stale is None:
                    return
                del upstream.failing[stale]
            failures = upstream.failing[key] = ModelFailures()
        if failures.avoid_until > now:
            return
        if request is not None and request == failures.last_request:
            return  # a retry of the request that failed last: not a new failure
        failures.last_request = request
        failures.in_a_row += 1
        if failures.in_a_row < self.config.eject_after_failures:
            return
        failures.in_a_row = 0  # the next run counts from here, once this avoidance ended
        failures.avoidances += 1
        backoff = min(self.config.max_ejection_s,
                      self.config.base_ejection_s * 2 ** (failures.avoidances - 1))
        failures.avoid_until = now + backoff
        log.warning("replica %s answered 500 to %d requests in a row for model %s: other replicas take "
                    "it for %.0fs", upstream.name, self.config.eject_after_failures,
                    self.upstreams.label(key), backoff)
        self.upstreams.changed()
        # Its end changes who is eligible too (the eligible lists are cached until changed()).
        asyncio.get_running_loop().call_later(backoff, self.upstreams.changed)

    def _model_recovered(self, upstream: Upstream, key: str) -> None:
        failures = upstream.failing.pop(key, None)
        if failures is not None and failures.avoid_until > time.monotonic():
            self.upstreams.changed()  # served it after all (no other replica could): back in line

    def _eject(self, upstream: Upstream, reason: str) -> None:
        upstream.ejections += 1
        backoff = min(self.config.max_ejection_s,
                      self.config.base_ejection_s * 2 ** (upstream.ejections - 1))
        upstream.ejected_until = time.monotonic() + backoff
        self.ejections.add(1, {self.telemetry.names.upstream_name: upstream.name})
        log.warning("replica %s ejected for %.0fs (%s, ejection %d in a row)", upstream.name, backoff,
                    reason, upstream.ejections)
        self._set(upstream, "ejected", reason)
        self.telemetry.events.ejection(upstream.name, reason, backoff, upstream.ejections)
        self.probe_soon(upstream)  # its watch re-plans: the next probe comes when the backoff ends

    def _stale(self, upstream: Upstream) -> bool:
        """Every in-flight request on `upstream` has been silent for stuck_after_s. Requests for cloud
        models do not count: their silence is ollama.com's, relayed by a replica that may be fine."""
        now = time.monotonic()
        attempts = [a for a in upstream.attempts if not is_cloud_model(a.model)]
        return bool(attempts) and all(now - a.last_progress > self.config.stuck_after_s for a in attempts)

    def _mark_stuck(self, upstream: Upstream) -> None:
        if upstream.status != "stuck":
            self.ejections.add(1, {self.telemetry.names.upstream_name: upstream.name})
            log.warning("replica %s is stuck: %d requests in flight, none made progress for %.0fs",
                        upstream.name, len(upstream.attempts), self.config.stuck_after_s)
            self._set(upstream, "stuck", f"no progress for {self.config.stuck_after_s:g}s")
            self.telemetry.events.ejection(upstream.name, upstream.reason, None, upstream.ejections)

    def _set(self, upstream: Upstream, status: str, reason: str) -> None:
        if upstream.status == status:
            return
        log.info("replica %s: %s -> %s%s", upstream.name, upstream.status, status,
                 f" ({reason})" if reason else "")
        self.telemetry.events.health(upstream.name, upstream.status, status, reason)
        upstream.status = status
        upstream.reason = reason
        if status == "healthy":
            upstream.healthy_since = time.monotonic()
        self.upstreams.changed()

    # restarts ----------------------------------------------------------------------------------------
    async def _maybe_restart(self, upstream: Upstream) -> None:
        command = upstream.restart_command
        if command is None or self.mode != "enforce" or upstream.name in self._restarting:
            return
        if upstream.status != "stuck" and self.probe_failures[upstream.name] < \
                self.config.restart_after_failures:
            return
        last = self.last_restart.get(upstream.name)
        if last is not None and time.monotonic() - last < self.config.restart_min_interval_s:
            return
        self.last_restart[upstream.name] = time.monotonic()
        why = upstream.reason  # `_set` below replaces it with the restart's own status text
        self._set(upstream, "restarting", "restart command running")
        self._restarting.add(upstream.name)
        upstream.returning = True  # the queue waits for it meanwhile (cold budget)
        code: int | None = None
        try:
            code = await self.restart(upstream, command, why)
        finally:
            self._restarting.discard(upstream.name)
            if code == 0:
                # A new daemon: its runners start afresh. Out of service meanwhile, it is in no
                # eligible list; the probe that takes it back (or the changed() below) renews them.
                upstream.failing.clear()
            if code == 0 and upstream.status == "restarting":
                # Only a probe takes it back, and the daemon may need a moment to listen: until
                # probes decide (see _probe), it is still coming back. Letting the waiters go here
                # sent every one of them health's 503 just before the probe found it serving.
                self._after_restart[upstream.name] = self.probe_failures[upstream.name]
            else:
                upstream.returning = False
                self.upstreams.changed()  # waiters held for it decide again (health's 503)

    async def restart(self, upstream: Upstream, command: str, why: str = "") -> int | None:
        """Run `command` for `upstream` (fields substituted per argument, no shell); log its output and
        record a span whose `health.reason` is `why` (the failure that called for the restart).
        Returns the exit code (None when it had to be killed)."""
        fields = {"name": upstream.name, "url": str(upstream.url), "host": upstream.url.host or "",
                  "port": str(upstream.url.port or "")}
        argv = restart_fields(command, **fields)  # checked when the configuration was loaded
        names = self.telemetry.names
        span = self.telemetry.tracer.start_span(
            names.health_restart_span, kind=SpanKind.INTERNAL,
            attributes={names.upstream_name: upstream.name, names.health_reason: why})
        code: int | None = None
        started = time.monotonic()
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
            output = bytearray()
            reader = asyncio.create_task(_read_tail(process, output))
            # The command's end is its exit, not the end of its output: a daemon it starts in the
            # background (`ollama serve &`) may hold the pipe open for as long as it runs (under
            # uvloop even one whose output is sent elsewhere). Waiting for that end kept the replica
            # `restarting`, unprobed, for restart_timeout_s.
            try:
                try:
                    async with asyncio.timeout(self.config.restart_timeout_s):
                        code = await process.wait()
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):  # it may exit in between
                        process.kill()
                    await process.wait()
                    code = None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(reader), _OUTPUT_GRACE_S)
            except asyncio.CancelledError:  # the replica left the set, or the proxy stops
                reader.cancel()  # nothing of the restart may outlive the replica or the proxy
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    await asyncio.shield(process.wait())
                span.set_status(Status(StatusCode.ERROR, "restart cancelled"))
                span.end()
                raise
            if not reader.done():
                # Still open: a daemon the command started holds it. Read on (and drop) what it
                # writes while the proxy runs: closing the pipe could kill it with SIGPIPE.
                self._outputs.add(reader)
                reader.add_done_callback(self._outputs.discard)
                log.warning("restart of %s: a process its command started keeps the command's output "
                            "open; if it writes there it may die of SIGPIPE when the proxy stops: "
                            "redirect its output (`... >/var/log/ollama.log 2>&1 &`)", upstream.name)
            text = bytes(output[-_OUTPUT_LOG_BYTES:]).decode(errors="replace").strip()
            outcome = "success" if code == 0 else "failure"
            (log.info if code == 0 else log.warning)(
                "restart of %s (%s) exited with %s; output: %s", upstream.name, argv[0], code,
                text or "(none)")
        except OSError as exc:
            outcome = "failure"
            log.warning("restart of %s could not run %s: %s", upstream.name, argv[0], exc)
        self.restarts[upstream.name] += 1
        self.restart_counter.add(1, {self.telemetry.names.upstream_name: upstream.name, "outcome": outcome})
        span.set_attribute(self.telemetry.names.health_restart_exit_code, -1 if code is None else code)
        self.telemetry.events.restart(upstream.name, code, outcome, time.monotonic() - started)
        if outcome != "success":
            span.set_status(Status(StatusCode.ERROR, "restart failed"))
        span.end()
        self.probe_soon(upstream)
        return code

    # pre-warming -------------------------------------------------------------------------------------
    def _missing_warm(self, upstream: Upstream) -> list[str]:
        return [name for name, _ in self.warm.get(upstream.name, [])
                if model_key(name) not in upstream.loaded]

    def _keep_pinned(self, upstream: Upstream) -> None:
        if self._warm_running(upstream):
            return
        now = time.monotonic()
        missing = [name for name, profile in self.warm.get(upstream.name, [])
                   if profile.pinned and model_key(name) not in upstream.loaded
                   and now - self._pin_attempts.get((upstream.name, name), -math.inf) > _PIN_RETRY_S]
        if missing:
            for name in missing:
                self._pin_attempts[(upstream.name, name)] = now
            self._start_warm(upstream, missing, then_serve=False)

    def _warm_running(self, upstream: Upstream) -> bool:
        running = self._warming.get(upstream.name)
        return running is not None and not running.done()

    def _start_warm(self, upstream: Upstream, models: list[str], then_serve: bool) -> None:
        """Load `models` on `upstream` in the background; with `then_serve`, a `warming` replica serves
        once they are loaded. Nothing when a warm-up runs already (the next probe after it ends takes a
        replica left `warming` back, see `_success`)."""
        if self._warm_running(upstream):
            return
        self._warming[upstream.name] = asyncio.create_task(self._warm(upstream, models, then_serve))

    async def _warm(self, upstream: Upstream, models: list[str], then_serve: bool) -> None:
        profiles = dict(self.warm.get(upstream.name, []))
        names = self.telemetry.names
        upstream.returning = then_serve
        done = False
        unreachable = False
        try:
            with self.telemetry.tracer.start_as_current_span(
                    names.health_warm_span, kind=SpanKind.INTERNAL,
                    attributes={names.upstream_name: upstream.name, names.health_models: models}):
                for name in models:
                    outcome = await self.load(upstream, name, profiles[name])
                    if outcome == "loaded":
                        upstream.loaded.setdefault(model_key(name), LoadedModel(model_key(name)))
                    elif outcome == "unreachable":
                        unreachable = True
                        break  # the next models would only fail the same way
            done = True
        finally:
            if done and unreachable and upstream.status == "warming":
                # The daemon went away while it loaded (killed, crashed, its host gone), whichever
                # warm-up held the replica: out of service as any replica that stops answering, so
                # the probes, the backoff and the restart policy take it from here. Set healthy, it
                # took requests it could only fail; left `warming`, nothing ever probed it back.
                self._eject(upstream, "unreachable while pre-warming")
            elif done and then_serve and upstream.status == "warming":
                # Serving before the queue hears of it: told while it was neither serving nor coming
                # back, the queue let its waiters go, and they reached it past its slots. A model the
                # daemon refused or loaded too slowly does not keep a replica that answers out of
                # service.
                self._set(upstream, "healthy", "")
            upstream.returning = False
            self.upstreams.changed()
        self.probe_soon(upstream)

    async def load(self, upstream: Upstream, model: str, profile: ModelConfig) -> LoadOutcome:
        """Load `model` on `upstream` without generating anything (Ollama's load-only request), with the
        model's canonical load options so that real requests reuse the runner. `unreachable`: the
        daemon could not be reached or dropped the connection; `failed`: it answered with a refusal,
        or did not finish within `warm_timeout_s` (a slow load is not a dead daemon)."""
        client = self.client
        if client is None or not client.running:
            return "failed"
        # The very rewrite the limits step applies to real requests, so their options match the runner.
        body, _ = canonicalize({"model": model}, profile.options, strip_others=True)
        if profile.pinned:
            body["keep_alive"] = -1
        attempts: tuple[tuple[str, dict[str, Any]], ...] = (("/api/generate", {}),
                                                             ("/api/embed", {"input": []}))
        started = time.monotonic()
        for path, extra in attempts:
            try:
                status = await client.post_status(upstream, path, {**body, **extra},
                                                  self.config.warm_timeout_s)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                log.warning("pre-warming %s on %s failed: %s", model, upstream.name, type(exc).__name__)
                # aiohttp's ServerTimeoutError is both a ClientError and a TimeoutError: a timeout.
                timed_out = isinstance(exc, TimeoutError) or not isinstance(
                    exc, (aiohttp.ClientConnectionError, OSError))
                return "failed" if timed_out else "unreachable"
            if status == 200:
                log.info("pre-warmed %s on %s", model, upstream.name)
                self.telemetry.events.model_load(upstream.name, model, time.monotonic() - started, "warm")
                return "loaded"
            if status != 400:  # 400: e.g. an embedding model cannot generate
                break
        log.warning("pre-warming %s on %s was refused", model, upstream.name)
        return "failed"

    def _observe_healthy(self, options: CallbackOptions) -> Iterable[Observation]:
        del options
        for upstream in self.upstreams:
            yield Observation(1 if upstream.serving else 0,
                              {self.telemetry.names.upstream_name: upstream.name})

    def snapshot(self) -> dict[str, Any]:
        """Per replica: status and why, failures, ejections, probe and restart counts, what is loaded."""
        now = time.monotonic()
        out: dict[str, Any] = {}
        for u in self.upstreams:
            out[u.name] = {
                "url": redact_url(str(u.url)), "status": u.status, "reason": u.reason or None,
                "version": u.version, "consecutive_failures": u.consecutive_failures,
                "suspect": u.suspect, "ejections": u.ejections,
                "ejected_for_s": round(u.ejected_until - now, 1) if u.status == "ejected" else None,
                "in_flight": len(u.attempts), "restarts": self.restarts[u.name],
                "loaded": [{"model": m.name, "context_length": m.context_length,
                            "expires_at": m.expires_at or None, "size_vram": m.size_vram}
                           for m in u.loaded.values()],
                "models_on_disk": sorted(u.models) if u.models is not None else None,
                "avoided_models": {key: round(f.avoid_until - now, 1) for key, f in u.failing.items()
                                   if f.avoid_until > now},
            }
        return out


async def _read_tail(process: asyncio.subprocess.Process, tail: bytearray) -> None:
    """Read `process`'s output to its end, keeping the last _OUTPUT_LOG_BYTES in `tail`."""
    stream = process.stdout
    assert stream is not None
    while chunk := await stream.read(65536):
        tail += chunk
        del tail[:-_OUTPUT_LOG_BYTES]


def _loaded_models(ps: Any) -> dict[str, LoadedModel]:
    models = ps.get("models") if isinstance(ps, dict) else None
    loaded: dict[str, LoadedModel] = {}
    for entry in models if isinstance(models, list) else ():
        if not isinstance(entry, dict):
            continue
        name = entry.get("model") or entry.get("name")
        if not isinstance(name, str):
            continue
        context = entry.get("context_length")
        vram = entry.get("size_vram")
        loaded[model_key(name)] = LoadedModel(
            model_key(name), str(entry.get("digest", "")),
            # A replica's word, trusted only within bounds: limits cuts every prompt for the model
            # to the largest context a replica reports (and injects it as num_ctx).
            context if isinstance(context, int) and 0 < context <= _MAX_CONTEXT_TOKENS else None,
            str(entry.get("expires_at", "")),
            vram if isinstance(vram, int) else None)
    return loaded
