"""Cloud models are not replica failures: Ollama forwards `*:cloud` / `*-cloud` requests to ollama.com and
copies its refusals through (429 when the account's usage limit is reached, 503 `Server overloaded, please
retry shortly (ref: ...)`). The emulator reproduces both (`cloud_status` fault); the proxy relays them byte
for byte with a Retry-After, does not retry them on another replica, and does not count them against the
replica's health, while the replica keeps serving local models."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.ollama import is_cloud_model
from tests.support.metrics import metric
from tests.support.servers import Server, start_emulator, start_proxy

CLOUD = "gpt-oss:120b-cloud"
MODELS = f"llama3.2,{CLOUD}"
OVERLOADED = re.compile(rb'\{"error":"Server overloaded, please retry shortly \(ref: [0-9a-f-]{36}\)"\}')
USAGE_LIMIT = (b'{"error":"you (emulator) have reached your session usage limit, upgrade for higher '
               b'limits: https://ollama.com/upgrade"}')
# One counted failure ejects: anything that counted a cloud refusal against a replica shows.
FAST = {"probe_interval_s": 0.3, "probe_timeout_s": 1.0, "base_ejection_s": 1.0, "eject_after_failures": 1,
        "stuck_after_s": 1.0}


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False,
            "options": {"num_predict": 3}}


def wait_for(predicate: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def set_faults(server: Server, **faults: Any) -> None:
    response = httpx.post(f"{server.url}/_emulator/faults", json=faults, timeout=5)
    assert response.status_code == 200, response.text


def fault_hits(server: Server) -> int:
    return int(server.stats()["faults"]["hits"])


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cloud")


@pytest.fixture(scope="module")
def fleet(tmp: Path) -> Iterator[tuple[Server, Server, Server]]:
    a = start_emulator(tmp, name="cloud-a", models=MODELS, decode_tokens_per_s=500)
    b = start_emulator(tmp, name="cloud-b", models=MODELS, decode_tokens_per_s=500)
    proxy = start_proxy(tmp, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
                        {"chain": {"health": FAST}}, name="cloud-proxy")
    try:
        yield a, b, proxy
    finally:
        proxy.stop()
        a.stop()
        b.stop()


@pytest.fixture(autouse=True)
def clear(fleet: tuple[Server, Server, Server]) -> Iterator[None]:
    for server in fleet[:2]:
        httpx.delete(f"{server.url}/_emulator/faults", timeout=5)
    yield
    for server in fleet[:2]:
        httpx.delete(f"{server.url}/_emulator/faults", timeout=5)


def probes(proxy: Server, replica: str) -> float:
    """Successful health probes of `replica` so far, by the proxy's /metrics."""
    return metric(proxy.url, "sop_health_probes_total", sop_upstream_name=replica, outcome="success") or 0.0


def replicas(proxy: Server) -> dict[str, Any]:
    return dict(httpx.get(f"{proxy.url}/system/profile", timeout=5).json()["replicas"])


def test_cloud_names_as_ollama_parses_them() -> None:
    for name in (CLOUD, "qwen3:cloud", "qwen3:CLOUD", "ns/model:7b-cloud", "host:5000/m:cloud"):
        assert is_cloud_model(name), name
    for name in ("llama3.2", "llama3.2:latest", "cloud", "my-cloud", "host:5000/m-cloud", "m:cloud/x",
                 "", None, 7):
        assert not is_cloud_model(name), name


def test_emulator_reproduces_ollama_cloud_refusals(fleet: tuple[Server, Server, Server]) -> None:
    a = fleet[0]
    set_faults(a, cloud_status=429, count=2)
    local = httpx.post(f"{a.url}/api/chat", json=chat("llama3.2"), timeout=30)
    assert local.status_code == 200  # local models are untouched and do not use up `count`
    limited = httpx.post(f"{a.url}/api/chat", json=chat(CLOUD), timeout=30)
    assert limited.status_code == 429 and limited.content == USAGE_LIMIT
    assert limited.headers["Content-Type"] == "application/json; charset=utf-8"
    assert "Retry-After" not in limited.headers  # ollama.com sends none
    openai_limited = httpx.post(f"{a.url}/v1/chat/completions", json=chat(CLOUD), timeout=30)
    assert openai_limited.status_code == 429
    assert openai_limited.json()["error"]["message"].startswith("you (emulator) have reached your session")
    assert fault_hits(a) == 2
    # `count` used up: the cloud model is served again (a signed-in daemon).
    assert httpx.post(f"{a.url}/api/chat", json=chat(CLOUD), timeout=30).status_code == 200

    set_faults(a, cloud_status=503, retry_after_s=9)
    overloaded = httpx.post(f"{a.url}/api/generate", json={"model": CLOUD, "prompt": "x"}, timeout=30)
    assert overloaded.status_code == 503 and OVERLOADED.fullmatch(overloaded.content)
    assert overloaded.headers["Retry-After"] == "9"
    assert httpx.post(f"{a.url}/api/generate", json={"model": "llama3.2", "prompt": "x", "stream": False},
                      timeout=30).status_code == 200

    # A cloud model the daemon does not hold would go to ollama.com signed with a key it does not have.
    httpx.delete(f"{a.url}/_emulator/faults", timeout=5)
    unsigned = httpx.post(f"{a.url}/api/chat", json=chat("qwen3:480b-cloud"), timeout=30)
    assert unsigned.status_code == 401 and unsigned.json()["error"] == "unauthorized"
    assert unsigned.json()["signin_url"].startswith("https://ollama.com/connect?name=")

    bad = httpx.post(f"{a.url}/_emulator/faults", json={"cloud_status": 500}, timeout=5)
    assert bad.status_code == 400


def test_cloud_refusals_are_relayed_and_never_count_against_the_replica(
        fleet: tuple[Server, Server, Server]) -> None:
    a, b, proxy = fleet
    wait_for(lambda: all(r["status"] == "healthy" for r in replicas(proxy).values()), what="healthy fleet")
    for server in (a, b):
        set_faults(server, cloud_status=503)
    sent = 0
    for _ in range(10):
        response = httpx.post(f"{proxy.url}/api/chat", json=chat(CLOUD), timeout=30)
        sent += 1
        assert response.status_code == 503, response.text
        assert OVERLOADED.fullmatch(response.content), response.content  # the replica's bytes
        assert int(response.headers["Retry-After"]) >= 1
        assert response.headers.get("x-should-retry") != "false"
    # Each request reached exactly one replica: a cloud 503 is not "this replica is busy, try another".
    assert fault_hits(a) + fault_hits(b) == sent

    for server in (a, b):
        set_faults(server, cloud_status=429)
    for i in range(10):
        path, body = ("/v1/chat/completions", chat(CLOUD)) if i % 2 else ("/api/chat", chat(CLOUD))
        response = httpx.post(f"{proxy.url}{path}", json=body, timeout=30)
        assert response.status_code == 429, response.text
        if path == "/api/chat":
            assert response.content == USAGE_LIMIT
        else:
            assert "usage limit" in response.json()["error"]["message"]
        assert int(response.headers["Retry-After"]) >= 1
    # The upstream's own Retry-After is kept within the proxy's bounds (1-60 s, `x-should-retry:
    # false` past them, `retry-after-ms` beside it): 0 would make clients retry in a tight loop, an
    # hour would make the OpenAI SDK sleep it (or fall back to its own backoff).
    for told, seconds, milliseconds, should in (("42", "42", "42000", None), ("0", "1", "1000", None),
                                                ("3600", "60", "60000", "false")):
        set_faults(a, cloud_status=429, retry_after_s=int(told))
        set_faults(b, cloud_status=429, retry_after_s=int(told))
        kept = httpx.post(f"{proxy.url}/api/chat", json=chat(CLOUD), timeout=30)
        assert kept.status_code == 429 and kept.headers.get_list("Retry-After") == [seconds], told
        assert kept.headers.get_list("retry-after-ms") == [milliseconds], told
        assert kept.headers.get("x-should-retry") == should, told

    # The OpenAI SDK sees a RateLimitError it can act on (no retries here: we count requests).
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="ollama", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=CLOUD, messages=[{"role": "user", "content": "hi"}])

    # The daemon cannot reach ollama.com: its 502 is about the cloud, not about the replica.
    for server in (a, b):
        set_faults(server, cloud_status=502)
    for _ in range(8):
        response = httpx.post(f"{proxy.url}/api/chat", json=chat(CLOUD), timeout=30)
        assert response.status_code == 502, response.text
        assert response.json()["error"].startswith('Post "https://ollama.com:443/api/chat": dial tcp')

    # 30 cloud refusals in a row: both replicas stay healthy, unsuspected, never ejected, and serve.
    # Two more probe rounds on each replica, in case anything had been put on probation.
    probed = {name: probes(proxy, name) for name in ("a", "b")}
    wait_for(lambda: all(probes(proxy, name) >= count + 2 for name, count in probed.items()),
             what="two probe rounds")
    for name, view in replicas(proxy).items():
        assert view["status"] == "healthy", (name, view)
        assert view["consecutive_failures"] == 0 and view["ejections"] == 0, (name, view)
        assert view["suspect"] is False, (name, view)
    for _ in range(4):
        local = httpx.post(f"{proxy.url}/api/chat", json=chat("llama3.2"), timeout=30)
        assert local.status_code == 200 and local.json()["done"] is True
    for server in (a, b):
        httpx.delete(f"{server.url}/_emulator/faults", timeout=5)
    served = httpx.post(f"{proxy.url}/api/chat", json=chat(CLOUD), timeout=30)
    assert served.status_code == 200 and served.json()["model"] == CLOUD


def test_a_silent_cloud_stream_does_not_make_the_replica_stuck(
        fleet: tuple[Server, Server, Server]) -> None:
    """ollama.com going quiet mid-stream is not the replica hanging: a stays healthy and serving."""
    a, _, proxy = fleet
    wait_for(lambda: all(r["status"] == "healthy" for r in replicas(proxy).values()), what="healthy fleet")
    set_faults(a, hang_after_chunks=1, count=1)
    with httpx.stream("POST", f"{proxy.url}/api/chat", headers={"X-Ollama-Replica": "a"}, timeout=30,
                      json={**chat(CLOUD), "stream": True, "options": {"num_predict": 50}}) as silent:
        assert silent.status_code == 200
        wait_for(lambda: replicas(proxy)["a"]["in_flight"] == 1, what="the cloud stream in flight")
        # Well past stuck_after_s (1 s), measured in probe rounds (each one checks for stuck).
        probed = probes(proxy, "a")
        wait_for(lambda: probes(proxy, "a") >= probed + 8, what="eight probe rounds")
        view = replicas(proxy)["a"]
        assert view["status"] == "healthy" and view["in_flight"] == 1, view
        local = httpx.post(f"{proxy.url}/api/chat", json=chat("llama3.2"), timeout=30,
                           headers={"X-Ollama-Replica": "a"})
        assert local.status_code == 200


def test_local_busy_503_is_still_retried_elsewhere(fleet: tuple[Server, Server, Server]) -> None:
    """The contrast: a local model's 503 (Ollama's queue full) on one replica goes to the other."""
    a, _, proxy = fleet
    wait_for(lambda: all(r["status"] == "healthy" for r in replicas(proxy).values()), what="healthy fleet")
    set_faults(a, status=503)
    for _ in range(6):
        response = httpx.post(f"{proxy.url}/api/chat", json=chat("llama3.2"), timeout=30)
        assert response.status_code == 200, response.text
    assert fault_hits(a) >= 1  # a was tried and answered 503; b served those requests
