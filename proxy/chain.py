"""The chain: Step, the fixed STEP_ORDER, and build_chain().

A step is an aiohttp middleware over forwarded requests only (the proxy's own routes pass straight
through). Code before `await handler(request)` is its request phase, code after it and in `finally` its
response phase, which runs once the last byte is out; whatever a step holds is released in `finally`,
so a client that disconnects (handler cancellation) frees it.

Every step has a mode: `enforce` raises its ProxyError; `shadow` records what it would have done (span
attribute, `<prefix>.<step>.decisions{decision=...}`, an `X-Shadow-Decision` response header) and lets the
request through; `off` skips the step (a step that sets `runs_when_off`, the balancer, still runs and
applies no policy of its own). One INTERNAL span per step covers its own work and is ended
before the step delegates. Every step records its span, with a decision, on every forwarded request it
sees, also when it has nothing to do (`unlimited`, `not_applicable`, ...: see `Step.record`), so a trace
always shows the whole chain. Names come from `telemetry.names` (proxy/telemetry/semconv.py), never
spelled here or in a step.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, ClassVar

from aiohttp import web
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode

from .context import CONTEXT, RequestContext
from .errors import ProxyError
from .schema import RolloutConfig
from .telemetry import semconv
from .telemetry.setup import Telemetry
from .telemetry.tracing import FastSpan

__all__ = ["FORWARD_ROUTE", "STEP_ORDER", "Canary", "Handler", "Step", "build_chain"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
STEP_ORDER = ("limits", "quotas", "backpressure", "health", "balancer")
FORWARD_ROUTE = "forward"
"""Name of the catch-all route the forwarder serves; steps act on it only."""


class Step:
    """Base of every chain step. Subclasses set `name` and implement `handle(request, ctx, handler)`."""

    name: ClassVar[str] = ""
    runs_when_off: ClassVar[bool] = False
    """True for a step the request cannot do without (the balancer): `off` changes its policy only."""

    def __init__(self, mode: str, telemetry: Telemetry, rollout: RolloutConfig | None = None) -> None:
        self.mode = mode
        self.telemetry = telemetry
        self.canary = Canary.of(mode, rollout)
        """None: the mode is the same for every request (no rollout, or not in enforce mode)."""
        # Counted in a plain dict and reported by callback: an SDK counter add costs ~10 us, and every
        # request meets five steps.
        self.decision_counts: Counter[str] = Counter()
        names = telemetry.names
        self._span_name = names.step_span(self.name)
        self._mode_attribute = names.step_mode
        self._decision_attribute = names.step_decision(self.name)
        telemetry.meter.create_observable_counter(
            telemetry.names.metric_step_decisions(self.name),
            callbacks=[self._observe_decisions], unit="{decision}",
            description=f"Decisions of the {self.name} step, by decision.")

    def reconfigure(self, config: Any) -> None:
        """A reload: the step's new section (its `mode`, `rollout` and own keys). Synchronous, like
        every part of a reload, so that no request sees half of one. Each step extends this to take its
        own keys (it reads them from `self.config` per request)."""
        self.mode = config.mode
        self.canary = Canary.of(config.mode, config.rollout)

    def _observe_decisions(self, options: CallbackOptions) -> Iterable[Observation]:
        del options
        for decision, count in list(self.decision_counts.items()):
            yield Observation(count, {"decision": decision})

    @web.middleware
    def middleware(self, request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
        """The aiohttp middleware: skip what is not forwarded, and steps that are off. Not a coroutine:
        it hands aiohttp the coroutine to await (the step's, or the next handler's), so the request's
        await chain, walked at every resumption, has one frame per step instead of two."""
        if (self.mode == "off" and not self.runs_when_off) or request.match_info.route.name != FORWARD_ROUTE:
            return handler(request)
        return self.handle(request, request[CONTEXT], handler)

    async def handle(self, request: web.Request, ctx: RequestContext,
                     handler: Handler) -> web.StreamResponse:
        raise NotImplementedError

    def mode_of(self, ctx: RequestContext) -> str:
        """The step's mode for this request: its configured mode, except that an `enforce` step under a
        `rollout` runs in shadow for the tenants outside the canary."""
        if self.canary is None:
            return self.mode
        return "enforce" if self.canary.enforces(ctx.tenant.name) else "shadow"

    def span(self, **attributes: Any) -> _StepSpan:
        """The step's own INTERNAL span, as a context manager; end it (leave the block) before
        delegating. A ProxyError leaving the block marks the span with its code."""
        if not self.telemetry.recording:
            return _NO_SPAN
        parent = trace.get_current_span()
        if not parent.is_recording():
            # Nothing would record it (no exporter, or a trace not sampled): five steps per request
            # skip the tracer and build no attributes.
            return _NO_SPAN
        fields = {self._mode_attribute: self.mode, **attributes}
        if type(parent) is FastSpan:  # the request's span: the tracer need not look it up again
            return _StepSpan(self.telemetry.tracer.child(parent, self._span_name, fields))
        return _StepSpan(self.telemetry.tracer.start_span(
            self._span_name, kind=SpanKind.INTERNAL, attributes=fields))

    def record(self, ctx: RequestContext, decision: str, **attributes: Any) -> None:
        """A span holding only `decision`, for a request the step lets through untouched (a tenant
        without limits, a route without a prompt or model): the trace still shows this step."""
        with self.span(**attributes) as span:
            self.decide(ctx, span, decision)

    def decide(self, ctx: RequestContext, span: Span, decision: str,
               error: ProxyError | None = None, mode: str | None = None) -> None:
        """Record a decision; with an error, reject (enforce) or only report it (shadow). `mode`: the
        mode the request was taken in when that was before an await (a request queued in enforce
        mode is refused when its wait ends, whatever a reload made of the step meanwhile); None: the
        step's mode for the request now."""
        mode = self.mode_of(ctx) if mode is None else mode
        if error is not None and mode == "shadow":
            decision = f"shadow_{error.code}"
            ctx.response_headers.add("X-Shadow-Decision", f"{self.name}={error.code}")
        span.set_attribute(self._decision_attribute, decision)
        if self.canary is not None:
            span.set_attribute(self._mode_attribute, mode)  # the request's own, under a rollout
        self.decision_counts[decision] += 1
        if error is not None and mode == "enforce":
            error.step = self.name
            raise error


class _StepSpan:
    """`Step.span`'s context manager: a class, not a generator, because five steps enter one per
    request (a generator-based context manager costs several times more)."""

    __slots__ = ("span",)

    def __init__(self, span: Span) -> None:
        self.span = span

    def __enter__(self) -> Span:
        return self.span

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: object) -> None:
        if isinstance(error, ProxyError):
            self.span.set_attribute(semconv.ATTR_ERROR_TYPE, error.code)
            self.span.set_status(Status(StatusCode.ERROR, error.code))
        self.span.end()


_NO_SPAN = _StepSpan(INVALID_SPAN)


class Canary:
    """Who a rolled-out step enforces for: the listed tenants, and the tenants whose stable hash falls
    within `enforce_share` (the same tenants on every proxy replica and after every restart, so a
    tenant's experience does not flip between requests)."""

    def __init__(self, rollout: RolloutConfig) -> None:
        self.share = rollout.enforce_share
        self.tenants = frozenset(rollout.tenants)
        self._decided: dict[str, bool] = {}

    @classmethod
    def of(cls, mode: str, rollout: RolloutConfig | None) -> Canary | None:
        """The canary for a step in `mode`, or None when every request gets the same mode (not in
        enforce mode, or a rollout that enforces for everybody: no cost per request then)."""
        if mode != "enforce" or rollout is None or rollout.enforce_share >= 1.0:
            return None
        return cls(rollout)

    def enforces(self, tenant: str) -> bool:
        decided = self._decided.get(tenant)
        if decided is None:
            digest = hashlib.blake2b(tenant.encode(), digest_size=8).digest()
            bucket = int.from_bytes(digest, "big") / 2**64
            decided = tenant in self.tenants or bucket < self.share
            # Tenant names come from the configuration (plus `anonymous` and `admin`): bounded.
            self._decided[tenant] = decided
        return decided


def build_chain(steps: dict[str, Step], plugins: Any = None
                ) -> list[Callable[..., Awaitable[web.StreamResponse]]]:
    """The middlewares of `steps` in STEP_ORDER (steps not built yet are simply absent), with the
    middleware of each plugin slot (proxy/plugin_chain.PluginChain, which runs the slot's plugins in
    configuration order) at its place: `before_limits` ahead of limits, `before_backpressure` between
    quotas and backpressure. The slots are there even with no plugin, so a reload can add one."""
    unknown = set(steps) - set(STEP_ORDER)
    if unknown:
        raise ValueError(f"unknown steps: {', '.join(sorted(unknown))}")
    at = {"limits": "before_limits", "backpressure": "before_backpressure"}
    chain: list[Callable[..., Awaitable[web.StreamResponse]]] = []
    for name in STEP_ORDER:
        slot = at.get(name)
        if slot is not None and plugins is not None:
            chain.append(plugins.middleware(slot))
        if name in steps:
            chain.append(steps[name].middleware)
    return chain
