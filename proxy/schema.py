"""Shared leaves of the configuration: the types several steps and modules use (Mode, PromptPolicy), the
validators, and the sections not owned by one step (server, upstreams, forwarding, telemetry, admin,
tenants, anonymous, models, state).

Each step's own section lives beside its code (`LimitsConfig` in middlewares/limits.py, ...); only
proxy/config.py knows the whole tree and loads it. This module imports nothing of the proxy, so any
module may import it without a cycle.

Key names are the public interface documented in deploy/config.example.yaml: extend, never rename.
"""

from __future__ import annotations

import shlex
from typing import Any, Literal

import attrs
from yarl import URL

__all__ = [
    "MODES",
    "AdminConfig",
    "AnonymousConfig",
    "ForwardingConfig",
    "Mode",
    "ModelConfig",
    "PromptPolicy",
    "RolloutConfig",
    "ServerConfig",
    "StateConfig",
    "TelemetryConfig",
    "TenantConfig",
    "UpstreamConfig",
    "http_url",
    "is_mode",
    "listen_address",
    "non_empty",
    "non_negative",
    "parse_listen",
    "positive",
    "ratio",
    "redis_url",
    "structure_mode",
    "valid_keys",
]


def positive(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    del instance
    if value is not None and value <= 0:
        raise ValueError(f"{attribute.name}: must be > 0")


def whole_requests(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """At least 1: a request takes one whole unit of its bucket, and a bucket holds at most its rate
    per minute, so under 1 no request could ever pass (every one refused with a Retry-After that
    could never come true)."""
    del instance
    if value is not None and value < 1:
        raise ValueError(f"{attribute.name}: must be >= 1 (a request takes one whole unit)")


def non_negative(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    del instance
    if value is not None and value < 0:
        raise ValueError(f"{attribute.name}: must be >= 0")


_C_INT_MAX = 2**31 - 1


def positive_c_int(instance: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    """> 0 and within a C int: the value goes to the socket layer or aiohttp's C parser, where a larger
    one raises OverflowError (at start, or on every connection) instead of being refused here."""
    positive(instance, attribute, value)
    if value > _C_INT_MAX:
        raise ValueError(f"{attribute.name}: must be at most {_C_INT_MAX}")


def ratio(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    del instance
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name}: must be between 0 and 1")


def non_empty(name: str, value: tuple[str, ...]) -> None:
    if not value:
        raise ValueError(f"{name}: at least one non-empty value is required")
    valid_keys(name, value)


def valid_keys(name: str, value: tuple[str, ...]) -> None:
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


def listen_address(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    del instance, attribute
    parse_listen(value)


def _parsed(attribute: attrs.Attribute[Any], value: str, what: str) -> URL:
    """`value` as a URL; yarl's complaint is not repeated (it quotes what it could not read, which
    may be a password, and this message is logged and shown by /system/config)."""
    try:
        return URL(value)
    except (ValueError, TypeError):
        raise ValueError(f"{attribute.name}: not a valid {what} (check the host, port and path; "
                         "percent-encode special characters in a user or password)") from None


def http_url(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    del instance
    url = _parsed(attribute, value, "http(s) URL")
    if url.scheme not in ("http", "https") or not url.host:
        # The scheme only, never the value: it may carry credentials, and this message is logged and
        # shown by /system/config when a reload is refused.
        raise ValueError(f"{attribute.name}: expected an http(s) URL, got scheme {url.scheme[:16]!r}"
                         if url.scheme else f"{attribute.name}: expected an http(s) URL")


RESTART_FIELDS = ("name", "url", "host", "port")
"""The placeholders a replica's `restart_command` may use."""


def restart_fields(command: str, **fields: str) -> list[str]:
    """`command` split into arguments (no shell) with the placeholders substituted (each empty when
    `fields` lacks it: the check `restart_command` runs when the file is loaded). Raises ValueError
    naming the placeholders that may be used, for anything else in braces or a broken quote."""
    try:
        arguments = shlex.split(command)
        return [arg.format(**{name: fields.get(name, "") for name in RESTART_FIELDS})
                for arg in arguments]
    except (KeyError, IndexError, ValueError, AttributeError):
        raise ValueError("restart_command: only {name}, {url}, {host} and {port} may be substituted "
                         "({{ and }} for a literal brace), and quotes must be closed") from None


def valid_restart_command(instance: Any, attribute: attrs.Attribute[Any], command: Any) -> None:
    del instance, attribute
    if not isinstance(command, str):
        raise ValueError("restart_command: expected a string")
    restart_fields(command)


def redis_url(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    del instance
    url = _parsed(attribute, value, "Redis URL")
    if url.scheme not in ("redis", "rediss", "unix") or not (url.host or url.path):
        raise ValueError(f"{attribute.name}: expected a redis://, rediss:// or unix:// URL")
    from .state.resp import url_settings  # here: the schema loads before the state's modules

    try:
        url_settings(value)
    except ValueError:
        # Not the parser's message: it quotes the part it could not read, which may be a password
        # (this message is logged and shown by /system/config when a reload is refused).
        raise ValueError(f"{attribute.name}: not a valid Redis URL (check the host, port and database; "
                         "percent-encode special characters in a password)") from None


OLLAMA_DEFAULT_ORIGINS: tuple[str, ...] = (
    *(f"{scheme}://{host}{port}" for host in ("localhost", "127.0.0.1", "0.0.0.0")
      for scheme in ("http", "https") for port in ("", ":*")),
    "app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*")
"""The origins Ollama allows with `OLLAMA_ORIGINS` unset (envconfig.AllowedOrigins): server.cors_origins'
default."""


@attrs.frozen
class ServerConfig:
    """The listening side."""

    listen: str = attrs.field(default="127.0.0.1:11435", validator=listen_address)
    """Address the proxy listens on, HOST:PORT. Env: SOP_LISTEN."""
    max_body_bytes: int = attrs.field(default=32 * 1024 * 1024, validator=positive)
    """Largest request body accepted (blob uploads excepted); larger ones get 413 before being read."""
    header_timeout_s: float = attrs.field(default=10.0, validator=positive)
    """Time a client has to send a complete request head; slower connections are closed (slowloris)."""
    keepalive_timeout_s: float = attrs.field(default=75.0, validator=positive)
    """Idle keep-alive connections are closed after this long."""
    backlog: int = attrs.field(default=2048, validator=positive_c_int)
    """Listen backlog; the default 128 of asyncio collapses under connection storms."""
    shutdown_timeout_s: float = attrs.field(default=30.0, validator=positive)
    """Grace period for in-flight requests on SIGTERM; streams still running then end with one final
    error line (`code: shutting_down`) and the process exits by this deadline."""
    max_header_bytes: int = attrs.field(default=64 * 1024, validator=positive_c_int)
    """Largest request head (request line and all headers together); larger ones get 431 before
    authentication, like nginx's large_client_header_buffers and Envoy's max_request_headers_kb."""
    body_timeout_s: float = attrs.field(default=60.0, validator=positive)
    """Longest silence while a request body is being received; then 408 and the connection is closed."""
    max_connections: int = attrs.field(default=8192, validator=positive)
    """Open client connections served at once; beyond it the oldest idle keep-alive connection is closed
    to make room, and when none is idle new connections get an immediate 503 and are closed, rather
    than exhaust file descriptors (the proxy raises its own RLIMIT_NOFILE to fit)."""
    config_watch_s: float = attrs.field(default=2.0, validator=non_negative)
    """How often the configuration file is checked for a change, which reloads it like SIGHUP does
    (0: only SIGHUP reloads). A rename onto the path (editors, Kubernetes ConfigMaps) counts too."""
    cors_origins: tuple[str, ...] = OLLAMA_DEFAULT_ORIGINS
    """Browser origins (patterns as `OLLAMA_ORIGINS` has them: `*` any run of characters, everything else
    literal; `*` alone: any) that may read the proxy's own answers: its
    errors (429, 503, 401, 413, ...) and what it builds itself (merged /api/tags, cached embeddings).
    Set it to what the replicas' OLLAMA_ORIGINS allow; the default is Ollama's own list. Answers
    relayed from a replica keep the replica's CORS headers (proxy/cors.py)."""


@attrs.frozen
class UpstreamConfig:
    """One Ollama replica."""

    url: str = attrs.field(validator=http_url)
    """Base URL of the replica, e.g. http://127.0.0.1:11434."""
    name: str = ""
    """Short name used in logs, spans, metrics and headers; defaults to host:port."""
    num_parallel: int = attrs.field(default=1, validator=positive)
    """The replica's OLLAMA_NUM_PARALLEL (slots per loaded model)."""
    weight: int = attrs.field(default=1, validator=positive)
    """Relative share of traffic in round-robin order (`chain.balancer.mode: off`); the balancer's
    placement (`enforce`, the default) chooses by residency and load and does not read it."""
    restart_command: str | None = attrs.field(default=None,
                                              validator=attrs.validators.optional(valid_restart_command))
    """Command the health step runs to restart this replica once it is down or stuck, e.g.
    `systemctl restart ollama@{name}` or `docker restart {name}`; `{name}`, `{url}`, `{host}` and `{port}`
    are substituted per argument (no shell). Unset: no restarts."""


@attrs.frozen
class ForwardingConfig:
    """How the proxy talks to upstreams. No total timeout: generations may legitimately run for minutes."""

    connect_timeout_s: float = attrs.field(default=5.0, validator=positive)
    """TCP connect to a replica."""
    first_byte_timeout_s: float = attrs.field(default=300.0, validator=positive)
    """Request sent -> response headers. Long enough for a cold model load (Ollama's own load stall
    timeout is 5 minutes)."""
    idle_timeout_s: float = attrs.field(default=120.0, validator=positive)
    """Longest silence of the replica between two body chunks of a response (a client slow to read
    them is bounded by the request's deadline, not by this)."""
    pool_size: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    """Upstream connections kept per proxy process; 0 = unlimited (admission is the chain's job). The
    fan-out's listings hold at most 8 connections per replica and 32 in all, whatever this says."""
    keepalive_s: float = attrs.field(default=30.0, validator=positive)
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
    sample_ratio: float = attrs.field(default=1.0, validator=ratio)
    """Share of new traces sampled (parent-based: an incoming sampled traceparent is always kept)."""
    metric_prefix: str = "sop"
    """Prefix of the proxy's own metric names (`sop.queue.depth`, ...)."""
    export_interval_s: float = attrs.field(default=15.0, validator=positive)
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
"""A step's mode. `enforce` applies the step's policy; `shadow` runs it, records what it would have done
(span attribute, `<prefix>.<step>.decisions`, `X-Shadow-Decision`) and lets the request through; `off`
removes the step's policy, per step:

- limits: no prompt count, prompt limit or option rewrite; the deadline and the body checks stay (the
  step still runs, `runs_when_off`);
- quotas: no rate, token or concurrency limit, no X-RateLimit-* headers (the step is skipped);
- backpressure: no queue and no slot limit: requests go straight on (the step is skipped);
- health: no probes, no ejections, no restarts; every replica takes traffic (the step is skipped);
- balancer: round robin instead of the cost model; retries before the first byte stay (the step still
  runs: a request cannot do without a replica).
"""


MODES: tuple[str, ...] = ("enforce", "shadow", "off")


def structure_mode(value: Any, _: Any = None) -> str:
    """A `mode:` value as written in YAML: one of MODES. `mode: off` unquoted is YAML 1.1's boolean
    false (PyYAML reads `off`, `no` and `false` alike), so false is `off`: the word the docs, the
    example file and DESIGN write must not be refused. True (`on`, `yes`) is refused with the reason,
    as is anything else."""
    if value is False:
        return "off"
    if value is True:
        raise TypeError("expected enforce, shadow or off (an unquoted on, yes or true is YAML's "
                        "boolean true, not a mode)")
    if isinstance(value, str) and value in MODES:
        return value
    # Not the value itself: a key pasted into the wrong field must not reach a log line.
    raise TypeError(f"not one of {list(MODES)}")


def is_mode(type_: Any) -> bool:
    """The predicate a cattrs converter registers `structure_mode` with (a Literal is no class, so it
    cannot be registered by type)."""
    return bool(type_ == Mode)


@attrs.frozen
class RolloutConfig:
    """A canary for a step or plugin in `enforce` mode: it enforces for the listed tenants and for a
    stable share of the others, and runs in shadow for the rest (what it would have done goes to
    X-Shadow-Decision, the span and the decisions metric). The defaults enforce for everybody."""

    enforce_share: float = attrs.field(default=1.0, validator=ratio)
    """Share of tenants (by a stable hash of the tenant's name) for whom the step enforces."""
    tenants: tuple[str, ...] = ()
    """Tenants (by name; `anonymous` for requests without a key) it always enforces for."""


PromptPolicy = Literal["reject", "truncate", "summarize"]


@attrs.frozen
class AdminConfig:
    """Who may use /system/* and, always, the model-management routes."""

    keys: tuple[str, ...] = attrs.field(default=(), validator=lambda _i, _a, v: valid_keys("keys", v))
    """Admin API keys (`Authorization: Bearer <key>` or `X-API-Key`). Never logged."""


@attrs.frozen
class TenantConfig:
    """A team sharing the fleet: its keys, lane and limits (null = unlimited)."""

    name: str
    keys: tuple[str, ...] = attrs.field(validator=lambda _i, _a, v: non_empty("keys", v))
    """API keys that identify the tenant. Never logged."""
    lane: Literal["interactive", "bulk"] = "interactive"
    """Queue lane (used by backpressure): interactive is served ahead of bulk."""
    weight: float = attrs.field(default=1.0, validator=positive)
    """Share of capacity relative to other tenants (weighted fair queuing)."""
    requests_per_minute: float | None = attrs.field(default=None, validator=whole_requests)
    """Requests per minute (a bucket holding this many, refilled continuously): at least 1."""
    tokens_per_minute: float | None = attrs.field(default=None, validator=positive)
    """Prompt plus output tokens per minute (reserved before admission, settled after)."""
    max_concurrent: int | None = attrs.field(default=None, validator=positive)
    """Requests in flight at once, across every proxy replica sharing the state backend."""
    deadline_s: float | None = attrs.field(default=None, validator=positive)
    """Deadline of this tenant's requests (default chain.limits.deadline_s); a client may lower it."""
    max_prompt_tokens: int | None = attrs.field(default=None, validator=positive)
    """Prompt limit for this tenant (the smallest of tenant, model and chain limits applies)."""
    allow_management: bool = False
    """May this tenant call pull, push, create, copy, delete and blobs?"""


@attrs.frozen
class AnonymousConfig:
    """Requests without a key: refused (`allow: false`, 401) or served under these limits."""

    allow: bool = True
    keys: tuple[str, ...] = attrs.field(default=("ollama",),
                                        validator=lambda _i, _a, v: valid_keys("keys", v))
    """Placeholder keys that clients send because their SDK insists on one (the OpenAI SDK with
    `api_key="ollama"`): while `allow` is true they count as no key at all; otherwise they are refused
    like any unknown key. Never a tenant's or admin's key."""
    requests_per_minute: float | None = attrs.field(default=None, validator=whole_requests)
    tokens_per_minute: float | None = attrs.field(default=None, validator=positive)
    max_concurrent: int | None = attrs.field(default=None, validator=positive)
    deadline_s: float | None = attrs.field(default=None, validator=positive)
    max_prompt_tokens: int | None = attrs.field(default=None, validator=positive)


OLLAMA_FLOAT_OPTIONS = ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
                        "frequency_penalty")
OLLAMA_INT_OPTIONS = ("num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch",
                      "num_gpu", "main_gpu", "num_thread")
OLLAMA_BOOL_OPTIONS = ("use_mmap",)
"""Ollama's typed options (api.Options, read by Options.FromMap): a value of another type fails every run
of the model with a 500 `option "x" must be of type ...`."""


LOAD_OPTIONS = frozenset({"num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "use_mlock",
                          "num_thread", "low_vram", "numa", "vocab_only"})
"""Options that make Ollama reload a runner when they differ from the loaded one (reference §4.2): the
ones `models.<m>.options` makes canonical."""


def without_nulls(value: dict[str, Any]) -> dict[str, Any]:
    """`models.<m>.options` without its null entries: Ollama skips a null option, so a canonical null
    means no canonical value (written as null into every request, it replaced the client's own value
    and showed as `num_ctx=8192->None`)."""
    return {key: item for key, item in value.items() if item is not None} if isinstance(value, dict) \
        else value


def ollama_options(instance: Any, attribute: attrs.Attribute[Any], value: dict[str, Any]) -> None:
    """`models.<m>.options` typed as Ollama types them: the load-time ones are written into every
    request for the model, so a wrong type would fail each of them at the replica instead of being
    refused here. Nulls are gone already (`without_nulls`); other keys are never written, so not checked."""
    del instance, attribute
    for key, item in value.items():
        if key not in LOAD_OPTIONS:
            continue
        number = isinstance(item, int | float) and not isinstance(item, bool)
        if key in OLLAMA_FLOAT_OPTIONS and not number:
            raise ValueError(f"options: {key} must be a number, got {type(item).__name__}")
        if key in OLLAMA_INT_OPTIONS and not number:
            raise ValueError(f"options: {key} must be an integer, got {type(item).__name__}")
        if key in OLLAMA_BOOL_OPTIONS and not isinstance(item, bool):
            raise ValueError(f"options: {key} must be true or false, got {type(item).__name__}")
        if key == "stop" and not (isinstance(item, list) and all(isinstance(s, str) for s in item)):
            raise ValueError("options: stop must be a list of strings")


@attrs.frozen
class ModelConfig:
    """Per-model policy."""

    max_prompt_tokens: int | None = attrs.field(default=None, validator=positive)
    prompt_policy: PromptPolicy | None = None
    """reject (400 prompt_too_long) or truncate (drop the oldest turns / the front of the prompt)."""
    tokenizer: str | None = None
    """Path of the model's SentencePiece `.model` file; else it is built from /api/show (verbose)."""
    options: dict[str, Any] = attrs.field(factory=dict, converter=without_nulls, validator=ollama_options)
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
class StateConfig:
    """Where shared state (buckets, leases) lives: this process, or Redis shared by proxy replicas."""

    backend: Literal["memory", "redis"] = "memory"
    url: str = attrs.field(default="redis://127.0.0.1:6379/0", validator=redis_url)
    """Redis to share state through: redis://, rediss:// (TLS) or unix:// (a socket path), with user,
    password and db as redis-py reads them; the options taken are TLS ones (`ssl_ca_certs`, `ssl_ca_path`,
    `ssl_certfile`, `ssl_keyfile`, `ssl_cert_reqs`, `ssl_check_hostname`), any other is refused."""
    key_prefix: str = "sop:"
    failure_mode: Literal["open", "closed"] = "open"
    """When Redis cannot answer in time: `open` admits and counts in this process alone (like Envoy's
    rate-limit filter, failure_mode_deny false), `closed` answers 503 `state_unavailable` with
    Retry-After. Either way a metric and a log line say the state is degraded."""
    socket_timeout_s: float = attrs.field(default=0.5, validator=positive)
    """Longest wait for one Redis command (and for a connection to it); past it the call has failed. A
    connection that answers nothing for twice this long is closed and replaced."""
    max_connections: int = attrs.field(default=512, validator=positive)
    """Connections to Redis per proxy process, at most 4 used: calls are pipelined on them (many in
    flight on one connection), so a burst never waits for a free connection."""
    retry_interval_s: float = attrs.field(default=1.0, validator=positive)
    """After a failure, Redis is not tried again for this long (calls use the failure mode meanwhile)."""
    lease_ttl_s: float = attrs.field(default=15.0, validator=positive)
    """Replica slot leases and queued tickets shared through Redis (backpressure) expire this long after
    their last renewal (renewed every third of it while held): a dead proxy process's slots return
    after at most this long."""
