"""Authentication and the route policy: tenants by API key, admin-only /system, management routes refused
to tenants unless allowed, keys never forwarded upstream nor logged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest

from tests.support.servers import Server, start_emulator, start_proxy

ADMIN, TEAM, OPS = "sk-admin-secret-1", "sk-team-secret-2", "sk-ops-secret-3"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    tmp: Path = tmp_path_factory.mktemp("access")
    emulator = start_emulator(tmp, name="access-emu")
    proxy = start_proxy(tmp, [emulator.url], {
        "admin": {"keys": [ADMIN]},
        "tenants": [{"name": "team", "keys": [TEAM]},
                    {"name": "ops", "keys": [OPS], "allow_management": True}],
        "anonymous": {"allow": False}}, name="access-proxy")
    yield emulator, proxy
    proxy.stop()
    emulator.stop()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_tenant_key_is_accepted_by_the_official_client(guarded: tuple[Server, Server],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _, proxy = guarded
    monkeypatch.setenv("OLLAMA_API_KEY", TEAM)  # the Ollama client sends it as a Bearer token
    client = ollama.Client(host=proxy.url)
    assert client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}]).done


def test_missing_and_unknown_keys_are_401(guarded: tuple[Server, Server]) -> None:
    _, proxy = guarded
    missing = httpx.post(f"{proxy.url}/api/chat", json={"model": "llama3.2", "messages": []})
    assert missing.status_code == 401 and missing.json()["code"] == "unauthorized"
    wrong = httpx.post(f"{proxy.url}/api/chat", headers=_auth("sk-nope"),
                       json={"model": "llama3.2", "messages": []})
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid API key"
    via_header = httpx.post(f"{proxy.url}/api/chat", headers={"X-API-Key": TEAM},
                            json={"model": "llama3.2", "messages": []})
    assert via_header.status_code == 200


def test_management_needs_permission(guarded: tuple[Server, Server]) -> None:
    _, proxy = guarded
    refused = httpx.post(f"{proxy.url}/api/pull", headers=_auth(TEAM), json={"model": "llama3.1"})
    assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
    assert refused.headers["content-type"] == "application/json; charset=utf-8"
    for method, path in (("DELETE", "/api/delete"), ("POST", "/api/copy"), ("POST", "/api/create"),
                         ("POST", "/api/push"), ("POST", "/api/blobs/sha256:" + "0" * 64)):
        assert httpx.request(method, proxy.url + path, headers=_auth(TEAM),
                             content=b"{}").status_code == 403, path
    allowed = httpx.post(f"{proxy.url}/api/pull", headers=_auth(OPS),
                         json={"model": "llama3.1", "stream": False})
    assert allowed.status_code == 200 and allowed.json() == {"status": "success"}
    admin = httpx.post(f"{proxy.url}/api/copy", headers=_auth(ADMIN),
                       json={"source": "llama3.1", "destination": "copied"})
    assert admin.status_code == 200


def test_system_routes_need_the_admin_key(guarded: tuple[Server, Server]) -> None:
    _, proxy = guarded
    assert httpx.get(f"{proxy.url}/system/quotas").status_code == 401
    assert httpx.get(f"{proxy.url}/system/quotas", headers=_auth(TEAM)).status_code == 403
    snapshot = httpx.get(f"{proxy.url}/system/quotas", headers=_auth(ADMIN))
    assert snapshot.status_code == 200 and {"team", "ops"} <= set(snapshot.json()["tenants"])


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


def test_metrics_behind_the_admin_key(tmp_path: Path) -> None:
    emulator = start_emulator(tmp_path, name="metrics-emu")
    proxy = start_proxy(tmp_path, [emulator.url], {
        "admin": {"keys": [ADMIN]}, "tenants": [{"name": "team", "keys": [TEAM]}],
        "telemetry": {"metrics_auth": "admin"}}, name="metrics-proxy")
    try:
        assert httpx.get(f"{proxy.url}/metrics").status_code == 401
        assert httpx.get(f"{proxy.url}/metrics", headers=_auth(TEAM)).status_code == 403
        assert httpx.get(f"{proxy.url}/metrics", headers=_auth("sk-nope")).status_code == 401
        scraped = httpx.get(f"{proxy.url}/metrics", headers=_auth(ADMIN))
        assert scraped.status_code == 200 and b"# TYPE" in scraped.content
        assert httpx.get(f"{proxy.url}/healthz").status_code == 200
    finally:
        proxy.stop()
        emulator.stop()


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
        assert "tenant=anonymous" in open_proxy.log()
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
    lines = [line for line in proxy.log().splitlines() if '"POST /api/pull" 403' in line]
    assert lines and "tenant=team" in lines[-1]
