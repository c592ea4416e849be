"""The `balancer` step over real emulated replicas: routing by residency (no model swaps), spreading equal
costs, prefix affinity, retries before the first byte (refused connections, Ollama's 503) and never after,
failover under load with a replica killed, requests that name a replica, `/api/show` sent to a replica
that has the model, and the decision on the step's span."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import ollama
import openai
import pytest
from yarl import URL

from proxy.config import BalancerConfig
from proxy.placement import Placement, Placing
from proxy.upstreams import LoadedModel, Upstream, UpstreamSet
from tests.support.metrics import metric
from tests.support.otlp_receiver import OtlpReceiver, attributes_of
from tests.support.polling import until
from tests.support.servers import Server, free_port, start_emulator, start_proxy

FAST = {"probe_interval_s": 0.3, "probe_timeout_s": 1.0, "base_ejection_s": 1.0}
ADMIN, TENANT = "sk-admin", "sk-tenant"


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("balancer")


def preload(*servers: Server, model: str = "llama3.2") -> None:
    for server in servers:
        assert httpx.post(f"{server.url}/api/generate", json={"model": model}, timeout=30).status_code == 200


def completed(server: Server) -> int:
    return int(server.stats()["completed"])


def wait_profile(proxy: Server, predicate: Any, timeout_s: float = 10.0,
                 headers: dict[str, str] | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        view = httpx.get(f"{proxy.url}/system/profile", timeout=5, headers=headers).json()
        if predicate(view):
            return dict(view)
        time.sleep(0.05)
    raise AssertionError(f"profile never matched: {view}")


def test_residency_routing_avoids_model_swaps(tmp: Path) -> None:
    # Each replica holds one model at a time (OLLAMA_MAX_LOADED_MODELS=1): round robin would swap models
    # on every request; routing by residency loads each model once.
    a = start_emulator(tmp, name="res-a", load_s=1.0, extra=["--max-loaded-models", "1"])
    b = start_emulator(tmp, name="res-b", load_s=1.0, extra=["--max-loaded-models", "1"])
    proxy = start_proxy(tmp, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
                        {"chain": {"health": FAST}}, name="res")
    try:
        client = ollama.Client(host=proxy.url)
        loads = []
        for model in ["llama3.2", "qwen3"] * 5:
            reply = client.generate(model=model, prompt="hello", options={"num_predict": 4})
            loads.append(reply.load_duration or 0)
        cold = [d for d in loads if d >= 500_000_000]
        assert len(cold) == 2, loads  # each model loaded once, then found where it is
        assert a.stats()["loads"] + b.stats()["loads"] == 2
        view = wait_profile(proxy, lambda v: len(v["models"].get("qwen3:latest", {}).get("loaded_on", []))
                            == 1 and len(v["models"]["llama3.2:latest"]["loaded_on"]) == 1)
        assert view["models"]["qwen3:latest"]["loaded_on"] != view["models"]["llama3.2:latest"]["loaded_on"]
        observed = view["models"]["llama3.2:latest"]["observed"]
        assert observed["loads"] == 1 and observed["load_s"] == pytest.approx(1.0, abs=0.01)
        assert observed["operation"] == "text_completion" and observed["requests_per_min"] > 0
        recommended = view["models"]["llama3.2:latest"]["recommended"]
        assert recommended["warm_on"] == view["models"]["llama3.2:latest"]["loaded_on"]
        assert recommended["pinned"] is False and recommended["options"] == {"num_ctx": 2048}
        assert metric(proxy.url, "sop_balancer_model_loads_total") == 2
    finally:
        for server in (proxy, a, b):
            server.stop()


def test_equal_cost_spreads_and_prefix_affinity_sticks(tmp: Path) -> None:
    a = start_emulator(tmp, name="aff-a")
    b = start_emulator(tmp, name="aff-b")
    preload(a, b)
    plain = start_proxy(tmp, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
                        {"chain": {"health": FAST}}, name="spread")
    sticky = start_proxy(tmp, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
                         {"chain": {"health": FAST, "balancer": {"affinity": "prefix"}}}, name="sticky")
    by_session = start_proxy(tmp, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
                             {"chain": {"health": FAST, "balancer": {"affinity": "session"}}},
                             name="session")
    try:
        body = {"model": "llama3.2", "stream": False, "options": {"num_predict": 2}}
        for _ in range(6):
            httpx.post(f"{plain.url}/api/chat", json={
                **body, "messages": [{"role": "user", "content": "same question"}]}, timeout=30)
        assert completed(a) == completed(b) == 3  # equal cost: turns
        def home(send: Callable[[int], httpx.Response]) -> int:
            """Send a 3-turn conversation; every turn must land on one replica (0: a, 1: b)."""
            before = (completed(a), completed(b))
            for turn in range(3):
                assert send(turn).status_code == 200
            served = [completed(a) - before[0], completed(b) - before[1]]
            assert sorted(served) == [0, 3], served
            return served.index(3)

        def by_prefix(session: int) -> Callable[[int], httpx.Response]:
            def send(turn: int) -> httpx.Response:
                messages = [{"role": "system", "content": f"You are assistant number {session}."},
                            {"role": "user", "content": "Tell me about the documents."}]
                messages += [{"role": "assistant", "content": "..."},
                             {"role": "user", "content": f"and {turn}"}] * turn
                return httpx.post(f"{sticky.url}/api/chat", json={**body, "messages": messages},
                                  timeout=30)
            return send

        def by_header(session: str) -> Callable[[int], httpx.Response]:
            def send(turn: int) -> httpx.Response:
                return httpx.post(f"{by_session.url}/api/chat", headers={"X-Session-Id": session},
                                  json={**body, "messages": [{"role": "user", "content": f"q{turn}"}]},
                                  timeout=30)
            return send

        # `prefix`: same tenant, system prompt and first message -> same replica; conversations spread.
        assert {home(by_prefix(session)) for session in range(6)} == {0, 1}
        # `session`: the client's X-Session-Id decides, whatever the messages.
        assert {home(by_header(s)) for s in ("s-1", "s-2", "s-7", "s-8", "s-9", "s-10")} == {0, 1}
    finally:
        for server in (plain, sticky, by_session, a, b):
            server.stop()


def test_retries_before_the_first_byte_only(tmp: Path) -> None:
    a = start_emulator(tmp, name="retry-a", decode_tokens_per_s=200)
    b = start_emulator(tmp, name="retry-b", decode_tokens_per_s=200)
    preload(a, b)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    # Plain round robin (balancer off), so that the dead replica keeps being chosen until ejected.
    proxy = start_proxy(tmp, [{"url": dead, "name": "dead"}, {"url": a.url, "name": "a"},
                              {"url": b.url, "name": "b"}],
                        {"chain": {"health": {**FAST, "probe_interval_s": 30.0},
                                   "balancer": {"mode": "off"}}}, name="retry")
    try:
        body = {"model": "llama3.2", "prompt": "hello", "stream": False, "options": {"num_predict": 3}}
        for _ in range(6):
            reply = httpx.post(f"{proxy.url}/api/generate", json=body, timeout=30)
            assert reply.status_code == 200, reply.text
        view = httpx.get(f"{proxy.url}/system/profile").json()["replicas"]
        assert view["dead"]["status"] == "ejected"
        # Ollama's 503 (server busy) is retried on another replica, and does not eject the one that said it.
        for busy in (a, b):
            httpx.post(f"{busy.url}/_emulator/faults", json={"status": 503, "count": 1})
            for _ in range(2):  # round robin: one of the two meets the 503 and is retried
                reply = httpx.post(f"{proxy.url}/api/generate", json=body, timeout=30)
                assert reply.status_code == 200, reply.text
        view = httpx.get(f"{proxy.url}/system/profile").json()["replicas"]
        assert view["a"]["status"] == view["b"]["status"] == "healthy"
        # Both busy: Ollama's own 503 reaches the client, with a Retry-After it did not send.
        for busy in (a, b):
            httpx.post(f"{busy.url}/_emulator/faults", json={"status": 503, "count": 1})
        reply = httpx.post(f"{proxy.url}/api/generate", json=body, timeout=30)
        assert reply.status_code == 503 and "server busy" in reply.json()["error"]
        assert int(reply.headers["Retry-After"]) >= 1
        assert (metric(proxy.url, "sop_balancer_retries_total", error_type="overload") or 0) >= 2
        # After the first byte there is no retry: the stream ends with an error line.
        httpx.post(f"{a.url}/_emulator/faults", json={"reset_after_chunks": 2, "count": 1})
        httpx.post(f"{b.url}/_emulator/faults", json={"reset_after_chunks": 2, "count": 1})
        with httpx.stream("POST", f"{proxy.url}/api/generate", timeout=30,
                          json={**body, "stream": True, "options": {"num_predict": 20}}) as stream:
            lines = [json.loads(line) for line in stream.iter_lines() if line]
        assert lines[-1]["code"] == "upstream_reset_after_response_started"
        assert all("error" not in line for line in lines[:-1]) and len(lines) >= 2
        assert completed(a) + completed(b) == 10  # 6 + 4 served, the broken stream not completed
    finally:
        for server in (proxy, a, b):
            server.stop()


def test_failover_under_load_loses_nothing_unstarted(tmp: Path) -> None:
    a = start_emulator(tmp, name="fail-a", decode_tokens_per_s=25, output_tokens="40,40",
                       extra=["--num-parallel", "4"], fixed_clock=False)
    b = start_emulator(tmp, name="fail-b", decode_tokens_per_s=25, output_tokens="40,40",
                       extra=["--num-parallel", "4"], fixed_clock=False)
    preload(a, b)
    proxy = start_proxy(tmp, [{"url": a.url, "name": "a", "num_parallel": 4},
                              {"url": b.url, "name": "b", "num_parallel": 4}],
                        {"chain": {"health": FAST}}, name="failover")

    async def one(session: aiohttp.ClientSession, index: int) -> tuple[str, int]:
        await asyncio.sleep(index * 0.1)
        async with session.post(f"{proxy.url}/api/generate", json={
                "model": "llama3.2", "prompt": f"question {index}"}) as response:
            assert response.status == 200, await response.text()
            chunks = [json.loads(line) async for line in response.content if line.strip()]
        last = chunks[-1]
        if last.get("done"):
            return "ok", len(chunks)
        return str(last.get("code")), len(chunks)

    async def run() -> tuple[list[tuple[str, int]], int]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            tasks = [asyncio.create_task(one(session, i)) for i in range(24)]
            # b dies while streams run on it (polled, not slept: on a loaded machine 1 s was not
            # always enough, on an idle one it was waste).
            await until(lambda: b.stats()["active"] >= 2, what="streams running on b")
            streaming_on_b = (await asyncio.to_thread(b.stats))["active"]
            await asyncio.to_thread(b.kill)
            return await asyncio.gather(*tasks), streaming_on_b

    try:
        results, streaming_on_b = asyncio.run(run())
        failed = [r for r in results if r[0] != "ok"]
        # Only streams already running on b when it died are lost, each ended by a final error line
        # after the bytes it had; every request that had not started streaming was served by a.
        assert len(failed) <= streaming_on_b
        assert all(code == "upstream_reset_after_response_started" and n >= 2 for code, n in failed)
        assert len(results) - len(failed) >= 24 - streaming_on_b
        view = httpx.get(f"{proxy.url}/system/profile").json()["replicas"]
        assert view["b"]["status"] == "ejected"
        reply = httpx.post(f"{proxy.url}/api/generate", json={
            "model": "llama3.2", "prompt": "after", "stream": False}, timeout=30)
        assert reply.status_code == 200
    finally:
        proxy.stop()
        a.stop()
        b.stop()


def test_named_replica_and_show_goes_to_a_holder(tmp: Path) -> None:
    a = start_emulator(tmp, name="named-a", models="llama3.2")
    b = start_emulator(tmp, name="named-b", models="qwen3")
    proxy = start_proxy(tmp, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
                        {"admin": {"keys": [ADMIN]}, "tenants": [{"name": "t", "keys": [TENANT]}],
                         "chain": {"health": FAST}}, name="named")
    admin = {"Authorization": f"Bearer {ADMIN}"}
    try:
        wait_profile(proxy, lambda v: all(r["models_on_disk"] for r in v["replicas"].values()),
                     headers=admin)
        for model in ("llama3.2", "qwen3") * 2:
            reply = httpx.post(f"{proxy.url}/api/show", json={"model": model},
                               headers={"Authorization": f"Bearer {TENANT}"})
            assert reply.status_code == 200, reply.text
        reply = httpx.post(f"{proxy.url}/api/generate", headers={**admin, "X-Ollama-Replica": "b"},
                           json={"model": "qwen3", "prompt": "hi", "stream": False,
                                 "options": {"num_predict": 2}}, timeout=30)
        assert reply.status_code == 200 and completed(b) == 1 and completed(a) == 0
        forbidden = httpx.post(f"{proxy.url}/api/generate", json={"model": "qwen3", "prompt": "hi"},
                               headers={"Authorization": f"Bearer {TENANT}", "X-Ollama-Replica": "b"})
        assert forbidden.status_code == 403 and "admin" in forbidden.json()["error"]
        unknown = httpx.get(f"{proxy.url}/api/ps", headers={**admin, "X-Ollama-Replica": "zz"})
        assert unknown.status_code == 400 and "no replica by that name" in unknown.json()["error"]
        # A named replica is relayed as it is, unmerged.
        direct = httpx.get(f"{proxy.url}/api/tags", headers={**admin, "X-Ollama-Replica": "a"})
        assert direct.content == httpx.get(f"{a.url}/api/tags").content
    finally:
        for server in (proxy, a, b):
            server.stop()


def test_model_lookup_goes_to_a_holder(tmp: Path) -> None:
    # `GET /v1/models/{model}` names its model in the path, not the body: it goes to a replica that
    # has the model, as /api/show does. (It went round robin: with the models on different replicas,
    # the OpenAI SDK's models.retrieve answered 404 for every other call.)
    a = start_emulator(tmp, name="lookup-a", models="llama3.2")
    b = start_emulator(tmp, name="lookup-b", models="qwen3")
    proxy = start_proxy(tmp, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
                        {"admin": {"keys": [ADMIN]}, "tenants": [{"name": "t", "keys": [TENANT]}],
                         "chain": {"health": FAST}}, name="lookup")
    try:
        wait_profile(proxy, lambda v: all(r["models_on_disk"] for r in v["replicas"].values()),
                     headers={"Authorization": f"Bearer {ADMIN}"})
        client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=TENANT, max_retries=0)
        # Each name twice in a row: round robin would send one of the two to the other replica.
        seen = [client.models.retrieve(name).id
                for name in ("llama3.2", "llama3.2", "qwen3:latest", "qwen3:latest", "qwen3", "qwen3")]
        assert seen == ["llama3.2", "llama3.2", "qwen3:latest", "qwen3:latest", "qwen3", "qwen3"]
        # Percent-encoded as some clients send it; a name no replica has is a replica's own 404.
        encoded = httpx.get(f"{proxy.url}/v1/models/qwen3%3Alatest",
                            headers={"Authorization": f"Bearer {TENANT}"})
        assert encoded.status_code == 200 and encoded.json()["id"] == "qwen3:latest"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("nope")
    finally:
        for server in (proxy, a, b):
            server.stop()


def test_decision_on_the_step_spans(tmp: Path) -> None:
    a = start_emulator(tmp, name="span-a")
    b = start_emulator(tmp, name="span-b")
    preload(b)
    with OtlpReceiver() as receiver:
        proxy = start_proxy(tmp, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
                            {"chain": {"health": FAST}, "models": {"qwen3": {"replicas": ["a"]}},
                             "telemetry": {"otlp_endpoint": receiver.url,
                                           "otlp_protocol": "http/protobuf"}}, name="spans")
        try:
            wait_profile(proxy, lambda v: v["models"].get("llama3.2:latest", {}).get("loaded_on") == ["b"])
            reply = httpx.post(f"{proxy.url}/api/generate", json={
                "model": "llama3.2", "prompt": "hi", "stream": False}, timeout=30)
            assert reply.status_code == 200 and completed(b) == 1
            reply = httpx.post(f"{proxy.url}/api/generate", json={
                "model": "qwen3", "prompt": "hi", "stream": False}, timeout=30)
            assert reply.status_code == 200 and completed(a) == 1  # only a may serve qwen3
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                spans = [s for s in receiver.spans() if s.name in ("sop.balancer", "sop.health")]
                if len(spans) >= 4:
                    break
                time.sleep(0.1)
            balancer = [attributes_of(s) for s in spans if s.name == "sop.balancer"]
            health = [attributes_of(s) for s in spans if s.name == "sop.health"]
            first = next(s for s in balancer if s["gen_ai.request.model"] == "llama3.2")
            assert first["sop.upstream.name"] == "b" and first["sop.balancer.decision"] == "resident"
            assert first["sop.balancer.late_bound"] is True
            assert first["sop.balancer.costs_s"][0].startswith("b=0.00:resident")
            assert any(c.startswith("a=") and c.endswith(":cold") for c in first["sop.balancer.costs_s"])
            second = next(s for s in balancer if s["gen_ai.request.model"] == "qwen3")
            assert second["sop.upstream.name"] == "a" and second["sop.balancer.dropped"] == ["b=not_allowed"]
            qwen = next(s for s in health if s["gen_ai.request.model"] == "qwen3")
            assert qwen["sop.health.candidates"] == ["a"] and qwen["sop.health.decision"] == "healthy"
        finally:
            proxy.stop()
            a.stop()
            b.stop()


def _two_replicas(b_holds: str, b_context: int) -> tuple[Placement, Upstream, Upstream]:
    """Placement over replicas a (llama3.2 loaded with 4096) and b (`b_holds` with `b_context`), 8 s loads."""
    upstreams = UpstreamSet([Upstream("a", URL("http://127.0.0.1:1")),
                             Upstream("b", URL("http://127.0.0.1:2"))])
    a, b = upstreams.upstreams
    a.loaded = {"llama3.2:latest": LoadedModel("llama3.2:latest", context_length=4096)}
    b.loaded = {b_holds: LoadedModel(b_holds, context_length=b_context)}
    return Placement(BalancerConfig(cold_load_s=8.0), upstreams), a, b


def test_cost_model_prefers_residency_and_prices_evictions() -> None:
    placement, a, b = _two_replicas("qwen3:latest", 4096)
    assert placement.cost(a, "llama3.2:latest", 1000, 0.0) == (0.0, "resident")
    # A prompt longer than the loaded context: still resident (no load), a little behind one that fits;
    # another num_ctx than the loaded one makes Ollama reload the model.
    assert placement.cost(a, "llama3.2:latest", 5000, 0.0) == (0.5, "short")
    assert placement.cost(a, "llama3.2:latest", 1000, 0.0, num_ctx=8192) == (8.0, "reload")
    assert placement.cost(a, "llama3.2:latest", 1000, 0.0, num_ctx=4096) == (0.0, "resident")
    # qwen3 not wanted lately: loading llama3.2 on b costs the load only...
    assert placement.cost(b, "llama3.2:latest", None, 0.0) == (8.0, "cold")
    # ...but once qwen3 is in demand, evicting it costs its next load too (b never held two models).
    placement.stat("qwen3:latest").last_wanted = time.monotonic()
    assert placement.cost(b, "llama3.2:latest", None, 0.0) == (16.0, "cold")
    b.loaded["mistral:latest"] = LoadedModel("mistral:latest")  # b is seen holding two at once
    assert placement.cost(b, "llama3.2:latest", None, 0.0)[0] == 8.0
    # Late binding: a free cold replica against a busy one that holds the model.
    ranked = placement.rank("llama3.2", [a, b], None, free=[b], position=0)
    assert ranked[0][2] is a  # half a service (1 s by default) beats an 8 s load
    placement.stat("llama3.2:latest").service_s = 30.0
    ranked = placement.rank("llama3.2", [a, b], None, free=[b], position=0)
    assert ranked[0][2] is b  # a 15 s expected wait does not


def test_a_float_num_ctx_is_priced_as_the_reload_it_makes() -> None:
    """`num_ctx: 8192.0` (how Python's json writes a float) is 8192 to Ollama, which reloads a model
    loaded with 4096: placement reads it as limits does, and prefers the replica loaded with 8192."""
    placement, a, b = _two_replicas("llama3.2:latest", 8192)
    for num_ctx in (8192, 8192.0, 8192.9):
        placing = Placing("t", "llama3.2", 100, body={"model": "llama3.2", "options": {"num_ctx": num_ctx}})
        ranked = placement.rank("llama3.2", [a, b], placing)
        assert [(row[1], row[2].name) for row in ranked] == [("resident", "b"), ("reload", "a")], num_ctx


@pytest.mark.parametrize("mode", ["shadow", "off"])
def test_unknown_named_replica_is_400_in_every_mode(tmp_path: Path, mode: str) -> None:
    a = start_emulator(tmp_path, name=f"named-{mode}-a")
    b = start_emulator(tmp_path, name=f"named-{mode}-b")
    proxy = start_proxy(tmp_path, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
                        {"admin": {"keys": [ADMIN]}, "chain": {"balancer": {"mode": mode}}},
                        name=f"named-{mode}")
    admin = {"Authorization": f"Bearer {ADMIN}"}
    try:
        for method, path, body in (("GET", "/api/ps", None), ("POST", "/api/generate", {
                "model": "llama3.2", "prompt": "hi", "stream": False})):
            reply = httpx.request(method, f"{proxy.url}{path}", json=body,
                                  headers={**admin, "X-Ollama-Replica": "zz-nowhere"})
            assert reply.status_code == 400, (mode, path, reply.text)
            assert reply.json()["code"] == "invalid_request" and "zz-nowhere" not in reply.text
        named = httpx.post(f"{proxy.url}/api/generate", headers={**admin, "X-Ollama-Replica": "b"},
                           json={"model": "llama3.2", "prompt": "hi", "stream": False})
        assert named.status_code == 200
    finally:
        for server in (proxy, a, b):
            server.stop()


def test_a_balancer_rollout_places_only_its_canary_by_cost(tmp: Path) -> None:
    """`chain.balancer.rollout`: the canary's tenants are placed by cost (on the replica holding the
    model), the others round robin, as the balancer's shadow mode places them. With backpressure on
    (the default), the slot's replica was chosen by cost for every tenant: the rollout did nothing."""
    a, b = start_emulator(tmp, name="rollout-a"), start_emulator(tmp, name="rollout-b")
    proxy = start_proxy(tmp, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}], {
        "admin": {"keys": [ADMIN]},
        "tenants": [{"name": "canary", "keys": [TENANT]}, {"name": "rest", "keys": ["sk-rest"]}],
        "chain": {"health": FAST,
                  "balancer": {"rollout": {"enforce_share": 0.0, "tenants": ["canary"]}}}},
        name="rollout")
    try:
        preload(a)  # only a holds llama3.2: cost placement sends everything there
        wait_profile(proxy, lambda v: [m["model"] for m in v["replicas"]["a"]["loaded"]]
                     == ["llama3.2:latest"] and v["replicas"]["b"]["loaded"] == [],
                     headers={"Authorization": f"Bearer {ADMIN}"})
        body = {"model": "llama3.2", "prompt": "hi", "stream": False, "options": {"num_predict": 2}}

        def served(key: str) -> tuple[int, int]:
            before = completed(a), completed(b)
            for _ in range(4):
                reply = httpx.post(f"{proxy.url}/api/generate", json=body, timeout=30,
                                   headers={"Authorization": f"Bearer {key}"})
                assert reply.status_code == 200
            return completed(a) - before[0], completed(b) - before[1]

        assert served(TENANT) == (4, 0)  # the canary: by residency
        assert served("sk-rest") == (2, 2)  # outside it: round robin
    finally:
        proxy.stop()
        a.stop()
        b.stop()


def test_a_replica_that_says_server_busy_gets_no_new_request_for_a_moment(tmp: Path) -> None:
    """A replica answering Ollama's `503 server busy` (its own queue full, with work the proxy does not
    see) is paused for a second: requests wait in the proxy's queue for the other replica rather than
    be placed on it. Answering at once, it always looked free and took a slot, and once the retry
    budget was spent the clients got its 503 (7 of 10 in a run with the other replica serving)."""
    from concurrent.futures import ThreadPoolExecutor

    # b answers in ~0.05 s: the burst is served within a's pause, and a loaded machine does not pile
    # up retries (each 503 from a is retried on b within the retry budget).
    a = start_emulator(tmp, name="busy-a", decode_tokens_per_s=200)
    b = start_emulator(tmp, name="busy-b", decode_tokens_per_s=200)
    preload(a, b)
    proxy = start_proxy(tmp, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}], {
        "chain": {"health": FAST, "backpressure": {"max_in_flight": 1}}}, name="busy")
    try:
        wait_profile(proxy, lambda v: all(r["status"] == "healthy" and r["loaded"]
                                          for r in v["replicas"].values()))
        assert httpx.post(f"{a.url}/_emulator/faults", json={"status": 503}).status_code == 200
        body = {"model": "llama3.2", "prompt": "hi", "stream": False, "options": {"num_predict": 8}}
        with ThreadPoolExecutor(10) as pool:
            replies = list(pool.map(lambda _: httpx.post(f"{proxy.url}/api/generate", json=body,
                                                         timeout=60), range(10)))
        assert [r.status_code for r in replies] == [200] * 10, [r.text[:80] for r in replies]
        assert completed(b) == 10
    finally:
        proxy.stop()
        a.stop()
        b.stop()


def test_a_replica_answering_500_to_every_request_for_a_model_is_avoided(tmp: Path) -> None:
    """A replica whose runner fails every request for a model (Ollama's 500) answers at once, so it
    always looked free and took every request: with the other replica serving, 10 of 10 got 500. After
    `eject_after_failures` 500s in a row for the model (different requests: a client's retries of one
    request count once), the other replica takes it for a backoff; when every replica fails it alike
    (the requests' own fault, likely), nothing is avoided and the 500s are the client's answer."""
    a = start_emulator(tmp, name="err-a")
    b = start_emulator(tmp, name="err-b")
    preload(a, b)
    proxy = start_proxy(tmp, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}], {
        "chain": {"health": {**FAST, "base_ejection_s": 30.0}}}, name="errors")
    def body(i: int) -> dict[str, Any]:
        return {"model": "llama3.2", "prompt": f"hi {i}", "stream": False, "options": {"num_predict": 4}}

    try:
        wait_profile(proxy, lambda v: all(r["status"] == "healthy" and r["loaded"]
                                          for r in v["replicas"].values()))
        assert httpx.post(f"{a.url}/_emulator/faults", json={"status": 500}).status_code == 200
        # One request sent again and again (as SDKs retry a 500) is one failure: a is not avoided.
        statuses = [httpx.post(f"{proxy.url}/api/generate", json=body(0), timeout=30).status_code
                    for _ in range(8)]
        assert statuses.count(500) >= 3, statuses
        view = httpx.get(f"{proxy.url}/system/profile", timeout=5).json()
        assert view["replicas"]["a"]["avoided_models"] == {}
        # Different requests failing on it are: after 3 in a row, b takes the model.
        statuses = [httpx.post(f"{proxy.url}/api/generate", json=body(i), timeout=30).status_code
                    for i in range(1, 13)]
        assert statuses.count(500) <= 3, statuses  # the run that names replica a, then only b
        assert statuses[-6:] == [200] * 6, statuses
        view = wait_profile(proxy, lambda v: "llama3.2:latest" in v["replicas"]["a"]["avoided_models"])
        assert view["replicas"]["a"]["status"] == "healthy"  # a 500 is not a gateway failure
        assert view["replicas"]["b"]["avoided_models"] == {}
        assert "answered 500 to 3 requests in a row for model llama3.2: " in proxy.log()

        # Both failing alike: nothing is avoided on top, every request is answered (500), none refused.
        assert httpx.post(f"{b.url}/_emulator/faults", json={"status": 500}).status_code == 200
        statuses = [httpx.post(f"{proxy.url}/api/generate", json=body(i), timeout=30).status_code
                    for i in range(20, 28)]
        assert statuses == [500] * 8, statuses

        # Once the replica serves the model again, a success ends its avoidance.
        for server in (a, b):
            assert httpx.delete(f"{server.url}/_emulator/faults").status_code in (200, 204)
        statuses = [httpx.post(f"{proxy.url}/api/generate", json=body(i), timeout=30).status_code
                    for i in range(30, 34)]
        assert statuses == [200] * 4, statuses
    finally:
        proxy.stop()
        a.stop()
        b.stop()
