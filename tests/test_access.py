"""Authentication and the route policy: tenants by API key, admin-only /system, management routes refused
to tenants unless allowed, keys never forwarded upstream nor logged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest
from aiohttp.test_utils import TestClient

from tests.support.inprocess import in_process_proxy
from tests.support.polling import wait_for
from tests.support.servers import Server, start_emulator, start_proxy

ADMIN, TEAM, OPS = "sk-admin-secret-1", "sk-team-secret-2", "sk-ops-secret-3"
GUARDED = {
    "admin": {"keys": [ADMIN]},
    "tenants": [{"name": "team", "keys": [TEAM]},
                {"name": "ops", "keys": [OPS], "allow_management": True}],
    "anonymous": {"allow": False}}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    """The guarded proxy as a process: for what needs one (its log, the official clients)."""
    tmp: Path = tmp_path_factory.mktemp("access")
    emulator = start_emulator(tmp, name="access-emu")
    proxy = start_proxy(tmp, [emulator.url], GUARDED, name="access-proxy")
    yield emulator, proxy
    proxy.stop()
    emulator.stop()


@pytest.fixture
async def guarded_app(aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path) -> TestClient[Any, Any]:
    """The same configuration in-process: access decisions need no subprocess."""
    client, _ = await in_process_proxy(aiohttp_client, aiohttp_server, tmp_path, GUARDED)
    return client


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_tenant_key_is_accepted_by_the_official_client(guarded: tuple[Server, Server],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _, proxy = guarded
    monkeypatch.setenv("OLLAMA_API_KEY", TEAM)  # the Ollama client sends it as a Bearer token
    client = ollama.Client(host=proxy.url)
    assert client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}]).done


async def test_missing_and_unknown_keys_are_401(guarded_app: TestClient[Any, Any]) -> None:
    proxy = guarded_app
    missing = await proxy.post("/api/chat", json={"model": "llama3.2", "messages": []})
    assert missing.status == 401 and (await missing.json())["code"] == "unauthorized"
    wrong = await proxy.post("/api/chat", headers=_auth("sk-nope"),
                             json={"model": "llama3.2", "messages": []})
    assert wrong.status == 401 and (await wrong.json())["error"] == "invalid API key"
    via_header = await proxy.post("/api/chat", headers={"X-API-Key": TEAM},
                                  json={"model": "llama3.2", "messages": []})
    assert via_header.status == 200


async def test_management_needs_permission(guarded_app: TestClient[Any, Any]) -> None:
    proxy = guarded_app
    refused = await proxy.post("/api/pull", headers=_auth(TEAM), json={"model": "llama3.1"})
    assert refused.status == 403 and (await refused.json())["code"] == "forbidden"
    assert refused.headers["content-type"] == "application/json; charset=utf-8"
    for method, path in (("DELETE", "/api/delete"), ("POST", "/api/copy"), ("POST", "/api/create"),
                         ("POST", "/api/push"), ("POST", "/api/blobs/sha256:" + "0" * 64)):
        response = await proxy.request(method, path, headers=_auth(TEAM), data=b"{}")
        assert response.status == 403, path
    allowed = await proxy.post("/api/pull", headers=_auth(OPS),
                               json={"model": "llama3.1", "stream": False})
    assert allowed.status == 200 and await allowed.json() == {"status": "success"}
    admin = await proxy.post("/api/copy", headers=_auth(ADMIN),
                             json={"source": "llama3.1", "destination": "copied"})
    assert admin.status == 200


async def test_system_routes_need_the_admin_key(guarded_app: TestClient[Any, Any]) -> None:
    proxy = guarded_app
    assert (await proxy.get("/system/quotas")).status == 401
    assert (await proxy.get("/system/quotas", headers=_auth(TEAM))).status == 403
    snapshot = await proxy.get("/system/quotas", headers=_auth(ADMIN))
    assert snapshot.status == 200 and {"team", "ops"} <= set((await snapshot.json())["tenants"])


def test_keys_are_neither_forwarded_nor_logged(tmp_path: Path) -> None:
    from aiohttp import web

    from tests.support.threaded import ThreadedApp

    seen: list[dict[str, str]] = []

    async def echo(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"models": []})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    with ThreadedApp(app) as upstream:
        proxy = start_proxy(tmp_path, [upstream.url], {"tenants": [{"name": "t", "keys": [TEAM]}]})
        try:
            assert httpx.get(f"{proxy.url}/api/tags", headers=_auth(TEAM)).status_code == 200
            assert httpx.get(f"{proxy.url}/api/tags", headers={"X-API-Key": TEAM}).status_code == 200
        finally:
            proxy.stop()
    assert seen and all("Authorization" not in h and "X-Api-Key" not in h for h in seen)
    assert TEAM not in proxy.log() and "tenant=t" in proxy.log()


def test_open_mode_is_a_plain_pass_through(proxy: Server) -> None:
    """No tenants, no admin keys: management and /system stay open, as Ollama itself is."""
    assert httpx.post(f"{proxy.url}/api/pull", json={"model": "llama3.1", "stream": False}
                      ).status_code == 200
    assert httpx.get(f"{proxy.url}/system/quotas").status_code == 200


def test_probes_never_need_a_key_and_metrics_are_open_by_default(
        guarded: tuple[Server, Server]) -> None:
    _, proxy = guarded
    for path in ("/healthz", "/readyz"):
        for headers in ({}, _auth("sk-not-a-key"), _auth(TEAM)):
            reply = httpx.get(f"{proxy.url}{path}", headers=headers)
            assert reply.status_code in (200, 503), (path, reply.status_code)  # 503: not ready, not 401
            assert reply.json()["status"] in ("ok", "ready", "no healthy upstream")
    assert httpx.get(f"{proxy.url}/metrics").status_code == 200
    assert httpx.get(f"{proxy.url}/system/queue").status_code == 401  # the admin routes still need one
    keyless = httpx.get(f"{proxy.url}/system/config")
    assert keyless.status_code == 401 and "admin API key" in keyless.json()["error"]
    # A tenant's key opens /system/queue (its own requests): the refusal says so, not "admin only".
    queue = httpx.get(f"{proxy.url}/system/queue")
    assert "tenant's key" in queue.json()["error"], queue.text
    assert httpx.get(f"{proxy.url}/system/queue", headers=_auth(TEAM)).status_code == 200


async def test_metrics_behind_the_admin_key(aiohttp_client: Any, aiohttp_server: Any,
                                            tmp_path: Path) -> None:
    proxy, _ = await in_process_proxy(aiohttp_client, aiohttp_server, tmp_path, {
        "admin": {"keys": [ADMIN]}, "tenants": [{"name": "team", "keys": [TEAM]}],
        "telemetry": {"metrics_auth": "admin"}})
    assert (await proxy.get("/metrics")).status == 401
    assert (await proxy.get("/metrics", headers=_auth(TEAM))).status == 403
    assert (await proxy.get("/metrics", headers=_auth("sk-nope"))).status == 401
    scraped = await proxy.get("/metrics", headers=_auth(ADMIN))
    assert scraped.status == 200 and b"# TYPE" in await scraped.read()
    assert (await proxy.get("/healthz")).status == 200


def test_a_key_in_either_header_identifies_and_neither_reaches_the_replica(tmp_path: Path) -> None:
    """Clients may send both headers: the OpenAI SDK's placeholder in Authorization and the tenant's
    key in X-API-Key, or a tenant's key beside an admin's. The real key identifies the caller, whichever
    header holds it, and every key the proxy knows stays with the proxy (a replica, or ollama.com
    behind it for a cloud model, never sees one). An unknown key is refused, not read as anonymous."""
    from aiohttp import web

    from tests.support.threaded import ThreadedApp

    seen: list[list[tuple[str, str]]] = []

    async def echo(request: web.Request) -> web.Response:
        if request.path == "/api/generate":  # not the health probes
            seen.append(list(request.headers.items()))
        return web.json_response({"model": "llama3.2", "response": "ok", "done": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    admin = "sk-admin-both"
    with ThreadedApp(app) as upstream:
        proxy = start_proxy(tmp_path, [upstream.url], {
            "tenants": [{"name": "t", "keys": [TEAM]}], "admin": {"keys": [admin]},
            "anonymous": {"allow": True, "keys": ["ollama"]}}, name="both")
        body = {"model": "llama3.2", "prompt": "x", "stream": False}
        cases: list[tuple[list[tuple[str, str]], str]] = [
            ([("Authorization", "Bearer ollama"), ("X-API-Key", TEAM)], "t"),
            ([("Authorization", f"Bearer {TEAM}"), ("X-API-Key", admin)], "t"),
            # A key on a second line is a key too; an empty X-API-Key is none.
            ([("Authorization", "Bearer not-ours"), ("Authorization", f"Bearer {TEAM}"),
              ("X-API-Key", ""), ("X-API-Key", admin)], "t"),
            ([("Authorization", "Bearer ollama"), ("X-API-Key", "")], "anonymous"),
            # Whitespace after the scheme may be a tab or several (before: a tab made the tenant's key
            # no key, and with anonymous allowed the request ran anonymous with the key relayed).
            ([("Authorization", f"Bearer\t{TEAM}")], "t"),
            ([("Authorization", f"bearer  {TEAM}")], "t"),
        ]
        try:
            for headers, _ in cases:
                answer = httpx.post(f"{proxy.url}/api/generate", headers=headers, json=body)
                assert answer.status_code == 200, answer.text
            unknown = httpx.post(f"{proxy.url}/api/generate", json=body,
                                 headers={"X-API-Key": "sk-typo"})
            assert unknown.status_code == 401
        finally:
            proxy.stop()
    assert len(seen) == len(cases)
    # No key the proxy knows (placeholder included) reaches the replica, on any line.
    assert not any(value.endswith((TEAM, admin, " ollama")) for h in seen for _, value in h)
    lines = [line for line in proxy.log().splitlines() if '"POST /api/generate" 200' in line]
    assert [line.split("tenant=")[1].split()[0] for line in lines] == [t for _, t in cases]
    assert TEAM not in proxy.log() and admin not in proxy.log()


def test_placeholder_keys_count_as_anonymous_when_allowed(tmp_path: Path) -> None:
    """The OpenAI SDK needs some api_key; `ollama` is what every Ollama guide tells people to pass."""
    import openai

    emulator = start_emulator(tmp_path, name="placeholder-emu")
    open_proxy = start_proxy(tmp_path, [emulator.url], {
        "tenants": [{"name": "team", "keys": [TEAM]}],
        "anonymous": {"allow": True, "keys": ["ollama", "sk-no-key-required"]}}, name="open-anon")
    closed_proxy = start_proxy(tmp_path, [emulator.url], {
        "tenants": [{"name": "team", "keys": [TEAM]}], "anonymous": {"allow": False}},
        name="closed-anon")
    try:
        for key in ("ollama", "sk-no-key-required"):
            client = openai.OpenAI(base_url=f"{open_proxy.url}/v1", api_key=key, max_retries=0)
            answer = client.chat.completions.create(
                model="llama3.2", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
            assert answer.choices[0].message.content
        wait_for(lambda: "tenant=anonymous" in open_proxy.log(), 10, "the access line")
        assert httpx.post(f"{open_proxy.url}/api/generate", headers=_auth("ollama-not"),
                          json={"model": "llama3.2", "prompt": "x"}).status_code == 401
        refused = openai.OpenAI(base_url=f"{closed_proxy.url}/v1", api_key="ollama", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            refused.chat.completions.create(model="llama3.2",
                                            messages=[{"role": "user", "content": "hi"}])
    finally:
        for server in (open_proxy, closed_proxy, emulator):
            server.stop()


def test_a_refused_request_is_logged_under_its_tenant(guarded: tuple[Server, Server]) -> None:
    _, proxy = guarded
    refused = httpx.post(f"{proxy.url}/api/pull", headers=_auth(TEAM), json={"model": "x"})
    assert refused.status_code == 403
    lines = wait_for(lambda: [line for line in proxy.log().splitlines()
                              if '"POST /api/pull" 403' in line], 10, "the access line")
    assert "tenant=team" in lines[-1]


def test_a_browser_preflight_needs_no_key(guarded: tuple[Server, Server]) -> None:
    # A CORS preflight never carries credentials (Fetch standard): refused with 401, no browser client
    # (a web app on the OpenAI SDK, an extension, an Obsidian plugin) could reach the proxy at all. It
    # is relayed, so the replica's OLLAMA_ORIGINS decides, exactly as without the proxy; the request
    # that follows still needs its key.
    emulator, proxy = guarded
    for origin in ("http://localhost:3000", "app://obsidian.md", "https://elsewhere.example"):
        preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization,content-type"}
        for path in ("/v1/chat/completions", "/api/chat"):
            through = httpx.options(f"{proxy.url}{path}", headers=preflight)
            direct = httpx.options(f"{emulator.url}{path}", headers=preflight)
            assert through.status_code == direct.status_code, (origin, path, through.text)
            assert through.headers.get("Access-Control-Allow-Origin") == \
                direct.headers.get("Access-Control-Allow-Origin")
    allowed = httpx.options(f"{proxy.url}/v1/chat/completions", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"})
    assert allowed.status_code == 204
    assert allowed.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    # Only a preflight: a bare OPTIONS, the request itself and the admin routes still need keys.
    assert httpx.options(f"{proxy.url}/v1/chat/completions").status_code == 401
    assert httpx.post(f"{proxy.url}/v1/chat/completions", headers={"Origin": "http://localhost:3000"},
                      json={"model": "llama3.2", "messages": []}).status_code == 401
    assert httpx.options(f"{proxy.url}/system/queue", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "GET"}).status_code == 401


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/healthz"), ("PUT", "/readyz"), ("DELETE", "/healthz"), ("POST", "/metrics"),
    ("PATCH", "/readyz")])
def test_a_probe_path_is_open_only_to_the_methods_the_proxy_answers(guarded: tuple[Server, Server],
                                                                     method: str, path: str) -> None:
    """The probes answer GET and HEAD; any other method on their paths needs a key like any route, so
    without one (anonymous access refused) it is a 401 and never reaches the replica (which answered
    its own 404: a keyless request had reached it). With a key it is the proxy's 405, never forwarded."""
    _, proxy = guarded
    reply = httpx.request(method, f"{proxy.url}{path}", content=b'{"model":"llama3.2"}')
    assert reply.status_code == 401, (reply.status_code, reply.text)
    assert reply.json()["code"] == "unauthorized"
    # The probes themselves stay open; with a key, the proxy's 405 (for /metrics, the admin's 403 first).
    assert httpx.head(f"{proxy.url}{path}").status_code in (200, 503)
    keyed = httpx.request(method, f"{proxy.url}{path}", headers=_auth(TEAM))
    if path == "/metrics":
        assert keyed.status_code == 403
        keyed = httpx.request(method, f"{proxy.url}{path}", headers=_auth(ADMIN))
    assert keyed.status_code == 405, (keyed.status_code, keyed.text)
    assert keyed.headers["Allow"] == "GET, HEAD"
    assert keyed.json()["code"] == "method_not_allowed"


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("POST", "/system/queue", "GET, HEAD"), ("DELETE", "/system/config", "GET, HEAD"),
    ("PUT", "/system/events", "GET"), ("OPTIONS", "/system/quotas", "GET, HEAD")])
def test_the_admin_routes_answer_405_to_other_methods(guarded: tuple[Server, Server], method: str,
                                                      path: str, allow: str) -> None:
    """No replica knows the proxy's own routes: another method there is the proxy's 405 with Allow (it
    was forwarded, and the replica answered its 404), and only after the key is checked."""
    _, proxy = guarded
    assert httpx.request(method, f"{proxy.url}{path}").status_code == 401
    reply = httpx.request(method, f"{proxy.url}{path}", headers=_auth(ADMIN))
    assert reply.status_code == 405, (reply.status_code, reply.text)
    assert reply.headers["Allow"] == allow
    assert reply.json() == {"error": f"{path} answers only {allow}", "code": "method_not_allowed"}
    assert reply.headers["x-should-retry"] == "false"
    with httpx.stream("GET", f"{proxy.url}{path}", headers=_auth(ADMIN)) as served:  # events: a stream
        assert served.status_code == 200
