"""Configuration: frozen attrs classes loaded from one YAML file, unknown keys and bad values refused with
the path of the key (`server.max_body_bytes: must be > 0`), then environment overrides.

Key names are the public interface documented in deploy/config.example.yaml: extend, never rename.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import cattrs
import yaml
from cattrs.gen import make_dict_structure_fn
from yarl import URL

from .validation import format_validation_error

__all__ = [
    "Config",
    "ConfigError",
    "ForwardingConfig",
    "ServerConfig",
    "TelemetryConfig",
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


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`) -> (host, port)."""
    if value.startswith("["):
        host, _, port = value[1:].partition("]:")
    else:
        host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
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
    """Grace period for in-flight requests on SIGTERM."""


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
    """Command that restarts this replica (used by health once it exists); `{name}` is substituted."""


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


@attrs.frozen
class Config:
    """The whole file. Sections of later chain steps are added here as they land."""

    server: ServerConfig = ServerConfig()
    upstreams: tuple[UpstreamConfig, ...] = (UpstreamConfig(url="http://127.0.0.1:11434"),)
    forwarding: ForwardingConfig = ForwardingConfig()
    telemetry: TelemetryConfig = TelemetryConfig()

    def __attrs_post_init__(self) -> None:
        if not self.upstreams:
            raise ValueError("upstreams: at least one upstream is required")


def _converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True)
    for cls in (ServerConfig, UpstreamConfig, ForwardingConfig, TelemetryConfig, Config):
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
