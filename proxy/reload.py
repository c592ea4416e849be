"""Configuration reload: SIGHUP or a change of the file applies a new configuration without a restart.

A reload reads and validates the whole file first (the same loader and checks as `serve` and
`check-config`), then prepares what can fail (new plugins built and started, tokenizer files read). Any
failure refuses the reload: the previous configuration keeps serving, and the refusal is logged, counted
(`<prefix>_config_reloads_total{outcome="refused"}`, `<prefix>_config_refused` = 1) and shown by
`GET /system/config`. Otherwise everything is applied in one synchronous stretch of the event loop (no
await between the parts), so each request sees either the old configuration or the new one for a given
part: keys, tenants with their quotas, the anonymous policy, model profiles, every step's section (mode,
rollout and keys), the plugins, and the replicas.

What a request already holds stays valid: its permits, leases and slot are released where they were
taken, a plugin it is inside of is stopped only after it left, and a replica removed from the
configuration leaves the set at once (nothing new is sent to it) while it finishes what it serves. A step
the request has not reached yet applies the new section.

`server`, `forwarding`, `state` and `telemetry` are bound when the process starts (the listening socket,
connection pools, the state backend, exporters): a change there is reported as needing a restart and
the running values stay; the rest of the file is applied.

A file caught in the middle of being written is never applied: a reload refuses an empty file (what
`open(path, "w")` leaves before the first byte, which would otherwise parse as "all defaults": no keys,
no tenants, the default replica), and the watch applies a change only once the file's identity, size
and modification time held still for one whole check interval. Writing the new file elsewhere and
renaming it onto the path (as editors and Kubernetes do) is still the safe way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import cattrs
from aiohttp import web
from opentelemetry.metrics import CallbackOptions, Observation

from .access import TenantDirectory
from .chain import Step
from .config import Config, ConfigError
from .fleet.health import FleetHealth
from .ingress import Ingress
from .plugin import PluginError, structure_plugins
from .plugin_chain import PluginChain
from .redaction import redact, redact_url
from .telemetry.setup import Telemetry
from .tokens import TokenizerRegistry
from .upstreams import Upstream, UpstreamSet

__all__ = ["RESTART_ONLY", "ReloadResult", "Reloader", "Runtime", "changed_keys"]

log = logging.getLogger("proxy.reload")

RESTART_ONLY = ("server", "forwarding", "state", "telemetry")
"""Top-level sections bound at start-up: a reload reports their changes and keeps the running values."""
_HISTORY = 20


@attrs.frozen
class ReloadResult:
    """One reload attempt."""

    outcome: str
    """applied, refused or unchanged (the file's configuration is the one being served)."""
    version: int
    """The version served after this attempt."""
    trigger: str
    """start, sighup, file or api."""
    at: float
    """Wall-clock time (Unix seconds)."""
    changed: tuple[str, ...] = ()
    """Key paths whose value changed (names only, never values)."""
    restart_required: tuple[str, ...] = ()
    """Changed key paths that only a restart applies."""
    error: str | None = None
    """Why it was refused (key paths and reasons, never values of secrets)."""

    def as_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "version": self.version, "trigger": self.trigger,
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at)),
                "changed": list(self.changed), "restart_required": list(self.restart_required),
                "error": self.error}


_UNSTRUCTURE = cattrs.Converter()


def _flatten(value: Any, path: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
        for key, item in value.items():
            _flatten(item, f"{path}.{key}" if path else key, out)
    else:
        out[path] = value


def plain(config: Config) -> dict[str, Any]:
    """The configuration as plain data (what the file would say, defaults filled in)."""
    data: dict[str, Any] = _UNSTRUCTURE.unstructure(config)
    return data


def changed_keys(old: Config, new: Config) -> list[str]:
    """Key paths whose value differs (lists, such as `tenants` or `plugins`, compare as a whole)."""
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    _flatten(plain(old), "", before)
    _flatten(plain(new), "", after)
    missing = object()
    return sorted(k for k in before.keys() | after.keys() if before.get(k, missing) != after.get(k, missing))


@attrs.define
class Runtime:
    """The parts of a running proxy a reload changes (built by app.py)."""

    directory: TenantDirectory
    upstreams: UpstreamSet
    fleet_health: FleetHealth
    steps: dict[str, Step]
    plugins: PluginChain
    tokenizers: TokenizerRegistry
    bind_plugins: Callable[[PluginChain], None]
    """Re-binds what other parts take from the plugins (limits' summarizer)."""
    ingress: Ingress
    """Holds the default deadline (`chain.limits.deadline_s`), set on each request before the chain."""
    draining: list[Upstream] = attrs.field(factory=list)
    """Replicas a reload removed that still serve requests."""

    async def apply(self, config: Config) -> list[str]:
        """Prepare what can fail, then apply `config` synchronously. Returns the plugins rebuilt.
        Raises (ConfigError, PluginError, OSError, ValueError) with nothing applied."""
        tokenizers = {name: m.tokenizer for name, m in config.models.items() if m.tokenizer}
        try:
            loaded = self.tokenizers.prepare(tokenizers)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"models: a tokenizer file cannot be loaded ({type(exc).__name__}: "
                              f"{str(exc)[:200]})") from None
        rebuilt = await self.plugins.replace(structure_plugins(config.plugins))
        # From here to the end, no await: the whole configuration changes between two requests' steps.
        self.tokenizers.apply(tokenizers, loaded)
        chain = config.chain
        self.directory.reconfigure(config.tenants, config.anonymous, config.admin.keys)
        added, removed = self.upstreams.reconcile(config.upstreams, config.models)
        self.draining.extend(removed)
        self.fleet_health.reconfigure(chain.health, config.models)
        for name, step in self.steps.items():
            section = getattr(chain, name)
            if name == "limits":
                step.reconfigure(section, config.models)  # type: ignore[call-arg]
            else:
                step.reconfigure(section)
        self.ingress.default_deadline_s = chain.limits.deadline_s
        self.plugins.commit()
        self.bind_plugins(self.plugins)
        for upstream in added:
            log.info("replica %s added (%s)", upstream.name, redact_url(str(upstream.url)))
        for upstream in removed:
            log.info("replica %s removed: it gets no new requests and finishes the %d it serves",
                     upstream.name, len(upstream.attempts))
        return rebuilt

    def still_draining(self) -> list[Upstream]:
        self.draining = [u for u in self.draining if u.attempts]
        return self.draining


class Reloader:
    """Loads, validates and applies the configuration file; see the module docstring."""

    def __init__(self, config: Config, runtime: Runtime, telemetry: Telemetry, *,
                 path: str | None, load: Callable[[], Config]) -> None:
        self.config = config
        """The configuration being served (restart-only sections as the process started)."""
        self.runtime = runtime
        self.path = path
        self._load = load
        self.version = 1
        self.digest = _digest(path)
        self.refused = False
        self.restart_required: tuple[str, ...] = ()
        self.started = time.time()
        self.last = ReloadResult("applied", 1, "start", self.started)
        self.history: deque[ReloadResult] = deque([self.last], maxlen=_HISTORY)
        self.listeners: list[Callable[[ReloadResult], None]] = []
        """Called with every result (the live events stream publishes them)."""
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sighup_pending = False
        self._stamp: tuple[int, int, int] | None = _stamp(path)
        """The file's stamp when it was last read (None: read it again at the next check)."""
        self._settling: tuple[int, int, int] | None = None
        """A changed stamp the watch saw at its last check: applied if it still holds at the next."""
        names = telemetry.names
        meter = telemetry.meter
        self._reloads = meter.create_counter(
            names.metric_config_reloads, unit="{reload}",
            description="Configuration reload attempts, by outcome (applied, refused, unchanged).")
        meter.create_observable_gauge(
            names.metric_config_version, callbacks=[self._observe_version], unit="1",
            description="Version of the configuration being served (1 at start, +1 per applied reload).")
        meter.create_observable_gauge(
            names.metric_config_refused, callbacks=[self._observe_refused], unit="1",
            description="1 while the newest configuration file was refused (the previous one serves).")
        meter.create_observable_gauge(
            names.metric_config_restart_required, callbacks=[self._observe_restart], unit="{key}",
            description="Settings the file changes that only a restart applies.")

    def _observe_version(self, options: CallbackOptions) -> Iterable[Observation]:
        del options
        yield Observation(self.version)

    def _observe_refused(self, options: CallbackOptions) -> Iterable[Observation]:
        del options
        yield Observation(1 if self.refused else 0)

    def _observe_restart(self, options: CallbackOptions) -> Iterable[Observation]:
        del options
        yield Observation(len(self.restart_required))

    async def reload(self, trigger: str) -> ReloadResult:
        """Read the file again and apply it; one reload at a time (a second waits for the first)."""
        async with self._lock:
            result = await self._reload(trigger)
        self._record(result)
        return result

    def _record(self, result: ReloadResult) -> None:
        self.last = result
        self.history.append(result)
        self._reloads.add(1, {"outcome": result.outcome})
        for listener in list(self.listeners):
            try:
                listener(result)
            except Exception:  # a listener's bug must not undo or hide a reload
                log.exception("reload listener failed")

    async def _reload(self, trigger: str) -> ReloadResult:
        now = time.time()
        self._stamp = _stamp(self.path)
        data = _read(self.path)
        before = _sha256(data)
        if data is not None and not data.strip():
            # Caught between `open(path, "w")` and the first write: applying it would serve the
            # defaults (no keys, no tenants). The watch looks again once the file changes.
            return self._refuse(trigger, now, "the file is empty (still being written?); write the new "
                                "file elsewhere and rename it into place")
        try:
            new = self._load()
        except (ConfigError, PluginError, ValueError) as exc:
            return self._refuse(trigger, now, str(exc))
        except Exception as exc:  # a plugin's import, an unexpected bug: refused, never half applied
            log.exception("configuration reload failed unexpectedly")
            return self._refuse(trigger, now, f"unexpected {type(exc).__name__} while loading")
        if _digest(self.path) != before:
            # The file changed while it was read: what was parsed may be neither version. Look again
            # at the next check of the watch (or the next SIGHUP).
            self._stamp = None
            return self._refuse(trigger, now, "the file changed while it was being read; retrying")
        changed = changed_keys(self.config, new)
        restart = tuple(k for k in changed if k.split(".", 1)[0] in RESTART_ONLY)
        applied = attrs.evolve(new, **{section: getattr(self.config, section) for section in RESTART_ONLY})
        live = tuple(k for k in changed if k not in restart)
        # What the file says and the process does not: only a restart applies it (until the file goes
        # back to the running values). Like the digest, it describes the file being served, so both
        # are recorded only once this file is in force: a refused apply leaves the last one's.
        restart_required = tuple(changed_keys(applied, new))
        if not live:
            self.digest, self.restart_required = before, restart_required
            self.refused = False
            log.info("configuration reload (%s): nothing to apply; still version %d", trigger,
                     self.version)
            self._log_restart(restart)
            return ReloadResult("unchanged", self.version, trigger, now, (), self.restart_required)
        try:
            rebuilt = await self.runtime.apply(applied)
        except Exception as exc:
            # Raised while preparing (a plugin that cannot start, a tokenizer file): nothing was
            # applied. The synchronous part raises nothing it could leave half done.
            with contextlib.suppress(Exception):
                await self.runtime.plugins.abandon()
            if not isinstance(exc, ConfigError | PluginError | OSError | ValueError | RuntimeError):
                log.exception("configuration reload failed unexpectedly")
                return self._refuse(trigger, now, f"unexpected {type(exc).__name__} while applying")
            return self._refuse(trigger, now, str(exc))
        self.config = applied
        self.digest, self.restart_required = before, restart_required
        self.version += 1
        self.refused = False
        log.info("configuration version %d applied (%s): changed %s%s", self.version, trigger,
                 ", ".join(live), f"; plugins: {', '.join(rebuilt)}" if rebuilt else "")
        self._log_restart(restart)
        return ReloadResult("applied", self.version, trigger, now, live, self.restart_required)

    def _refuse(self, trigger: str, now: float, error: str) -> ReloadResult:
        self.refused = True
        error = error[:2000]
        log.error("configuration reload refused (%s); still serving version %d: %s", trigger,
                  self.version, error)
        return ReloadResult("refused", self.version, trigger, now, error=error)

    @staticmethod
    def _log_restart(restart: tuple[str, ...]) -> None:
        if restart:
            log.warning("configuration: %s changed in the file but only a restart applies %s; the "
                        "running values stay", ", ".join(restart), "it" if len(restart) == 1 else "them")

    # triggers ----------------------------------------------------------------------------------------
    async def watch(self, interval_s: float) -> None:
        """Reload whenever the file's identity or contents change (checked every `interval_s`): an edit
        in place, or a new file renamed onto the path (how editors and Kubernetes ConfigMaps update).
        A change is applied once its stamp held for a whole interval: a file being written in place is
        read when its writer is done, not halfway."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                stamp = _stamp(self.path)
                if stamp is None or stamp == self._stamp:
                    self._settling = None
                    continue
                if stamp != self._settling:
                    self._settling = stamp  # changed since the last check: may still be being written
                    continue
                self._settling = None
                digest = _digest(self.path)
                if digest == self.digest and not self.refused:
                    self._stamp = stamp  # touched, not changed
                    continue
                await self.reload("file")
            except Exception:  # the watch must outlive any one reload's bug
                log.exception("configuration watch: reload failed unexpectedly")

    def sighup(self) -> None:
        """The SIGHUP handler (serving.run_until_signalled installs it): reload in the background."""
        if self.path is None:
            log.warning("SIGHUP: no configuration file (--config) to reload")
            return
        if self._sighup_pending:
            return  # a reload that has not read the file yet will see this change too: coalesced
        self._sighup_pending = True
        task = asyncio.get_running_loop().create_task(self._on_sighup(), name="config-reload")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_sighup(self) -> None:
        async with self._lock:
            self._sighup_pending = False  # from here on the file is read: a new SIGHUP needs a new reload
            result = await self._reload("sighup")
        self._record(result)

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: the file watch, when `server.config_watch_s` > 0 and there is a file."""
        del app
        interval = self.config.server.config_watch_s
        if self.path is not None and interval > 0:
            task = asyncio.get_running_loop().create_task(self.watch(interval), name="config-watch")
            self._tasks.add(task)
        try:
            yield
        finally:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # /system/config ----------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """What `GET /system/config` shows: the configuration being served (secrets redacted), its
        version, the last reload and its history, settings waiting for a restart, draining replicas."""
        return {
            "version": self.version,
            "source": self.path,
            "sha256": self.digest,
            "refused": self.refused,
            "restart_only": list(RESTART_ONLY),
            "restart_required": list(self.restart_required),
            "last_reload": self.last.as_dict(),
            "history": [r.as_dict() for r in reversed(self.history)],
            "draining_upstreams": [{"name": u.name, "in_flight": len(u.attempts)}
                                   for u in self.runtime.still_draining()],
            "config": redact(plain(self.config)),
        }


def _stamp(path: str | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _read(path: str | None) -> bytes | None:
    """The file's bytes; None without a file or when it cannot be read (the loader reports why)."""
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


def _sha256(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _digest(path: str | None) -> str | None:
    return _sha256(_read(path))
