"""Configuration: the example file lists every key with its default, bad files are refused with the key
path, environment overrides apply, and `check-config` validates without serving."""

from __future__ import annotations

import socket
import subprocess
import sys
import typing
from pathlib import Path

import attrs
import pytest
import yaml

from proxy.config import Config, ConfigError, ModelConfig, TenantConfig, load_config, structure

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "config.example.yaml"
PLUGINS_DOC = Path(__file__).resolve().parent.parent / "docs" / "PLUGINS.md"


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


def _plugin_samples() -> list[tuple[str, str]]:
    """The `plugins:` samples operators copy: each indented block of docs/PLUGINS.md that starts with
    `plugins:`, and the commented-out plugin entries of the example file, uncommented."""
    samples: list[tuple[str, str]] = []
    lines = PLUGINS_DOC.read_text(encoding="utf-8").splitlines()
    for index, line in enumerate(lines):
        if line.strip() == "plugins:" or line.strip().startswith("plugins:  "):
            indent = len(line) - len(line.lstrip())
            if indent < 4 or (index and lines[index - 1].strip()):
                continue
            block = []
            for follow in lines[index:]:
                if follow.strip() and len(follow) - len(follow.lstrip()) < indent:
                    break
                block.append(follow[indent:])
            samples.append((f"docs/PLUGINS.md:{index + 1}", "\n".join(block)))
    commented = EXAMPLE.read_text(encoding="utf-8").split("\nplugins: []\n", 1)[1].splitlines()
    assert all(line.startswith("# ") for line in commented), "uncommenting is deleting each line's '# '"
    samples.append(("deploy/config.example.yaml (commented plugins)",
                    "\n".join(line[2:] for line in commented)))
    return samples


def test_every_documented_plugin_sample_loads(tmp_path: Path) -> None:
    """Each plugin sample the docs show is a valid configuration as written (with the system tenants
    it names configured); `max_messages`, the third-party example of PLUGINS.md, needs its package."""
    samples = _plugin_samples()
    assert len(samples) >= 6, [where for where, _ in samples]
    for where, text in samples:
        data = yaml.safe_load(text)
        entries = [e for e in data["plugins"] if e["name"] != "max_messages"]
        assert entries, where
        names = {e.get("tenant") for e in entries} - {None, "anonymous"}
        config = {**data, "tenants": [{"name": n, "keys": [f"sk-{n}"]} for n in sorted(names)],
                  "plugins": entries}  # any other key the sample holds is checked too
        path = tmp_path / "sample.yaml"
        path.write_text(yaml.safe_dump(config))
        loaded = load_config(path, environ={})
        assert [p["name"] for p in loaded.plugins] == [e["name"] for e in entries], where
    built_ins = ["trim_history", "summarize_history", "embed_cache", "embed_batch"]
    assert [e["name"] for e in yaml.safe_load(samples[-1][1])["plugins"]] == built_ins


def test_model_options_check_only_what_is_written() -> None:
    """Only the load-time options (and keep_alive) are written into requests: a null is skipped, as
    Ollama skips it, and an option the proxy never writes is not refused for its type."""
    config = structure({"models": {"m": {"options": {"num_ctx": None, "temperature": "warm",
                                                      "num_batch": 512}}}})
    assert config.models["m"].options == {"temperature": "warm", "num_batch": 512}  # no null written


def test_a_canary_may_name_the_admin_callers() -> None:
    """Admin-key callers run as the tenant `admin`, so a rollout list may name it (it did before the
    rollout names were checked); a plugin's sub-requests still cannot be charged to it."""
    config = structure({"admin": {"keys": ["sk-admin"]},
                        "chain": {"limits": {"rollout": {"enforce_share": 0, "tenants": ["admin"]}}},
                        "plugins": [{"name": "trim_history", "rollout": {"tenants": ["admin"]}}]})
    assert list(config.chain.limits.rollout.tenants) == ["admin"]
    with pytest.raises(ConfigError, match=r"plugins\[0\]\.tenant: unknown tenant 'admin'"):
        structure({"plugins": [{"name": "embed_cache", "tenant": "admin"}]})


def test_listen_may_ask_for_any_free_port() -> None:
    """Port 0: the system picks one and the server reports it (`--port-file`, its log line)."""
    assert structure({"server": {"listen": "127.0.0.1:0"}}).server.listen == "127.0.0.1:0"


@pytest.mark.parametrize("data,message", [
    ({"server": {"max_body_bytes": 0}}, "server.max_body_bytes: must be > 0"),
    ({"server": {"bogus": 1}}, "server: unknown key(s) bogus"),
    ({"upstreams": [{"url": "http://a:1"}, {"url": "ftp://x"}]},
     "upstreams[1].url: expected an http(s) URL, got scheme 'ftp'"),
    ({"upstreams": [{"name": "a"}]}, "upstreams[0].url: required key missing"),
    ({"plugins": [{"name": "embed_cache", "tenant": "nope"}]}, "plugins[0].tenant: unknown tenant 'nope'"),
    ({"tenants": [{"name": "canary", "keys": ["sk-canary"]}],
      "chain": {"quotas": {"rollout": {"enforce_share": 0, "tenants": ["canray"]}}}},
     "chain.quotas.rollout.tenants: unknown tenant 'canray' (known: admin, anonymous, canary)"),
    ({"plugins": [{"name": "trim_history", "rollout": {"tenants": ["nope"]}}]},
     "plugins[0].rollout.tenants: unknown tenant 'nope'"),
    # Written into every request for the model: a type Ollama refuses would fail each of them.
    ({"models": {"llama3.2": {"options": {"num_ctx": "big"}}}},
     "models.llama3.2.options: num_ctx must be an integer, got str"),
    ({"models": {"m": {"options": {"num_thread": [2]}}}}, "models.m.options: num_thread must be an integer"),
    ({"models": {"m": {"options": {"use_mmap": 1}}}}, "models.m.options: use_mmap must be true or false"),
    ({"upstreams": [{"url": "htp://user:secret@h:1"}]}, "upstreams[0].url: expected an http(s) URL"),
    ({"telemetry": {"otlp_protocol": "udp"}}, "telemetry.otlp_protocol: not one of"),
    ({"telemetry": {"sample_ratio": 2}}, "telemetry.sample_ratio: must be between 0 and 1"),
    ({"server": {"listen": "nowhere"}}, "server.listen: expected HOST:PORT"),
    ({"server": {"listen": "127.0.0.1:65536"}}, "server.listen: expected HOST:PORT"),
    ({"forwarding": {"idle_timeout_s": "soon"}}, "forwarding.idle_timeout_s: expected a number"),
    ({"upstreams": []}, "upstreams: at least one upstream is required"),
    ({"chains": {}}, "unknown key(s) chains"),
    # Step sections live beside their steps; the loader's derived hooks keep them just as strict.
    ({"chain": {"limits": {"bogus": 1}}}, "chain.limits: unknown key(s) bogus"),
    ({"chain": {"quotas": {"bogus": 1}}}, "chain.quotas: unknown key(s) bogus"),
    ({"chain": {"backpressure": {"bogus": 1}}}, "chain.backpressure: unknown key(s) bogus"),
    ({"chain": {"health": {"bogus": 1}}}, "chain.health: unknown key(s) bogus"),
    ({"chain": {"balancer": {"bogus": 1}}}, "chain.balancer: unknown key(s) bogus"),
    ({"chain": {"health": {"mode": "sometimes"}}}, "chain.health.mode: not one of"),
    ({"chain": {"balancer": {"max_retries": True}}}, "chain.balancer.max_retries: expected an integer"),
    ({"chain": {"backpressure": {"max_queue_size": 0}}}, "chain.backpressure.max_queue_size: must be > 0"),
    # A request takes one whole unit of a bucket holding the rate: under 1, every request got a 429
    # whose Retry-After (60) never came true.
    ({"tenants": [{"name": "t", "keys": ["k1"], "requests_per_minute": 0.5}]},
     "tenants[0].requests_per_minute: must be >= 1"),
    ({"anonymous": {"requests_per_minute": 0.9}}, "anonymous.requests_per_minute: must be >= 1"),
    ({"models": {"m": {"bogus": 1}}}, "models.m: unknown key(s) bogus"),
    # Reserved tenant names: a tenant called so would share the keyless callers' (or admins') buckets.
    ({"upstreams": [{"url": "http://a:1"}], "tenants": [{"name": "t", "keys": ["k1"]},
                                                       {"name": "anonymous", "keys": ["k2"]}]},
     "tenants[1].name: 'anonymous' is reserved"),
    ({"upstreams": [{"url": "http://a:1"}], "tenants": [{"name": "admin", "keys": ["k1"]}]},
     "tenants[0].name: 'admin' is reserved"),
    # A Redis URL the parser cannot read: refused without quoting the part it could not read.
    ({"upstreams": [{"url": "http://a:1"}], "state": {"url": "redis://:secretPrefix/tail@h:6379/0"}},
     "state.url: not a valid Redis URL"),
    ({"upstreams": [{"url": "http://a:secretPrefix/x@h:1"}]}, "upstreams[0].url: not a valid http(s) URL"),
    ({"upstreams": [{"url": "http://a:1"}],
      "plugins": [{"name": "embed_cache", "redis_url": "redis://:secretPrefix/tail@h:6379/0"}]},
     "plugins[0].redis_url: not a valid Redis URL"),
    ({"upstreams": [{"url": "http://a:1", "restart_command": "restart {instance}"}]},
     "upstreams[0].restart_command: only {name}, {url}, {host} and {port} may be substituted"),
])
def test_bad_values_name_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        structure(data)
    assert message in str(error.value)
    assert "secret" not in str(error.value).lower()  # a refused value is never quoted back when a URL


def test_mode_off_written_as_the_docs_write_it(tmp_path: Path) -> None:
    """`mode: off`, unquoted as DESIGN, the README and the example file write it, is YAML 1.1's boolean
    false to PyYAML: it must mean `off` for every step and plugin (it was refused as "not one of
    ['enforce', 'shadow', 'off']"), while an unquoted `on` is refused with the reason."""
    path = tmp_path / "off.yaml"
    path.write_text("chain:\n" + "".join(f"  {step}: {{mode: off}}\n" for step in
                                          ("limits", "quotas", "backpressure", "health", "balancer"))
                    + "plugins:\n  - {name: trim_history, mode: off}\n")
    config = load_config(path, environ={})
    assert {config.chain.limits.mode, config.chain.quotas.mode, config.chain.backpressure.mode,
            config.chain.health.mode, config.chain.balancer.mode} == {"off"}
    checked = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(path)],
                             capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr
    path.write_text("chain:\n  quotas: {mode: on}\n")
    with pytest.raises(ConfigError, match=r"chain\.quotas\.mode: expected enforce, shadow or off"):
        load_config(path, environ={})
    path.write_text("plugins:\n  - {name: trim_history, mode: on}\n")
    with pytest.raises(ConfigError, match=r"plugins\[0\]\.mode: expected enforce, shadow or off"):
        load_config(path, environ={})


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
    missing = tmp_path / "missing.yaml"
    # Each names the file once (it said `broken.yaml: broken.yaml: invalid YAML ...`).
    for path, message in ((broken, "invalid YAML at line 2, column 1"),
                          (missing, "cannot be read (No such file or directory)")):
        refused = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(path)],
                                 capture_output=True, text=True, check=False)
        assert refused.returncode == 1
        assert refused.stderr.startswith(f"{path}: {message}") and refused.stderr.count(str(path)) == 1


def test_a_port_file_that_cannot_be_written_is_refused_before_listening(tmp_path: Path) -> None:
    """`--port-file` in a directory that does not exist: exit 2 with the reason, before binding (it
    used to bind, serve, then die with a traceback when it came to write the file)."""
    # A path that is a directory as well: the port file is renamed onto it, which failed the same way.
    (tmp_path / "a-directory").mkdir()
    for port_file, reason in ((tmp_path / "absent" / "proxy.port", "does not exist"),
                              (tmp_path / "a-directory", "is a directory")):
        for command in (["serve", "--upstream", "http://127.0.0.1:9"], ["emulate"]):
            result = subprocess.run([sys.executable, "-m", "proxy", *command, "--listen", "127.0.0.1:0",
                                     "--port-file", str(port_file)],
                                    capture_output=True, text=True, timeout=30, check=False)
            assert result.returncode == 2, (command, result.stderr[-500:])
            assert "--port-file" in result.stderr and reason in result.stderr
            assert "Traceback" not in result.stderr and "listening" not in result.stderr


def test_an_address_that_cannot_be_bound_is_one_line_and_exit_2() -> None:
    """serve, emulate and demo on a port another process holds: `cannot bind HOST:PORT: <reason>` and
    exit 2, as `serve --workers N` says it (they used to die with an OSError traceback, exit 1)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for command in (["serve", "--upstream", "http://127.0.0.1:9", "--listen", f"127.0.0.1:{port}"],
                        ["emulate", "--listen", f"127.0.0.1:{port}"],
                        ["demo", "--listen", f"127.0.0.1:{port}", "--replica-ports", "0,0"],
                        ["demo", "--listen", "127.0.0.1:0", "--replica-ports", f"0,{port}"]):
            result = subprocess.run([sys.executable, "-m", "proxy", *command],
                                    capture_output=True, text=True, timeout=30, check=False)
            assert result.returncode == 2, (command, result.stderr[-800:])
            assert f"cannot bind 127.0.0.1:{port}: Address already in use" in result.stderr, command
            assert "Traceback" not in result.stderr and "is running" not in result.stdout, command


def test_serve_refuses_a_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams: [{url: 'nope'}]\n")
    result = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(bad)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2 and "upstreams[0].url" in result.stderr


@pytest.mark.parametrize("data,message", [
    ({"admin": {"keys": "ROOT"}}, "admin.keys: expected a list, got str"),
    ({"tenants": [{"name": "a", "keys": "sk-a"}]}, "tenants[0].keys: expected a list, got str"),
    ({"anonymous": {"allow": "no"}}, "anonymous.allow: expected true or false, got str"),
    ({"anonymous": {"allow": "false"}}, "anonymous.allow: expected true or false"),
    ({"tenants": [{"name": "a", "keys": ["k"], "allow_management": "yes"}]},
     "tenants[0].allow_management: expected true or false"),
    ({"admin": {"keys": [""]}}, "admin.keys[0]: an empty or whitespace key is not allowed"),
    ({"admin": {"keys": ["  "]}}, "admin.keys[0]: an empty or whitespace key is not allowed"),
    ({"tenants": [{"name": "a", "keys": ["ok", "\t"]}]},
     "tenants[0].keys[1]: an empty or whitespace key is not allowed"),
    ({"tenants": [{"name": "a", "keys": ["sk a"]}]},
     "tenants[0].keys[0]: a key may not contain whitespace or control characters"),
    ({"tenants": [{"name": "a", "keys": ["k1"]}, {"name": "b", "keys": ["k1"]}]},
     "tenants[1].keys: a key is used twice (also by a)"),
    ({"admin": {"keys": ["k1"]}, "tenants": [{"name": "a", "keys": ["k1"]}]},
     "tenants[0].keys: a key is used twice (also by admin)"),
    ({"tenants": [{"name": "a", "keys": ["ollama"]}]},
     "tenants[0].keys: a key is also an anonymous placeholder"),
    ({"server": {"max_body_bytes": "1024"}}, "server.max_body_bytes: expected an integer, got str"),
    ({"server": {"max_header_bytes": True}}, "server.max_header_bytes: expected an integer, got bool"),
    ({"server": {"body_timeout_s": 0}}, "server.body_timeout_s: must be > 0"),
    ({"models": {"llama3.2": {"warm_on": "a"}}}, "models.llama3.2.warm_on: expected a list, got str"),
    ({"models": ["llama3.2"]}, "models: expected a mapping, got list"),
    ({"state": {"failure_mode": "maybe"}}, "state.failure_mode: not one of"),
    ({"state": {"backend": "redis", "url": "http://127.0.0.1:6379"}},
     "state.url: expected a redis://, rediss:// or unix:// URL"),
    ({"telemetry": {"metrics_auth": "yes"}}, "telemetry.metrics_auth: expected true, false"),
    ({"upstreams": [{"url": "http://a:1", "name": 5}]}, "upstreams[0].name: expected a string, got int"),
])
def test_config_is_typed_strictly(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        structure(data)
    assert message in str(error.value)


@pytest.mark.parametrize("data", [
    {"telemetry": {"metrics_auth": "admin"}},
    {"telemetry": {"metrics_auth": True}, "tenants": [{"name": "a", "keys": ["k"]}]},
])
def test_metrics_behind_the_admin_key_needs_an_admin_key(data: dict[str, object]) -> None:
    """`metrics_auth: admin` with no admin key is refused (before: accepted, and /metrics stayed open
    where no key was configured at all, the open pass-through, or answered 401 to everybody)."""
    with pytest.raises(ConfigError) as error:
        structure(data)
    assert str(error.value).startswith("telemetry.metrics_auth: puts /metrics behind the admin key, but "
                                       "admin.keys is empty")


def test_strict_errors_never_echo_a_key() -> None:
    with pytest.raises(ConfigError) as error:
        structure({"admin": {"keys": "sk-secret-root"}})
    assert "sk-secret-root" not in str(error.value)


def test_typed_values_that_are_right_still_load() -> None:
    config = structure({"admin": {"keys": ["root"]}, "anonymous": {"allow": False, "keys": []},
                        "telemetry": {"metrics_auth": "admin"}, "server": {"body_timeout_s": 5},
                        "state": {"backend": "redis", "failure_mode": "closed"}})
    assert config.admin.keys == ("root",) and config.anonymous.allow is False
    assert config.telemetry.metrics_need_admin and config.server.body_timeout_s == 5.0
    assert structure({"telemetry": {"metrics_auth": True},
                      "admin": {"keys": ["root"]}}).telemetry.metrics_need_admin
    assert not structure({}).telemetry.metrics_need_admin
    assert structure({}).anonymous.keys == ("ollama",)


@pytest.mark.parametrize("text,path", [
    ("admin: {keys: ROOT}\n", "admin.keys"),
    ("anonymous: {allow: 'no'}\n", "anonymous.allow"),
])
def test_check_config_and_serve_refuse_loose_types(tmp_path: Path, text: str, path: str) -> None:
    bad = tmp_path / "loose.yaml"
    bad.write_text(text)
    checked = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(bad)],
                             capture_output=True, text=True, check=False)
    assert checked.returncode == 1 and path in checked.stderr
    served = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(bad)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert served.returncode == 2 and path in served.stderr


@pytest.mark.parametrize("data,message", [
    ({1: 2}, "unknown key(s) 1"),
    ({True: "x", "server": {7: 1}}, "server: unknown key(s) 7"),
    ({"tenants": [{"name": "a", "keys": ["k"], 5: "x"}]}, "tenants[0]: unknown key(s) 5"),
])
def test_keys_that_are_not_strings_are_named(data: dict[object, object], message: str) -> None:
    # YAML reads `1: 2` with an integer key: the refusal names it (it raised a TypeError from the
    # message's join instead: a traceback from check-config and serve, "unexpected TypeError" on reload).
    with pytest.raises(ConfigError) as error:
        structure(data)  # type: ignore[arg-type]
    assert message in str(error.value)


def test_a_file_that_is_not_utf8_is_refused_with_its_path(tmp_path: Path) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"server:\n  listen: \"\xff\xfe\"\n")
    with pytest.raises(ConfigError, match=r"binary\.yaml: not UTF-8 text \(an invalid byte at offset 19\)"):
        load_config(binary)
    checked = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(binary)],
                             capture_output=True, text=True, check=False)
    assert checked.returncode == 1 and "not UTF-8" in checked.stderr
    assert "Traceback" not in checked.stderr


@pytest.mark.parametrize("make", ["missing", "not a SentencePiece model"])
def test_check_config_and_serve_refuse_a_tokenizer_file_that_cannot_be_loaded(tmp_path: Path,
                                                                            make: str) -> None:
    # check-config said OK, and serve died with a traceback (exit 1) loading the file.
    tokenizer = tmp_path / "llama.model"
    if make != "missing":
        tokenizer.write_bytes(b"\x00garbage, not a model proto")
    config = tmp_path / "tok.yaml"
    config.write_text(yaml.safe_dump({"server": {"listen": "127.0.0.1:0"},
                                      "models": {"llama3.2": {"tokenizer": str(tokenizer)}}}))
    checked = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(config)],
                             capture_output=True, text=True, check=False)
    assert checked.returncode == 1, checked.stdout
    assert "models.llama3.2.tokenizer: cannot be loaded" in checked.stderr
    served = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert served.returncode == 2
    assert "models.llama3.2.tokenizer: cannot be loaded" in served.stderr
    assert "Traceback" not in served.stderr


@pytest.mark.parametrize("key", ["backlog", "max_header_bytes"])
def test_numbers_past_what_the_socket_layer_takes_are_refused(key: str) -> None:
    # check-config said OK; serve then died of OverflowError in listen() (backlog), or started and
    # reset every connection with one (max_header_bytes, in aiohttp's parser).
    with pytest.raises(ConfigError, match=rf"server\.{key}: must be at most 2147483647"):
        structure({"server": {key: 3_000_000_000}})
    assert getattr(structure({"server": {key: 2**31 - 1}}).server, key) == 2**31 - 1


def test_a_key_written_twice_is_refused_with_its_line(tmp_path: Path) -> None:
    # PyYAML keeps the last of two equal keys: a second `admin:` block appended to the file silently
    # took the first one's keys away (check-config said OK, serve and a reload applied it).
    twice = tmp_path / "twice.yaml"
    twice.write_text("admin: {keys: [sk-first-secret]}\n"
                     "tenants: [{name: a, keys: [sk-a], requests_per_minute: 5, requests_per_minute: 9}]\n"
                     "admin: {keys: [sk-second-secret]}\n")
    with pytest.raises(ConfigError) as error:
        load_config(twice)
    assert "line 3, column 1: duplicate key 'admin'" in str(error.value)
    assert "secret" not in str(error.value).replace(str(twice), "")
    twice.write_text("tenants: [{name: a, keys: [sk-a], requests_per_minute: 5, requests_per_minute: 9}]\n")
    with pytest.raises(ConfigError, match=r"line 1, column 59: duplicate key 'requests_per_minute'"):
        load_config(twice)
    twice.write_text("admin: {keys: [sk-first-secret]}\nadmin: {keys: [sk-second-secret]}\n")
    checked = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(twice)],
                             capture_output=True, text=True, check=False)
    assert checked.returncode == 1 and "line 2, column 1: duplicate key 'admin'" in checked.stderr
    assert "sk-" not in checked.stderr
    served = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(twice)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert served.returncode == 2 and "duplicate key 'admin'" in served.stderr
    # A merge (`<<: *defaults`) may still be overridden by a key of the mapping itself.
    merged = tmp_path / "merged.yaml"
    merged.write_text("models:\n  a: &base {max_prompt_tokens: 5, prompt_policy: reject}\n"
                      "  b:\n    <<: *base\n    max_prompt_tokens: 7\n")
    models = load_config(merged).models
    assert models["a"].max_prompt_tokens == 5 and models["b"].max_prompt_tokens == 7
    assert models["b"].prompt_policy == "reject"


def test_a_merged_mapping_may_override_what_it_merges_itself(tmp_path: Path) -> None:
    # `chain.limits` merges defaults and overrides one, and `anonymous` (a level above, so constructed
    # first) merges `chain.limits`: PyYAML flattened the limits in place for `anonymous` before building
    # them, and the merged key next to the override read as one key written twice.
    merged = tmp_path / "merged.yaml"
    merged.write_text("chain:\n  limits: &limits\n    <<: {deadline_s: 60.0, max_prompt_tokens: 4096}\n"
                      "    max_prompt_tokens: 8192\n"
                      "anonymous:\n  <<: *limits\n  requests_per_minute: 60\n")
    config = load_config(merged)
    assert config.chain.limits.max_prompt_tokens == 8192 and config.chain.limits.deadline_s == 60.0
    assert config.anonymous.max_prompt_tokens == 8192 and config.anonymous.requests_per_minute == 60
    # A key written twice in a mapping that is only ever merged is still refused.
    merged.write_text("chain:\n  limits: {deadline_s: 60.0}\n"
                      "anonymous:\n  <<: {max_prompt_tokens: 1, max_prompt_tokens: 2}\n")
    with pytest.raises(ConfigError, match=r"line 4, column 30: duplicate key 'max_prompt_tokens'"):
        load_config(merged)


def test_nested_aliases_are_refused_before_they_expand(tmp_path: Path) -> None:
    # A 600-byte file of nested aliases (9**8 strings once expanded) passed check-config and started;
    # GET /system/config and any reload (which compares configurations as plain data) then wrote it out
    # in full: gigabytes. Sharing a few parts (above) still loads.
    lines = ["models:", "  llama3.2:", "    options:", "      a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"      a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 8)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"more than 200000 values once its YAML aliases are expanded"):
        load_config(bomb)
    checked = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(bomb)],
                             capture_output=True, text=True, timeout=30, check=False)
    assert checked.returncode == 1 and "YAML aliases" in checked.stderr


@pytest.mark.parametrize("text,message", [
    ("chain: {limits: {deadline_s: 1e3}}\n",
     "chain.limits.deadline_s: expected a number, got str (YAML reads an exponent without a dot and "
     "a sign, such as 1e3, as text: write 1.0e+3 or the digits)"),
    ("server: {max_body_bytes: 5e7}\n",
     "server.max_body_bytes: expected an integer, got str (YAML reads an exponent such as 1e3 as "
     "text: write the digits out)"),
])
def test_a_number_yaml_reads_as_text_says_how_to_write_it(tmp_path: Path, text: str, message: str) -> None:
    # PyYAML (YAML 1.1) reads `1e3` as the string "1e3": "expected a number, got str" for what the
    # operator sees as a number sent them looking for quotes that are not there.
    config = tmp_path / "exponent.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(config)
    assert message in str(error.value)
    with pytest.raises(ConfigError, match=r"expected a number, got str$"):
        structure({"chain": {"limits": {"deadline_s": "soon"}}})  # text that is no number: no hint


@pytest.mark.parametrize("text,problem", [
    ("admin:\n  keys:\n    - !sk-live-9f8e7d6c\n",
     "could not determine a constructor for the tag (withheld)"),
    ("admin:\n  keys:\n    - *sk-live-9f8e7d6c\n", "found undefined alias (withheld)"),
    # A tag holding a ' is quoted in double quotes (Python's repr): withheld all the same.
    ("admin:\n  keys:\n    - !sk-live'9f8e7d6c\n",
     "could not determine a constructor for the tag (withheld)"),
])
def test_yaml_errors_never_quote_a_token_that_may_be_a_key(tmp_path: Path, text: str, problem: str) -> None:
    # An unquoted key starting with `!` or `*` is a tag or an alias to YAML, and PyYAML's message
    # quoted it whole: into check-config's output, the reload's ERROR line and /system/config.
    config = tmp_path / "token.yaml"
    config.write_text(text)
    checked = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(config)],
                             capture_output=True, text=True, check=False)
    assert checked.returncode == 1
    assert f"{config}: invalid YAML at line 3, column 7: {problem}" in checked.stderr
    assert "9f8e7d6c" not in checked.stderr
    # What helps and cannot be a key is still said: a character, a token's name.
    config.write_text("server:\n\tlisten: x\n")
    with pytest.raises(ConfigError, match=r"found character '\\t' that cannot start any token"):
        load_config(config)
    config.write_text("admin: {keys: [a}\n")
    with pytest.raises(ConfigError, match=r"expected ',' or '\]', but got '}'"):
        load_config(config)
