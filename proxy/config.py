"""Configuration: frozen attrs classes loaded from one YAML file, unknown keys and bad values refused with
the path of the key (`server.max_body_bytes: must be > 0`), then environment overrides.

This module is the only place that knows the whole tree (ChainConfig, Config) and the loader. Each step's
section lives beside its code (`LimitsConfig` in middlewares/limits.py, ...); the shared leaves (Mode,
PromptPolicy, the validators, the sections no single step owns) live in proxy/schema.py. Both are
re-exported here, so `from proxy.config import LimitsConfig` keeps working. The cattrs converter finds
every attrs class by itself (a hook factory), so a new section needs no registration.

Key names are the public interface documented in deploy/config.example.yaml: extend, never rename.
"""

from __future__ import annotations

import math
import os
import re
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

from middlewares.backpressure import BackpressureConfig
from middlewares.balancer import BalancerConfig
from middlewares.health import HealthConfig
from middlewares.limits import LimitsConfig
from middlewares.quotas import QuotasConfig

from .schema import (
    AdminConfig,
    AnonymousConfig,
    ForwardingConfig,
    Mode,
    ModelConfig,
    PromptPolicy,
    ServerConfig,
    StateConfig,
    TelemetryConfig,
    TenantConfig,
    UpstreamConfig,
    is_mode,
    parse_listen,
    structure_mode,
)
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
    "Mode",
    "ModelConfig",
    "PromptPolicy",
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


@attrs.frozen
class ChainConfig:
    """The steps, by name."""

    limits: LimitsConfig = attrs.field(factory=LimitsConfig)
    quotas: QuotasConfig = attrs.field(factory=QuotasConfig)
    backpressure: BackpressureConfig = attrs.field(factory=BackpressureConfig)
    health: HealthConfig = attrs.field(factory=HealthConfig)
    balancer: BalancerConfig = attrs.field(factory=BalancerConfig)


@attrs.frozen
class Config:
    """The whole file."""

    server: ServerConfig = attrs.field(factory=ServerConfig)
    admin: AdminConfig = attrs.field(factory=AdminConfig)
    upstreams: tuple[UpstreamConfig, ...] = (UpstreamConfig(url="http://127.0.0.1:11434"),)
    forwarding: ForwardingConfig = attrs.field(factory=ForwardingConfig)
    tenants: tuple[TenantConfig, ...] = ()
    anonymous: AnonymousConfig = attrs.field(factory=AnonymousConfig)
    models: dict[str, ModelConfig] = attrs.field(factory=dict)
    chain: ChainConfig = attrs.field(factory=ChainConfig)
    state: StateConfig = attrs.field(factory=StateConfig)
    telemetry: TelemetryConfig = attrs.field(factory=TelemetryConfig)
    plugins: tuple[dict[str, Any], ...] = ()
    """`[{name: <plugin>, ...}]`, in order; each entry is checked against its plugin's own config class
    (proxy/plugin.py) when the file is loaded."""

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
        for reserved, whose in (("anonymous", "callers without a key"), ("admin", "admin keys")):
            # A tenant called so would share their quota buckets and their rows in /system/quotas
            # and the metrics.
            if reserved in names:
                raise ValueError(f"tenants[{names.index(reserved)}].name: {reserved!r} is reserved "
                                 f"(the {whose})")
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


_EXPONENT_TEXT = re.compile(r"[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+")
"""What YAML 1.1 (PyYAML) reads as a string although it looks like a number: an exponent without a dot
in the mantissa or without a sign (`1e3`, `5e7`, `1.5e9`); `1.0e+3` is a float."""


def _strict_int(value: Any, _: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        hint = " (YAML reads an exponent such as 1e3 as text: write the digits out)" \
            if isinstance(value, str) and _EXPONENT_TEXT.fullmatch(value) else ""
        raise TypeError(f"expected an integer, got {type(value).__name__}{hint}")
    return value


def _strict_float(value: Any, _: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        # The value itself is never quoted (a key pasted into the wrong field must not be logged).
        hint = (" (YAML reads an exponent without a dot and a sign, such as 1e3, as text: write 1.0e+3 "
                "or the digits)") if isinstance(value, str) and _EXPONENT_TEXT.fullmatch(value) else ""
        raise TypeError(f"expected a number, got {type(value).__name__}{hint}")
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
    # `mode: off` unquoted is a YAML boolean: see structure_mode.
    converter.register_structure_hook_func(is_mode, structure_mode)

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

    def count_or_auto(value: Any, _: Any) -> int | str:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
            return value  # type: ignore[no-any-return]
        raise TypeError("expected `auto` or an integer")

    converter.register_structure_hook(int | Literal["auto"], count_or_auto)
    # Every attrs class met while structuring Config (steps' sections included, wherever they live)
    # forbids unknown keys: derived, not a hand-kept list that a new section could be missing from.
    converter.register_structure_hook_factory(
        attrs.has, lambda cls: make_dict_structure_fn(cls, converter, _cattrs_forbid_extra_keys=True))
    return converter


_CONVERTER = _converter()


def structure(data: Mapping[str, Any]) -> Config:
    """Build a Config from plain data, or raise ConfigError naming each bad key path."""
    try:
        config = _CONVERTER.structure(dict(data), Config)
        known = {t.name for t in config.tenants} | {"anonymous"}

        # Admin-key callers run as the tenant `admin` (proxy/access.py), so a canary may name it; a
        # plugin's sub-requests cannot be charged to it (it has no quotas).
        rollout_known = known | {"admin"}

        def check_tenant(path: str, tenant: str, names: set[str] = known) -> None:
            if tenant not in names:
                raise ValueError(f"{path}: unknown tenant {tenant[:60]!r} (known: "
                                 f"{', '.join(sorted(names))})")

        # A canary's tenants are names of this file's tenants: a typo would make it enforce for
        # nobody, without a word.
        for field in attrs.fields(ChainConfig):
            for tenant in getattr(config.chain, field.name).rollout.tenants:
                check_tenant(f"chain.{field.name}.rollout.tenants", tenant, rollout_known)
        if config.telemetry.metrics_need_admin and not config.admin.keys:
            # Without an admin key /metrics would stay open (no tenants either: the open pass-through)
            # or answer nobody: either way not what the operator who asked for it meant.
            raise ValueError("telemetry.metrics_auth: puts /metrics behind the admin key, but admin.keys "
                             "is empty (with no key configured /metrics would stay open)")
        if config.plugins:
            from .plugin import structure_plugins

            # The plugins' own config classes, with the key path; a plugin's sub-requests charged to a
            # tenant need that tenant (else every one of them would be refused, and the plugin fail open
            # without a word).
            for index, (_, plugin) in enumerate(structure_plugins(config.plugins)):
                tenant = getattr(plugin, "tenant", None)
                if tenant is not None:
                    check_tenant(f"plugins[{index}].tenant", tenant)
                for tenant in plugin.rollout.tenants:
                    check_tenant(f"plugins[{index}].rollout.tenants", tenant, rollout_known)
        return config
    except (cattrs.BaseValidationError, ValueError, TypeError) as exc:
        if isinstance(exc, cattrs.BaseValidationError):
            raise ConfigError(format_validation_error(exc)) from None
        raise ConfigError(str(exc)) from None


MAX_VALUES = 200_000
"""The most values (mappings, lists and scalars, counted as often as aliases repeat them) a configuration
file may hold. Far above any real fleet's file; a few lines of nested aliases (`&a [x, x, ...]`,
`&b [*a, *a, ...]`) expand to billions, which loading takes lazily but `/system/config` and a reload's
comparison would write out in full."""


class _DuplicateKey(yaml.constructor.ConstructorError):
    """A key written twice in one mapping (its message is ours: it names the key, a config name)."""


_QUOTED = re.compile(r"'((?:[^'\\]|\\.)*)'" r'|"((?:[^"\\]|\\.)*)"')
"""A Python repr as PyYAML's messages quote: in single quotes, or in double quotes when the text holds a
single one (a tag may: `!sk-live'9f8e`), with backslash escapes."""


def _withhold_tokens(problem: str) -> str:
    """`problem` (PyYAML's) without what it quotes that may be part of a key: the token it stopped at
    (a tag `!abc`, an alias `*abc`). A character (`'\\t'`, `'}'`) and a token's name (`'<stream end>'`)
    stay: they help and cannot be a key. Quotes are taken in pairs, left to right."""

    def keep(match: re.Match[str]) -> str:
        text = match.group(1) if match.group(1) is not None else match.group(2)
        return match.group(0) if len(text) <= 2 or re.fullmatch(r"<[a-z ]+>", text) else "(withheld)"

    return _QUOTED.sub(keep, problem)


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice in one mapping is an error: PyYAML keeps
    the last silently, so a second `tenants:` or `admin:` block appended to a file would drop the first
    one's keys and tenants without a word. Keys brought in by a merge (`<<: *defaults`) may still be
    overridden: only the keys written in the mapping itself are compared."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._flattened: set[int] = set()
        """The mappings whose own keys were compared (by id: the document's nodes live as long as the
        loader)."""

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Checked here, the first time a mapping is flattened, not in construct_mapping: flattening
        # rewrites node.value in place, the merged keys first, and a mapping merged elsewhere (`<<: *a`)
        # may be flattened before it is constructed itself (PyYAML constructs level by level), so its
        # own override of a key it merges would then read as that key written twice.
        if id(node) not in self._flattened:
            self._flattened.add(id(node))
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    # The key's name as written (bounded); never the value, which may be a secret.
                    raise _DuplicateKey(None, None, f"duplicate key {str(key)[:60]!r}",
                                        key_node.start_mark)
                seen.add(key)
        super().flatten_mapping(node)


def _check_size(data: Any, limit: int = MAX_VALUES) -> None:
    """Raise ValueError when `data` holds more than `limit` values once aliases are expanded; stops
    counting at the limit, so a bomb costs no more than a file at the limit."""
    count = 0
    stack = [data]
    while stack:
        item = stack.pop()
        count += 1
        if count > limit:
            raise ValueError(f"the file holds more than {limit} values once its YAML aliases are "
                             "expanded; write the repeated parts out instead")
        if isinstance(item, dict):
            stack.extend(item.values())
            stack.extend(item.keys())
        elif isinstance(item, list):
            stack.extend(item)


def load_config(path: str | Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read `path` (or the defaults when None), validate it, then apply environment overrides. A key
    written twice in one mapping, or a file whose aliases expand past `MAX_VALUES`, is refused."""
    data: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
        except UnicodeDecodeError as exc:
            # Where, never the bytes around it (they may be part of a key).
            raise ConfigError(f"{path}: not UTF-8 text (an invalid byte at offset {exc.start})") from None
        try:
            data = yaml.load(text, Loader=_StrictLoader) or {}  # a SafeLoader: no Python objects
        except yaml.YAMLError as exc:
            # Where and what, never the offending line itself: it may hold a key (this message is logged
            # and shown by /system/config when a reload is refused).
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            if not isinstance(exc, _DuplicateKey):
                # An unquoted key starting with `!` or `*` is a tag or an alias to YAML, and PyYAML
                # quotes it whole.
                problem = _withhold_tokens(problem)
            raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        try:
            _check_size(data)
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None
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
