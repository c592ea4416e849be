"""Configuration: the example file lists every key with its default, bad files are refused with the key
path, environment overrides apply, and `check-config` validates without serving."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import yaml

from proxy.config import Config, ConfigError, load_config, structure

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "config.example.yaml"


def _keys(value: object, prefix: str = "") -> set[str]:
    if attrs.has(type(value)):
        out: set[str] = set()
        for field in attrs.fields(type(value)):
            out |= {f"{prefix}{field.name}"} | _keys(getattr(value, field.name),
                                                     f"{prefix}{field.name}.")
        return out
    if isinstance(value, tuple) and value and attrs.has(type(value[0])):
        return _keys(value[0], prefix)
    return set()


def _yaml_keys(value: object, prefix: str = "") -> set[str]:
    if isinstance(value, dict):
        out: set[str] = set()
        for key, item in value.items():
            out |= {f"{prefix}{key}"} | _yaml_keys(item, f"{prefix}{key}.")
        return out
    if isinstance(value, list) and value:
        return _yaml_keys(value[0], prefix)
    return set()


def test_example_lists_every_key_with_its_default() -> None:
    loaded = load_config(EXAMPLE, environ={})
    assert loaded == Config()
    assert _yaml_keys(yaml.safe_load(EXAMPLE.read_text())) == _keys(Config())


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
