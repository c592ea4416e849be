"""deploy/: `make deploy-check` validates every deploy file offline (promtool, amtool, a Compose validator,
systemd-analyze, kubernetes-validate, the proxy's check-config), each validator refuses a broken copy, and
the files hold what operators rely on (non-root image with a health check, probes, drain, PDB...)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.support.tools import ROOT, tool

DEPLOY = ROOT / "deploy"


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=180, cwd=cwd, check=False)


def _manifests() -> dict[str, dict[str, Any]]:
    docs = yaml.safe_load_all((DEPLOY / "kubernetes" / "shared-ollama-proxy.yaml").read_text())
    return {d["kind"]: d for d in docs}


def test_make_deploy_check_passes() -> None:
    done = _run("make", "--no-print-directory", "deploy-check", f"DEPLOY_PYTHON={sys.executable}",
                f"PROMTOOL={tool('promtool')}", f"AMTOOL={tool('amtool')}",
                f"DOCKER_COMPOSE={tool('docker-compose')}",
                f"KUBERNETES_VALIDATE={tool('kubernetes-validate')}", cwd=ROOT)
    tool("systemd-analyze")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


def test_compose_validator_refuses_a_broken_file(tmp_path: Path) -> None:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert {"ollama-a", "ollama-b", "proxy", "redis", "jaeger", "prometheus", "alertmanager",
            "grafana"} <= set(data["services"])
    assert data["services"]["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    data["services"]["proxy"]["restart"] = ["always"]  # a list where Compose wants a string
    broken = tmp_path / "compose.yaml"
    broken.write_text(yaml.safe_dump(data))
    assert _run(tool("docker-compose"), "-f", str(broken), "config", "-q").returncode != 0


def test_systemd_units_verify_and_a_bad_key_is_reported(tmp_path: Path) -> None:
    proxy_unit = (DEPLOY / "systemd" / "shared-ollama-proxy.service").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in proxy_unit
    assert re.search(r"^LimitNOFILE=\d+", proxy_unit, re.M)
    for key in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "CapabilityBoundingSet="):
        assert key in proxy_unit
    template = (DEPLOY / "systemd" / "ollama@.service").read_text()
    assert "%i" in template
    # verify insists ExecStart's binary exists: check copies whose binaries are /bin/true.
    rewrite = re.compile(r"^(ExecStart\w*=)\S+", re.M)
    (tmp_path / "shared-ollama-proxy.service").write_text(rewrite.sub(r"\1/bin/true", proxy_unit))
    (tmp_path / "ollama@.service").write_text(rewrite.sub(r"\1/bin/true", template))
    for unit in ("shared-ollama-proxy.service", "ollama@a.service"):
        done = _run(tool("systemd-analyze"), "verify", unit, cwd=tmp_path)
        assert done.returncode == 0 and done.stderr == "", done.stderr
    (tmp_path / "shared-ollama-proxy.service").write_text(
        rewrite.sub(r"\1/bin/true", proxy_unit).replace("LimitNOFILE=", "LimitNOFILES="))
    done = _run(tool("systemd-analyze"), "verify", "shared-ollama-proxy.service", cwd=tmp_path)
    assert "Unknown key" in done.stderr


def test_kubernetes_manifests_hold_what_operators_rely_on(tmp_path: Path) -> None:
    kinds = _manifests()
    assert {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget",
            "ServiceMonitor"} <= set(kinds)
    deployment = kinds["Deployment"]["spec"]
    assert deployment["replicas"] >= 2
    container = deployment["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "preStop" in container["lifecycle"]
    assert deployment["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    config = yaml.safe_load(kinds["ConfigMap"]["data"]["config.yaml"])
    assert config["state"]["backend"] == "redis"
    assert "sk-" not in kinds["ConfigMap"]["data"]["config.yaml"], "keys belong in the Secret"
    # the init container's placeholders are all provided by the Secret
    placeholders = set(re.findall(r"\$\{(\w+)\}", kinds["ConfigMap"]["data"]["config.yaml"]))
    assert placeholders == set(kinds["Secret"]["stringData"])
    broken = (DEPLOY / "kubernetes" / "shared-ollama-proxy.yaml").read_text().replace(
        "  replicas: 2", "  replicas: two")
    (tmp_path / "broken.yaml").write_text(broken)
    assert _run(tool("kubernetes-validate"), "--strict", str(tmp_path / "broken.yaml")).returncode != 0


def test_dockerfile_runs_unprivileged_with_a_health_check() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n.*?/healthz", text, re.M)
    for line in re.findall(r"^COPY (\S+)", text, re.M):
        if not line.startswith("--"):
            assert (ROOT / line).exists(), f"COPY {line}: no such file in the repository"
