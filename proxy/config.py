"""Configuration: frozen attrs classes loaded from one YAML file, unknown keys and bad values refused with
the path of the key (`server.max_body_bytes: must be > 0`), then environment overrides.

Key names are the public interface documented in deploy/config.example.yaml: extend, never rename.
"""

from __future__ import annotations

import math
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import cattrs
import yaml
from cattrs.errors import IterableValidationError, IterableValidationNote
from cattrs.gen import make_dict_structure_fn
from yarl import URL

from .validation import format_validation_error

__all__ = [
    "AdminConfig",
    "AnonymousConfig",
    "BackpressureConfig",
    "BalancerConfig",
    "ChainConfig",
    "Config",
    "ConfigError",
    "ForwardingConfig",
    "HealthConfig",
    "LimitsConfig",
    "ModelConfig",
    "QuotasConfig",
    "ServerConfig",
    "StateConfig",
    "TelemetryConfig",
    "TenantConfig",
    "UpstreamConfig",
    "apply_environment",
    "load_config",
    "parse_listen",
    "structure",
]


class ConfigError(ValueError):
    """A configuration that cannot be served; the message names every offending key path."""


def _positive(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    del instance
    if value is not None and value <= 0:
        raise ValueError(f"{attribute.name}: must be > 0")


def _ratio(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    del instance
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name}: must be between 0 and 1")


def _non_empty(name: str, value: tuple[str, ...]) -> None:
    if not value:
        raise ValueError(f"{name}: at least one non-empty value is required")
    _valid_keys(name, value)


def _valid_keys(name: str, value: tuple[str, ...]) -> None:
    """API keys: non-empty, no surrounding or inner whitespace or control characters (a key with them
    could never be sent in a header as written), and no duplicates."""
    for index, key in enumerate(value):
        if not key.strip():
            raise ValueError(f"{name}[{index}]: an empty or whitespace key is not allowed")
        if key != key.strip() or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in key):
            raise ValueError(f"{name}[{index}]: a key may not contain whitespace or control characters")
    if len(set(value)) != len(value):
        raise ValueError(f"{name}: a key is listed twice")


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`) -> (host, port). Port 0 asks the system for a free port (the
    server reports the one it got: `--port-file` and its "listening on" log line)."""
    if value.startswith("["):
        host, _, port = value[1:].partition("]:")
    else:
        host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"listen: expected HOST:PORT, got {value!r}")
    return host, int(port)


def _listen(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    del instance, attribute
    parse_listen(value)


def _http_url(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    del instance
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{attribute.name}: expected an http(s) URL, got {value!r}")


def _redis_url(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    del instance
    url = URL(value)
    if url.scheme not in ("redis", "rediss", "unix") or not (url.host or url.path):
        raise ValueError(f"{attribute.name}: expected a redis://, rediss:// or unix:// URL")


@attrs.frozen
class ServerConfig:
    """The listening side."""

    listen: str = attrs.field(default="127.0.0.1:11435", validator=_listen)
    """Address the proxy listens on, HOST:PORT. Env: SOP_LISTEN."""
    max_body_bytes: int = attrs.field(default=32 * 1024 * 1024, validator=_positive)
    """Largest request body accepted (blob uploads excepted); larger ones get 413 before being read."""
    header_timeout_s: float = attrs.field(default=10.0, validator=_positive)
    """Time a client has to send a complete request head; slower connections are closed (slowloris)."""
    keepalive_timeout_s: float = attrs.field(default=75.0, validator=_positive)
    """Idle keep-alive connections are closed after this long."""
    backlog: int = attrs.field(default=2048, validator=_positive)
    """Listen backlog; the default 128 of asyncio collapses under connection storms."""
    shutdown_timeout_s: float = attrs.field(default=30.0, validator=_positive)
    """Grace period for in-flight requests on SIGTERM; streams still running then end with one final
    error line (`code: shutting_down`) and the process exits by this deadline."""
    max_header_bytes: int = attrs.field(default=64 * 1024, validator=_positive)
    """Largest request head (request line and all headers together); larger ones get 431 before
    authentication, like nginx's large_client_header_buffers and Envoy's max_request_headers_kb."""
    body_timeout_s: float = attrs.field(default=60.0, validator=_positive)
    """Longest silence while a request body is being received; then 408 and the connection is closed."""
    max_connections: int = attrs.field(default=8192, validator=_positive)
    """Open client connections served at once; beyond it new connections get an immediate 503 and are
    closed, rather than exhaust file descriptors (the proxy raises its own RLIMIT_NOFILE to fit)."""


@attrs.frozen
class UpstreamConfig:
    """One Ollama replica."""

    url: str = attrs.field(validator=_http_url)
    """Base URL of the replica, e.g. http://127.0.0.1:11434."""
    name: str = ""
    """Short name used in logs, spans, metrics and headers; defaults to host:port."""
    num_parallel: int = attrs.field(default=1, validator=_positive)
    """The replica's OLLAMA_NUM_PARALLEL (slots per loaded model)."""
    weight: int = attrs.field(default=1, validator=_positive)
    """Relative share of traffic."""
    restart_command: str | None = None
    """Command the health step runs to restart this replica once it is down or stuck, e.g.
    `systemctl restart ollama@{name}` or `docker restart {name}`; `{name}`, `{url}`, `{host}` and `{port}`
    are substituted per argument (no shell). Unset: no restarts."""


@attrs.frozen
class ForwardingConfig:
    """How the proxy talks to upstreams. No total timeout: generations may legitimately run for minutes."""

    connect_timeout_s: float = attrs.field(default=5.0, validator=_positive)
    """TCP connect to a replica."""
    first_byte_timeout_s: float = attrs.field(default=300.0, validator=_positive)
    """Request sent -> response headers. Long enough for a cold model load (Ollama's own load stall
    timeout is 5 minutes)."""
    idle_timeout_s: float = attrs.field(default=120.0, validator=_positive)
    """Longest silence between two body chunks of a response."""
    pool_size: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    """Upstream connections kept per proxy process; 0 = unlimited (admission is the chain's job)."""
    keepalive_s: float = attrs.field(default=30.0, validator=_positive)
    """How long an idle upstream connection stays in the pool."""


@attrs.frozen
class TelemetryConfig:
    """Traces and metrics. Standard OTEL_* environment variables override these."""

    service_name: str = "shared-ollama-proxy"
    """`service.name` resource attribute. Env: OTEL_SERVICE_NAME."""
    otlp_endpoint: str | None = None
    """OTLP collector or Jaeger endpoint; nothing is exported when unset. Env: OTEL_EXPORTER_OTLP_ENDPOINT."""
    otlp_protocol: Literal["grpc", "http/protobuf"] = "grpc"
    """OTLP transport. Env: OTEL_EXPORTER_OTLP_PROTOCOL."""
    sample_ratio: float = attrs.field(default=1.0, validator=_ratio)
    """Share of new traces sampled (parent-based: an incoming sampled traceparent is always kept)."""
    metric_prefix: str = "sop"
    """Prefix of the proxy's own metric names (`sop.queue.depth`, ...)."""
    export_interval_s: float = attrs.field(default=15.0, validator=_positive)
    """OTLP metric export interval."""
    access_log: bool = True
    """One line per request on the `proxy.access` logger (never bodies, prompts or keys)."""
    metrics_auth: bool | Literal["none", "admin"] = False
    """Who may scrape `/metrics`: false / `none` (anyone, the default, as Prometheus expects) or
    true / `admin` (an admin key, sent by Prometheus as `authorization: {credentials: ...}`)."""

    @property
    def metrics_need_admin(self) -> bool:
        return self.metrics_auth is True or self.metrics_auth == "admin"


Mode = Literal["enforce", "shadow", "off"]
PromptPolicy = Literal["reject", "truncate"]


@attrs.frozen
class AdminConfig:
    """Who may use /system/* and, always, the model-management routes."""

    keys: tuple[str, ...] = attrs.field(default=(), validator=lambda _i, _a, v: _valid_keys("keys", v))
    """Admin API keys (`Authorization: Bearer <key>` or `X-API-Key`). Never logged."""


@attrs.frozen
class TenantConfig:
    """A team sharing the fleet: its keys, lane and limits (null = unlimited)."""

    name: str
    keys: tuple[str, ...] = attrs.field(validator=lambda _i, _a, v: _non_empty("keys", v))
    """API keys that identify the tenant. Never logged."""
    lane: Literal["interactive", "bulk"] = "interactive"
    """Queue lane (used by backpressure): interactive is served ahead of bulk."""
    weight: float = attrs.field(default=1.0, validator=_positive)
    """Share of capacity relative to other tenants (weighted fair queuing)."""
    requests_per_minute: float | None = attrs.field(default=None, validator=_positive)
    tokens_per_minute: float | None = attrs.field(default=None, validator=_positive)
    """Prompt plus output tokens per minute (reserved before admission, settled after)."""
    max_concurrent: int | None = attrs.field(default=None, validator=_positive)
    """Requests in flight at once, across every proxy replica sharing the state backend."""
    deadline_s: float | None = attrs.field(default=None, validator=_positive)
    """Deadline of this tenant's requests (default chain.limits.deadline_s); a client may lower it."""
    max_prompt_tokens: int | None = attrs.field(default=None, validator=_positive)
    """Prompt limit for this tenant (the smallest of tenant, model and chain limits applies)."""
    allow_management: bool = False
    """May this tenant call pull, push, create, copy, delete and blobs?"""


@attrs.frozen
class AnonymousConfig:
    """Requests without a key: refused (`allow: false`, 401) or served under these limits."""

    allow: bool = True
    keys: tuple[str, ...] = attrs.field(default=("ollama",),
                                        validator=lambda _i, _a, v: _valid_keys("keys", v))
    """Placeholder keys that clients send because their SDK insists on one (the OpenAI SDK with
    `api_key="ollama"`): while `allow` is true they count as no key at all; otherwise they are refused
    like any unknown key. Never a tenant's or admin's key."""
    requests_per_minute: float | None = attrs.field(default=None, validator=_positive)
    tokens_per_minute: float | None = attrs.field(default=None, validator=_positive)
    max_concurrent: int | None = attrs.field(default=None, validator=_positive)
    deadline_s: float | None = attrs.field(default=None, validator=_positive)
    max_prompt_tokens: int | None = attrs.field(default=None, validator=_positive)


@attrs.frozen
class ModelConfig:
    """Per-model policy."""

    max_prompt_tokens: int | None = attrs.field(default=None, validator=_positive)
    prompt_policy: PromptPolicy | None = None
    """reject (400 prompt_too_long) or truncate (drop the oldest turns / the front of the prompt)."""
    tokenizer: str | None = None
    """Path of the model's SentencePiece `.model` file; else it is built from /api/show (verbose)."""
    options: dict[str, Any] = attrs.field(factory=dict)
    """Canonical load-time options (num_ctx, num_batch, num_gpu, ..., and keep_alive): requests are
    rewritten to these so that no tenant can make Ollama reload the model for everyone."""
    warm_on: tuple[str, ...] = ()
    """Replicas (by name, `"*"` for all) that keep this model loaded: it is loaded there when the proxy
    starts, and after a replica comes back it is loaded before the replica takes traffic again."""
    pinned: bool = False
    """Keep it loaded for good on its `warm_on` replicas (`keep_alive: -1`), re-loaded whenever a probe
    finds it gone."""
    replicas: tuple[str, ...] = ()
    """The only replicas allowed to serve this model (e.g. big models on dedicated boxes, the embedding
    model apart from the chat models); empty: any replica."""


@attrs.frozen
class LimitsConfig:
    """chain.limits: guardrails at the edge."""

    mode: Mode = "enforce"
    max_prompt_tokens: int = attrs.field(default=4096, validator=_positive)
    """Default prompt limit in tokens (Ollama's default context is 4096)."""
    prompt_policy: PromptPolicy = "reject"
    deadline_s: float = attrs.field(default=120.0, validator=_positive)
    """Default deadline of a request, first byte to last."""
    strip_load_options: bool = True
    """Remove load-time options (num_ctx, num_batch, ...) a model has no canonical value for."""
    truncation_tolerance_tokens: int = attrs.field(default=16, validator=attrs.validators.ge(0))
    """How far below our count Ollama's prompt_eval_count may be before we call it a silent truncation
    (chat templates differ a little between our count and the model's)."""


@attrs.frozen
class QuotasConfig:
    """chain.quotas: per-tenant rate, token and concurrency limits."""

    mode: Mode = "enforce"
    default_output_tokens: int = attrs.field(default=256, validator=_positive)
    """Output tokens reserved when a request does not set num_predict / max_tokens."""
    lease_ttl_s: float = attrs.field(default=30.0, validator=_positive)
    """A concurrency lease expires this long after its last renewal (a dead proxy's leases come back)."""


@attrs.frozen
class BackpressureConfig:
    """chain.backpressure: the bounded, fair queue in front of the replicas' slots."""

    mode: Mode = "enforce"
    max_queue_size: int = attrs.field(default=256, validator=_positive)
    """Requests that may wait per model; beyond it, 503 overload."""
    queue_timeout_s: float = attrs.field(default=30.0, validator=_positive)
    """Longest wait for a slot before 503 queue_timeout (the request's deadline may cut it shorter)."""
    max_in_flight: int | None = attrs.field(default=None, validator=_positive)
    """Requests per replica and model past this step; default the replica's num_parallel."""
    fair: bool = True
    """Weighted fair queuing by token cost with interactive/bulk lanes; false: one FIFO."""
    bulk_share: float = attrs.field(default=0.1, validator=_ratio)
    """Share of dispatches that go to the bulk lane while interactive requests also wait."""
    adaptive: bool = False
    """Adapt each (replica, model) limit to Ollama's time per output token (gradient limiter)."""
    adaptive_max_in_flight: int | None = attrs.field(default=None, validator=_positive)
    """Upper bound of the adaptive limit; default twice max_in_flight."""
    adaptive_tolerance: float = attrs.field(default=0.5, validator=_positive)
    """How far (as a fraction) time per token may rise above its no-load baseline before the limit
    shrinks."""


@attrs.frozen
class HealthConfig:
    """chain.health: which replicas may take traffic (active probes, passive ejection, restarts)."""

    mode: Mode = "enforce"
    """enforce: unhealthy replicas get no traffic; shadow: probe and report only; off: no probes."""
    probe_interval_s: float = attrs.field(default=5.0, validator=_positive)
    """Time between two probes of a replica (`GET /api/version`, then `GET /api/ps`), jittered."""
    probe_jitter: float = attrs.field(default=0.2, validator=_ratio)
    """Each interval is drawn from +/- this fraction, so replicas are not probed in lockstep."""
    probe_timeout_s: float = attrs.field(default=2.0, validator=_positive)
    """A probe that takes longer has failed."""
    eject_after_failures: int = attrs.field(default=3, validator=_positive)
    """Consecutive gateway failures (connect refused, reset, no response, 502/504, failed probe) that
    eject a replica."""
    base_ejection_s: float = attrs.field(default=10.0, validator=_positive)
    """First ejection time; it doubles with every ejection in a row (exponential backoff)."""
    max_ejection_s: float = attrs.field(default=300.0, validator=_positive)
    """Longest ejection time; a replica healthy this long has its backoff reset."""
    max_ejection_ratio: float = attrs.field(default=0.5, validator=_ratio)
    """Passive detection ejects at most this share of the replicas (at least one); failed probes always
    eject."""
    stuck_after_s: float = attrs.field(default=180.0, validator=_positive)
    """A replica whose in-flight requests have all received nothing for this long is stuck: it gets no new
    traffic (and is restarted when it has a restart_command)."""
    restart_after_failures: int = attrs.field(default=3, validator=_positive)
    """Failed probes in a row before the replica's restart_command runs."""
    restart_min_interval_s: float = attrs.field(default=300.0, validator=_positive)
    """At most one restart of a replica per this many seconds."""
    restart_timeout_s: float = attrs.field(default=120.0, validator=_positive)
    """A restart command still running after this long is killed."""
    warm_timeout_s: float = attrs.field(default=300.0, validator=_positive)
    """Longest wait for one model to load when pre-warming a replica."""


@attrs.frozen
class BalancerConfig:
    """chain.balancer: which healthy replica serves a request, and retries before the first byte."""

    mode: Mode = "enforce"
    """enforce: choose by residency, load and affinity; shadow: round robin, the choice is only reported;
    off: round robin."""
    affinity: Literal["none", "prefix", "session"] = "none"
    """Among replicas of equal cost, prefer the one a hash points to: `prefix` hashes the tenant, the
    system prompt and the first `affinity_prefix_bytes` of the context; `session` uses the
    `X-Session-Id` header when present, else the same hash. Never overrides load."""
    affinity_prefix_bytes: int = attrs.field(default=4096, validator=_positive)
    """How much of the system prompt and of the first message (or prompt) the prefix hash covers: the
    start of a conversation, which stays the same from turn to turn."""
    cold_load_s: float = attrs.field(default=10.0, validator=_positive)
    """Assumed time to load a model a replica does not hold, until the replica's own load times are
    measured (from Ollama's load_duration)."""
    max_retries: int = attrs.field(default=2, validator=attrs.validators.ge(0))
    """Other replicas tried when one fails before the first response byte (connect refused, reset,
    Ollama's 503 server busy). Never after the first byte reached the client."""
    retry_budget_ratio: float = attrs.field(default=0.2, validator=_ratio)
    """Retries in flight may be at most this share of the requests in flight (Envoy's retry budget)..."""
    min_retry_concurrency: int = attrs.field(default=3, validator=attrs.validators.ge(0))
    """...or this many, whichever is larger."""


@attrs.frozen
class ChainConfig:
    """The steps, by name."""

    limits: LimitsConfig = LimitsConfig()
    quotas: QuotasConfig = QuotasConfig()
    backpressure: BackpressureConfig = BackpressureConfig()
    health: HealthConfig = HealthConfig()
    balancer: BalancerConfig = BalancerConfig()


@attrs.frozen
class StateConfig:
    """Where shared state (buckets, leases) lives: this process, or Redis shared by proxy replicas."""

    backend: Literal["memory", "redis"] = "memory"
    url: str = attrs.field(default="redis://127.0.0.1:6379/0", validator=_redis_url)
    """Redis to share state through: redis://, rediss:// (TLS) or unix:// (a socket path)."""
    key_prefix: str = "sop:"
    failure_mode: Literal["open", "closed"] = "open"
    """When Redis cannot answer in time: `open` admits and counts in this process alone (like Envoy's
    rate-limit filter, failure_mode_deny false), `closed` answers 503 `state_unavailable` with
    Retry-After. Either way a metric and a log line say the state is degraded."""
    socket_timeout_s: float = attrs.field(default=0.5, validator=_positive)
    """Longest wait for one Redis command (and for a connection to it); past it the call has failed."""
    max_connections: int = attrs.field(default=512, validator=_positive)
    """Connections to Redis per proxy process; a burst beyond waits for one (up to socket_timeout_s)."""
    retry_interval_s: float = attrs.field(default=1.0, validator=_positive)
    """After a failure, Redis is not tried again for this long (calls use the failure mode meanwhile)."""


@attrs.frozen
class Config:
    """The whole file."""

    server: ServerConfig = ServerConfig()
    admin: AdminConfig = AdminConfig()
    upstreams: tuple[UpstreamConfig, ...] = (UpstreamConfig(url="http://127.0.0.1:11434"),)
    forwarding: ForwardingConfig = ForwardingConfig()
    tenants: tuple[TenantConfig, ...] = ()
    anonymous: AnonymousConfig = AnonymousConfig()
    models: dict[str, ModelConfig] = attrs.field(factory=dict)
    chain: ChainConfig = ChainConfig()
    state: StateConfig = StateConfig()
    telemetry: TelemetryConfig = TelemetryConfig()

    def __attrs_post_init__(self) -> None:
        if not self.upstreams:
            raise ValueError("upstreams: at least one upstream is required")
        seen: dict[str, str] = {}
        for index, tenant in enumerate(self.tenants):
            for key in tenant.keys:
                if key in seen or key in self.admin.keys:
                    raise ValueError(f"tenants[{index}].keys: a key is used twice "
                                     f"(also by {seen.get(key, 'admin')})")
                if key in self.anonymous.keys:
                    raise ValueError(f"tenants[{index}].keys: a key is also an anonymous placeholder "
                                     "(anonymous.keys)")
                seen[key] = tenant.name
        if any(key in self.anonymous.keys for key in self.admin.keys):
            raise ValueError("admin.keys: a key is also an anonymous placeholder (anonymous.keys)")
        names = [t.name for t in self.tenants]
        if len(set(names)) != len(names):
            raise ValueError("tenants: tenant names must be unique")
        replicas = [u.name or f"{URL(u.url).host}:{URL(u.url).port}" for u in self.upstreams]
        if len(set(replicas)) != len(replicas):
            raise ValueError("upstreams: replica names must be unique")
        for model, profile in self.models.items():
            for key in ("warm_on", "replicas"):
                unknown = [n for n in getattr(profile, key) if n != "*" and n not in replicas]
                if unknown:
                    raise ValueError(f"models.{model}.{key}: unknown replica {unknown[0]!r} "
                                     f"(known: {', '.join(replicas)})")


def _strict_bool(value: Any, _: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {type(value).__name__}")
    return value


def _strict_int(value: Any, _: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _strict_float(value: Any, _: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise TypeError("expected a finite number")
    return float(value)


def _strict_str(value: Any, _: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _is_homogeneous_tuple(type_: Any) -> bool:
    args = typing.get_args(type_)
    return typing.get_origin(type_) is tuple and len(args) == 2 and args[1] is Ellipsis


def _is_dict(type_: Any) -> bool:
    return typing.get_origin(type_) is dict


def _converter() -> cattrs.Converter:
    # cattrs' defaults are lenient where an operator's slip becomes a hole: `keys: "ROOT"` would be the
    # tuple ('R', 'O', 'O', 'T') and `allow: "no"` would be True. Every leaf is checked for its real type.
    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_structure_hook(bool, _strict_bool)
    converter.register_structure_hook(int, _strict_int)
    converter.register_structure_hook(float, _strict_float)
    converter.register_structure_hook(str, _strict_str)

    def sequence_hook(type_: Any) -> Any:
        item = typing.get_args(type_)[0]

        def structure_sequence(value: Any, _: Any) -> tuple[Any, ...]:
            if not isinstance(value, list | tuple):
                raise TypeError(f"expected a list, got {type(value).__name__}")
            return tuple(_each(enumerate(value), item, type_))

        return structure_sequence

    def _each(pairs: Any, item: Any, type_: Any) -> list[Any]:
        out: list[Any] = []
        errors: list[Exception] = []
        for index, element in pairs:
            try:
                out.append(converter.structure(element, item))
            except Exception as exc:  # collected, re-raised with the index below
                exc.__notes__ = [*getattr(exc, "__notes__", []),
                                 IterableValidationNote(f"@ {index!r}", index, item)]
                errors.append(exc)
        if errors:
            raise IterableValidationError("invalid entries", errors, type_)
        return out

    converter.register_structure_hook_factory(_is_homogeneous_tuple, sequence_hook)

    def mapping_check(value: Any, type_: Any) -> dict[Any, Any]:
        if not isinstance(value, dict):
            raise TypeError(f"expected a mapping, got {type(value).__name__}")
        key_type, value_type = typing.get_args(type_) or (Any, Any)
        keys = _each(((k, k) for k in value), key_type, type_)
        return dict(zip(keys, _each(value.items(), value_type, type_), strict=True))

    converter.register_structure_hook_func(_is_dict, mapping_check)

    def metrics_auth(value: Any, _: Any) -> bool | str:
        if isinstance(value, bool) or value in ("none", "admin"):
            return value  # type: ignore[no-any-return]
        raise TypeError("expected true, false, 'none' or 'admin'")

    converter.register_structure_hook(bool | Literal["none", "admin"], metrics_auth)
    for cls in (ServerConfig, UpstreamConfig, ForwardingConfig, TelemetryConfig, AdminConfig,
                TenantConfig, AnonymousConfig, ModelConfig, LimitsConfig, QuotasConfig,
                BackpressureConfig, HealthConfig, BalancerConfig, ChainConfig,
                StateConfig, Config):
        converter.register_structure_hook(
            cls, make_dict_structure_fn(cls, converter, _cattrs_forbid_extra_keys=True))
    return converter


_CONVERTER = _converter()


def structure(data: Mapping[str, Any]) -> Config:
    """Build a Config from plain data, or raise ConfigError naming each bad key path."""
    try:
        return _CONVERTER.structure(dict(data), Config)
    except (cattrs.BaseValidationError, ValueError, TypeError) as exc:
        if isinstance(exc, cattrs.BaseValidationError):
            raise ConfigError(format_validation_error(exc)) from None
        raise ConfigError(str(exc)) from None


def load_config(path: str | Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read `path` (or the defaults when None), validate it, then apply environment overrides."""
    data: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    config = structure(data)
    return apply_environment(config, os.environ if environ is None else environ)


def apply_environment(config: Config, environ: Mapping[str, str]) -> Config:
    """Overrides people set per deployment: SOP_LISTEN, SOP_UPSTREAMS (comma-separated URLs),
    OTEL_SERVICE_NAME, OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_PROTOCOL."""
    try:
        if listen := environ.get("SOP_LISTEN"):
            config = attrs.evolve(config, server=attrs.evolve(config.server, listen=listen))
        if upstreams := environ.get("SOP_UPSTREAMS"):
            urls = [u.strip() for u in upstreams.split(",") if u.strip()]
            config = attrs.evolve(config, upstreams=tuple(UpstreamConfig(url=u) for u in urls))
        telemetry = config.telemetry
        if name := environ.get("OTEL_SERVICE_NAME"):
            telemetry = attrs.evolve(telemetry, service_name=name)
        if endpoint := environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            telemetry = attrs.evolve(telemetry, otlp_endpoint=endpoint)
        if protocol := environ.get("OTEL_EXPORTER_OTLP_PROTOCOL"):
            if protocol not in ("grpc", "http/protobuf"):
                raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: unsupported protocol {protocol!r}")
            telemetry = attrs.evolve(telemetry, otlp_protocol=protocol)  # type: ignore[arg-type]
        return attrs.evolve(config, telemetry=telemetry)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
