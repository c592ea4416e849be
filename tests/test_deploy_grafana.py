"""deploy/grafana: the dashboard passes the (hand-kept) Grafana dashboard schema, its PromQL parses
(promtool, by the rule-file trick), and every metric its panels and the Prometheus rules name is one a real
proxy exports after some traffic (or a rule records): a renamed metric breaks this test, not the dashboard."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from tests.support.redis_server import RedisServer
from tests.support.servers import start_emulator, start_proxy
from tests.support.tools import ROOT, tool

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "shared-ollama-proxy.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
KEY = "sk-grafana-test"

_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
             "offset", "inf", "nan"}


def _dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def _panel_exprs() -> list[str]:
    return [t["expr"] for p in _dashboard()["panels"] for t in p["targets"]]


def _rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords, labels or durations)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        if match.group(2) is None and match.group(1) not in _KEYWORDS:
            names.add(match.group(1))
    return names


def test_metric_name_extraction() -> None:
    assert metric_names('sum by (job, le) (rate(a_b_bucket{le="45",x=~"a|b"}[5m])) / on (job) c:d') == \
        {"a_b_bucket", "c:d"}
    assert metric_names("1 - max (x_total) > 0.5 and y") == {"x_total", "y"}


def test_dashboard_matches_the_grafana_schema() -> None:
    schema = json.loads((GRAFANA / "dashboard.schema.json").read_text())
    dashboard = _dashboard()
    jsonschema.validate(dashboard, schema)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
    datasource = yaml.safe_load((GRAFANA / "datasource.yaml").read_text())["datasources"][0]
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {datasource["uid"]}


def test_schema_refuses_a_broken_dashboard() -> None:
    schema = json.loads((GRAFANA / "dashboard.schema.json").read_text())
    dashboard = _dashboard()
    dashboard["panels"][0]["id"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(dashboard, schema)
    dashboard = _dashboard()
    del dashboard["panels"][1]["targets"][0]["expr"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(dashboard, schema)


def test_panel_promql_parses(tmp_path: Path) -> None:
    """promtool parses the panels' queries as recording rules ($__rate_interval fixed to 5m)."""
    rules = [{"record": f"panel:q{i}", "expr": e.replace("$__rate_interval", "5m")}
             for i, e in enumerate(_panel_exprs())]
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    checked = subprocess.run([tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True,
                             timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    path.write_text(yaml.safe_dump({"groups": [{"name": "broken", "rules": [
        {"record": "panel:broken", "expr": "sum by (le (rate(x[5m]))"}]}]}))
    broken = subprocess.run([tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert broken.returncode != 0


def _words(count: int) -> str:
    return " ".join(f"word{i % 97}" for i in range(count))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """Sample names of a real proxy's /metrics (Redis state, a tenant) after varied traffic: chat, embed,
    a silent truncation, a model load, an unknown key."""
    tmp = tmp_path_factory.mktemp("grafana")
    redis = RedisServer(tmp)
    emulator = start_emulator(tmp, load_s=0.8)  # a load over the cold-load threshold (0.5 s)
    proxy = start_proxy(tmp, [emulator.url], {
        "tenants": [{"name": "team", "keys": [KEY]}],
        "state": {"backend": "redis", "url": redis.url},
        # Shadow limits let the over-long prompt reach Ollama (enforced, the context guard refuses it),
        # so the silent truncation and its metric happen.
        "chain": {"limits": {"max_prompt_tokens": 8000, "mode": "shadow"}},
        "models": {"qwen3": {"options": {"num_ctx": 512}}}})
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        chat = httpx.post(f"{proxy.url}/api/chat", headers=auth, timeout=60, json={
            "model": "llama3.2", "stream": False, "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 200
        embed = httpx.post(f"{proxy.url}/api/embed", headers=auth, timeout=60,
                           json={"model": "nomic-embed-text", "input": ["a", "b"]})
        assert embed.status_code == 200
        silent = httpx.post(f"{proxy.url}/api/generate", headers=auth, timeout=60, json={
            "model": "qwen3", "prompt": _words(900), "stream": False, "think": False,
            "options": {"num_ctx": 512}})
        assert silent.status_code == 200
        assert httpx.post(f"{proxy.url}/api/chat", headers={"Authorization": "Bearer nope"},
                          json={"model": "llama3.2"}, timeout=30).status_code == 401
        text = httpx.get(f"{proxy.url}/metrics", timeout=30).text
        yield {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}
    finally:
        proxy.stop()
        emulator.stop()
        redis.stop()


def test_dashboard_and_rules_name_only_exported_metrics(exported: set[str]) -> None:
    recorded = {r["record"] for r in _rules() if "record" in r}
    known = exported | recorded
    missing = {}
    for expr in _panel_exprs() + [r["expr"] for r in _rules()]:
        unknown = metric_names(expr) - known
        if unknown:
            missing[expr] = sorted(unknown)
    assert missing == {}, f"not exported by the proxy: {missing}\nexported: {sorted(exported)}"
