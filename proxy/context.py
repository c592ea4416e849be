"""RequestContext: everything the chain learns about one request, stored once under `CONTEXT`.

Steps read and write it; ingress creates it and turns it into the access log line, span status and
metrics. It never holds a prompt for logging: `body` is the raw request body, used only for forwarding and
parsing values such as `model`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import attrs
from aiohttp import web
from multidict import CIMultiDict
from opentelemetry.trace import Span

from . import gojson
from .access import ANONYMOUS, Identity, Tenant
from .ollama import RouteInfo, Usage
from .upstreams import Attempt, Upstream

if TYPE_CHECKING:
    from .plugin import ResponseObserver

DEADLINE_REQUEST_HEADER = "X-Deadline-S"
"""A client may lower its request's deadline with this header (seconds)."""
_DEADLINE_VALUE = re.compile(r"[ \t]*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)[ \t]*")
"""The X-Deadline-S grammar: a plain decimal number of seconds (ASCII digits, an optional fraction),
optionally surrounded by HTTP's OWS (spaces, tabs). Not Python's float(): it also reads `1_0` as 10,
`1e1`, `nan`, `inf` and non-ASCII digits, none of which a client of an HTTP API means as a number."""

__all__ = ["CONTEXT", "DEADLINE_REQUEST_HEADER", "Admission", "Candidates", "Exchange", "PromptFacts",
           "RequestContext", "Routing",
           "SlotHolder", "plain_number"]


class SlotHolder(Protocol):
    """A slot a step reserved on a replica (backpressure); the balancer moves it when it retries."""

    def move(self, upstream: Upstream) -> None: ...

    def retry_after_s(self) -> float:
        """When to come back, from the measured drain rate of the queue the slot came from."""
        ...


@attrs.define
class PromptFacts:
    """What the `limits` step learnt about the prompt. Writer: limits."""

    tokens: int | None = None
    """The prompt's token count as limits counted it (None: not counted)."""
    context_tokens: int | None = None
    """The context the request will run with upstream, when known (its num_ctx, or the loaded one)."""


@attrs.define
class Admission:
    """The slot `backpressure` holds for the request. Writer: backpressure (the balancer may ask the slot
    to move with a retry, through `slot.move`)."""

    replica: Upstream | None = None
    """The replica the slot was granted on (late binding); the balancer starts from it."""
    slot: SlotHolder | None = None
    ranking: Any = None
    """The placement's ranking of the replicas when the slot was granted (reused for the balancer's span)."""


@attrs.define
class Candidates:
    """Which replicas may serve the request. Writer: health."""

    replicas: list[Upstream] | None = None
    """As health found them (None: health did not run)."""
    dropped: dict[str, str] = attrs.field(factory=dict)
    """Replica name -> why it may not serve the request (ejected, not_allowed, model_absent, ...)."""


@attrs.define
class Routing:
    """Where the request goes. Writer: the balancer."""

    upstream: Upstream | None = None
    """The replica chosen (None: the forwarder takes the next serving one, round robin)."""
    attempt: Attempt | None = None
    """The request in flight on `upstream` (the forwarder marks its progress)."""
    retry_statuses: frozenset[int] = frozenset()
    """Upstream statuses the balancer would rather retry elsewhere than relay (set per attempt)."""
    fan_out: bool = False
    """Sent to every replica (fleet routes), not to one."""


@attrs.define
class Exchange:
    """The upstream call as it happened. Writer: the forwarder."""

    upstream_name: str | None = None
    status: int = 0
    """The status of the replica's answer being relayed (0: none relayed)."""
    first_byte_at: float | None = None
    bytes_out: int = 0
    usage: Usage | None = None
    """Token counts and timings the upstream reported (read from the response's own bytes)."""
    records_out: int = 0
    """NDJSON lines or SSE `data:` lines relayed. While Ollama streams, each carries about one output
    token: what a response cut short before its final counts is charged for (on top of its prompt)."""
    complete: bool = False
    """The replica's response ended (its last byte read), as opposed to cut short by the client
    leaving, a timeout or a lost connection."""
    sent: bool = False
    """This attempt's request reached a replica (its head was written): the replica may be working."""
    relayed: bool = False
    """The response going out is a replica's, relayed (its CORS headers are the replica's)."""
    abandoned: bool = False
    """Given up after the request reached a replica and before the first byte came back (the client
    left, or the request's deadline passed): the replica worked (prompt evaluation, at least) for
    nobody, and the prompt is charged."""

    def mark_sent(self) -> None:
        self.sent = True


_GENERATING = frozenset({"chat", "text_completion"})
"""Operations whose response records are output tokens (not embeddings, not pull progress)."""

_UNREAD = object()
"""No body looked at yet (None is a body's possible parse)."""


@attrs.define
class RequestContext:
    """Per-request state shared by ingress, the plugins, the steps and the forwarder.

    One writer per part: ingress writes the request's identity, body, deadline, status and outcome; each
    step writes its own sub-object (`prompt`: limits, `admission`: backpressure, `health`: health,
    `routing`: balancer) and the forwarder writes `exchange`. Everyone may read everything.
    """

    request_id: str
    route: RouteInfo
    path_model: str | None = None
    """The model the request's path names (`GET /v1/models/{model}`), None on other routes: the
    `model` of a request whose body names none. Writer: ingress."""
    started: float = attrs.field(factory=time.monotonic)
    body: bytes | None = None
    """The request body once read (None for bodiless requests and streamed blob uploads)."""
    outcome: str = "ok"
    """`ok`, a ProxyError code, `client_disconnect`, or `upstream_error` for a mid-stream failure."""
    status: int = 0
    root_span: Span | None = None
    identity: Identity | None = None
    """Who is calling (set by ingress); None only before authentication."""
    deadline_s: float | None = None
    deadline_at: float | None = None
    """Monotonic time after which the request is abandoned (504 or a final error line), `deadline_s`
    after it started. Writer: ingress (`set_deadline`), from the tenant's deadline, lowered (never
    raised) by the client's X-Deadline-S, whatever the steps' modes."""
    response_headers: CIMultiDict[str] = attrs.field(factory=CIMultiDict)
    """Headers every step wants on the response (added when it is prepared, errors included)."""
    service_limits: dict[str, Any] = attrs.field(factory=dict)
    """The limits that applied, rendered as the versioned `X-Service-Limits` header."""
    prompt: PromptFacts = attrs.field(factory=PromptFacts)
    admission: Admission = attrs.field(factory=Admission)
    health: Candidates = attrs.field(factory=Candidates)
    routing: Routing = attrs.field(factory=Routing)
    exchange: Exchange = attrs.field(factory=Exchange)
    header_hooks: list[Callable[[RequestContext, bytes], None]] = attrs.field(factory=list)
    """Called with this context and the first body chunk just before the response headers go out (the
    forwarder holds them until then): a step may still add a header from what the answer says. The
    context is passed, not captured: a closure over it, stored on it, is a reference cycle, and made
    every request's objects garbage that only the collector could free (issue 16)."""
    observers: list[ResponseObserver] = attrs.field(factory=list)
    """Plugins' response observers (proxy/plugin.py): the forwarder feeds them every relayed chunk."""
    prepared: web.StreamResponse | None = None
    """The response whose head has gone (or is going) to the client, once one is prepared: nothing
    else may be sent for this request. Writer: ingress's on_response_prepare hook."""
    _json: Any = attrs.field(default=None, alias="_json")
    _json_parsed: bool = attrs.field(default=False, alias="_json_parsed")
    _json_error: str | None = attrs.field(default=None, alias="_json_error")
    _model_of: Any = attrs.field(default=_UNREAD, alias="_model_of")
    _model: str | None = attrs.field(default=None, alias="_model")

    def served_tokens(self) -> int:
        """Tokens the request was served, what quotas and the fair queue settle by: 0 when nothing came
        back (refused, failed, or the client left before its request reached a replica) or the replica
        answered an error status without counts (it refused or failed), except the
        prompt when the client left, or its deadline passed, after it did (`Exchange.abandoned`:
        otherwise leaving, or a deadline lowered with X-Deadline-S, just before the first byte, again
        and again, would have the fleet evaluate prompts for free and keep the tenant first in the fair
        queue); Ollama's counts from a response that ended; else (cut short,
        or no counts) the prompt plus, on routes that generate, one token per record relayed, and never
        less than counts already seen (a client that leaves just before the final line pays for its
        output all the same; /v1/messages reports its input before the first token)."""
        exchange = self.exchange
        if exchange.first_byte_at is None:
            return (self.prompt.tokens or 0) if exchange.abandoned else 0
        usage = exchange.usage
        counted = None
        if usage is not None and (usage.input_tokens is not None or usage.output_tokens is not None):
            counted = (usage.input_tokens or 0) + (usage.output_tokens or 0)
            if exchange.complete:
                return counted
        if counted is None and exchange.status >= 400:
            # The replica's own refusal or failure (503 server busy, a runner's 500, a 400): an error
            # body, not output, and nothing to charge, as for a replica that could not be reached.
            return 0
        generated = exchange.records_out if self.route.operation in _GENERATING else 0
        return max(counted or 0, (self.prompt.tokens or 0) + generated)

    @property
    def tenant(self) -> Tenant:
        """The caller's tenant (anonymous before or without authentication)."""
        return self.identity.tenant if self.identity is not None else ANONYMOUS

    def replace_json(self, value: Any) -> None:
        """Replace the body with `value` re-encoded (a step rewrote the request) so that Go reads the
        same values: numbers Python cannot hold keep their original text (proxy/gojson.py). Raises
        gojson.RewriteTooLarge, an InvalidRequest (400 `invalid_request`, rendered by ingress like any
        step's refusal), for a value nested deeper than orjson writes that is too large to write."""
        self.body = gojson.dumps(value)
        self._json = value
        self._json_parsed = True
        self._json_error = None
        self._model_of = _UNREAD  # `value` may be the parsed body, edited in place

    def set_deadline(self, default_s: float, asked: str | None) -> None:
        """The request's deadline: the tenant's (else `default_s`), lowered by a client's `X-Deadline-S`
        value `asked` when it is a positive number below it (`_DEADLINE_VALUE`; any other value is
        ignored)."""
        deadline = self.tenant.deadline_s or default_s
        if asked is not None and (match := _DEADLINE_VALUE.fullmatch(asked)) is not None:
            value = float(match[1])
            if 0 < value < deadline:  # a client may lower its deadline, never raise it
                deadline = value
        self.deadline_s = deadline
        self.deadline_at = self.started + deadline

    def restore_body(self, body: bytes | None, parsed: Any = _UNREAD) -> None:
        """Put back a body and its parsed view as they were (a plugin's rewrite undone). Without
        `parsed`, the view is read again from `body` when next asked for: the view a plugin was handed
        may have been edited in place (replace_json allows it), and then only the bytes are still what
        the client sent."""
        self.body = body
        if parsed is _UNREAD:
            self._json = None
            self._json_parsed = False
        else:
            self._json = parsed
            self._json_parsed = True
        self._json_error = None
        self._model_of = _UNREAD

    @property
    def internal(self) -> bool:
        """A plugin's own sub-request (set through the identity ingress resolved)."""
        return self.identity is not None and self.identity.internal

    def service_limits_header(self) -> str:
        """`v=1; key=value; ...` for X-Service-Limits. Cached by content: the limits come from the
        configuration and a handful of contexts, so most responses repeat one of a few headers."""
        key = tuple(self.service_limits.items())
        header = _LIMITS_HEADERS.get(key)
        if header is None:
            header = "; ".join(["v=1", *(f"{k}={plain_number(v)}" for k, v in key)])
            if len(_LIMITS_HEADERS) >= 1024:
                _LIMITS_HEADERS.clear()  # bounded, whatever mix of limits comes by
            _LIMITS_HEADERS[key] = header
        return header

    def json(self) -> Any:
        """The body as Ollama reads it (cached): Go's encoding/json semantics (proxy/gojson.py), with
        the request struct's fields under their canonical names whatever case the client used. None if
        the body is absent or Go would refuse it (then `body_error` says why)."""
        if not self._json_parsed:
            self._json_parsed = True
            if self.body:
                try:
                    value, slow = gojson.loads(self.body)
                    # OpenAI's and Anthropic's messages (and Anthropic's tools) are plain structs to
                    # Ollama (gojson.REUSED_ELEMENTS).
                    reused = gojson.REUSED_ELEMENTS.get(self.route.dialect, frozenset())
                    view = gojson.request_view(value, self.body, slow, reused)
                    if slow:
                        gojson.check_numbers(view, self.route.go_struct,
                                             native=self.route.dialect == "ollama")
                    self._json = view
                except gojson.GoJSONError as exc:
                    self._json = None
                    self._json_error = str(exc)
        return self._json

    @property
    def json_ready(self) -> bool:
        """Is the body's view parsed already (json() returns it at once)?"""
        return self._json_parsed

    @property
    def body_error(self) -> str | None:
        """Go's error text when the body is present but Ollama's decoder would refuse it, else None."""
        self.json()
        return self._json_error

    @property
    def model(self) -> str | None:
        """The `model` the client asked for, if the body (else the path, `path_model`) names one."""
        value = self.json()
        # Read ~10 times a request: kept per parsed body, forgotten by every rewrite (replace_json,
        # restore_body), also one that hands the same object back edited in place.
        if value is self._model_of:
            return self._model
        model = None
        if isinstance(value, dict):
            named = value.get("model") or value.get("name")
            if isinstance(named, str):
                model = named
        if model is None:
            model = self.path_model
        self._model_of = value
        self._model = model
        return model

    @property
    def streaming(self) -> bool:
        """Whether the client asked for a stream (the route's default when the body does not say)."""
        value = self.json()
        if isinstance(value, dict) and isinstance(value.get("stream"), bool):
            return bool(value["stream"])
        return self.route.stream_default


_LIMITS_HEADERS: dict[tuple[tuple[str, Any], ...], str] = {}


def plain_number(value: Any) -> str:
    """`600.0` -> `600`, `0.3` -> `0.3`: numbers as people write them in headers."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


CONTEXT: web.RequestKey[RequestContext] = web.RequestKey("sop_context", RequestContext)
