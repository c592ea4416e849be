"""deploy/loadtest: the Locust file and the k6 script run their RAG-burst user classes (chat, RAG, ingest)
for a few seconds against a real proxy + emulator and exit 0, their SLO verdicts met; and the k6 verdict
fails (exit 99) when the proxy rejects requests."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.metrics import metric
from tests.support.servers import Server, start_emulator, start_proxy
from tests.support.tools import ROOT, tool

LOADTEST = ROOT / "deploy" / "loadtest"
KEY = "sk-loadtest"
ENV = {"SOP_CHAT_KEY": KEY, "SOP_RAG_KEY": KEY, "SOP_INGEST_KEY": KEY}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("loadtest")
    emulator = start_emulator(tmp, decode_tokens_per_s=200.0)
    server = start_proxy(tmp, [emulator.url], {
        "tenants": [{"name": "load", "keys": [KEY]}],
        "anonymous": {"allow": False},
        "chain": {"limits": {"max_prompt_tokens": 32000}}})  # RAG contexts are up to 64 KB
    try:
        yield server
    finally:
        server.stop()
        emulator.stop()


def _run(args: list[str], extra: dict[str, str], timeout: float = 150) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **ENV, **extra}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
                          check=False)


def test_locust_runs_its_user_classes(proxy: Server) -> None:
    done = _run([tool("locust"), "-f", str(LOADTEST / "locustfile.py"), "--headless", "-u", "5", "-r", "5",
                 "-t", "5s", "--host", proxy.url, "--only-summary", "--exit-code-on-error", "1"], {})
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    for name in ("/api/chat", "/api/embed"):
        assert name in output, output[-4000:]


def test_locust_without_host_or_run_time_uses_sop_host_and_stops_by_itself(proxy: Server) -> None:
    """As the loadtest README says of both tools: the target comes from SOP_HOST (default the loopback
    proxy) and a headless run is bounded by SOP_DURATION when --run-time is not given. Without them
    Locust refused to start for want of --host, or ran until interrupted."""
    started = time.monotonic()
    try:
        done = _run([tool("locust"), "-f", str(LOADTEST / "locustfile.py"), "--headless", "-u", "2",
                     "-r", "2", "--only-summary"], {"SOP_HOST": proxy.url, "SOP_DURATION": "3s"}, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("locust did not stop by itself within 60 s")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "/api/chat" in output, output[-4000:]
    assert time.monotonic() - started < 60


def test_k6_runs_its_scenarios_and_meets_the_slos(proxy: Server) -> None:
    done = _run([tool("k6"), "run", "--no-usage-report", str(LOADTEST / "k6.js")],
                {"SOP_HOST": proxy.url, "SOP_DURATION": "4s", "K6_NO_USAGE_REPORT": "true"})
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "sop_rejected" in output and "sop_completion" in output


def test_k6_verdict_fails_when_requests_fail() -> None:
    """The thresholds are real: against an address nothing answers every request fails (status 0, counted
    as a timeout), the timeout verdict fails, and k6 exits 99."""
    done = _run([tool("k6"), "run", "--no-usage-report", str(LOADTEST / "k6.js")],
                {"SOP_HOST": "http://127.0.0.1:9", "SOP_DURATION": "2s", "SOP_RAG_VUS": "0",
                 "SOP_INGEST_VUS": "0", "SOP_CHAT_VUS": "1", "K6_NO_USAGE_REPORT": "true"})
    assert done.returncode == 99, (done.stdout + done.stderr)[-4000:]


def test_k6_counts_a_stream_the_proxys_deadline_ended_as_a_timeout(tmp_path: Path) -> None:
    """A tenant whose deadline (1 s) passes mid-stream: the proxy has sent 200 and ends the stream with an
    `upstream_response_timeout` line, which it counts as a timeout (error_type; the rules' timeouts
    ratio). k6 counts it so too: the timeout verdict fails (exit 99), and the cut stream is no
    completion. Chat only (streamed), one user, against a ~10 s replica."""
    emulator = start_emulator(tmp_path, name="k6-deadline-emu", decode_tokens_per_s=10.0, load_s=0,
                              output_tokens="100,100")
    proxy = start_proxy(tmp_path, [emulator.url], {
        "tenants": [{"name": "load", "keys": [KEY], "deadline_s": 1}], "anonymous": {"allow": False}},
        name="k6-deadline")
    try:
        done = _run([tool("k6"), "run", "--no-usage-report", str(LOADTEST / "k6.js")],
                    {"SOP_HOST": proxy.url, "SOP_DURATION": "3s", "SOP_RAG_VUS": "0", "SOP_INGEST_VUS": "0",
                     "SOP_CHAT_VUS": "1", "K6_NO_USAGE_REPORT": "true"})
        cut = metric(proxy.url, "http_server_request_duration_seconds_count",
                     http_response_status_code="200", error_type="upstream_response_timeout")
    finally:
        proxy.stop()
        emulator.stop()
    output = done.stdout + done.stderr
    assert cut, output[-4000:]  # the proxy did end streams at the deadline
    assert done.returncode == 99, output[-4000:]
    assert re.search(r"sop_timed_out\S*\.*: 100\.00%", output), output[-4000:]
