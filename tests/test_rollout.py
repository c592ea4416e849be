"""Canary rollout of a step: `rollout: {enforce_share, tenants}` enforces for the listed tenants and a
stable share of the others, and runs the step in shadow for the rest: visible in X-Shadow-Decision, the
decisions metric and the span's mode. Against a real proxy and emulator."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiohttp import web

from proxy.chain import Canary
from proxy.schema import RolloutConfig
from tests.support.metrics import metric
from tests.support.polling import wait_for
from tests.support.redis_server import RedisServer
from tests.support.servers import Server, free_port, start_emulator, start_proxy
from tests.support.threaded import ThreadedApp

TENANTS = [f"team-{i}" for i in range(12)]
LONG = "word " * 200  # over the 32-token limit below


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_emulator(tmp_path_factory.mktemp("rollout"), name="rollout-emu")
    yield server
    server.stop()


def _proxy(tmp: Path, emulator: Server, rollout: dict[str, object], name: str) -> Server:
    return start_proxy(tmp, [emulator.url], {
        "tenants": [{"name": t, "keys": [f"sk-{t}"]} for t in TENANTS],
        "chain": {"limits": {"max_prompt_tokens": 32, "rollout": rollout}}}, name=name)


def _long(proxy: Server, tenant: str) -> httpx.Response:
    return httpx.post(f"{proxy.url}/api/generate", headers={"Authorization": f"Bearer sk-{tenant}"},
                      json={"model": "llama3.2", "prompt": LONG, "stream": False}, timeout=30)


def test_listed_tenants_are_enforced_and_the_rest_shadowed(tmp_path: Path, emulator: Server) -> None:
    proxy = _proxy(tmp_path, emulator, {"enforce_share": 0.0, "tenants": ["team-3"]}, "canary-list")
    try:
        enforced = _long(proxy, "team-3")
        assert enforced.status_code == 400 and enforced.json()["code"] == "prompt_too_long"
        shadowed = _long(proxy, "team-4")
        assert shadowed.status_code == 200
        assert shadowed.headers["x-shadow-decision"] == "limits=prompt_too_long"
        name = "sop_limits_decisions_total"
        assert metric(proxy.url, name, decision="rejected") == 1
        assert metric(proxy.url, name, decision="shadow_prompt_too_long") == 1
    finally:
        proxy.stop()


def test_a_share_is_a_stable_split_of_tenants(tmp_path: Path, emulator: Server) -> None:
    rollout = {"enforce_share": 0.5, "tenants": []}
    canary = Canary(RolloutConfig(enforce_share=0.5))
    expected = {t for t in TENANTS if canary.enforces(t)}
    assert 0 < len(expected) < len(TENANTS)  # the split is not trivial for these names
    first = _proxy(tmp_path, emulator, rollout, "canary-share-1")
    second = _proxy(tmp_path, emulator, rollout, "canary-share-2")
    try:
        for proxy in (first, second):  # the same tenants on every proxy replica
            refused = {t for t in TENANTS if _long(proxy, t).status_code == 400}
            assert refused == expected
            again = {t for t in TENANTS if _long(proxy, t).status_code == 400}
            assert again == expected  # and on every request
    finally:
        first.stop()
        second.stop()


def test_the_default_rollout_enforces_for_everybody(tmp_path: Path, emulator: Server) -> None:
    proxy = _proxy(tmp_path, emulator, {}, "canary-default")
    try:
        assert all(_long(proxy, t).status_code == 400 for t in TENANTS[:4])
    finally:
        proxy.stop()


def test_a_health_canary_keeps_the_proxy_ready(tmp_path: Path) -> None:
    """Health enforces for the canary tenant only; the replica fails its probes (its /api/ps answers
    500) but serves work. The canary tenant gets 503, everyone else is served as in shadow mode, and
    /readyz stays 200: pulling the proxy from its load balancer would fail them all."""
    async def handler(request: web.Request) -> web.Response:
        if request.path == "/api/ps":
            return web.json_response({"error": "broken"}, status=500)
        if request.path in ("/api/version", "/api/tags"):
            return web.json_response({"version": "0.12.0", "models": []})
        return web.json_response({"model": "llama3.2", "response": "ok", "done": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    with ThreadedApp(app) as replica:
        proxy = start_proxy(tmp_path, [{"url": replica.url, "name": "r"}], {
            "admin": {"keys": ["sk-admin"]},
            "tenants": [{"name": t, "keys": [f"sk-{t}"]} for t in ("canary", "rest")],
            "chain": {"health": {"probe_interval_s": 0.3, "base_ejection_s": 30,
                                 "rollout": {"enforce_share": 0.0, "tenants": ["canary"]}}}},
                            name="health-canary")
        try:
            wait_for(lambda: httpx.get(f"{proxy.url}/system/profile", timeout=10,
                                       headers={"Authorization": "Bearer sk-admin"}).json()
                     ["replicas"]["r"]["status"] != "healthy", what="the replica ejected")
            ready = httpx.get(f"{proxy.url}/readyz", timeout=10)
            assert ready.status_code == 200, ready.text
            assert _short(proxy, "rest").status_code == 200
            assert _short(proxy, "canary").status_code == 503
        finally:
            proxy.stop()


def test_closed_mode_without_redis_is_not_ready_under_a_health_canary(tmp_path: Path) -> None:
    """The canary's readiness (no healthy replica, yet ready: the other tenants are served as in
    shadow mode) does not hold while `failure_mode: closed` refuses every request for want of Redis:
    /readyz is 503 then, whatever health's rollout says."""
    async def handler(request: web.Request) -> web.Response:
        if request.path == "/api/ps":
            return web.json_response({"error": "broken"}, status=500)
        return web.json_response({"version": "0.12.0", "models": []})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    with ThreadedApp(app) as replica:
        proxy = start_proxy(tmp_path, [{"url": replica.url, "name": "r"}], {
            "admin": {"keys": ["sk-admin"]},
            "tenants": [{"name": "canary", "keys": ["sk-canary"], "requests_per_minute": 100}],
            "state": {"backend": "redis", "url": f"redis://127.0.0.1:{free_port()}/0",
                      "failure_mode": "closed", "retry_interval_s": 1},
            "chain": {"health": {"probe_interval_s": 0.3, "base_ejection_s": 30,
                                 "rollout": {"enforce_share": 0.0, "tenants": ["canary"]}}}},
                            name="canary-closed")
        try:
            wait_for(lambda: httpx.get(f"{proxy.url}/system/profile", timeout=10,
                                       headers={"Authorization": "Bearer sk-admin"}).json()
                     ["replicas"]["r"]["status"] != "healthy", what="the replica ejected")
            assert _short(proxy, "canary").status_code == 503  # refused: Redis is out
            ready = wait_for(lambda: (r := httpx.get(f"{proxy.url}/readyz", timeout=10)).status_code
                             == 503 and r, what="/readyz 503")
            assert "shared state" in ready.json()["status"], ready.text
        finally:
            proxy.stop()


def _short(proxy: Server, tenant: str) -> httpx.Response:
    return httpx.post(f"{proxy.url}/api/generate", headers={"Authorization": f"Bearer sk-{tenant}"},
                      json={"model": "llama3.2", "prompt": "hi", "stream": False}, timeout=30)


@pytest.mark.parametrize(("change", "shared"), [
    ({"rollout": {"enforce_share": 0.0, "tenants": []}}, False), ({"mode": "shadow"}, False),
    ({"rollout": {"enforce_share": 0.0, "tenants": []}}, True)], ids=["rollout", "shadow", "redis"])
def test_a_request_queued_before_a_reload_to_shadow_gets_its_queue_timeout(
        tmp_path: Path, change: dict[str, object], shared: bool, request: pytest.FixtureRequest) -> None:
    """A request waits in backpressure's queue (enforce mode; with `shared`, the Redis-shared queue); a
    reload then puts its tenant outside a rollout, or the step in shadow mode. It was queued in enforce
    mode, so its wait ends as such a wait does: 503 queue_timeout, counted as `queue_timeout` (not an
    internal error, nor a shadow decision)."""
    emulator = start_emulator(tmp_path, name="queued-emu", decode_tokens_per_s=10.0, load_s=0,
                              output_tokens="100,100")  # ~10 s: holds the only slot
    backpressure: dict[str, object] = {"max_in_flight": 1, "max_queue_size": 4, "queue_timeout_s": 4.0,
                                       "cold_queue_timeout_s": 4.0}
    config: dict[str, Any] = {
        "admin": {"keys": ["sk-admin"]}, "server": {"config_watch_s": 0},
        "tenants": [{"name": t, "keys": [f"sk-{t}"]} for t in ("holder", "waiter")],
        "chain": {"backpressure": backpressure}}
    if shared:
        redis: RedisServer = request.getfixturevalue("fresh_redis_server")
        config["state"] = {"backend": "redis", "url": redis.url}
    proxy = start_proxy(tmp_path, [emulator.url], config, name="queued-reload")
    admin = {"Authorization": "Bearer sk-admin"}
    answers: dict[str, httpx.Response] = {}

    def send(tenant: str) -> None:
        answers[tenant] = httpx.post(f"{proxy.url}/api/generate", timeout=60,
                                     headers={"Authorization": f"Bearer sk-{tenant}"},
                                     json={"model": "llama3.2", "prompt": "hi", "stream": False})
    try:
        holder = threading.Thread(target=send, args=("holder",))
        holder.start()
        wait_for(lambda: metric(proxy.url, "sop_backpressure_decisions_total", decision="admitted"),
                 what="the slot taken")
        waiter = threading.Thread(target=send, args=("waiter",))
        waiter.start()
        if shared:  # in Redis's queue, which this process's queue depth does not count
            time.sleep(1.0)
        else:
            wait_for(lambda: metric(proxy.url, "sop_queue_depth"), what="the second request queued")
        assert proxy.config_path is not None
        written = yaml.safe_load(proxy.config_path.read_text())
        written["chain"]["backpressure"].update(change)
        proxy.config_path.write_text(yaml.safe_dump(written))
        proxy.process.send_signal(signal.SIGHUP)
        wait_for(lambda: httpx.get(f"{proxy.url}/system/config", headers=admin, timeout=10)
                 .json()["version"] == 2, what="the reload applied")
        waiter.join(60)
        refused = answers["waiter"]
        assert refused.status_code == 503, refused.text
        assert refused.json()["code"] == "queue_timeout"
        assert "x-shadow-decision" not in refused.headers
        assert metric(proxy.url, "sop_backpressure_decisions_total", decision="queue_timeout") == 1
        holder.join(60)
        assert answers["holder"].status_code == 200
    finally:
        proxy.stop()
        emulator.stop()
    assert "Traceback" not in proxy.log()
