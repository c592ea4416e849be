"""deploy/prometheus: the rules pass promtool's checks and unit tests, a broken rule fails them, and end to
end a real Prometheus scraping a real proxy driven into overload fires the rejection-rate SLO alert."""

from __future__ import annotations

import asyncio
import math
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.polling import until, wait_for
from tests.support.servers import Server, free_port, start_emulator, start_proxy
from tests.support.tools import ROOT, tool

PROM = ROOT / "deploy" / "prometheus"
OPERATIONS = ROOT / "docs" / "OPERATIONS.md"


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, cwd=cwd, check=False)


def _alerts() -> list[dict[str, Any]]:
    data = yaml.safe_load((PROM / "rules.yml").read_text())
    return [rule for group in data["groups"] for rule in group["rules"] if "alert" in rule]


def test_rules_check_and_unit_tests_pass() -> None:
    checked = _run(tool("promtool"), "check", "rules", str(PROM / "rules.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _run(tool("promtool"), "test", "rules", "tests.yml", cwd=PROM)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    tests = yaml.safe_load((PROM / "tests.yml").read_text())["tests"]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else silent).add(check["alertname"])
    names = {rule["alert"] for rule in _alerts()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - silent == set(), "alerts never tested silent"


def test_every_alert_links_its_runbook_section() -> None:
    # GitHub's anchors: the heading lowercased, spaces to dashes, punctuation dropped.
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#{2,3} (.+)$", OPERATIONS.read_text(), flags=re.M)}
    for rule in _alerts():
        url = rule["annotations"]["runbook_url"]
        assert url.startswith("docs/OPERATIONS.md#"), url
        assert url.split("#", 1)[1] in anchors, f"{rule['alert']}: no section {url}"


def test_a_broken_rule_fails_its_unit_test(tmp_path: Path) -> None:
    """The unit tests can fail: the page threshold of the rejection alert raised out of reach."""
    text = (PROM / "rules.yml").read_text()
    broken = text.replace("sop:rejections:ratio_rate1h > 0.72", "sop:rejections:ratio_rate1h > 0.99")
    assert broken != text
    (tmp_path / "rules.yml").write_text(broken)
    (tmp_path / "tests.yml").write_text((PROM / "tests.yml").read_text())
    tested = _run(tool("promtool"), "test", "rules", "tests.yml", cwd=tmp_path)
    assert tested.returncode != 0
    assert "SOPRejectionsBudgetBurnFast" in tested.stdout + tested.stderr


_SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\}$")
_TARGET_LABELS = {"job", "instance"}
"""Labels Prometheus adds to a scraped series itself: the proxy never exports them."""


def test_the_unit_tests_feed_series_shaped_like_the_proxys(tmp_path: Path) -> None:
    """Every input series of tests.yml whose metric a real proxy exports after a request carries only
    labels the proxy's own series of it have (plus job and instance): an alert tested on a label the
    proxy never exports (its `by` grouping then yields nothing) passes promtool and misleads on call."""
    emulator = start_emulator(tmp_path)
    proxy = start_proxy(tmp_path, [emulator.url])
    try:
        served = httpx.post(f"{proxy.url}/api/chat", json={
            "model": "llama3.2", "stream": False, "messages": [{"role": "user", "content": "hi"}]},
            timeout=60)
        assert served.status_code == 200
        refused = httpx.post(f"{proxy.url}/api/chat", content=b"{", timeout=60)  # an error.type too
        assert refused.status_code == 400
        exported: dict[str, set[str]] = {}
        bounds: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(httpx.get(f"{proxy.url}/metrics", timeout=30).text):
            for sample in family.samples:
                exported.setdefault(sample.name, set()).update(sample.labels)
                if "le" in sample.labels:
                    bounds.setdefault(sample.name, set()).add(sample.labels["le"])
    finally:
        proxy.stop()
        emulator.stop()
    checked: set[str] = set()
    for case in yaml.safe_load((PROM / "tests.yml").read_text())["tests"]:
        for entry in case["input_series"]:
            match = _SERIES.match(entry["series"])
            assert match is not None, entry["series"]
            pairs = dict(pair.split("=", 1) for pair in match[2].split(","))
            name, labels = match[1], {key.strip() for key in pairs}
            if name in exported:
                checked.add(name)
                assert labels - _TARGET_LABELS <= exported[name], (
                    f"{case['name']}: {name} has no label {sorted(labels - _TARGET_LABELS - exported[name])}")
                # A bucket bound as the proxy writes it (le="45.0"): a rule matching le="45" passes
                # promtool on le="45" inputs and never matches a scraped series.
                if "le" in labels:
                    assert pairs["le"].strip('"') in bounds[name], (
                        f"{case['name']}: {name} has no bucket le={pairs['le']} ({sorted(bounds[name])})")
    # Not vacuous: the request and traffic metrics and the backpressure decisions are among them.
    assert {"http_server_request_duration_seconds_count", "sop_backpressure_decisions_total",
            "sop_upstream_healthy", "http_server_request_duration_seconds_bucket"} <= checked


def _start_prometheus(tmp: Path, target: str,
                      edit: Callable[[str], str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Prometheus on 127.0.0.1 (a port of its own), scraping and evaluating every second, with a test copy of
    the rules whose `for:` durations are 0s (and `edit` applied to its text)."""
    rules = re.sub(r"for: \S+", "for: 0s", (PROM / "rules.yml").read_text())
    if edit is not None:
        rules = edit(rules)
    (tmp / "rules.yml").write_text(rules)
    (tmp / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp / "rules.yml")],
        "scrape_configs": [{"job_name": "sop", "static_configs": [{"targets": [target]}]}]}))
    port = free_port()  # Prometheus cannot report a port it chose; taken late, checked by polling
    log = (tmp / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [tool("prometheus"), f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError((tmp / "prometheus.log").read_text())
        try:
            return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
    wait_for(ready, 30, "prometheus ready")
    return process, url


@pytest.mark.timeout(120)
def test_the_slow_completion_ratio_is_computed_from_a_real_proxys_buckets(tmp_path: Path) -> None:
    """`sop:slow_completions:ratio_rate5m` (what both slow-completion alerts compare) has a value when a
    real Prometheus scrapes a real proxy that served completions: 0, all of them well within 45 s. A rule
    naming a bucket bound the proxy does not write (le="45" against the exported le="45.0") leaves the
    ratio empty for ever, and the P95 completion SLO alerts can never fire."""
    emulator = start_emulator(tmp_path)
    proxy = start_proxy(tmp_path, [emulator.url])
    prometheus, url = _start_prometheus(tmp_path, f"127.0.0.1:{proxy.port}")
    body = {"model": "llama3.2", "stream": False, "messages": [{"role": "user", "content": "hi"}]}
    try:
        def ratio() -> list[dict[str, Any]]:
            # A completion between scrapes, until rate() sees the bucket and the count rise.
            assert httpx.post(f"{proxy.url}/api/chat", json=body, timeout=60).status_code == 200
            time.sleep(0.5)  # scraped and evaluated every second
            result: list[dict[str, Any]] = httpx.get(f"{url}/api/v1/query", timeout=5, params={
                "query": "sop:slow_completions:ratio_rate5m"}).json()["data"]["result"]
            return result
        result = wait_for(ratio, 60, "sop:slow_completions:ratio_rate5m has a value")
        assert [float(series["value"][1]) for series in result] == [0.0]
    finally:
        prometheus.terminate()
        prometheus.wait(15)
        proxy.stop()
        emulator.stop()


def _one_second_slo(rules: str) -> str:
    """The slow-completion threshold of the rules moved from 45 s to 1 s, so a test needs no 45 s waits."""
    edited = rules.replace('le=~"45|45\\\\.0"', 'le=~"1|1\\\\.0"')
    assert edited != rules
    return edited


async def _queued_round(proxy: Server, emulator: Server, waiters: int) -> list[int]:
    """One request holds the only slot for 2 s (the replica never answers; its deadline ends it with a
    504), `waiters` more wait in the proxy's queue behind it and are then answered at once."""
    body = {"model": "llama3.2", "stream": False, "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(timeout=60) as client:
        fault = await client.post(f"{emulator.url}/_emulator/faults",
                                  json={"hang_before_headers": True, "count": 1})
        assert fault.status_code == 200
        holder = asyncio.ensure_future(client.post(f"{proxy.url}/api/chat", json=body,
                                                   headers={"X-Deadline-S": "2"}))
        await until(lambda: emulator.stats()["faults"]["hits"] == 1, 10, "the holder at the replica")
        queued = await asyncio.gather(*(client.post(f"{proxy.url}/api/chat", json=body)
                                        for _ in range(waiters)))
        return [(await holder).status_code, *(r.status_code for r in queued)]


@pytest.mark.timeout(150)
def test_the_completion_slo_counts_the_time_requests_waited_in_the_queue(tmp_path: Path) -> None:
    """P95 completion < 45 s is the clients' completion time (what `loadgen --check-slo` judges): time
    queued in the proxy counts. Requests that wait ~2 s for a slot and are then answered at once are all
    slow at a 1 s threshold; a ratio taken from the replica's answer time alone (the GenAI client
    histogram, started when the request leaves the queue) calls them fast, and a fleet whose clients
    wait minutes in the queue never pages."""
    emulator = start_emulator(tmp_path)  # instant answers
    proxy = start_proxy(tmp_path, [emulator.url], {"chain": {"backpressure": {
        "max_in_flight": 1, "max_queue_size": 8, "queue_timeout_s": 60.0}}})
    prometheus, url = _start_prometheus(tmp_path, f"127.0.0.1:{proxy.port}", _one_second_slo)
    try:
        def ratio() -> float | None:
            codes = asyncio.run(_queued_round(proxy, emulator, 3))
            assert codes == [504, 200, 200, 200], codes
            time.sleep(1.5)  # scraped and evaluated every second
            result = httpx.get(f"{url}/api/v1/query", timeout=5, params={
                "query": "sop:slow_completions:ratio_rate5m"}).json()["data"]["result"]
            value = float(result[0]["value"][1]) if result else math.nan
            return None if math.isnan(value) else value  # NaN: no completion seen rising yet (0/0)
        assert wait_for(ratio, 90, "sop:slow_completions:ratio_rate5m has a value") > 0.9
    finally:
        prometheus.terminate()
        prometheus.wait(15)
        proxy.stop()
        emulator.stop()


async def _burst(proxy: Server, count: int) -> list[int]:
    body = {"model": "llama3.2", "stream": False, "messages": [{"role": "user", "content": "hello there"}]}
    async with httpx.AsyncClient(timeout=60) as client:
        responses = await asyncio.gather(*(client.post(f"{proxy.url}/api/chat", json=body)
                                           for _ in range(count)))
    return [r.status_code for r in responses]


@pytest.mark.timeout(150)
def test_overload_fires_the_rejection_slo_alert_in_a_real_prometheus(tmp_path: Path) -> None:
    emulator = start_emulator(tmp_path, decode_tokens_per_s=20.0)  # slow: a request holds its slot
    proxy = start_proxy(tmp_path, [emulator.url], {"chain": {"backpressure": {
        "max_queue_size": 1, "max_in_flight": 1, "queue_timeout_s": 60.0}}})
    prometheus, url = _start_prometheus(tmp_path, f"127.0.0.1:{proxy.port}")
    try:
        def scraped() -> bool:
            targets = httpx.get(f"{url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            return any(t["health"] == "up" for t in targets)
        wait_for(scraped, 30, "proxy scraped")

        def firing() -> list[dict[str, Any]]:
            # Bounded bursts of 12 requests until the alert fires (90 s at most): the 503 series
            # must exist in one scrape and rise in a later one for rate() to see it.
            codes = asyncio.run(_burst(proxy, 12))
            assert 503 in codes, codes
            alerts = httpx.get(f"{url}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
            return [a for a in alerts if a["labels"]["alertname"] == "SOPRejectionsBudgetBurnFast"
                    and a["state"] == "firing"]
        alerts = wait_for(firing, 90, "SOPRejectionsBudgetBurnFast firing")
        assert alerts[0]["labels"]["severity"] == "page"
        assert alerts[0]["annotations"]["runbook_url"].endswith("#queue-full")
    finally:
        prometheus.terminate()
        prometheus.wait(15)
        proxy.stop()
        emulator.stop()
