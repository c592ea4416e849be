"""Configuration: the example file lists every key with its default, bad files are refused with the key
path, environment overrides apply, and `check-config` validates without serving."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import attrs
import pytest
import yaml

from proxy.config import Config, ConfigError, ModelConfig, TenantConfig, load_config, structure

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "config.example.yaml"


def _type_keys(cls: type, prefix: str = "") -> set[str]:
    """Every key path a class accepts; list and mapping entries are walked with `*` for the name."""
    out: set[str] = set()
    for field in attrs.fields(attrs.resolve_types(cls)):
        path = f"{prefix}{field.name}"
        out.add(path)
        kind = field.type
        args = [a for a in typing.get_args(kind) if a is not Ellipsis]
        inner = args[-1] if args else None
        if attrs.has(kind):
            out |= _type_keys(kind, f"{path}.")
        elif typing.get_origin(kind) is tuple and inner is not None and attrs.has(inner):
            out |= _type_keys(inner, f"{path}.")
        elif typing.get_origin(kind) is dict and inner is not None and attrs.has(inner):
            out |= {f"{path}.*"} | _type_keys(inner, f"{path}.*.")
    return out


def _yaml_keys(value: object, prefix: str = "") -> set[str]:
    if isinstance(value, dict):
        out: set[str] = set()
        for key, item in value.items():
            name = "*" if prefix == "models." else key
            out |= {f"{prefix}{name}"} | _yaml_keys(item, f"{prefix}{name}.")
        return out
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return _yaml_keys(value[0], prefix)
    return set()


def test_example_lists_every_key_with_its_default() -> None:
    loaded = load_config(EXAMPLE, environ={})
    defaults = Config()
    example_entries = ("tenants", "models")  # the example shows one of each; the default has none
    for field in attrs.fields(Config):
        if field.name not in example_entries:
            assert getattr(loaded, field.name) == getattr(defaults, field.name), field.name
    assert loaded.tenants[0] == TenantConfig(name="example-team", keys=("sk-example-change-me",))
    assert loaded.models["llama3.2"] == ModelConfig()
    assert _yaml_keys(yaml.safe_load(EXAMPLE.read_text())) == _type_keys(Config)


@pytest.mark.parametrize("data,message", [
    ({"server": {"max_body_bytes": 0}}, "server.max_body_bytes: must be > 0"),
    ({"server": {"bogus": 1}}, "server: unknown key(s) bogus"),
    ({"upstreams": [{"url": "http://a:1"}, {"url": "ftp://x"}]},
     "upstreams[1].url: expected an http(s) URL, got 'ftp://x'"),
    ({"upstreams": [{"name": "a"}]}, "upstreams[0].url: required key missing"),
    ({"telemetry": {"otlp_protocol": "udp"}}, "telemetry.otlp_protocol: 'udp' is not one of"),
    ({"telemetry": {"sample_ratio": 2}}, "telemetry.sample_ratio: must be between 0 and 1"),
    ({"server": {"listen": "nowhere"}}, "server.listen: expected HOST:PORT"),
    ({"forwarding": {"idle_timeout_s": "soon"}}, "forwarding.idle_timeout_s: expected float"),
    ({"upstreams": []}, "upstreams: at least one upstream is required"),
    ({"chains": {}}, "unknown key(s) chains"),
])
def test_bad_values_name_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        structure(data)
    assert message in str(error.value)


def test_environment_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server: {listen: '127.0.0.1:1'}\n")
    config = load_config(path, environ={
        "SOP_LISTEN": "0.0.0.0:9000", "SOP_UPSTREAMS": "http://a:1, http://b:2",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": "edge"})
    assert config.server.listen == "0.0.0.0:9000"
    assert [u.url for u in config.upstreams] == ["http://a:1", "http://b:2"]
    assert config.telemetry.otlp_endpoint == "http://c:4318"
    assert config.telemetry.otlp_protocol == "http/protobuf"
    assert config.telemetry.service_name == "edge"
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        load_config(None, environ={"OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"})


def test_check_config_command(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(EXAMPLE)],
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "OK" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  max_body_bytes: -5\n")
    refused = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(bad)],
                             capture_output=True, text=True, check=False)
    assert refused.returncode == 1
    assert "server.max_body_bytes: must be > 0" in refused.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("server: [\n")
    assert subprocess.run([sys.executable, "-m", "proxy", "check-config", str(broken)],
                          capture_output=True, check=False).returncode == 1


def test_serve_refuses_a_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams: [{url: 'nope'}]\n")
    result = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(bad)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2 and "upstreams[0].url" in result.stderr
