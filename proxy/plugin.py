"""The plugin seam: code of our own or of a third party that runs in the chain without the chain knowing it.

DESIGN's path is `ingress -> [plugins] -> limits -> ...`; a plugin declares where it sits:

- `before_limits`: it sees the body before anything counts it and may rewrite it (trim a history,
  summarise it): limits, quotas and the queue then apply to what it produced;
- `before_backpressure`: after limits and quotas (the tenant has paid for the request), before a slot is
  taken: it may answer from its own store (an embedding cache hit) without using a replica's slot.

Either kind may attach a response observer that sees every chunk of the response as the forwarder relays
it (synchronously, never buffering and never delaying it) and the end of the response.

A plugin is a `Plugin` subclass with a `name`, a `slot` and a `config_class` beside it (an attrs class
deriving `PluginConfig`, so `mode` and `fail` are common to all). Plugins are configured as
`plugins: [{name: <plugin>, ...}]`, in that order, and found among the built-ins (`plugins/` modules that
set `PLUGIN`) and the entry-point group `shared_ollama_proxy.plugins`. Each gets its own span
(`<prefix>.plugin.<name>`) and decision counter; `mode` works as for the steps (`shadow` runs it and
reports what it would have done without applying it; `off` removes it); an exception inside a plugin is
logged and counted and the request goes on without it (fail open), unless its config says `fail: closed`.

A plugin that needs the fleet (a summary from a small model, embeddings to score turns) calls
`services.subrequest`: an HTTP request to this proxy itself, under an identity (the caller's tenant or a
configured one), so quotas, the queue and the balancer apply to it like to any other request; plugins do
not see their own sub-requests.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from importlib import import_module, metadata
from pkgutil import iter_modules
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import attrs
import cattrs
from aiohttp import web
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode

from .access import INTERNAL_HEADER
from .chain import Canary
from .errors import DeadlinePassed, InternalProxyError, ProxyError
from .offload import parsed_json
from .schema import Mode, RolloutConfig, is_mode, structure_mode
from .telemetry import semconv

if TYPE_CHECKING:
    from .context import RequestContext
    from .ollama import Usage
    from .telemetry.setup import Telemetry
    from .tokens import Tokenizer

__all__ = [
    "ENTRY_POINT_GROUP",
    "INTERNAL_HEADER",
    "SLOTS",
    "Plugin",
    "PluginConfig",
    "PluginError",
    "PluginServices",
    "PluginStep",
    "ResponseObserver",
    "Subrequests",
    "discover",
    "shadowing",
    "structure_plugins",
]

log = logging.getLogger("proxy.plugin")

_SHADOWING: ContextVar[bool] = ContextVar("sop_plugin_shadowing", default=False)
"""Set around a plugin's request phase: whether what it does there will be discarded (see shadowing)."""


def shadowing() -> bool:
    """Whether the plugin request phase running now is in shadow mode (its mode, or a `rollout` canary
    that only shadows this tenant): its rewrite and answer will be discarded and the request served
    as it came. A plugin never needs this to be correct; one whose answer costs work upstream (a
    sub-request) should skip that work here and decide what it would have done, since the replica
    would then do it twice and the tenant would pay twice for an answer nobody gets."""
    return _SHADOWING.get()

ENTRY_POINT_GROUP = "shared_ollama_proxy.plugins"
SLOTS = ("before_limits", "before_backpressure")
"""Where a plugin may sit: before `limits` (may rewrite the body) or before `backpressure` (may answer)."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


DEADLINE_GRACE_S = 1.0
"""How long past the request's deadline a plugin's request phase may still run: one that watches the
deadline itself answers it first (embed_cache and embed_batch charge a prompt already sent), one that
does not is cut off then."""


MAX_DECISIONS = 32
"""Distinct decisions counted per plugin; any further one is counted as `other`: a plugin that puts a
number or a name in its decision must not grow /metrics without bound."""
PROXY_DECISIONS = frozenset({"pass", "answered", "rejected", "failed", "deadline", "wrote_response",
                             "other", "shadow_pass", "shadow_answered"})
"""The decisions the proxy itself records for a plugin (a fixed set): never counted against
MAX_DECISIONS nor folded into `other`, so a plugin's own unbounded decisions cannot hide its failures."""
DECISION_MAX_CHARS = 64
"""Longest decision kept (the rest is cut)."""


class _PluginOverDeadline(DeadlinePassed):
    """The request's deadline passed while a plugin's request phase was still running."""


class StrayCancellation(Exception):
    """A CancelledError out of a plugin whose request was not being cancelled (it awaited a future or
    task someone else cancelled): the plugin's failure, not the client's leaving."""


class PluginError(ValueError):
    """A plugin configuration that cannot be served (unknown name, bad key); names the key path."""


@attrs.frozen(kw_only=True)
class PluginConfig:
    """Keys every plugin takes. A plugin's own config class derives from this one (attrs, frozen,
    kw_only), with a docstring per field and the unit in the name."""

    name: str
    """Which plugin (a built-in in plugins/, or an entry point of `shared_ollama_proxy.plugins`)."""
    mode: Mode = "enforce"
    """enforce: act; shadow: run and report what it would have done (span, metric, X-Shadow-Decision)
    without changing the request; off: not in the chain at all."""
    fail: Literal["open", "closed"] = "open"
    """open: an exception inside the plugin is logged and the request goes on without it; closed: the
    request fails with 500 internal_error where the plugin enforces (in shadow mode, and for the
    tenants a canary shadows, it fails open)."""
    rollout: RolloutConfig = attrs.field(factory=RolloutConfig)
    """Canary for `enforce`: who it acts for; the other tenants get shadow (see RolloutConfig)."""


class ResponseObserver(Protocol):
    """Sees a response as it is relayed. `feed` is called with every chunk, synchronously, in order: it
    must be cheap and must not keep a reference it does not need (the chunk is the client's). `end` is
    called once, after the last chunk or when the response ended early (`ctx.outcome` says how)."""

    def feed(self, chunk: bytes) -> None: ...

    def end(self, ctx: RequestContext) -> None: ...


class Subrequests:
    """Requests from plugins to the fleet, sent through this proxy's own chain under an identity.

    They go to the proxy's own listening address over loopback HTTP, carrying `X-SOP-Internal:
    <secret> <tenant>`: ingress maps that to the tenant (quotas, lanes and the queue apply) and marks the
    request so that plugins skip it (no recursion). The secret is random per process and never leaves it,
    except to the other workers of one `serve --workers N` (the kernel may hand a sub-request to any of
    them): their supervisor draws it and gives it to each through a pipe (`secret`).
    """

    def __init__(self, secret: str | None = None) -> None:
        self.secret = secret or secrets.token_urlsafe(24)
        self.base_url: str | None = None
        """Where this proxy listens, learnt from the first request it serves (the port may have been
        chosen by the OS, and the listening address may be a wildcard)."""
        self._session: Callable[[], Any] = lambda: None

    def bind_session(self, session: Callable[[], Any]) -> None:
        """The HTTP client session to send through (the fleet client's control pool)."""
        self._session = session

    def learn_address(self, request: web.Request) -> None:
        """Remember the local address `request` arrived on, as the address sub-requests go to."""
        if self.base_url is not None or request.transport is None:
            return
        sockname = request.transport.get_extra_info("sockname")
        if not sockname:
            return
        host, port = sockname[0], sockname[1]
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        self.base_url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def credential(self, tenant: str) -> str:
        return f"{self.secret} {tenant}"

    def parse(self, value: str) -> str | None:
        """The tenant a credential names, or None when the secret is not ours (then it is no credential)."""
        secret, _, tenant = value.partition(" ")
        if not tenant or not secrets.compare_digest(secret.encode(), self.secret.encode()):
            return None
        return tenant

    async def post_json(self, path: str, body: Mapping[str, Any], *, tenant: str,
                        timeout_s: float = 60.0) -> tuple[int, Any]:
        """POST `body` to `path` through the chain as `tenant`; returns (status, parsed JSON or None).

        Raises ProxyError-free: a failure to reach the proxy itself is (599, None)."""
        import orjson

        status, raw = await self.post_raw(path, body, tenant=tenant, timeout_s=timeout_s)
        try:
            return status, orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            return status, None

    async def post_raw(self, path: str, body: Mapping[str, Any], *, tenant: str,
                       timeout_s: float = 60.0) -> tuple[int, bytes]:
        """As `post_json`, but the answer's bytes as the replica wrote them (for plugins that splice
        them into an answer of their own, e.g. embeddings in Go's float formatting); (599, b"") when the
        proxy itself could not be reached."""
        import aiohttp
        import orjson
        from opentelemetry.propagate import inject

        session = self._session()
        if self.base_url is None or session is None:
            return 599, b""
        headers = {INTERNAL_HEADER: self.credential(tenant), "Content-Type": "application/json"}
        inject(headers)  # the sub-request's spans join the caller's trace, under its current span
        try:
            # Never redirected: the credential names any tenant, and may reach nobody but this proxy
            # (a replica's 3xx, relayed, would otherwise send it to whatever origin it names).
            async with session.post(
                    self.base_url + path, data=orjson.dumps(body), headers=headers,
                    timeout=aiohttp.ClientTimeout(total=timeout_s),
                    allow_redirects=False) as response:
                return response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError):
            return 599, b""


async def _estimate_tokenizer(model: str) -> Tokenizer:
    from .tokens import EstimateTokenizer

    del model
    return EstimateTokenizer()


@attrs.define
class PluginServices:
    """What the application lends every plugin: telemetry, sub-requests, and what the fleet knows about
    its models (names, tokenizers, digests)."""

    telemetry: Telemetry
    subrequests: Subrequests
    knows_model: Callable[[str], bool] = lambda _model: True
    """Is a model name one the fleet serves (configured or listed)? Plugins key state by it only then."""
    tokenizer_for: Callable[[str], Awaitable[Tokenizer]] = _estimate_tokenizer
    """The model's own tokenizer (the one `limits` counts with), or the over-counting estimate."""
    model_digest: Callable[[str], str | None] = lambda _model: None
    """The digest of the model as a replica holds it (from /api/ps or /api/tags), None when unknown:
    what a cache keyed by model output must include, so a re-pulled model invalidates it."""


class Plugin:
    """Base of every plugin; see the module docstring. Subclasses set `name`, `slot` and `config_class`
    and override `on_request` and/or `observe`."""

    name: ClassVar[str] = ""
    slot: ClassVar[str] = "before_limits"
    config_class: ClassVar[type[PluginConfig]] = PluginConfig

    def __init__(self, config: PluginConfig, services: PluginServices) -> None:
        self.config = config
        self.services = services

    async def on_request(self, request: web.Request, ctx: RequestContext,
                         decide: Callable[[str], None]) -> web.StreamResponse | None:
        """The request phase. Return a response to answer the request here (only `before_backpressure`
        plugins may), or None to go on. Rewrite the body with `ctx.replace_json` (only `before_limits`
        plugins may). Call `decide("...")` with what it did; in shadow mode the body rewrite and the
        answer are discarded by the caller, so a plugin never needs to check its mode."""
        del request, ctx
        decide("pass")
        return None

    def observe(self, ctx: RequestContext) -> ResponseObserver | None:
        """An observer for this request's response, or None (the default: no cost per chunk)."""
        del ctx
        return None

    async def start(self) -> None:
        """Called once when the application starts (open stores, start background tasks)."""

    async def stop(self) -> None:
        """Called once when the application stops."""


def discover() -> dict[str, type[Plugin]]:
    """Every plugin this process can load, by name: the built-ins (modules of the `plugins` package
    that set `PLUGIN`), then the entry points of `shared_ollama_proxy.plugins` (an entry point may not
    replace a built-in)."""
    found: dict[str, type[Plugin]] = {}
    import plugins as builtin_package

    for module_info in iter_modules(builtin_package.__path__):
        module = import_module(f"plugins.{module_info.name}")
        cls = getattr(module, "PLUGIN", None)
        if isinstance(cls, type) and issubclass(cls, Plugin) and cls.name:
            found[cls.name] = cls
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in found:
            log.warning("plugin entry point %s ignored: a built-in has that name", entry.name)
            continue
        try:
            cls = entry.load()
        except Exception as exc:  # a broken third-party package must not stop the proxy's start
            log.error("plugin entry point %s could not be loaded (%s)", entry.name, type(exc).__name__)
            continue
        if isinstance(cls, type) and issubclass(cls, Plugin):
            found[entry.name] = cls
    return found


def structure_plugins(raw: Iterable[Any], available: Mapping[str, type[Plugin]] | None = None
                      ) -> list[tuple[type[Plugin], PluginConfig]]:
    """Validate `plugins:` entries against each plugin's config class, in order; raises PluginError
    naming the key path (`plugins[1].max_bytes: must be > 0`)."""
    from .validation import format_validation_error

    available = discover() if available is None else available
    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_structure_hook_func(is_mode, structure_mode)  # `mode: off` unquoted is YAML's false
    out: list[tuple[type[Plugin], PluginConfig]] = []
    for index, entry in enumerate(raw):
        where = f"plugins[{index}]"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            raise PluginError(f"{where}: expected a mapping with a `name`")
        cls = available.get(entry["name"])
        if cls is None:
            raise PluginError(f"{where}.name: unknown plugin {entry['name']!r:.60} (known: "
                              f"{', '.join(sorted(available)) or 'none'})")
        if cls.slot not in SLOTS:
            raise PluginError(f"{where}: plugin {cls.name} declares an unknown slot {cls.slot!r}")
        try:
            config = converter.structure(dict(entry), cls.config_class)
        except (cattrs.BaseValidationError, ValueError, TypeError) as exc:
            text = format_validation_error(exc) if isinstance(exc, cattrs.BaseValidationError) \
                else str(exc)
            nested = re.match(r"^[\w.\[\]]+: ", text) is not None
            raise PluginError(f"{where}.{text}" if nested else f"{where}: {text}") from None
        out.append((cls, config))
    return out


class PluginStep:
    """One configured plugin as a chain middleware: span, mode, fail-open, shadow and its decisions."""

    def __init__(self, plugin: Plugin, telemetry: Telemetry, *, forward_route: str) -> None:
        self.plugin = plugin
        self.telemetry = telemetry
        self.mode = plugin.config.mode
        self.canary = Canary.of(self.mode, plugin.config.rollout)
        self.forward_route = forward_route
        names = telemetry.names
        self.span_name = names.step_span(f"plugin.{plugin.name}")
        self.decision_attribute = names.step_decision(f"plugin.{plugin.name}")
        self.mode_attribute = names.step_mode
        self.decision_counts: Counter[str] = Counter()
        self.failures = 0
        self.active = 0
        """Requests inside this plugin now (a reload stops a dropped plugin once it is 0)."""
        self._idle: asyncio.Event | None = None
        telemetry.meter.create_observable_counter(
            names.metric_step_decisions(f"plugin.{plugin.name}"),
            callbacks=[self._observe], unit="{decision}",
            description=f"Decisions of the {plugin.name} plugin, by decision.")

    def _count(self, decision: str) -> None:
        """Count `decision`, as `other` once MAX_DECISIONS distinct ones are (logged once)."""
        counts = self.decision_counts
        if decision not in counts and decision not in PROXY_DECISIONS and \
                sum(1 for known in counts if known not in PROXY_DECISIONS) >= MAX_DECISIONS:
            if "other" not in counts:
                log.warning("plugin %s made more than %d distinct decisions; further ones are "
                            "counted as `other`", self.plugin.name, MAX_DECISIONS)
            decision = "other"
        counts[decision] += 1

    def _observe(self, options: CallbackOptions) -> Iterable[Observation]:
        del options
        for decision, count in list(self.decision_counts.items()):
            yield Observation(count, {"decision": decision})

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        from .context import CONTEXT

        if self.mode == "off" or request.match_info.route.name != self.forward_route:
            return await handler(request)
        ctx = request[CONTEXT]
        self.plugin.services.subrequests.learn_address(request)
        if ctx.internal:
            return await handler(request)  # a plugin's own sub-request: no plugin sees it
        try:
            answer = await self._request_phase(request, ctx)
        except ProxyError:
            if ctx.prepared is None:
                raise
            answer = None  # a refusal cannot be sent: the plugin has started a response itself
        if ctx.prepared is not None:
            return self._answered_itself(request, ctx, answer)
        if answer is not None:
            return answer
        observer = None
        try:
            observer = self.plugin.observe(ctx)
        except Exception as exc:
            self._failed(ctx, exc)
        if observer is None:
            return await handler(request)
        ctx.observers.append(observer)
        try:
            return await handler(request)
        finally:
            # Here, not in the forwarder: the response may end anywhere downstream (a refusal, an
            # answer of a later plugin, a client that left), and `end` must be called exactly once.
            try:
                observer.end(ctx)
            except Exception as exc:
                log.warning("plugin %s's response observer failed at the end (%s)",
                            self.plugin.name, type(exc).__name__)

    def _answered_itself(self, request: web.Request, ctx: RequestContext,
                         answer: web.StreamResponse | None) -> web.StreamResponse:
        """The plugin prepared a response on the client's connection itself (a streamed answer).
        Enforced from `before_backpressure` and returned, that is its answer. Otherwise (shadow mode,
        the `before_limits` slot, or it failed, refused or went on after starting it) its head and
        whatever body it wrote are the client's already and cannot be taken back: nothing else may
        follow on that connection (another response there would be read as the answer to the client's
        next request), so the response ends the connection, at once when the plugin did not hand it
        back finished (the client sees it cut short, not complete)."""
        response = ctx.prepared
        assert response is not None
        if answer is response and self.mode_of(ctx) == "enforce" \
                and self.plugin.slot == "before_backpressure":
            return response
        response.force_close()
        # Besides the request phase's own outcome (failed, shadow_..., ...), which says what the plugin
        # decided: this one says the connection was spent on the plugin's response.
        self._count("wrote_response")
        log.warning("plugin %s started a response of its own on request %s without answering with it "
                    "(%s); the connection ends after it", self.plugin.name, ctx.request_id,
                    "returned it" if answer is response else "did not return it")
        if answer is not response and request.transport is not None:
            request.transport.close()
        return response

    def mode_of(self, ctx: RequestContext) -> str:
        """This plugin's mode for the request's tenant (a canary enforces for some tenants only)."""
        return self.mode if self.canary is None else (
            "enforce" if self.canary.enforces(ctx.tenant.name) else "shadow")

    def enter(self) -> None:
        """A request entered this plugin's slot (PluginChain counts it before the first plugin)."""
        self.active += 1

    def leave(self) -> None:
        self.active -= 1
        if not self.active and self._idle is not None:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no request is inside this plugin."""
        while self.active:
            self._idle = asyncio.Event()
            await self._idle.wait()

    async def _request_phase(self, request: web.Request,
                             ctx: RequestContext) -> web.StreamResponse | None:
        decisions: list[str] = []
        # Parsed in a worker when large, as limits does (cached: once for every plugin and limits): a
        # large body Go's way takes seconds, which on the event loop would hold every other request.
        body_before, json_before = ctx.body, await parsed_json(ctx)
        # Shadow mode and a failure discard what the plugin did to the response headers too (a copy of
        # a few entries: well under a microsecond).
        mode = self.mode_of(ctx)
        headers_saved = ctx.response_headers.copy()
        headers_before = headers_saved if mode == "shadow" else None
        # An answer a plugin makes (proxy/embeddings.respond) records itself as the forwarder records a
        # relayed one (status, first byte, complete, usage): discarded in shadow mode, or on failure,
        # that record goes with it, or the request the forwarder then serves kept it (its first byte
        # never timed, and a prompt abandoned upstream charged as the discarded answer's 0 tokens).
        exchange = ctx.exchange
        recorded = (ctx.status, exchange.first_byte_at, exchange.complete, exchange.usage)
        span: Span = INVALID_SPAN
        if self.telemetry.recording:
            span = self.telemetry.tracer.start_span(
                self.span_name, kind=SpanKind.INTERNAL, attributes={self.mode_attribute: mode})
        try:
            answer = await self._bounded(request, ctx, decisions.append)
        except ProxyError as exc:
            span.set_attribute(semconv.ATTR_ERROR_TYPE, exc.code)
            span.set_status(Status(StatusCode.ERROR, exc.code))
            span.end()
            if isinstance(exc, _PluginOverDeadline):  # not the plugin's refusal: in every mode
                # The 504 is the proxy's: nothing of what the cut-off plugin set goes with it.
                ctx.response_headers = headers_saved
                self._unrecord(ctx, recorded)
                self._count("deadline")
                exc.step = f"plugin.{self.plugin.name}"
                raise
            self._count("rejected")
            if headers_before is not None:
                ctx.response_headers = headers_before
                ctx.response_headers.add("X-Shadow-Decision", f"{self.plugin.name}={exc.code}")
                self._restore(ctx, body_before, json_before, failed=True)
                return None
            exc.step = exc.step or f"plugin.{self.plugin.name}"
            raise
        except Exception as exc:
            # The type only: an exception's message may quote the body, which never goes on a span.
            span.set_attribute(semconv.ATTR_ERROR_TYPE, type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR, "plugin_failure"))
            span.end()
            ctx.response_headers = headers_saved
            self._restore(ctx, body_before, json_before, failed=True)
            self._unrecord(ctx, recorded)
            self._failed(ctx, exc)
            return None
        # What a plugin decides goes on a metric label, a span and X-Shadow-Decision: a short string.
        decision = str(decisions[-1])[:DECISION_MAX_CHARS] if decisions else (
            "answered" if answer is not None else "pass")
        span.set_attribute(self.decision_attribute, decision)
        span.end()
        if headers_before is not None:
            if answer is not None or ctx.body is not body_before:
                headers_before.add("X-Shadow-Decision", f"{self.plugin.name}={decision}")
            ctx.response_headers = headers_before
            self._restore(ctx, body_before, json_before)
            if answer is not None:
                self._unrecord(ctx, recorded)
            self._count(f"shadow_{decision}")
            return None
        self._count(decision)
        if answer is not None and self.plugin.slot != "before_backpressure":
            raise InternalProxyError(f"plugin {self.plugin.name} answered a request from the "
                                     f"{self.plugin.slot} slot, where only rewriting is allowed")
        if ctx.body is not body_before and self.plugin.slot != "before_limits":
            self._restore(ctx, body_before, json_before)
            raise InternalProxyError(f"plugin {self.plugin.name} rewrote a body from the "
                                     f"{self.plugin.slot} slot, after limits counted it")
        return answer

    async def _bounded(self, request: web.Request, ctx: RequestContext,
                       decide: Callable[[str], None]) -> web.StreamResponse | None:
        """The plugin's request phase, cancelled `DEADLINE_GRACE_S` after the request's deadline: a
        plugin that hangs (an external call without a timeout) must not hold the client, and the
        tenant's reservation and concurrency place, past the deadline every other part keeps."""
        if ctx.deadline_at is None:
            return await self._uncancelled(request, ctx, decide)
        loop = asyncio.get_running_loop()
        bound = asyncio.timeout_at(loop.time() + (ctx.deadline_at + DEADLINE_GRACE_S - time.monotonic()))
        try:
            async with bound:
                return await self._uncancelled(request, ctx, decide)
        except TimeoutError:
            if not bound.expired():
                raise  # the plugin's own
            raise _PluginOverDeadline(
                f"the request's deadline of {ctx.deadline_s:g}s passed (in plugin "
                f"{self.plugin.name})") from None

    async def _uncancelled(self, request: web.Request, ctx: RequestContext,
                           decide: Callable[[str], None]) -> web.StreamResponse | None:
        """The plugin's request phase, a CancelledError nobody asked this request for turned into
        StrayCancellation (a failure, fail-open like any other): let through, it would end the
        request as if the client had left, without a response."""
        shadowed = _SHADOWING.set(self.mode_of(ctx) == "shadow")
        try:
            return await self.plugin.on_request(request, ctx, decide)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # the client left, the deadline's bound or the stop sequence
            raise StrayCancellation() from None
        finally:
            _SHADOWING.reset(shadowed)

    @staticmethod
    def _restore(ctx: RequestContext, body: bytes | None, parsed: Any, *,
                 failed: bool = False) -> None:
        """Undo what the plugin did to the body: its rewrite, and an edit in place of the parsed view
        it was handed (`ctx.replace_json` allows one), which the bytes never saw. The view is then
        read again from the bytes, the one record of what the client sent, unless nothing could have
        changed it: no rewrite, no failure (a plugin that edits the view in place rewrites with
        replace_json; one that failed may have stopped between the two), or a view that cannot be
        edited (a string, a number)."""
        if ctx.body is body and not failed:
            return
        if parsed is None or isinstance(parsed, dict | list):
            # None is also a body Go refuses: read again, its error comes back with it (put back as
            # a view of None, the error was lost and limits answered `model is required`).
            ctx.restore_body(body)
        else:
            ctx.restore_body(body, parsed)

    @staticmethod
    def _unrecord(ctx: RequestContext,
                  recorded: tuple[int, float | None, bool, Usage | None]) -> None:
        """Put back what an answer records (ctx.status and the exchange's first byte, completeness and
        usage: see proxy/embeddings.respond) as it was before the plugin ran."""
        exchange = ctx.exchange
        ctx.status, exchange.first_byte_at, exchange.complete, exchange.usage = recorded

    def _failed(self, ctx: RequestContext, exc: Exception) -> None:
        """Count and log a failure; fail the request (500) only under `fail: closed` where the plugin
        enforces. In shadow mode, and for the tenants a canary only shadows, the plugin must change
        nothing, its failure included: it fails open there whatever `fail` says."""
        self.failures += 1
        self._count("failed")
        closed = self.plugin.config.fail == "closed" and self.mode_of(ctx) == "enforce"
        log.warning("plugin %s failed on request %s (%s); %s", self.plugin.name, ctx.request_id,
                    type(exc).__name__, "failing it" if closed else "going on without it")
        if closed:
            raise InternalProxyError(f"plugin {self.plugin.name} failed") from None
