"""The load generator: seeded plans (rag-chat-ingest: growing histories, overlapping ingests; every
generation prompt within the context, cut as a client would), open-loop
dispatch against a real emulator, the counting tap, outcome classification
(ok, rejected, timeout, error), requests sent through the retry helper (counted once, from the first
attempt), summaries and the loopback-only rule."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import httpx
import pytest
from aiohttp import web

from proxy.config import structure
from proxy.emulator.profile import load_profile
from proxy.emulator.vocabulary import default_vocabulary
from proxy.loadgen.retrying import Retrying
from proxy.loadgen.runner import Record, assert_loopback, run_plan
from proxy.loadgen.scenarios import SCENARIOS, scenario
from proxy.loadgen.summary import jain, percentile, summarize
from proxy.loadgen.tap import Tap
from proxy.loadgen.workload import Burst, Conversations, Ingests, Planned, Scenario, Stream, Tenant, plan
from tests.support.metrics import metric
from tests.support.polling import wait_for
from tests.support.servers import Server, free_port, start_emulator, start_proxy
from tests.support.threaded import ThreadedApp


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


def test_an_empty_plan_sends_nothing_and_returns_no_records(emulator: Server) -> None:
    assert asyncio.run(run_plan(emulator.url, [], timeout_s=5)) == []
    assert summarize([], 4.0)["overall"]["requests"] == 0


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


def test_a_deadline_the_proxy_enforces_counts_as_a_timeout(tmp_path: Path) -> None:
    """A tenant whose deadline_s (1 s) passes before a slow replica answers: the proxy answers 504 (no
    stream) or ends the stream with an `upstream_response_timeout` line, and counts both as timeouts
    (error_type, the rules' timeouts ratio). loadgen counts them as timeouts too, completed at the time
    the answer took (not censored at its own client timeout)."""
    emulator = start_emulator(tmp_path, name="deadline-emu", decode_tokens_per_s=10.0, load_s=0,
                              output_tokens="100,100")  # ~10 s an answer
    proxy = start_proxy(tmp_path, [emulator.url], {"tenants": [
        {"name": "alpha", "keys": ["sk-alpha"], "deadline_s": 1}]}, name="deadline-proxy")
    chat = next(p for p in plan(scenario("smoke"), 1) if p.tenant == "alpha" and p.kind == "chat")
    planned = [attrs.evolve(chat, index=0, at_s=0.0),
               attrs.evolve(chat, index=1, at_s=0.1, body={**chat.body, "stream": False})]
    try:
        records = asyncio.run(run_plan(proxy.url, planned, timeout_s=30))
        assert metric(proxy.url, "http_server_request_duration_seconds_count",
                      error_type="upstream_response_timeout") == 2
    finally:
        proxy.stop()
        emulator.stop()
    assert [(r.status, r.outcome) for r in records] == [(200, "timeout"), (504, "timeout")]
    summary = summarize(records, 1.0, timeout_s=30)
    assert summary["overall"]["timeout_pct"] == 100.0
    assert not summary["slo"]["timeouts_lt_1pct"]
    assert summary["overall"]["completion_p95_s"] < 10  # the answers' own times


def test_a_queue_timeout_counts_as_a_timeout_and_a_rejection(tmp_path: Path) -> None:
    """A request that waited `queue_timeout_s` for a slot gets 503 `queue_timeout`: the proxy's rules count
    it in both the timeouts ratio and the rejections ratio (docs/OPERATIONS.md, Timeouts), and so does
    loadgen, so `--check-slo` and the alerts judge the same run alike."""
    emulator = start_emulator(tmp_path, name="queue-emu", decode_tokens_per_s=20.0, load_s=0,
                              output_tokens="40,40")  # ~2 s an answer
    proxy = start_proxy(tmp_path, [emulator.url], {
        "tenants": [{"name": "alpha", "keys": ["sk-alpha"]}],
        "chain": {"backpressure": {"max_in_flight": 1, "queue_timeout_s": 0.5}}}, name="queue-proxy")
    chat = next(p for p in plan(scenario("smoke"), 1) if p.tenant == "alpha" and p.kind == "chat")
    planned = [attrs.evolve(chat, index=0, at_s=0.0), attrs.evolve(chat, index=1, at_s=0.2)]
    try:
        # Loaded first: a request waiting on a model load has the longer cold_queue_timeout_s.
        warm = httpx.post(f"{proxy.url}/api/chat", headers={"Authorization": "Bearer sk-alpha"}, timeout=30,
                          json={**chat.body, "stream": False})
        assert warm.status_code == 200
        records = asyncio.run(run_plan(proxy.url, planned, timeout_s=30))
        assert metric(proxy.url, "http_server_request_duration_seconds_count",
                      error_type="queue_timeout") == 1
    finally:
        proxy.stop()
        emulator.stop()
    assert [(r.status, r.outcome) for r in records] == [(200, "ok"), (503, "rejected")]
    overall = summarize(records, 1.0, timeout_s=30)["overall"]
    assert (overall["timeout_pct"], overall["rejection_pct"]) == (50.0, 50.0)


def test_loopback_only() -> None:
    assert_loopback("http://127.0.0.1:1")
    assert_loopback("http://[::1]:1")
    with pytest.raises(ValueError, match="loopback only"):
        assert_loopback("http://192.0.2.10:11434")
    result = subprocess.run([sys.executable, "-m", "proxy", "loadgen", "--target",
                             "http://192.0.2.10:11434", "--scenario", "smoke"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2 and "loopback only" in result.stderr


def test_a_redirect_is_not_followed(tmp_path: Path) -> None:
    """A loopback target answering 307 to another host: the load stays on the target (the loopback rule
    is checked on it only), each request is one `error` with the 307, and nothing reaches the host the
    redirect names (here another loopback server, which counts what it gets)."""
    reached: list[str] = []

    async def elsewhere(request: web.Request) -> web.Response:
        reached.append(request.path)
        return web.json_response({"done": True})

    sink = web.Application()
    sink.router.add_route("*", "/{tail:.*}", elsewhere)
    with ThreadedApp(sink) as other:
        async def redirect(request: web.Request) -> web.Response:
            raise web.HTTPTemporaryRedirect(other.url + request.path)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", redirect)
        with ThreadedApp(app) as target:
            records = asyncio.run(run_plan(target.url, plan(scenario("smoke"), 1)[:3], timeout_s=10))
    assert {(r.status, r.outcome) for r in records} == {(307, "error")}
    assert reached == []


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-5", "3601", "soon"])
def test_the_cli_refuses_a_client_timeout_that_would_not_bound_the_run(value: str) -> None:
    """--timeout-s bounds every request and the run (last arrival + timeout + 10 s): inf would let a
    run against a target that never answers go on for ever, nan crashed it, 0 or less timed every
    request out unsent. Refused before anything is sent (the target here does not even listen)."""
    result = subprocess.run([sys.executable, "-m", "proxy", "loadgen", "--target",
                             f"http://127.0.0.1:{free_port()}", "--scenario", "smoke",
                             f"--timeout-s={value}"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--timeout-s" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_stops_at_once_and_reports_what_finished(tmp_path: Path, number: int) -> None:
    """Ctrl-C (or SIGTERM) during a run against a target that never answers: loadgen stops within
    seconds (not at its 30 s client timeout), without a traceback, exits 128 + the signal, writes every
    planned request to --out (the unfinished ones `stopped`) and prints the figures of what finished,
    saying it was interrupted; the target sees every request it got closed."""
    arrived: list[str] = []
    left: list[str] = []

    async def never(request: web.Request) -> web.Response:
        arrived.append(request.path)
        try:
            await asyncio.sleep(60)
        finally:
            left.append(request.path)
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", never)
    out = tmp_path / "records.jsonl"
    with ThreadedApp(app) as target:
        run = subprocess.Popen([sys.executable, "-m", "proxy", "loadgen", "--target", target.url,
                                "--scenario", "smoke", "--timeout-s", "30", "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: len(arrived) >= 2, 30, "requests in flight")
            run.send_signal(number)
            sent = time.monotonic()
            stdout, stderr = run.communicate(timeout=20)
            took = time.monotonic() - sent
        finally:
            if run.poll() is None:
                run.kill()
                run.communicate()
        wait_for(lambda: len(left) == len(arrived), 10, "the requests closed at the target")
    assert took < 10, took
    assert run.returncode == 128 + number, stderr
    assert "Traceback" not in stderr
    summary = json.loads(stdout)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(plan(scenario("smoke"), 1))
    unfinished = sum(1 for line in lines if line["outcome"] == "stopped")
    assert summary["interrupted"] == {"signal": signal.Signals(number).name, "unfinished": unfinished}
    assert unfinished >= len(arrived) >= 2
    assert summary["overall"]["requests"] == len(lines) - unfinished


def test_cli_writes_records(emulator: Server, tmp_path: Path) -> None:
    """A run that meets the SLOs exits 0, also with --check-slo."""
    out = tmp_path / "records.jsonl"
    result = subprocess.run([sys.executable, "-m", "proxy", "loadgen", "--target", emulator.url,
                             "--scenario", "smoke", "--seed", "2", "--out", str(out), "--check-slo"],
                            capture_output=True, text=True, timeout=120, check=True)
    summary = json.loads(result.stdout)
    assert all(summary["slo"].values()), summary["slo"]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == summary["overall"]["requests"] == len(plan(scenario("smoke"), 2))
    assert {"tenant", "kind", "ttft_s", "completion_s", "outcome"} <= set(lines[0])


@pytest.mark.parametrize("check", [True, False], ids=["check-slo", "report-only"])
def test_check_slo_fails_a_run_that_misses_the_slos(tmp_path: Path, check: bool) -> None:
    """Against a target that refuses everything (503 with Retry-After), the rejection SLO is missed:
    with --check-slo loadgen still prints the figures and exits 99 (k6's status for crossed thresholds),
    without it 0."""
    async def refuse(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"error": "server busy, please try again.  maximum pending requests "
                                           "exceeded"}, status=503, headers={"Retry-After": "1"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)
    with ThreadedApp(app) as target:
        result = subprocess.run([sys.executable, "-m", "proxy", "loadgen", "--target", target.url,
                                 "--scenario", "smoke", *(["--check-slo"] if check else [])],
                                check=False, capture_output=True, text=True, timeout=120)
    summary = json.loads(result.stdout)
    assert summary["overall"]["rejection_pct"] == 100.0
    assert summary["slo"]["rejections_lt_5pct"] is False
    assert result.returncode == (99 if check else 0), result.stderr


def test_check_slo_fails_a_run_whose_requests_fail(tmp_path: Path) -> None:
    """Failures (a replica's 500 here) are completions that never came: with 2 of the smoke run's
    requests failing and the rest answered at once, the completion SLO is missed and --check-slo exits
    99 (before: P95 over the answers alone passed, whatever share failed). A client error (4xx) counts
    in no SLO."""
    emulator = start_emulator(tmp_path, name="failing-emu")
    try:
        httpx.post(f"{emulator.url}/_emulator/faults", json={"status": 500, "count": 2}).raise_for_status()
        result = subprocess.run([sys.executable, "-m", "proxy", "loadgen", "--target", emulator.url,
                                 "--scenario", "smoke", "--seed", "2", "--check-slo"],
                                check=False, capture_output=True, text=True, timeout=120)
    finally:
        emulator.stop()
    overall = json.loads(result.stdout)["overall"]
    assert overall["failed_pct"] > 5 and overall["ok"] == overall["requests"] - 2, overall
    assert overall["completion_p95_s"] < 45 and overall["slo_completion_p95_s"] is None
    assert result.returncode == 99, result.stderr
    records = [Record(i, "a", "chat", 0.0, 200, "ok", 0.1, 1.0) for i in range(19)]
    client_error = Record(19, "a", "chat", 0.0, 400, "error")
    assert all(summarize([*records, client_error], 10.0)["slo"].values())
    reset = Record(19, "a", "chat", 0.0, 0, "error")  # no answer at all: a failure
    assert not summarize([*records, reset, attrs.evolve(reset, index=20)], 10.0)["slo"][
        "p95_completion_lt_45s"]


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


def test_rag_chat_ingest_is_seeded_finite_with_growing_histories_and_overlapping_ingests() -> None:
    mixed = scenario("rag-chat-ingest")
    first, again, other = plan(mixed, 1), plan(mixed, 1), plan(mixed, 2)
    assert first == again and first != other
    assert 0 < len(first) < mixed.max_requests  # every request planned, none cut by the bound
    assert max(p.at_s for p in first) < mixed.duration_s + 30
    assert {p.kind for p in first} == {"chat", "long-chat", "embed"}
    vocabulary = default_vocabulary()

    conversations: dict[str, list[Planned]] = {}
    for item in first:
        if item.kind == "long-chat":
            conversations.setdefault(item.group, []).append(item)
    assert len(conversations) == 2
    for turns in conversations.values():
        assert len(turns) == 12
        for before, after in itertools.pairwise(turns):
            # The whole history again, then the answer to the last question and a new question.
            old, new = before.body["messages"], after.body["messages"]
            assert new[:len(old)] == old and len(new) == len(old) + 2
            assert [m["role"] for m in new[-2:]] == ["assistant", "user"]
            assert after.at_s > before.at_s
        tokens = [sum(vocabulary.count(m["content"]) for m in t.body["messages"]) for t in turns]
        # Past a 4,096-token history budget, yet within the num_ctx every request asks for.
        assert tokens[0] < 4096 < tokens[-1] < turns[-1].body["options"]["num_ctx"]

    jobs: dict[str, list[Planned]] = {}
    for item in first:
        if item.kind == "embed":
            assert item.path == "/api/embed" and item.group
            jobs.setdefault(item.group, []).append(item)
    assert len(jobs) == 5
    texts = {group: [t for p in calls for t in ([p.body["input"]] if isinstance(p.body["input"], str)
                                                  else p.body["input"])]
             for group, calls in jobs.items()}
    embedded = [t for chunks in texts.values() for t in chunks]
    assert len(set(embedded)) < len(embedded) / 2  # most chunks are embedded again by a later job
    ordered = sorted(jobs, key=lambda g: jobs[g][0].at_s)
    for earlier, later in itertools.pairwise(ordered):
        assert set(texts[earlier]) & set(texts[later])  # each job re-embeds its predecessor's chunks
    singles = [p for p in first if p.kind == "embed" and isinstance(p.body["input"], str)]
    batches = [p for p in first if p.kind == "embed" and isinstance(p.body["input"], list)]
    assert singles and batches
    # A single-input job's calls for one document leave together (a worker pool), to be coalesced.
    assert max(Counter(p.at_s for p in singles).values()) >= 8


def test_adding_conversations_and_ingests_leaves_the_other_requests_alone() -> None:
    base = Scenario("s", 20.0, (Tenant("t", "k", streams=(Stream("chat", 1.0),)),))
    more = Scenario("s", 20.0, (Tenant("t", "k", streams=(Stream("chat", 1.0),),
                                       conversations=(Conversations(1, 3),),
                                       ingests=(Ingests(4, 2, 2, 2, 1),)),))
    plain = plan(base, 5)
    mixed = [p for p in plan(more, 5) if not p.group]
    assert [(p.at_s, p.body) for p in mixed] == [(p.at_s, p.body) for p in plain]


def test_tap_relays_and_counts_what_the_replica_received(emulator: Server) -> None:
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "hello there"}],
            "stream": True, "options": {"num_predict": 4}}
    batch = {"model": "nomic-embed-text", "input": ["first chunk", "second chunk"]}
    single = {"model": "nomic-embed-text", "input": "third chunk"}

    async def scenario_() -> tuple[Tap, list[tuple[int, bytes, str]], list[bytes]]:
        tap = Tap(emulator.url)
        await tap.start()
        try:
            async with aiohttp.ClientSession() as session:
                seen = []
                for path, body in (("/api/chat", chat), ("/api/embed", batch), ("/api/embed", single)):
                    async with session.post(tap.url + path, json=body) as reply:
                        seen.append((reply.status, await reply.read(), reply.headers["Content-Type"]))
                async with session.get(tap.url + "/api/tags") as reply:
                    assert reply.status == 200
                direct = []
                for body in (batch, single):
                    async with session.post(emulator.url + "/api/embed", json=body) as reply:
                        direct.append(await reply.read())
        finally:
            await tap.stop()
        return tap, seen, direct

    tap, seen, direct = asyncio.run(scenario_())
    assert [s[0] for s in seen] == [200, 200, 200]
    assert seen[0][2] == "application/x-ndjson"
    for (_, relayed, _), straight in zip(seen[1:], direct, strict=True):
        assert json.loads(relayed)["embeddings"] == json.loads(straight)["embeddings"]
    reported = [json.loads(body.splitlines()[-1])["prompt_eval_count"] for _, body, _ in seen]
    routes = tap.snapshot()
    assert routes["POST /api/chat"]["llama3.2"] == {"calls": 1, "prompt_tokens": reported[0],
                                                    "inputs": 0, "statuses": {"200": 1}}
    assert routes["POST /api/embed"]["nomic-embed-text"] == {
        "calls": 2, "prompt_tokens": reported[1] + reported[2], "inputs": 3, "statuses": {"200": 2}}
    assert routes["GET /api/tags"][""]["calls"] == 1
    totals = tap.totals()
    assert totals["calls"] == 3 and totals["prompt_tokens"] == sum(reported)
    with pytest.raises(ValueError, match="loopback only"):
        Tap("http://192.0.2.10:11434")


def test_the_bench_proxy_configurations_load_and_t4_runs_beside_t3() -> None:
    from tests.bench.burst import (
        FLEET_TARGETS,
        HISTORY_PLUGINS,
        HYGIENE_PAIR,
        RETRY_LABEL,
        bulk_retry_pass,
        hygiene_plugins,
        passes,
        proxy_config,
    )

    assert passes(["rag-burst", "rag-chat-ingest", "rag-burst-fleet"], None) == [
        ("rag-burst", None, "rag-burst"), ("rag-burst", HYGIENE_PAIR, "rag-burst-hygiene"),
        ("rag-chat-ingest", HYGIENE_PAIR, "rag-chat-ingest"),
        ("rag-burst-fleet", FLEET_TARGETS, "rag-burst-fleet"), bulk_retry_pass()]
    assert bulk_retry_pass() == ("rag-burst", frozenset({RETRY_LABEL}), "rag-burst-retry")

    upstreams = [{"url": "http://127.0.0.1:1"}]
    for history in HISTORY_PLUGINS:
        structure({**proxy_config(True, hygiene_plugins(history)), "upstreams": upstreams})
    t4 = structure({**proxy_config(True, hygiene_plugins()), "upstreams": upstreams})
    assert [p["name"] for p in t4.plugins] == ["trim_history", "embed_cache", "embed_batch"]
    t3 = structure({**proxy_config(True), "upstreams": upstreams})
    assert not t3.plugins and t3.chain == t4.chain and t3.tenants == t4.tenants  # T4 = T3 + plugins


def _chat_model_seconds(item: Planned) -> float:
    """What one request costs the chat model's one slot on the gpu-8b profile: prefill of its prompt
    (the emulator's own token count) plus its output at one stream's rate (num_predict, or the
    profile's mean answer length)."""
    timing = load_profile("gpu-8b").for_model(item.body["model"])
    vocabulary = default_vocabulary()
    text = item.body.get("prompt") or " ".join(m["content"] for m in item.body["messages"])
    output = item.body["options"].get("num_predict") or sum(timing.output_tokens) / 2
    return timing.prefill_s(vocabulary.count(text)) + output / timing.decode_tokens_per_s


def test_rag_burst_fleet_is_seeded_finite_and_a_burst_two_replicas_absorb() -> None:
    fleet = scenario("rag-burst-fleet")
    first, again, other = plan(fleet, 1), plan(fleet, 1), plan(fleet, 2)
    assert first == again and first != other
    assert 0 < len(first) < fleet.max_requests
    assert max(p.at_s for p in first) < fleet.duration_s
    assert {p.kind for p in first} == {"chat", "rag", "embed"}
    rag = [p for p in first if p.kind == "rag"]
    assert {p.tenant for p in rag} == {"ingest-team"} and len(rag) == 10
    generations = [p for p in first if p.kind != "embed"]
    # Offered load in replicas (chat-model slot-seconds per second), per burst window and overall:
    # a sharp burst (about 5x one replica), a broad one, and a mean within two replicas.
    peaks = []
    for start, window_s in ((20.0, 15.0), (80.0, 25.0)):
        window = [p for p in generations if start <= p.at_s < start + window_s]
        assert sum(1 for p in window if p.kind == "rag") == 5
        peaks.append(sum(_chat_model_seconds(p) for p in window) / window_s)
    assert 4.5 <= peaks[0] <= 5.5 and 2.5 <= peaks[1] <= 4.0, peaks
    mean = sum(_chat_model_seconds(p) for p in generations) / fleet.duration_s
    assert 1.0 < mean < 1.6, mean  # more than one replica can do, well within two
    quiet = [p for p in generations if p.kind == "chat"]
    assert sum(_chat_model_seconds(p) for p in quiet) / fleet.duration_s < 1.0


def _emulator_tokens(body: dict[str, Any]) -> int:
    """A generation prompt's tokens as the emulator counts the rendered prompt (BOS, text, assistant
    header; per chat message its header), with the whole text counted at once."""
    vocabulary = default_vocabulary()
    if "prompt" in body:
        return 1 + vocabulary.count(body["prompt"]) + 3
    return 1 + sum(4 + vocabulary.count(m["content"]) for m in body["messages"]) + 3


def test_every_scenario_plans_prompts_within_the_context() -> None:
    for name, named in SCENARIOS.items():
        budget = named.prompt_budget()
        assert budget == named.num_ctx - 256
        for seed in (1, 2, 3):
            for item in plan(named, seed):
                if item.kind != "embed":
                    assert _emulator_tokens(item.body) <= budget, (name, seed, item.index)


def _tight(fit: bool) -> Scenario:
    """RAG contexts of 2-16k tokens, long conversations and chats against a 2,048-token context."""
    return Scenario(
        "tight", 10.0,
        (Tenant("t", "sk-t", streams=(Stream("chat", 2.0, max_output_tokens=4),),
                bursts=(Burst("rag", 0.5, 8, 1.0, max_output_tokens=4),),
                conversations=(Conversations(2, 5, at_s=0.5, stagger_s=0.2, think_s=(0.2, 0.4),
                                             question_bytes=(3000, 5000), max_output_tokens=4),)),),
        num_ctx=2048, fit_prompts=fit)


def test_prompts_are_cut_to_the_context_and_the_replica_takes_them_whole(emulator: Server) -> None:
    cut, whole = plan(_tight(True), 4), plan(_tight(False), 4)
    budget = _tight(True).prompt_budget()
    assert budget == 2048 - 256 and _tight(False).prompt_budget() is None
    # The same requests at the same offsets: only the prompts over the budget changed.
    assert [(p.at_s, p.kind) for p in cut] == [(p.at_s, p.kind) for p in whole]
    assert [p.body for p in cut if p.kind == "chat"] == [p.body for p in whole if p.kind == "chat"]
    for short, long in zip(cut, whole, strict=True):
        assert _emulator_tokens(short.body) <= budget
        if short.kind == "rag":
            # The leading words of the drawn context, the question after them unchanged.
            assert _emulator_tokens(long.body) > 2048 and budget - 64 < _emulator_tokens(short.body)
            head, _, question = short.body["prompt"].partition("\n\nQuestion: ")
            assert long.body["prompt"].startswith(head) and long.body["prompt"].endswith(question)
            assert short.context_bytes == len(head.partition("Context:\n")[2]) < long.context_bytes
        if short.kind == "long-chat":
            # The newest turns, starting with a question, after the system prompt.
            sent, history = short.body["messages"], long.body["messages"]
            assert sent[0] == history[0] and sent[1]["role"] == "user"
            assert sent[1:] == history[len(history) - len(sent) + 1:]
    assert any(len(s.body["messages"]) < len(w.body["messages"]) for s, w in zip(cut, whole, strict=True)
               if s.kind == "long-chat")

    def strict(planned: list[Planned]) -> list[Planned]:
        # truncate false: the replica answers 400 rather than cut a prompt over its context.
        return [attrs.evolve(p, body={**p.body, "truncate": False}) for p in planned]

    records = asyncio.run(run_plan(emulator.url, strict(cut), timeout_s=30))
    assert {r.outcome for r in records} == {"ok"}, Counter((r.status, r.error) for r in records)
    assert max(r.prompt_tokens or 0 for r in records) <= budget
    overflowing = asyncio.run(run_plan(emulator.url, strict(whole), timeout_s=30))
    assert {r.status for r in overflowing if r.kind == "rag"} == {400}


CLOUD = "gpt-oss:120b-cloud"


@pytest.fixture(scope="module")
def cloud_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """An emulator serving a cloud model, whose `cloud_status` fault answers as ollama.com refuses."""
    server = start_emulator(tmp_path_factory.mktemp("loadgen-cloud"), fixed_clock=False,
                            decode_tokens_per_s=400, output_tokens="10,20", name="load-cloud",
                            models=f"llama3.2,{CLOUD}")
    yield server
    server.stop()


def _cloud_chat() -> list[Planned]:
    body = {"model": CLOUD, "messages": [{"role": "user", "content": "hello"}], "stream": True,
            "options": {"num_predict": 8}}
    return [Planned(0, 0.0, "alpha", "sk-alpha", "chat", "/api/chat", body)]


def test_a_request_refused_then_completed_through_the_retry_helper_counts_once(
        cloud_emulator: Server) -> None:
    from shared_ollama_client import RetryPolicy

    # Refused twice with Retry-After: 1 (429, as ollama.com answers), then answered.
    httpx.post(f"{cloud_emulator.url}/_emulator/faults",
               json={"cloud_status": 429, "retry_after_s": 1, "count": 2}).raise_for_status()
    try:
        [record] = asyncio.run(run_plan(cloud_emulator.url, _cloud_chat(), timeout_s=60,
                                        retrying={"alpha": Retrying()}))
    finally:
        httpx.delete(f"{cloud_emulator.url}/_emulator/faults")
    assert record.outcome == "ok" and record.status == 200, record.error
    assert (record.attempts, record.refusals) == (3, 2)
    # From the first attempt to the final answer: both waits the server asked for are in it.
    assert record.ttft_s is not None and record.ttft_s >= 2.0
    assert record.completion_s is not None and record.completion_s >= record.ttft_s
    assert record.output_tokens and record.output_tokens > 0
    summary = summarize([record], 10.0)["overall"]
    assert (summary["requests"], summary["ok"], summary["refused_then_ok"], summary["attempts"]) == \
        (1, 1, 1, 3)
    assert summary["rejection_pct"] == 0.0 and summary["completion_p95_s"] == record.completion_s

    # A request the helper gives up on counts as its final answer, once.
    httpx.post(f"{cloud_emulator.url}/_emulator/faults",
               json={"cloud_status": 503, "retry_after_s": 0, "count": 2}).raise_for_status()
    try:
        [refused] = asyncio.run(run_plan(
            cloud_emulator.url, _cloud_chat(), timeout_s=60,
            retrying={"alpha": Retrying(RetryPolicy(max_attempts=2))}))
    finally:
        httpx.delete(f"{cloud_emulator.url}/_emulator/faults")
    assert (refused.outcome, refused.status, refused.attempts, refused.refusals) == ("rejected", 503, 2, 2)
    summary = summarize([refused], 10.0)["overall"]
    assert (summary["requests"], summary["ok"], summary["refused_then_ok"]) == (1, 0, 0)
    assert summary["rejection_pct"] == 100.0

    # Tenants not named in `retrying` send once, as before.
    httpx.post(f"{cloud_emulator.url}/_emulator/faults",
               json={"cloud_status": 429, "retry_after_s": 0, "count": 1}).raise_for_status()
    try:
        [plain] = asyncio.run(run_plan(cloud_emulator.url, _cloud_chat(), timeout_s=60))
    finally:
        httpx.delete(f"{cloud_emulator.url}/_emulator/faults")
    assert (plain.outcome, plain.attempts, plain.refusals) == ("rejected", 1, 1)
