"""The `health` step with real emulated replicas: probes that learn residency without loading anything,
passive ejection of a killed replica and its recovery, 503 no_healthy_upstream, stuck detection, and
the restart hook restarting an emulator whose profile models are loaded before it takes traffic again."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import yaml
from aiohttp import web
from yarl import URL

from proxy.config import HealthConfig, TelemetryConfig
from proxy.fleet.health import FleetHealth
from proxy.telemetry.setup import build_telemetry
from proxy.upstreams import Upstream, UpstreamSet
from tests.support.metrics import metric
from tests.support.otlp_receiver import OtlpReceiver, attributes_of
from tests.support.polling import until
from tests.support.servers import Server, start_emulator, start_proxy
from tests.support.threaded import ThreadedApp

FAST = {"probe_interval_s": 0.3, "probe_timeout_s": 1.0, "base_ejection_s": 1.0}
BODY = {"model": "llama3.2", "prompt": "hello", "stream": False, "options": {"num_predict": 4}}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("health")


def profile(proxy: Server) -> dict[str, Any]:
    return dict(httpx.get(f"{proxy.url}/system/profile", timeout=5).json())


def wait_for(predicate: Callable[[], bool], timeout_s: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def status(proxy: Server, replica: str) -> str:
    return str(profile(proxy)["replicas"][replica]["status"])


def loaded(url: str) -> list[str]:
    """What the Ollama (or emulator) at `url` has loaded, by its own /api/ps."""
    return [m["name"] for m in httpx.get(f"{url}/api/ps", timeout=5).json()["models"]]


def test_probes_learn_residency_and_never_load(tmp: Path) -> None:
    a = start_emulator(tmp, name="probe-a")
    b = start_emulator(tmp, name="probe-b")
    httpx.post(f"{a.url}/api/generate", json={"model": "qwen3"}, timeout=30)  # load-only, directly
    proxy = start_proxy(tmp, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
                        {"chain": {"health": FAST}}, name="probe")
    try:
        wait_for(lambda: profile(proxy)["models"].get("qwen3:latest", {}).get("loaded_on") == ["a"],
                 what="qwen3 seen loaded on a")
        time.sleep(1.5)  # time passing, not a barrier: a few more probe rounds keep both healthy
        view = profile(proxy)
        assert view["replicas"]["a"]["status"] == view["replicas"]["b"]["status"] == "healthy"
        assert view["replicas"]["a"]["version"] == "0.33.0"
        assert [m["model"] for m in view["replicas"]["a"]["loaded"]] == ["qwen3:latest"]
        assert view["replicas"]["a"]["loaded"][0]["context_length"] == 4096
        assert "llama3.2:latest" in view["replicas"]["b"]["models_on_disk"]
        # Probes loaded nothing anywhere: b holds nothing, a only what it was given.
        assert loaded(b.url) == [] and loaded(a.url) == ["qwen3:latest"]
        assert a.stats()["loads"] == 1 and b.stats()["loads"] == 0
        assert metric(proxy.url, "sop_upstream_healthy", sop_upstream_name="a") == 1.0
        assert (metric(proxy.url, "sop_health_probes_total", sop_upstream_name="b", outcome="success")
                or 0) >= 3
    finally:
        for server in (proxy, a, b):
            server.stop()


def test_killed_replica_is_ejected_then_recovers(tmp: Path) -> None:
    a = start_emulator(tmp, name="eject-a")
    b = start_emulator(tmp, name="eject-b")
    port = b.port  # b comes back on the same port below
    for server in (a, b):  # both hold the model: equal cost, so the balancer spreads requests
        httpx.post(f"{server.url}/api/generate", json={"model": "llama3.2"}, timeout=30)
    proxy = start_proxy(tmp, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
                        # Probes rarely (after the first one): the requests must find b dead themselves.
                        {"chain": {"health": {**FAST, "probe_interval_s": 30.0}}}, name="eject")
    try:
        wait_for(lambda: all(len(r["loaded"]) == 1 for r in profile(proxy)["replicas"].values()),
                 what="both replicas probed once")
        b.kill()
        # Requests keep succeeding (retried on a before any byte) while b collects failures.
        for _ in range(6):
            reply = httpx.post(f"{proxy.url}/api/generate", json=BODY, timeout=30)
            assert reply.status_code == 200, reply.text
        view = profile(proxy)["replicas"]["b"]
        assert view["status"] == "ejected", view
        assert "connect" in view["reason"].lower()  # refused: seen by a request or by a probe
        assert (metric(proxy.url, "sop_health_ejections_total", sop_upstream_name="b") or 0) >= 1
        assert (metric(proxy.url, "sop_balancer_retries_total", sop_upstream_name="b",
                       error_type="upstream_connect_failure") or 0) >= 1
        assert metric(proxy.url, "sop_upstream_healthy", sop_upstream_name="b") == 0.0
        b = start_emulator(tmp, name="eject-b2", port=port)
        # Half-open after the 1 s backoff: the next successful probe takes it back.
        wait_for(lambda: status(proxy, "b") == "healthy", 12, "b back in service")
    finally:
        for server in (proxy, a, b):
            server.stop()


def test_no_healthy_upstream(tmp: Path) -> None:
    a = start_emulator(tmp, name="none-a")
    proxy = start_proxy(tmp, [{"url": a.url, "name": "a"}],
                        {"chain": {"health": {**FAST, "base_ejection_s": 30.0}}}, name="none")
    try:
        wait_for(lambda: status(proxy, "a") == "healthy", what="a healthy")
        assert httpx.get(f"{proxy.url}/readyz").status_code == 200
        a.kill()
        wait_for(lambda: status(proxy, "a") == "ejected", what="a ejected by its probes")
        reply = httpx.post(f"{proxy.url}/api/chat", json={"model": "llama3.2", "messages": []})
        assert reply.status_code == 503
        body = reply.json()
        assert body["code"] == "no_healthy_upstream" and "a: " in body["error"]
        assert 25 <= int(reply.headers["Retry-After"]) <= 31  # the backoff's end, not a constant
        ready = httpx.get(f"{proxy.url}/readyz")
        assert ready.status_code == 503 and ready.json()["upstreams"] == {"a": "ejected"}
    finally:
        proxy.stop()
        a.stop()


def test_stuck_replica_gets_no_new_traffic(tmp: Path) -> None:
    a = start_emulator(tmp, name="stuck-a", decode_tokens_per_s=200)
    b = start_emulator(tmp, name="stuck-b", decode_tokens_per_s=200)
    proxy = start_proxy(tmp, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
                        {"chain": {"health": {**FAST, "stuck_after_s": 1.0}}}, name="stuck")
    try:
        wait_for(lambda: all(r["status"] == "healthy" for r in profile(proxy)["replicas"].values()))
        httpx.post(f"{a.url}/_emulator/faults", json={"hang_after_chunks": 2, "count": 1})
        with httpx.stream("POST", f"{proxy.url}/api/generate", headers={"X-Ollama-Replica": "a"},
                          json={"model": "llama3.2", "prompt": "hello"}, timeout=30) as hung:
            assert hung.status_code == 200
            wait_for(lambda: status(proxy, "a") == "stuck", 10, "a marked stuck")
            assert "no progress" in profile(proxy)["replicas"]["a"]["reason"]
            for _ in range(3):
                reply = httpx.post(f"{proxy.url}/api/generate", json=BODY, timeout=30)
                assert reply.status_code == 200
            assert a.stats()["completed"] == 0
        # The silent request is gone (client left): a is back.
        wait_for(lambda: status(proxy, "a") == "healthy", 10, "a healthy again")
    finally:
        for server in (proxy, a, b):
            server.stop()


def test_restart_hook_restarts_and_prewarms(tmp: Path) -> None:
    pidfile = tmp / "a.pid"
    command = (f"{sys.executable} -m tests.support.respawn --port {{port}} --log {tmp / 'respawn.log'} "
               f"--pidfile {pidfile} -- --seed 7 --load-s 0.5")
    a = start_emulator(tmp, name="restart-a", load_s=0.5)
    port = a.port  # the restart command brings it back on the same port
    b = start_emulator(tmp, name="restart-b")
    proxy = start_proxy(tmp, [{"url": a.url, "name": "a", "restart_command": command},
                              {"url": b.url, "name": "b"}],
                        {"models": {"qwen3": {"warm_on": ["a"], "options": {"num_ctx": 8192}}},
                         "chain": {"health": {**FAST, "restart_after_failures": 2,
                                              "restart_min_interval_s": 60}}}, name="restart")
    try:
        # At start-up the profile model is loaded on its replica.
        wait_for(lambda: loaded(a.url) == ["qwen3:latest"], what="qwen3 pre-warmed on a at start")
        a.kill()
        wait_for(pidfile.exists, 20, "the restart command to run")
        seen: list[str] = []

        def back() -> bool:
            seen.append(status(proxy, "a"))
            return seen[-1] == "healthy"

        wait_for(back, 20, "a restarted and healthy")
        assert "restarting" in seen or "warming" in seen
        assert loaded(f"http://127.0.0.1:{port}") == ["qwen3:latest"]
        # Loaded with the model's canonical options, so real requests (rewritten to them) reuse it.
        running = httpx.get(f"http://127.0.0.1:{port}/api/ps").json()["models"][0]
        assert running["context_length"] == 8192
        log = proxy.log()
        assert "restart of a" in log and f"listening on port {port}" in log
        # It took traffic again only once its profile model was loaded.
        assert log.index("pre-warmed qwen3 on a", log.index("restart of a")) < \
            log.index("replica a: warming -> healthy")
        reply = httpx.post(f"{proxy.url}/api/generate", json={**BODY, "model": "qwen3"}, timeout=30)
        assert reply.status_code == 200 and reply.json()["load_duration"] < 100_000_000
        assert profile(proxy)["replicas"]["a"]["restarts"] == 1
    finally:
        proxy.stop()
        b.stop()
        a.stop()
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGTERM)


def _fleet(count: int = 4, **health: Any) -> tuple[FleetHealth, list[Upstream]]:
    upstreams = UpstreamSet([Upstream(name, URL(f"http://127.0.0.1:{11434 + i}"))
                             for i, name in enumerate("abcdefgh"[:count])])
    step = FleetHealth(HealthConfig(**health), upstreams, {}, build_telemetry(TelemetryConfig()))
    for upstream in upstreams:
        upstream.status = "healthy"
    return step, list(upstreams)


def test_passive_ejection_backs_off_exponentially_and_recovers_half_open() -> None:
    step, (a, b, _, _) = _fleet(eject_after_failures=3, base_ejection_s=10.0, max_ejection_s=35.0)
    step.observe(a, "upstream_connect_failure", 0)
    step.observe(a, "ok", 200)  # a success in between ends the run
    step.observe(a, "upstream_connect_failure", 0)
    step.observe(a, "ok", 502)
    assert a.status == "healthy"
    step.observe(a, "upstream_reset_before_response_started", 0)
    assert a.status == "ejected" and a.ejected_until - time.monotonic() == pytest.approx(10, abs=0.5)
    # Ollama's own 500s and 503s are not the replica's health.
    for outcome, status_code in (("ok", 500), ("ok", 503), ("ok", 404), ("client_disconnect", 0)):
        step.observe(b, outcome, status_code)
    assert b.status == "healthy" and b.consecutive_failures == 0
    # Backoff expired: half-open; a failed probe ejects again for twice as long, then the cap.
    a.ejected_until = time.monotonic() - 1
    step.failure(a, "probe failed", probe=True)
    assert a.ejected_until - time.monotonic() == pytest.approx(20, abs=0.5)
    a.ejected_until = time.monotonic() - 1
    step.failure(a, "probe failed", probe=True)
    assert a.ejected_until - time.monotonic() == pytest.approx(35, abs=0.5)
    # A successful probe while backing off changes nothing; after it, the replica is back.
    a.ejected_until = time.monotonic() + 5
    step._success(a)
    assert a.status == "ejected"
    a.ejected_until = time.monotonic() - 1
    step._success(a)
    assert a.status == "healthy" and a.consecutive_failures == 0


def test_passive_ejection_keeps_most_of_the_fleet() -> None:
    step, (a, b, c, _) = _fleet(eject_after_failures=1, max_ejection_ratio=0.5)
    step.observe(a, "upstream_connect_failure", 0)
    step.observe(b, "upstream_connect_failure", 0)
    step.observe(c, "upstream_connect_failure", 0)
    assert [u.status for u in (a, b, c)] == ["ejected", "ejected", "healthy"]  # at most half, passively
    step.failure(c, "probe failed", probe=True)
    assert c.status == "ejected"  # a failed probe is evidence enough


def test_a_replica_that_never_answered_is_out_at_once() -> None:
    step, (a, *_) = _fleet()
    a.status = "unknown"
    step.failure(a, "probe failed (ClientConnectorError)", probe=True)
    assert a.status == "ejected"


def test_pinned_model_stays_loaded(tmp: Path) -> None:
    a = start_emulator(tmp, name="pin-a")
    b = start_emulator(tmp, name="pin-b")
    proxy = start_proxy(tmp, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
                        {"models": {"nomic-embed-text": {"warm_on": ["b"], "pinned": True,
                                                         "replicas": ["b"]}},
                         "chain": {"health": FAST}}, name="pin")
    try:
        wait_for(lambda: loaded(b.url) == ["nomic-embed-text:latest"], what="the embedding model pinned on b")
        running = httpx.get(f"{b.url}/api/ps").json()["models"][0]
        assert int(running["expires_at"][:4]) > 2200  # keep_alive -1: never expires
        assert loaded(a.url) == []
        # Unloaded behind the proxy's back: the next probe notices, and it is loaded again.
        loads = b.stats()["loads"]
        httpx.post(f"{b.url}/api/embed", json={"model": "nomic-embed-text", "input": [], "keep_alive": 0})
        # Polled by the replica's own load counter: the unloaded moment may be shorter than a poll.
        wait_for(lambda: b.stats()["loads"] > loads and loaded(b.url) == ["nomic-embed-text:latest"],
                 20, "the pinned model loaded again")
        # Only b may serve it: embeddings go there, whatever a's load.
        for _ in range(3):
            reply = httpx.post(f"{proxy.url}/api/embed", json={"model": "nomic-embed-text",
                                                                 "input": ["a chunk"]}, timeout=30)
            assert reply.status_code == 200 and reply.json()["load_duration"] < 100_000_000
        assert b.stats()["completed"] >= 3 and a.stats()["completed"] == 0
    finally:
        for server in (proxy, a, b):
            server.stop()


def test_waiters_leave_the_queue_when_the_last_replica_hangs(tmp: Path) -> None:
    a = start_emulator(tmp, name="last-a", decode_tokens_per_s=10, output_tokens="50,50",
                       fixed_clock=False)
    proxy = start_proxy(tmp, [{"url": a.url, "name": "a"}],
                        {"chain": {"health": {**FAST, "base_ejection_s": 30.0}}}, name="last")
    body = {"model": "llama3.2", "prompt": "hello", "stream": False}

    async def scenario() -> list[tuple[int, str | None, float]]:
        async def one(delay: float) -> tuple[int, str | None, float]:
            await asyncio.sleep(delay)
            started = time.monotonic()
            async with aiohttp.ClientSession() as session, \
                    session.post(f"{proxy.url}/api/generate", json=body) as reply:
                payload = await reply.json(content_type=None) if reply.status != 200 else {}
                return reply.status, payload.get("code"), time.monotonic() - started

        tasks = [asyncio.create_task(one(0.2 * i)) for i in range(3)]
        # one runs (5 s of decoding), two wait in the proxy's queue
        await until(lambda: httpx.get(f"{proxy.url}/system/queue").json()["models"].get(
            "llama3.2:latest", {}).get("queued") == 2, what="two requests queued")
        a.process.send_signal(signal.SIGSTOP)  # hung: connections open, nothing answers, probes time out
        try:
            done, _ = await asyncio.wait(tasks[1:], timeout=15)
        finally:
            a.process.send_signal(signal.SIGCONT)
        await asyncio.to_thread(a.kill)
        return [task.result() for task in done]

    try:
        wait_for(lambda: status(proxy, "a") == "healthy", what="a healthy")
        results = asyncio.run(scenario())
        # Once the probes eject the hung replica, the two waiters get health's 503 at once, not the
        # 30 s queue timeout (nor a request sent to a replica known to be gone).
        assert len(results) == 2, results
        assert all(r[0] == 503 and r[1] == "no_healthy_upstream" and r[2] < 10 for r in results), results
        wait_for(lambda: httpx.get(f"{proxy.url}/system/queue").json()["models"]["llama3.2:latest"]
                 ["in_flight"] == {"a": 0}, 10, "the running request's slot back")
        assert httpx.get(f"{proxy.url}/system/queue").json()["models"]["llama3.2:latest"]["queued"] == 0
    finally:
        proxy.stop()
        a.stop()


def test_a_failed_probe_confirms_a_request_failure() -> None:
    step, (a, b, *_) = _fleet(eject_after_failures=3)
    step.observe(a, "upstream_connect_failure", 0)  # one request failed: a probe is sent at once...
    assert a.status == "healthy" and a.suspect
    step.failure(a, "probe failed (ClientConnectorError)", probe=True)  # ...and confirms it
    assert a.status == "ejected"
    # A probe failing on its own is not enough (a network blip); nor a request failure the next
    # request contradicts.
    step.failure(b, "probe failed (TimeoutError)", probe=True)
    step.observe(b, "upstream_reset_before_response_started", 0)
    step.observe(b, "ok", 200)
    step.failure(b, "probe failed (TimeoutError)", probe=True)
    assert b.status == "healthy"


@pytest.mark.parametrize("context", [-7, 1 << 40])
def test_a_replica_s_unbelievable_listing_is_not_believed(tmp: Path, context: int) -> None:
    """A replica whose /api/ps reports a non-positive or absurd context length, and whose /api/tags
    holds no list: the model is served as if its context were unknown (not every prompt refused as too
    long, nor num_ctx set to a trillion), and the probes neither fail nor log a traceback."""
    async def handler(request: web.Request) -> web.Response:
        path = request.path
        if path == "/api/version":
            return web.json_response({"version": "0.12.0"})
        if path == "/api/ps":
            return web.json_response({"models": [{"model": "llama3.2:latest", "name": "llama3.2:latest",
                                                  "context_length": context}]})
        if path == "/api/tags":
            return web.json_response({"models": 5})
        body = await request.json()
        return web.json_response({"model": body.get("model"), "response": "ok", "done": True,
                                  "options_seen": body.get("options")})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    with ThreadedApp(app) as replica:
        proxy = start_proxy(tmp, [{"url": replica.url, "name": "odd"}], {"chain": {"health": FAST}},
                            name=f"odd-{context}")
        try:
            wait_for(lambda: profile(proxy)["replicas"]["odd"]["loaded"], what="the listing probed")
            view = profile(proxy)["replicas"]["odd"]
            assert view["status"] == "healthy" and view["loaded"][0]["context_length"] is None
            answer = httpx.post(f"{proxy.url}/api/generate", timeout=30, json={
                "model": "llama3.2", "prompt": "words " * 50, "stream": False})
            assert answer.status_code == 200, answer.text
            assert (answer.json()["options_seen"] or {}).get("num_ctx") != context
            assert "Traceback" not in proxy.log()
        finally:
            proxy.stop()


def test_a_restart_command_with_an_unknown_placeholder_is_refused_at_load(tmp: Path) -> None:
    """`{instance}` (not one of name, url, host, port) is the file's error, not a replica stuck in
    `restarting` with a traceback at every probe."""
    path = tmp / "restart-typo.yaml"
    path.write_text(yaml.safe_dump({"upstreams": [{"url": "http://127.0.0.1:1",
                                                   "restart_command": "systemctl restart {instance}"}]}))
    checked = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(path)],
                             capture_output=True, text=True, timeout=60, check=False)
    assert checked.returncode != 0
    assert "only {name}, {url}, {host} and {port}" in checked.stdout + checked.stderr


def test_a_replica_ejected_during_its_start_up_warm_up_comes_back(tmp: Path) -> None:
    """Ejected while the start-up warm-up (which does not take it out of service) still loads its
    profile model, a replica found alive again is set `warming`; when that warm-up ends, the replica
    serves again. It stayed `warming` (503 no_healthy_upstream) for good. The load takes 10 s: the
    ejection and its 1 s backoff must end while it runs, even on a loaded machine."""
    a = start_emulator(tmp, name="warm-eject", load_s=10.0)
    proxy = start_proxy(tmp, [{"url": a.url, "name": "a"}],
                        {"models": {"llama3.2": {"warm_on": ["a"]}},
                         "chain": {"health": {**FAST, "eject_after_failures": 2}}}, name="warm-eject")
    try:
        wait_for(lambda: status(proxy, "a") == "healthy", what="a healthy at start")
        # Probes fail (the start-up warm-up keeps loading llama3.2 meanwhile): ejected.
        httpx.post(f"{a.url}/_emulator/faults", json={"status": 500, "paths": ["/api/version"]})
        wait_for(lambda: status(proxy, "a") == "ejected", what="a ejected")
        httpx.delete(f"{a.url}/_emulator/faults")
        wait_for(lambda: status(proxy, "a") == "warming", what="a warming after its backoff")
        wait_for(lambda: status(proxy, "a") == "healthy", 30, "a serving once llama3.2 is loaded")
        assert loaded(a.url) == ["llama3.2:latest"]
        reply = httpx.post(f"{proxy.url}/api/generate", json=BODY, timeout=30)
        assert reply.status_code == 200
    finally:
        proxy.stop()
        a.stop()


@pytest.mark.parametrize("start_up_load", ["running", "refused"])
def test_a_replica_whose_daemon_dies_while_it_pre_warms_is_ejected_not_served(
        tmp: Path, start_up_load: str) -> None:
    """A replica coming back from an ejection loads its profile model before it serves (`warming`):
    with a warm-up of its own, or with the start-up's when that one still runs. When its daemon dies
    during that load, it is ejected again: the probes, the backoff and the restart policy take it from
    there. It was set `healthy` as if the load had gone through (its own warm-up), and took requests
    it could only fail; or it stayed `warming` for good, never probed back (the start-up's)."""
    a = start_emulator(tmp, name="warm-dies-a", load_s=30.0)
    b = start_emulator(tmp, name="warm-dies-b")
    if start_up_load == "refused":  # the start-up warm-up ends at once: the replica gets its own
        httpx.post(f"{a.url}/_emulator/faults", json={"status": 500, "paths": ["/api/generate"]})
    proxy = start_proxy(tmp, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
                        {"models": {"qwen3": {"warm_on": ["a"]}},
                         "chain": {"health": {**FAST, "eject_after_failures": 2}}},
                        name=f"warm-dies-{start_up_load}")
    try:
        wait_for(lambda: status(proxy, "a") == "healthy", what="a healthy at start")
        if start_up_load == "refused":
            wait_for(lambda: "pre-warming qwen3 on a was refused" in proxy.log(),
                     what="the start-up warm-up refused")
            httpx.delete(f"{a.url}/_emulator/faults")
        httpx.post(f"{a.url}/_emulator/faults", json={"status": 500, "paths": ["/api/version"]})
        wait_for(lambda: status(proxy, "a") == "ejected", what="a ejected")
        httpx.delete(f"{a.url}/_emulator/faults")
        wait_for(lambda: status(proxy, "a") == "warming", what="a warming after its backoff")
        a.kill()  # the 30 s load of qwen3 is under way
        wait_for(lambda: "replica a: warming -> " in proxy.log(), 20, "the warm-up to end")
        log = proxy.log()
        after = log[log.index("replica a: warming -> "):]
        assert after.startswith("replica a: warming -> ejected (unreachable while pre-warming)"), \
            after[:200]
        assert "replica a: warming -> healthy" not in log
        assert status(proxy, "a") != "healthy"
        reply = httpx.post(f"{proxy.url}/api/generate", json=BODY, timeout=30)
        assert reply.status_code == 200  # b serves
    finally:
        proxy.stop()
        b.stop()
        a.stop()


def test_requests_waiting_on_a_restart_are_served_once_it_is_back(tmp: Path) -> None:
    """Requests queued while the only replica's restart command runs wait for it (the cold budget) and
    then take its slots one by one. They were let go the moment the command exited, before the probe
    that takes the replica back, and all got 503 no_healthy_upstream (`restarting`); and those queued
    while it pre-warmed were let go at the end of the warm-up and reached it together, past its slot."""
    pidfile = tmp / "waiters.pid"
    command = (f"{sys.executable} -m tests.support.respawn --port {{port}} --log {tmp / 'waiters.log'} "
               f"--pidfile {pidfile} -- --seed 7 --load-s 1.0 --decode-tokens-per-s 50")
    a = start_emulator(tmp, name="waiters-a", load_s=1.0)
    port = a.port
    proxy = start_proxy(tmp, [{"url": a.url, "name": "a", "restart_command": command}],
                        {"models": {"llama3.2": {"warm_on": ["a"]}},
                         "chain": {"backpressure": {"max_in_flight": 1, "cold_queue_timeout_s": 60},
                                   "health": {**FAST, "restart_after_failures": 1,
                                              "restart_min_interval_s": 60}}}, name="waiters")
    try:
        wait_for(lambda: loaded(a.url) == ["llama3.2:latest"], what="llama3.2 pre-warmed on a")
        a.kill()
        wait_for(lambda: status(proxy, "a") == "restarting", what="the restart command running")
        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda _: httpx.post(f"{proxy.url}/api/generate", json=BODY,
                                                         timeout=60), range(3)))
        assert [r.status_code for r in replies] == [200, 200, 200], [r.text for r in replies]
        stats = httpx.get(f"http://127.0.0.1:{port}/_emulator/stats", timeout=5).json()
        assert stats["completed"] == 3 and stats["peak"] == 1, stats
    finally:
        proxy.stop()
        a.stop()
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGTERM)


def test_a_restart_command_that_leaves_its_daemon_running_ends_when_it_exits(tmp: Path) -> None:
    """A restart command that starts the daemon in the background and exits (`ollama serve &`), the
    daemon keeping the command's output open: the restart ends when the command exits and the probes
    take the replica back. The proxy waited for the end of the output instead, `restarting` and
    unprobed, until restart_timeout_s (then failed on killing a process already gone)."""
    pidfile = tmp / "background.pid"
    script = tmp / "restart-in-background.sh"
    script.write_text(f"#!/bin/sh\ncd {Path.cwd()}\n"
                      f"{sys.executable} -m proxy emulate --listen 127.0.0.1:$1 --seed 7 &\n"
                      f"echo $! > {pidfile}\necho started\n")
    script.chmod(0o755)
    a = start_emulator(tmp, name="background-a")
    proxy = start_proxy(tmp, [{"url": a.url, "name": "a", "restart_command": f"{script} {{port}}"}],
                        {"chain": {"health": {**FAST, "restart_after_failures": 1,
                                              "restart_min_interval_s": 60,
                                              "restart_timeout_s": 60}}}, name="background")
    try:
        wait_for(lambda: status(proxy, "a") == "healthy", what="a healthy at start")
        a.kill()
        wait_for(pidfile.exists, 15, "the restart command to run")
        wait_for(lambda: status(proxy, "a") == "healthy", 15, "a back after its restart")
        assert profile(proxy)["replicas"]["a"]["restarts"] == 1
        assert "restart of a" in proxy.log() and "output: started" in proxy.log()
        assert "keeps the command's output open" in proxy.log()  # the operator is told to redirect it
        reply = httpx.post(f"{proxy.url}/api/generate", json=BODY, timeout=30)
        assert reply.status_code == 200
    finally:
        proxy.stop()
        a.stop()
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGTERM)


def test_a_healthy_replica_shows_no_reason_once_its_failures_are_over(tmp: Path) -> None:
    """`/system/profile`'s `reason` says why a replica is in its state: a failure below the ejection
    threshold is shown while it counts, and gone once a request or a probe went through (before, a
    healthy replica kept showing `HTTP 502` or `probe failed (...)` for good)."""
    a = start_emulator(tmp, name="reason-a")
    proxy = start_proxy(tmp, [{"url": a.url, "name": "a"}], {"chain": {"health": FAST}}, name="reason")
    try:
        wait_for(lambda: status(proxy, "a") == "healthy", what="a healthy")
        httpx.post(f"{a.url}/_emulator/faults", json={"status": 502, "count": 1}).raise_for_status()
        assert httpx.post(f"{proxy.url}/api/generate", json=BODY, timeout=30).status_code == 502
        # The probe sent right after the failure succeeds: the run of failures is over.
        wait_for(lambda: profile(proxy)["replicas"]["a"]["consecutive_failures"] == 0,
                 what="a's failure run over")
        view = profile(proxy)["replicas"]["a"]
        assert (view["status"], view["reason"]) == ("healthy", None), view
        assert httpx.post(f"{proxy.url}/api/generate", json=BODY, timeout=30).status_code == 200
        view = profile(proxy)["replicas"]["a"]
        assert (view["status"], view["reason"]) == ("healthy", None), view
    finally:
        proxy.stop()
        a.stop()


def test_the_restart_span_says_why_the_replica_was_restarted(tmp: Path) -> None:
    """The `sop.health.restart` span's `sop.health.reason` is the failure that triggered the restart
    (before: always `restart command running`, the status text set just before the span started)."""
    a = start_emulator(tmp, name="why-a")
    with OtlpReceiver() as receiver:
        proxy = start_proxy(tmp, [{"url": a.url, "name": "a",
                                   "restart_command": f"{sys.executable} -c pass"}],
                            {"chain": {"health": {**FAST, "restart_after_failures": 2,
                                                  "restart_min_interval_s": 60}},
                             "telemetry": {"otlp_endpoint": receiver.url,
                                           "otlp_protocol": "http/protobuf"}}, name="why")
        try:
            wait_for(lambda: status(proxy, "a") == "healthy", what="a healthy")
            a.kill()
            wait_for(lambda: any(s.name == "sop.health.restart" for s in receiver.spans()), 20,
                     "the restart span exported")
            span = next(s for s in receiver.spans() if s.name == "sop.health.restart")
            reason = attributes_of(span)["sop.health.reason"]
            assert reason.startswith("probe failed"), reason
        finally:
            proxy.stop()
            a.stop()


def test_a_model_only_an_ejected_replica_has_is_a_503_not_another_replica_s_404(tmp: Path) -> None:
    """A model on the disk of an out-of-service replica only is `503 no_healthy_upstream` with
    `Retry-After` (retry later: it exists), on every route that names it (before: sent to a serving
    replica without it, a `404 model not found`, on which a client gives up or pulls the model)."""
    a = start_emulator(tmp, name="absent-a")
    b = start_emulator(tmp, name="absent-b")
    httpx.post(f"{a.url}/api/copy", json={"source": "llama3.2", "destination": "onlya"}).raise_for_status()
    proxy = start_proxy(tmp, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
                        {"chain": {"health": {**FAST, "base_ejection_s": 30.0}}}, name="absent")
    try:
        wait_for(lambda: "onlya:latest" in (profile(proxy)["replicas"]["a"]["models_on_disk"] or []),
                 what="onlya seen on a's disk")
        body = {**BODY, "model": "onlya"}
        assert httpx.post(f"{proxy.url}/api/generate", json=body, timeout=30).status_code == 200
        a.kill()
        wait_for(lambda: status(proxy, "a") == "ejected", what="a ejected by its probes")
        for reply in (httpx.post(f"{proxy.url}/api/generate", json=body, timeout=30),
                      httpx.post(f"{proxy.url}/api/show", json={"model": "onlya"}, timeout=30),
                      httpx.post(f"{proxy.url}/api/embed", json={"model": "onlya", "input": "x"},
                                 timeout=30)):
            assert reply.status_code == 503, reply.text
            assert reply.json()["code"] == "no_healthy_upstream"
            assert "a: ejected" in reply.json()["error"] and "b: model_absent" in reply.json()["error"]
            assert 20 <= int(reply.headers["Retry-After"]) <= 31  # a's backoff, not b's next probe
        v1 = httpx.post(f"{proxy.url}/v1/chat/completions",
                        json={"model": "onlya", "messages": [{"role": "user", "content": "x"}]}, timeout=30)
        assert v1.status_code == 503 and v1.json()["error"]["code"] == "no_healthy_upstream"
        # What b has, and names no replica has at all, are unchanged: served, and b's own 404.
        assert httpx.post(f"{proxy.url}/api/generate", json=BODY, timeout=30).status_code == 200
        assert httpx.post(f"{proxy.url}/api/generate", json={**BODY, "model": "nosuch"},
                          timeout=30).status_code == 404
        # A replica named by an admin, and management, still go where they are sent: creating the
        # model on b makes it b's to serve.
        named = httpx.post(f"{proxy.url}/api/generate", json=body, headers={"X-Ollama-Replica": "b"},
                           timeout=30)
        assert named.status_code == 404
        created = httpx.post(f"{proxy.url}/api/create", json={"model": "onlya", "from": "llama3.2",
                                                               "stream": False}, timeout=30)
        assert created.status_code == 200, created.text
        assert httpx.post(f"{proxy.url}/api/generate", json=body, timeout=30).status_code == 200
        assert httpx.get(f"{proxy.url}/system/queue").json()["models"]["onlya:latest"]["queued"] == 0
    finally:
        for server in (proxy, a, b):
            server.stop()
