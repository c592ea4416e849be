"""Routes about the whole fleet, through the official clients: the merged `/api/tags`, `/v1/models` and
`/api/ps` (with the replica named), `/api/version`, and model management sent to every replica (or to the
one an admin names) with per-replica results, replicas that are down reported as skipped."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from tests.support.servers import Server, start_emulator, start_proxy

ADMIN, TENANT, MANAGER = "sk-admin", "sk-tenant", "sk-manager"


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fanout")


@pytest.fixture
def fleet(tmp: Path) -> Iterator[tuple[Server, Server, Server]]:
    a = start_emulator(tmp, name="fan-a", models="llama3.2,nomic-embed-text")
    b = start_emulator(tmp, name="fan-b", models="qwen3,llama3.2")
    proxy = start_proxy(tmp, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}], {
        "admin": {"keys": [ADMIN]},
        "tenants": [{"name": "t", "keys": [TENANT]},
                    {"name": "ops", "keys": [MANAGER], "allow_management": True}],
        "chain": {"health": {"probe_interval_s": 0.3, "base_ejection_s": 30.0}}}, name="fan")
    yield a, b, proxy
    for server in (proxy, a, b):
        server.stop()


def names(server_url: str, key: str | None = None) -> list[str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return sorted(m["name"] for m in httpx.get(f"{server_url}/api/tags", headers=headers).json()["models"])


def test_read_routes_are_merged(fleet: tuple[Server, Server, Server]) -> None:
    a, b, proxy = fleet
    client = ollama.Client(host=proxy.url, headers={"Authorization": f"Bearer {TENANT}"})
    listed = sorted(m.model or "" for m in client.list().models)
    assert listed == ["llama3.2:latest", "nomic-embed-text:latest", "qwen3:latest"]
    reply = httpx.get(f"{proxy.url}/api/tags", headers={"Authorization": f"Bearer {TENANT}"})
    assert reply.headers["X-Replica-Results"] == "a=ok, b=ok"
    models = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=TENANT).models.list()
    assert sorted(m.id for m in models.data) == listed
    httpx.post(f"{a.url}/api/generate", json={"model": "llama3.2"}, timeout=30)
    httpx.post(f"{b.url}/api/generate", json={"model": "llama3.2"}, timeout=30)
    httpx.post(f"{b.url}/api/generate", json={"model": "qwen3"}, timeout=30)
    running = client.ps().models
    assert sorted((m.model or "") for m in running) == ["llama3.2:latest", "llama3.2:latest", "qwen3:latest"]
    raw = httpx.get(f"{proxy.url}/api/ps", headers={"Authorization": f"Bearer {TENANT}"}).json()["models"]
    assert sorted((m["name"], m["replica"]) for m in raw) == [
        ("llama3.2:latest", "a"), ("llama3.2:latest", "b"), ("qwen3:latest", "b")]
    assert client.show("qwen3").modelinfo is not None  # sent to b, the replica that has it
    assert httpx.get(f"{proxy.url}/api/version").json() == {"version": "0.33.0"}


def test_merged_listings_are_framed_as_a_replica_frames_them(fleet: tuple[Server, Server, Server]) -> None:
    """The merged `/v1/models` and `/api/tags` carry the Content-Type and framing a replica gives the
    route (Ollama's /v1 middleware writes `application/json` and json.Encoder's newline; gin's
    `/api/tags` `application/json; charset=utf-8` and none), so a client cannot tell a fleet from one
    daemon by them (before: the merged /v1/models said `application/json; charset=utf-8`)."""
    a, _, proxy = fleet
    auth = {"Authorization": f"Bearer {TENANT}"}
    for path in ("/v1/models", "/api/tags"):
        own = httpx.get(f"{a.url}{path}")
        merged = httpx.get(f"{proxy.url}{path}", headers=auth)
        assert merged.headers["X-Replica-Results"] == "a=ok, b=ok"
        assert merged.headers["content-type"] == own.headers["content-type"], path
        assert merged.content.endswith(b"\n") == own.content.endswith(b"\n"), path


def test_management_goes_to_every_replica(fleet: tuple[Server, Server, Server]) -> None:
    a, b, proxy = fleet
    tenant = ollama.Client(host=proxy.url, headers={"Authorization": f"Bearer {TENANT}"})
    with pytest.raises(ollama.ResponseError) as refused:
        tenant.pull("all-minilm")
    assert refused.value.status_code == 403
    ops = ollama.Client(host=proxy.url, headers={"Authorization": f"Bearer {MANAGER}"})
    assert ops.pull("all-minilm").status == "success"
    assert "all-minilm:latest" in names(a.url) and "all-minilm:latest" in names(b.url)
    # Streamed progress: every line names its replica, and a summary closes the stream.
    with httpx.stream("POST", f"{proxy.url}/api/pull", json={"model": "qwen3"},
                      headers={"Authorization": f"Bearer {MANAGER}"}) as stream:
        lines = [json.loads(line) for line in stream.iter_lines() if line]
    assert {line["replica"] for line in lines[:-1]} == {"a", "b"}
    assert [line["status"] for line in lines[:-1] if line["replica"] == "a"][-1] == "success"
    assert lines[-1] == {"status": "success", "replicas": {"a": "success", "b": "success"}}
    with pytest.raises(ollama.ResponseError) as unknown:
        ops.pull("no-such-model-anywhere")
    assert "file does not exist" in str(unknown.value)
    # copy and delete keep Ollama's empty 200, with the results per replica in a header.
    copied = httpx.post(f"{proxy.url}/api/copy", json={"source": "nomic-embed-text", "destination": "emb"},
                        headers={"Authorization": f"Bearer {MANAGER}"})
    assert copied.status_code == 200 and copied.content == b""
    assert copied.headers["X-Replica-Results"] == "a=success, b=404"
    assert ops.delete("qwen3").status == "success"
    assert "qwen3:latest" not in names(a.url) + names(b.url)
    deadline = time.monotonic() + 5
    while "qwen3:latest" in names(proxy.url, TENANT) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert names(proxy.url, TENANT) == ["all-minilm:latest", "emb:latest", "llama3.2:latest",
                                        "nomic-embed-text:latest"]
    gone = httpx.request("DELETE", f"{proxy.url}/api/delete", json={"model": "qwen3"},
                         headers={"Authorization": f"Bearer {MANAGER}"})
    assert gone.status_code == 404 and gone.json() == {"error": "model 'qwen3' not found"}


def test_named_replica_and_skipped_replicas(fleet: tuple[Server, Server, Server]) -> None:
    a, b, proxy = fleet
    admin = {"Authorization": f"Bearer {ADMIN}"}
    only_a = httpx.post(f"{proxy.url}/api/pull", json={"model": "all-minilm", "stream": False},
                        headers={**admin, "X-Ollama-Replica": "a"})
    assert only_a.status_code == 200 and only_a.json() == {"status": "success"}  # relayed as it is
    assert "all-minilm:latest" in names(a.url) and "all-minilm:latest" not in names(b.url)
    b.kill()
    deadline = time.monotonic() + 10
    while httpx.get(f"{proxy.url}/system/profile", headers=admin).json()["replicas"]["b"]["status"] \
            == "healthy" and time.monotonic() < deadline:
        time.sleep(0.05)
    reply = httpx.post(f"{proxy.url}/api/pull", json={"model": "qwen3", "stream": False}, headers=admin)
    assert reply.status_code == 200
    assert reply.json() == {"status": "success",
                            "replicas": {"a": "success", "b": "skipped: replica is ejected"}}
    assert names(proxy.url, ADMIN) == sorted(names(a.url))  # only a answers the merged list now


def test_a_busy_fleet_answer_says_when_to_come_back(fleet: tuple[Server, Server, Server]) -> None:
    """Replicas answering a management call with 503 (and no Retry-After): the merged answer keeps the
    status and, like every 429 and 503 the proxy sends, carries Retry-After."""
    a, b, proxy = fleet
    for replica in (a, b):
        httpx.post(f"{replica.url}/_emulator/faults", timeout=5,
                   json={"status": 503, "paths": ["/api/pull", "/api/copy"]})
    admin = {"Authorization": f"Bearer {ADMIN}"}
    for path, body in (("/api/pull", {"model": "llama3.2", "stream": False}),
                       ("/api/copy", {"source": "llama3.2", "destination": "copy"})):
        answer = httpx.post(f"{proxy.url}{path}", json=body, headers=admin, timeout=30)
        assert answer.status_code == 503, answer.text
        assert answer.headers["Retry-After"] == "5" and "replicas" in answer.json()  # the default


@pytest.mark.parametrize("told,expected", [
    ({"retry_after_s": 17}, {"retry-after": "17", "retry-after-ms": "17000"}),
    ({"retry_after_s": 0}, {"retry-after": "1", "retry-after-ms": "1000"}),  # never "retry at once"
    ({"retry_after_s": 600}, {"retry-after": "60", "retry-after-ms": "60000", "x-should-retry": "false"}),
    ({"retry_after": "soon"}, {"retry-after": "5", "retry-after-ms": "5000"}),  # unreadable: the default
], ids=["17s", "0s", "600s", "unreadable"])
def test_a_busy_fleet_answer_relays_the_replicas_own_wait(
        fleet: tuple[Server, Server, Server], told: dict[str, object], expected: dict[str, str]) -> None:
    """A replica that says when to come back (its 503's Retry-After) is relayed in the forwarder's
    bounds: at least 1 s, at most 60 (and `x-should-retry: false` past it); a value no client can read
    gives the default, as no value does."""
    a, b, proxy = fleet
    for replica in (a, b):
        httpx.post(f"{replica.url}/_emulator/faults", timeout=5,
                   json={"status": 503, "paths": ["/api/copy"], **told})
    answer = httpx.post(f"{proxy.url}/api/copy", json={"source": "llama3.2", "destination": "copy"},
                        headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert answer.status_code == 503, answer.text
    assert {name: answer.headers.get(name) for name in expected} == expected
    if "x-should-retry" not in expected:
        assert "x-should-retry" not in answer.headers


def test_a_streamed_call_every_replica_refuses_keeps_ollamas_status(
        fleet: tuple[Server, Server, Server]) -> None:
    """A streamed push, create or pull that every replica refuses before any progress (a missing model
    to push, a create naming no source, a busy daemon) is answered as one Ollama answers it: with its
    status, which the official client reads, the results per replica, and Retry-After on a 503
    (before: a 200 stream of error lines, which the client read as status -1, its wait lost). A
    refusal beside a replica that streams stays an error line of the stream."""
    a, b, proxy = fleet
    manager = {"Authorization": f"Bearer {MANAGER}"}
    ops = ollama.Client(host=proxy.url, headers=manager)
    own = ollama.Client(host=a.url)
    for call in (lambda c: list(c.push("no-such-model", stream=True)),
                 lambda c: list(c.create("mine", stream=True))):
        with pytest.raises(ollama.ResponseError) as direct:
            call(own)
        with pytest.raises(ollama.ResponseError) as fanned:
            call(ops)
        assert (fanned.value.status_code, direct.value.status_code) == (400, 400)
        assert direct.value.error in fanned.value.error
    httpx.post(f"{a.url}/_emulator/faults", timeout=5, json={"status": 503, "paths": ["/api/pull"]})
    with httpx.stream("POST", f"{proxy.url}/api/pull", json={"model": "llama3.2"}, headers=manager,
                      timeout=30) as stream:
        assert stream.status_code == 200
        lines = [json.loads(line) for line in stream.iter_lines() if line]
    assert [line["replica"] for line in lines[:-1] if "error" in line] == ["a"]
    assert lines[-1]["replicas"]["b"] == "success" and lines[-1]["replicas"]["a"] != "success"
    httpx.post(f"{b.url}/_emulator/faults", timeout=5, json={"status": 503, "paths": ["/api/pull"]})
    busy = httpx.post(f"{proxy.url}/api/pull", json={"model": "llama3.2"}, headers=manager, timeout=30)
    assert busy.status_code == 503, busy.text
    assert busy.headers["Retry-After"] == "5" and set(busy.json()["replicas"]) == {"a", "b"}


@pytest.mark.parametrize("odd", [
    {"models": 5},
    {"models": [{"name": ["x"], "model": {"a": 1}, "modified_at": 5}, "text", None]},
    {"models": "not a list"},
], ids=["count", "list-names", "string"])
def test_a_replica_answering_an_odd_listing_does_not_break_the_fleets(tmp: Path,
                                                                      odd: dict[str, object]) -> None:
    """One replica whose /api/tags and /api/ps say something that is not Ollama's list (another server
    behind the URL, a broken version): the merged listing is the others' (plus what of it is an
    entry), never a 500 for everyone (`'int' object is not iterable`, `unhashable type: 'list'`)."""
    from aiohttp import web

    from tests.support.threaded import ThreadedApp

    async def handler(request: web.Request) -> web.Response:
        if request.path in ("/api/tags", "/api/ps"):
            return web.json_response(odd)
        return web.json_response({"version": "0.12.0"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    good = start_emulator(tmp, name="fan-good", models="llama3.2")
    with ThreadedApp(app) as replica:
        proxy = start_proxy(tmp, [{"url": replica.url, "name": "odd"}, {"url": good.url, "name": "good"}],
                            {"chain": {"health": {"probe_interval_s": 0.3}}}, name="fan-odd")
        try:
            for path in ("/api/tags", "/api/ps"):
                answer = httpx.get(f"{proxy.url}{path}", timeout=30)
                assert answer.status_code == 200, answer.text
                assert answer.headers["X-Replica-Results"] == "odd=ok, good=ok"
            listed = [m["name"] for m in httpx.get(f"{proxy.url}/api/tags", timeout=30).json()["models"]]
            assert "llama3.2:latest" in listed
            assert "Traceback" not in proxy.log()
        finally:
            proxy.stop()
            good.stop()


def test_management_fanned_out_to_a_replica_that_never_answers_ends_at_the_deadline(tmp: Path) -> None:
    """A replica that accepts `DELETE /api/delete` (or copy, or a pull with stream false) and never
    answers: with one replica the forwarder ends the request at its deadline (504); fanned out to
    several it waited for ever (no timeout at all). Now the hung replica's result is a 504 at the
    deadline, and the others' results are reported with it."""
    a = start_emulator(tmp, name="fan-hang-a")
    b = start_emulator(tmp, name="fan-hang-b")
    proxy = start_proxy(tmp, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
                        {"admin": {"keys": [ADMIN]}, "chain": {"limits": {"deadline_s": 3}}},
                        name="fan-hang")
    try:
        httpx.post(f"{b.url}/_emulator/faults", timeout=5,
                   json={"hang_before_headers": True, "paths": ["/api/delete", "/api/copy"]})
        admin = {"Authorization": f"Bearer {ADMIN}"}
        for method, path, body in (("DELETE", "/api/delete", {"model": "qwen3"}),
                                   ("POST", "/api/copy", {"source": "llama3.2", "destination": "c"})):
            started = time.monotonic()
            answer = httpx.request(method, f"{proxy.url}{path}", json=body, headers=admin, timeout=60)
            assert time.monotonic() - started < 20
            assert answer.status_code == 504, answer.text
            results = answer.json()["replicas"]
            assert results["a"] == "success" and results["b"].startswith("504: ")
            assert "deadline" in results["b"]
    finally:
        for server in (proxy, a, b):
            server.stop()


def test_merged_listings_end_at_the_requests_deadline(tmp: Path) -> None:
    """A replica that accepts `GET /api/tags` (or `/api/ps`, `/v1/models`) and never answers: the merged
    listing is the others' when the request's deadline passes (X-Deadline-S, or the tenant's), and a
    504 when no replica answered by then, as the forwarder answers with one replica (before: the
    listing waited the fan-out's own 10 s whatever the deadline, and was a 502)."""
    a = start_emulator(tmp, name="fan-late-a")
    b = start_emulator(tmp, name="fan-late-b")
    proxy = start_proxy(tmp, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
                        {"chain": {"health": {"probe_interval_s": 60}}}, name="fan-late")
    try:
        for replica in (a, b):  # the start-up probes have read both listings: both serve
            for _ in range(100):
                if replica.stats()["requests"].get("GET /api/tags"):
                    break
                time.sleep(0.05)
        hung = ["/api/tags", "/api/ps", "/v1/models"]
        httpx.post(f"{b.url}/_emulator/faults", timeout=5,
                   json={"hang_before_headers": True, "paths": hung}).raise_for_status()
        for path in hung:
            started = time.monotonic()
            answer = httpx.get(f"{proxy.url}{path}", headers={"X-Deadline-S": "1"}, timeout=30)
            assert time.monotonic() - started < 3, path
            assert answer.status_code == 200, answer.text
            assert answer.headers["X-Replica-Results"] == "a=ok, b=failed"
        httpx.post(f"{a.url}/_emulator/faults", timeout=5,
                   json={"hang_before_headers": True, "paths": hung}).raise_for_status()
        started = time.monotonic()
        answer = httpx.get(f"{proxy.url}/api/tags", headers={"X-Deadline-S": "1"}, timeout=30)
        assert time.monotonic() - started < 3
        assert answer.status_code == 504, answer.text
        assert answer.json()["code"] == "upstream_response_timeout"
        assert answer.headers["x-should-retry"] == "false"
    finally:
        for server in (proxy, a, b):
            server.stop()


def test_streamed_management_fanned_out_to_a_replica_that_never_answers_ends_at_the_deadline(
        tmp: Path) -> None:
    """The same for a streamed pull: the replica that accepts it and never answers is reported failed
    at the request's deadline, after the others' progress; every replica silent is a 504 then (before:
    the stream waited for every replica's head, up to the 120 s idle timeout, sending nothing)."""
    a = start_emulator(tmp, name="fan-hang-stream-a")
    b = start_emulator(tmp, name="fan-hang-stream-b")
    proxy = start_proxy(tmp, [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
                        {"admin": {"keys": [ADMIN]}, "chain": {"limits": {"deadline_s": 2}}},
                        name="fan-hang-stream")
    try:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        httpx.post(f"{b.url}/_emulator/faults", timeout=5,
                   json={"hang_before_headers": True, "paths": ["/api/pull"]}).raise_for_status()
        started = time.monotonic()
        answer = httpx.post(f"{proxy.url}/api/pull", json={"model": "llama3.2"}, headers=admin,
                            timeout=60)
        assert time.monotonic() - started < 10
        assert answer.status_code == 200, answer.text
        lines = [json.loads(line) for line in answer.text.splitlines()]
        assert any(line.get("replica") == "a" and line.get("status") == "success" for line in lines)
        results = lines[-1]["replicas"]
        assert results["a"] == "success" and "deadline" in results["b"], lines[-1]
        httpx.post(f"{a.url}/_emulator/faults", timeout=5,
                   json={"hang_before_headers": True, "paths": ["/api/pull"]}).raise_for_status()
        started = time.monotonic()
        answer = httpx.post(f"{proxy.url}/api/pull", json={"model": "llama3.2"}, headers=admin,
                            timeout=60)
        assert time.monotonic() - started < 10
        assert answer.status_code == 504, answer.text
        assert all("deadline" in r for r in answer.json()["replicas"].values())
        # A replica still streaming progress at the deadline is cut there, as the forwarder cuts one.
        for replica in (a, b):
            httpx.delete(f"{replica.url}/_emulator/faults", timeout=5)
        httpx.post(f"{a.url}/_emulator/faults", timeout=5,
                   json={"slow_drip_s": 0.7, "paths": ["/api/pull"]}).raise_for_status()
        answer = httpx.post(f"{proxy.url}/api/pull", json={"model": "llama3.2"}, headers=admin,
                            timeout=60)
        results = [json.loads(line) for line in answer.text.splitlines()][-1]["replicas"]
        assert results == {"a": "the request's deadline of 2s passed", "b": "success"}, results
    finally:
        for server in (proxy, a, b):
            server.stop()


def test_management_fanned_out_to_an_unreachable_replica_is_a_502_not_a_deadline(tmp: Path) -> None:
    """A replica whose connect times out (a listening socket whose accept queue is full: the kernel
    drops the SYNs) is unreachable, a 502 like a refused connect. aiohttp's connect timeout is also a
    TimeoutError, and it was reported as the request's deadline (504) long before that deadline."""
    a = start_emulator(tmp, name="fan-unreach-a")
    stuck = socket.socket()
    stuck.bind(("127.0.0.1", 0))
    stuck.listen(0)
    filler = socket.create_connection(stuck.getsockname(), timeout=5)  # fills the accept queue
    stuck_url = f"http://127.0.0.1:{stuck.getsockname()[1]}"
    proxy = start_proxy(tmp, [{"url": a.url, "name": "a"}, {"url": stuck_url, "name": "b"}],
                        {"admin": {"keys": [ADMIN]}, "chain": {"limits": {"deadline_s": 120},
                                                               "health": {"mode": "off"}},
                         "forwarding": {"connect_timeout_s": 0.5}}, name="fan-unreach")
    try:
        answer = httpx.request("DELETE", f"{proxy.url}/api/delete", json={"model": "qwen3"},
                               headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
        results = answer.json()["replicas"]
        assert results["a"] == "success", results
        assert results["b"].startswith("502: "), results
        assert "cannot reach replica" in results["b"] and "deadline" not in results["b"]
    finally:
        proxy.stop()
        a.stop()
        filler.close()
        stuck.close()


def test_long_pulls_do_not_starve_the_listings(tmp: Path) -> None:
    """Streamed pulls hold a connection to each replica for as long as they last (minutes, for a large
    model). With management calls in the listings' bounded pool, 16 pulls on 2 replicas took all of
    it, and /api/tags waited for a connection until its own timeout: a 502 after 10 s. Management
    has a pool of its own."""
    replicas = [start_emulator(tmp, name=f"pull-hang-{i}") for i in range(2)]
    for replica in replicas:
        httpx.post(f"{replica.url}/_emulator/faults", timeout=5, json={
            "hang_before_headers": True, "paths": ["/api/pull"]}).raise_for_status()
    proxy = start_proxy(tmp, [r.url for r in replicas], name="pull-hang")
    stop = threading.Event()

    def pull() -> None:
        with contextlib.suppress(httpx.HTTPError), httpx.stream(
                "POST", f"{proxy.url}/api/pull", json={"model": "big:70b"}, timeout=60) as reply:
            for _ in reply.iter_lines():
                if stop.is_set():
                    return

    threads = [threading.Thread(target=pull, daemon=True) for _ in range(16)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(3)  # the pulls are connected and waiting (their replicas never answer)
        started = time.monotonic()
        reply = httpx.get(f"{proxy.url}/api/tags", timeout=60)
        assert reply.status_code == 200, reply.text[:200]
        assert time.monotonic() - started < 8  # 10 s and a 502 when the pulls held the pool
    finally:
        stop.set()
        proxy.stop()
        for replica in replicas:
            replica.stop()
