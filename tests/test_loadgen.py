"""The load generator: seeded plans, open-loop dispatch against a real emulator, outcome classification
(ok, rejected, timeout, error), summaries and the loopback-only rule."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy.loadgen.runner import Record, assert_loopback, run_plan
from proxy.loadgen.scenarios import scenario
from proxy.loadgen.summary import jain, percentile, summarize
from proxy.loadgen.workload import Burst, Scenario, Stream, Tenant, plan
from tests.support.servers import Server, start_emulator


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_emulator(tmp_path_factory.mktemp("loadgen"), fixed_clock=False,
                            decode_tokens_per_s=400, output_tokens="10,20", name="load")
    yield server
    server.stop()


def test_plans_are_seeded_and_bounded() -> None:
    smoke = scenario("smoke")
    first, again, other = plan(smoke, 3), plan(smoke, 3), plan(smoke, 4)
    assert first == again and first != other
    assert [p.at_s for p in first] == sorted(p.at_s for p in first)
    assert {p.kind for p in first} == {"chat", "rag", "embed"}
    rag = [p for p in first if p.kind == "rag"]
    assert all(8 * 1024 <= p.context_bytes <= 64 * 1024 for p in rag)
    flood = Scenario("flood", 10.0, (Tenant("t", "k", streams=(Stream("chat", 1000.0),)),),
                     max_requests=50)
    assert len(plan(flood, 1)) == 50


def test_burst_lands_in_its_window() -> None:
    bursty = Scenario("b", 30.0, (Tenant("t", "k", bursts=(Burst("rag", 10.0, 25, 2.0),)),))
    offsets = [p.at_s for p in plan(bursty, 1)]
    assert len(offsets) == 25 and all(10.0 <= at <= 12.0 for at in offsets)


def test_open_loop_run_against_the_emulator(emulator: Server) -> None:
    planned = plan(scenario("smoke"), 1)
    records = asyncio.run(run_plan(emulator.url, planned, timeout_s=30))
    assert len(records) == len(planned)
    assert all(r.outcome == "ok" for r in records), [r.error for r in records]
    for item, record in zip(planned, records, strict=True):
        assert abs(record.submitted_s - item.at_s) < 0.5  # left on schedule, not after the previous
        assert record.ttft_s is not None and record.completion_s is not None
        assert record.prompt_tokens and record.prompt_tokens > 0
    summary = summarize(records, 4.0)
    assert summary["overall"]["requests"] == len(planned)
    assert set(summary["by_class"]) == {"chat", "rag", "embed"}
    assert set(summary["by_tenant"]) == {"alpha", "beta"}
    assert summary["slo"] == {"p95_completion_lt_45s": True, "timeouts_lt_1pct": True,
                              "rejections_lt_5pct": True}
    assert summary["jain_fairness"] == pytest.approx(1.0)


def test_rejections_and_timeouts_are_classified(emulator: Server) -> None:
    planned = plan(scenario("smoke"), 1)[:3]
    httpx.post(f"{emulator.url}/_emulator/faults", json={"status": 503})
    try:
        rejected = asyncio.run(run_plan(emulator.url, planned, timeout_s=10))
    finally:
        httpx.delete(f"{emulator.url}/_emulator/faults")
    assert {r.outcome for r in rejected} == {"rejected"}
    httpx.post(f"{emulator.url}/_emulator/faults", json={"hang_before_headers": True})
    try:
        hung = asyncio.run(run_plan(emulator.url, planned, timeout_s=0.5))
    finally:
        httpx.delete(f"{emulator.url}/_emulator/faults")
    assert {r.outcome for r in hung} == {"timeout"}
    summary = summarize(hung, 4.0, timeout_s=0.5)
    assert summary["overall"]["timeout_pct"] == 100.0
    assert summary["overall"]["completion_p95_s"] == 0.5  # censored at the timeout, not dropped
    assert not summary["slo"]["timeouts_lt_1pct"]


def test_loopback_only() -> None:
    assert_loopback("http://127.0.0.1:1")
    assert_loopback("http://[::1]:1")
    with pytest.raises(ValueError, match="loopback only"):
        assert_loopback("http://192.0.2.10:11434")
    result = subprocess.run([sys.executable, "-m", "proxy", "loadgen", "--target",
                             "http://192.0.2.10:11434", "--scenario", "smoke"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2 and "loopback only" in result.stderr


def test_cli_writes_records(emulator: Server, tmp_path: Path) -> None:
    out = tmp_path / "records.jsonl"
    result = subprocess.run([sys.executable, "-m", "proxy", "loadgen", "--target", emulator.url,
                             "--scenario", "smoke", "--seed", "2", "--out", str(out)],
                            capture_output=True, text=True, timeout=120, check=True)
    summary = json.loads(result.stdout)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == summary["overall"]["requests"] == len(plan(scenario("smoke"), 2))
    assert {"tenant", "kind", "ttft_s", "completion_s", "outcome"} <= set(lines[0])


def test_statistics() -> None:
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0
    assert percentile([float(i) for i in range(1, 101)], 95) == 95.0
    assert percentile([], 95) is None
    assert jain([1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert jain([1.0, 0.0]) == pytest.approx(0.5)
    records = [Record(0, "a", "chat", 0.0, 200, "ok", 0.1, 1.0),
               Record(1, "b", "chat", 0.0, 503, "rejected")]
    summary = summarize(records, 10.0)
    assert summary["overall"]["rejection_pct"] == 50.0
    assert summary["jain_fairness"] == pytest.approx(0.5)
