"""The live event stream: `EventBus` (held by Telemetry as `telemetry.events`), which ingress, the fleet's
health service and the balancer publish to, and `GET /system/events`, which streams it to operators as
server-sent events (aiohttp-sse): `curl -N -H "Authorization: Bearer $ADMIN_KEY" $SOP/system/events`.

Publishing never awaits and costs one check of an empty list while nobody subscribes. Each subscriber has
a bounded buffer: a reader that does not keep up loses its oldest events (counted, and told with a
`dropped` event once it reads again), it never slows the proxy. Events are JSON, never carry a key, a body
or a prompt, and every value that may come from a client is bounded and escaped (proxy/escaping.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import orjson
from aiohttp import web
from aiohttp_sse import EventSourceResponse
from opentelemetry.metrics import CallbackOptions, Meter, Observation

from .access import TenantDirectory
from .context import CONTEXT
from .errors import (
    InternalProxyError,
    InvalidRequest,
    MalformedBody,
    NoHealthyUpstream,
    OutOfDescriptors,
    Overload,
    PromptTooLong,
    ProxyError,
    QueueTimeout,
    QuotaExceeded,
    RateLimited,
    RequestExceedsQuota,
    StateUnavailable,
    TooManySubscribers,
    UpstreamBusy,
    UpstreamConnectFailure,
    UpstreamResetBeforeResponseStarted,
    UpstreamResponseTimeout,
)
from .escaping import escape
from .serving import STOP
from .telemetry import semconv
from .upstreams import OTHER_MODEL, UpstreamSet

__all__ = [
    "BUFFER_EVENTS",
    "EVENTS_PATH",
    "HEARTBEAT_S",
    "KINDS",
    "MAX_SUBSCRIBERS",
    "QUEUE_SAMPLE_S",
    "Event",
    "EventBus",
    "Subscription",
    "TooManySubscribers",
    "add_events_route",
    "parse_kinds",
]

log = logging.getLogger("proxy.events")

EVENTS_PATH = "/system/events"
KINDS = ("rejection", "health", "ejection", "restart", "model_load", "reload", "queue")
"""What a subscriber may ask for with `?kinds=`. Two control events are sent whatever it asked:
`dropped` (events it lost) and `shutdown` (the stream ends after it: `reason` `shutting_down`, the proxy
is stopping, or `key_revoked`, a reload took away the admin access of the key that opened it)."""
MAX_SUBSCRIBERS = 64
"""Streams open at once per proxy process; past it, 503 `too_many_subscribers`."""
BUFFER_EVENTS = 256
"""Events held per subscriber while its reader is behind; past it the oldest are dropped."""
HEARTBEAT_S = 15.0
"""A `: ping` comment this often keeps idle streams open through proxies and load balancers."""
QUEUE_SAMPLE_S = 1.0
"""Queue depth is sampled this often, only while a subscriber wants `queue` events."""
SEND_TIMEOUT_S = 30.0
"""A reader that takes nothing for this long (its connection is stalled) is disconnected."""
SEND_BUFFER_BYTES = 32 * 1024
"""The kernel's send buffer for a stream's connection (Linux doubles it). Left to autotuning, a reader
that stopped reading would have megabytes of stale events queued in the kernel, per subscriber, before
its own bounded buffer even started to drop; the connection is closed after the stream."""
_STOP_POLL_S = 0.5
"""How often an idle stream looks whether the proxy is stopping (it then ends at once, with `shutdown`)."""
_TEXT_LIMIT = 200
_MAX_CHANGED_KEYS = 100

_STEP_OF_ERROR: dict[type[ProxyError], str] = {
    MalformedBody: "ingress", PromptTooLong: "limits", InvalidRequest: "limits",
    RateLimited: "quotas", QuotaExceeded: "quotas", RequestExceedsQuota: "quotas",
    StateUnavailable: "quotas", UpstreamBusy: "forwarder", OutOfDescriptors: "forwarder",
    Overload: "backpressure",
    QueueTimeout: "backpressure", NoHealthyUpstream: "health", UpstreamConnectFailure: "forwarder",
    UpstreamResetBeforeResponseStarted: "forwarder", UpstreamResponseTimeout: "forwarder",
    InternalProxyError: "internal",
}
"""Which step refuses with each error (the nearest class in the error's MRO). The rest (unauthorized,
forbidden, payload or head too large, request timeout, shutting down) are ingress's, as is anything
refused before the caller was identified. Used only for errors no step's `decide` raised (a step that
refuses names itself on the error)."""


def _text(value: object, limit: int = _TEXT_LIMIT) -> str:
    """`value` as a bounded, printable string: anything else escaped (`\\xNN`), cut at `limit`."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit and text.isprintable():
        return text
    return escape(text, limit, str.isprintable)


def step_of(error: ProxyError, identified: bool) -> str:
    """The step that refused with `error` (see _STEP_OF_ERROR); `ingress` before identification."""
    if not identified:
        return "ingress"
    if error.step is not None:
        return error.step
    for cls in type(error).__mro__:
        step = _STEP_OF_ERROR.get(cls)
        if step is not None:
            return step
    return "ingress"


@attrs.frozen
class Event:
    """One published event: its sequence number (the SSE `id`), kind (the SSE `event`) and JSON data."""

    seq: int
    kind: str
    data: str


class Subscription:
    """One reader's bounded buffer. Written by `EventBus.publish` (never blocks), read by its stream."""

    def __init__(self, kinds: frozenset[str] | None, capacity: int = BUFFER_EVENTS) -> None:
        self.kinds = kinds
        """The kinds it asked for (None: all)."""
        self.buffer: deque[Event] = deque()
        self.capacity = capacity
        self.lost = 0
        """Events dropped since it was last told."""
        self.lost_total = 0
        self.wake = asyncio.Event()
        self.recheck = False
        """The keys changed (`EventBus.access_changed`): the stream checks its key before it sends
        anything more."""

    def wants(self, kind: str) -> bool:
        return self.kinds is None or kind in self.kinds

    def push(self, event: Event) -> Event | None:
        """Buffer `event`; returns the oldest event, dropped to make room, if the buffer was full."""
        dropped = None
        if len(self.buffer) >= self.capacity:
            dropped = self.buffer.popleft()
            self.lost += 1
            self.lost_total += 1
        self.buffer.append(event)
        self.wake.set()
        return dropped

    def take(self) -> tuple[int, list[Event]]:
        """Everything buffered, and how many events were dropped before it (both reset)."""
        self.wake.clear()
        lost, self.lost = self.lost, 0
        events = list(self.buffer)
        self.buffer.clear()
        return lost, events


class EventBus:
    """Publish/subscribe for the proxy's own events. Call it on the event loop's thread (publishers
    are: ingress, the fleet's health service, the balancer, the reload code). `publish` is O(number of
    subscribers), never awaits, and returns at once when there is none; the typed helpers below it
    (`rejection`, `health`, ...) are the documented signatures of each kind."""

    def __init__(self, meter: Meter, names: semconv.Names) -> None:
        self._subscribers: list[Subscription] = []
        self._seq = 0
        self.published: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.label: Callable[[str | None], str] = lambda model: OTHER_MODEL if model else ""
        """Model name -> bounded label (the fleet's `UpstreamSet.label`, bound by add_events_route)."""
        self.queue_sample: Callable[[], dict[str, Any]] | None = None
        """Returns `{"depth": {model: {lane: n}}, "in_flight": {model: n}}` (bound by add_events_route)."""
        self._sampler: asyncio.Task[None] | None = None
        # Counted in plain Counters, observed at collection time (as the steps' decisions are).
        meter.create_observable_counter(
            names.metric_events_published, callbacks=[self._observe_published], unit="{event}",
            description="Events put on /system/events while someone subscribed, by kind.")
        meter.create_observable_counter(
            names.metric_events_dropped, callbacks=[self._observe_dropped], unit="{event}",
            description="Events a slow /system/events reader lost (its buffer was full), by kind.")

    @property
    def active(self) -> bool:
        """Someone subscribes: a publisher may skip building an event's fields when not."""
        return bool(self._subscribers)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    # publishing --------------------------------------------------------------------------------------
    def publish(self, kind: str, /, **fields: Any) -> None:
        """Put one event of `kind` (one of KINDS) with JSON-serialisable `fields` in the buffer of every
        subscriber that wants it. The fields must already be bounded and free of client text (the
        helpers below see to it); `kind` and `ts` (Unix time, seconds) are added."""
        subscribers = self._subscribers
        if not subscribers:
            return
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        event: Event | None = None
        for subscription in subscribers:
            if not subscription.wants(kind):
                continue
            if event is None:
                self._seq += 1
                data = orjson.dumps({"kind": kind, "ts": round(time.time(), 3), **fields}).decode()
                event = Event(self._seq, kind, data)
                self.published[kind] += 1
            dropped = subscription.push(event)
            if dropped is not None:
                self.dropped[dropped.kind] += 1

    def rejection(self, error: ProxyError, model: str | None, tenant: str, route: str | None,
                  identified: bool = True) -> None:
        """A request the proxy refused itself (rendered before the response started): its status, code
        (the reason), the step that refused, the model's label (`other` for a name the fleet does not
        know), the tenant's configured name (never a key) and the route template. `identified`: the
        caller was authenticated (false: ingress refused before knowing who called)."""
        if not self._subscribers:
            return
        self.publish("rejection", status=error.status, code=error.code,
                     step=step_of(error, identified), model=_text(self.label(model)) or None,
                     tenant=_text(tenant), route=route,
                     retry_after_s=round(error.retry_after_s, 1) if error.retry_after_s is not None
                     else None)

    def health(self, replica: str, before: str, after: str, reason: str) -> None:
        """A replica's health status changed from `before` to `after` (unknown, healthy, ejected,
        stuck, down, restarting, warming), and why (the last failure; empty when it recovered)."""
        if self._subscribers:
            self.publish("health", replica=_text(replica), before=before, after=after,
                         reason=_text(reason) or None)

    def ejection(self, replica: str, reason: str, backoff_s: float | None, ejections: int) -> None:
        """A replica was taken out of service: ejected for `backoff_s` (the `ejections`-th in a row), or
        found stuck (`backoff_s` None: it comes back when it makes progress or is restarted)."""
        if self._subscribers:
            self.publish("ejection", replica=_text(replica), reason=_text(reason),
                         backoff_s=round(backoff_s, 1) if backoff_s is not None else None,
                         ejections=ejections)

    def restart(self, replica: str, exit_code: int | None, outcome: str, duration_s: float) -> None:
        """A replica's `restart_command` ran: its exit code (None: it was killed at the timeout or could
        not start), `success` or `failure`, and how long it took."""
        if self._subscribers:
            self.publish("restart", replica=_text(replica), exit_code=exit_code, outcome=outcome,
                         duration_s=round(duration_s, 3))

    def model_load(self, replica: str, model: str, duration_s: float | None, source: str) -> None:
        """A model was loaded on `replica`: for a request (`source` `request`, the duration Ollama
        reported as load_duration) or by pre-warming (`warm`, the duration of the load request)."""
        if self._subscribers:
            self.publish("model_load", replica=_text(replica), model=_text(self.label(model)),
                         duration_s=round(duration_s, 3) if duration_s is not None else None,
                         source=source)

    def reload(self, version: int | str, ok: bool, changed: Iterable[str] = (),
               error: str | None = None) -> None:
        """A configuration reload (SIGHUP or a changed file): `version` is the configuration now serving
        (the new one when `ok`, the old one when refused), `changed` the key paths that changed
        (`chain.quotas.mode`, ...; at most 100 are listed), `error` why the new file was refused (the
        failing key's path and message)."""
        if not self._subscribers:
            return
        keys = [_text(key) for key in itertools.islice(changed, _MAX_CHANGED_KEYS)]
        self.publish("reload", version=version if isinstance(version, int) else _text(version),
                     outcome="ok" if ok else "refused", changed=keys,
                     error=_text(error, 1000) if error is not None else None)

    # subscribing -------------------------------------------------------------------------------------
    def subscribe(self, kinds: frozenset[str] | None = None) -> Subscription:
        """A new subscription to `kinds` (None: all); raises TooManySubscribers past MAX_SUBSCRIBERS.
        Pair with `unsubscribe`. Starts the queue sampler when it is the first to want `queue`."""
        if len(self._subscribers) >= MAX_SUBSCRIBERS:
            raise TooManySubscribers(f"{MAX_SUBSCRIBERS} event streams are open already; retry later",
                                     retry_after_s=5.0)
        subscription = Subscription(kinds)
        self._subscribers = [*self._subscribers, subscription]  # publish iterates a stable list
        if subscription.wants("queue") and self._sampler is None:
            self._sampler = asyncio.get_running_loop().create_task(self._sample_queues(),
                                                                   name="events-queue-sampler")
        return subscription

    def access_changed(self) -> None:
        """The keys may have changed (an applied reload): every open stream checks, before it sends
        anything more, that the key it was opened with still opens it, and ends with `shutdown`
        (`key_revoked`) if not. O(subscribers) once per reload; publishing is untouched."""
        for subscription in self._subscribers:
            subscription.recheck = True
            subscription.wake.set()

    def unsubscribe(self, subscription: Subscription) -> None:
        """Remove `subscription`; the queue sampler stops with the last subscriber that wanted it."""
        self._subscribers = [s for s in self._subscribers if s is not subscription]
        if self._sampler is not None and not any(s.wants("queue") for s in self._subscribers):
            self._sampler.cancel()
            self._sampler = None

    async def _sample_queues(self) -> None:
        """Publish the queue depth every QUEUE_SAMPLE_S while some queue holds or serves requests, and
        once more when they all emptied (so a reader sees the drain)."""
        busy = False
        while True:
            await asyncio.sleep(QUEUE_SAMPLE_S)
            sample = self.queue_sample
            if sample is None:
                continue
            try:
                values = sample()
            except Exception:  # a bug in sampling must not end the stream's other events
                log.exception("sampling the queue depth for /system/events failed")
                continue
            now_busy = bool(values.get("depth") or values.get("in_flight"))
            if now_busy or busy:
                self.publish("queue", **values)
            busy = now_busy

    def add_route(self, app: web.Application, upstreams: UpstreamSet, steps: Mapping[str, Any],
                  directory: TenantDirectory | None = None) -> None:
        """`add_events_route(app, self, upstreams, steps, directory)`: serve this bus on `app`."""
        add_events_route(app, self, upstreams, steps, directory)

    # metrics -----------------------------------------------------------------------------------------
    def _observe_published(self, options: CallbackOptions) -> Iterable[Observation]:
        del options
        for kind, count in list(self.published.items()):
            yield Observation(count, {"kind": kind})

    def _observe_dropped(self, options: CallbackOptions) -> Iterable[Observation]:
        del options
        for kind, count in list(self.dropped.items()):
            yield Observation(count, {"kind": kind})


def parse_kinds(values: list[str]) -> frozenset[str] | None:
    """The kinds asked for by `?kinds=a,b` (the parameter may repeat); None when absent (all kinds).
    Raises InvalidRequest (400) for an empty list or a kind not in KINDS (never echoing it)."""
    if not values:
        return None
    kinds = frozenset(part.strip() for value in values for part in value.split(","))
    if not kinds or "" in kinds or not kinds <= set(KINDS):
        raise InvalidRequest(f"kinds: expected a comma-separated list of {', '.join(KINDS)}")
    return kinds


def _queue_sampler(steps: Mapping[str, Any], upstreams: UpstreamSet) -> Callable[[], dict[str, Any]]:
    """Depth per model label and lane, and requests holding a slot per model label, from the
    backpressure step's snapshot (labels: names the fleet does not know share `other`)."""

    def sample() -> dict[str, Any]:
        step = steps.get("backpressure")
        snapshot = step.snapshot() if step is not None and hasattr(step, "snapshot") else {}
        depth: dict[str, dict[str, int]] = {}
        in_flight: Counter[str] = Counter()
        for model, view in snapshot.items():
            label = _text(upstreams.label(model))
            for lane, tenants in view.get("depth", {}).items():
                waiting = sum(tenants.values())
                if waiting:
                    lanes = depth.setdefault(label, {})
                    lanes[lane] = lanes.get(lane, 0) + waiting
            serving = sum(view.get("in_flight", {}).values())
            if serving:
                in_flight[label] += serving
        return {"depth": depth, "in_flight": dict(in_flight)}

    return sample


def add_events_route(app: web.Application, bus: EventBus, upstreams: UpstreamSet,
                     steps: Mapping[str, Any], directory: TenantDirectory | None = None) -> None:
    """Register `GET /system/events` on `app` (before the catch-all forwarder) and bind `bus` to this
    application's fleet (model labels, queue sampling). The route is admin-only as every `/system/*`
    route is (proxy/access.py); `directory` (the one ingress asks, which a reload reconfigures in place)
    is asked again after each `bus.access_changed()`, and a stream whose key it no longer lets in ends.
    A rebuilt application (reload) binds the same bus again: open streams carry on."""
    bus.label = upstreams.label
    bus.queue_sample = _queue_sampler(steps, upstreams)

    async def events(request: web.Request) -> web.StreamResponse:
        """The event stream: SSE `id` (a sequence number per process), `event` (the kind) and `data`
        (one JSON object); a `: ping` comment every HEARTBEAT_S; `?kinds=` filters."""
        subscription = bus.subscribe(parse_kinds(request.query.getall("kinds", [])))

        def still_allowed() -> bool:
            """Would ingress let this request in now? (The same check, on the same headers.)"""
            if directory is None:
                return True
            try:
                directory.identify(request.method, request.path, request.headers)
            except ProxyError:  # Unauthorized, Forbidden
                return False
            return True

        try:
            response = EventSourceResponse(ping_interval=HEARTBEAT_S, send_timeout=SEND_TIMEOUT_S,
                                           headers={"X-Accel-Buffering": "no"})
            _bound_send_buffer(request)
            response.force_close()  # the socket's buffer was changed for this stream: not reused
            await response.prepare(request)
            try:
                await _stream(request, response, subscription, still_allowed)
            finally:
                response.stop_streaming()
                await response.wait()
        finally:
            bus.unsubscribe(subscription)
        return response

    app.router.add_get(EVENTS_PATH, events, allow_head=False)


def _bound_send_buffer(request: web.Request) -> None:
    """Cap the kernel's send buffer of the stream's connection at SEND_BUFFER_BYTES (TCP only)."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)


async def _stream(request: web.Request, response: EventSourceResponse, subscription: Subscription,
                  still_allowed: Callable[[], bool]) -> None:
    """Write the subscription's events until the client leaves (the handler is cancelled), its
    connection stalls for SEND_TIMEOUT_S, the proxy stops, or (checked when the subscription is told
    to `recheck`, after a reload) its key no longer opens the stream: then one `shutdown` event, with
    `reason` `shutting_down` or `key_revoked`, ends the stream. The stream is registered with the stop
    sequence like a relay (proxy/serving.py), so that at the end of the grace period it is ended here,
    not cancelled into an error response."""
    stop = request.app.get(STOP)
    ctx = request.get(CONTEXT)
    key = ctx.request_id if ctx is not None else f"events-{id(request)}"
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        async with asyncio.timeout(None) as timer:
            if stop is not None:
                stop.relay(key, timer)
            reason = "shutting_down"
            try:
                while stop is None or not stop.stopping:
                    if subscription.recheck:
                        subscription.recheck = False
                        if not still_allowed():  # before anything buffered: none of it is its now
                            reason = "key_revoked"
                            break
                    if not subscription.buffer and not subscription.lost:
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(_STOP_POLL_S):
                                await subscription.wake.wait()
                        continue
                    lost, batch = subscription.take()
                    if lost:
                        await response.send(orjson.dumps({
                            "kind": "dropped", "dropped": lost,
                            "dropped_total": subscription.lost_total}).decode(), event="dropped")
                    for event in batch:
                        await response.send(event.data, id=str(event.seq), event=event.kind)
                await response.send(orjson.dumps({"kind": "shutdown", "reason": reason}).decode(),
                                    event="shutdown")
            finally:
                if stop is not None:
                    stop.relay_done(key)
