"""CORS on the proxy's own answers (proxy/cors.py): a page whose origin the replicas allow can read the
proxy's 429, 401 and merged /api/tags, with Retry-After and X-Service-Limits exposed; answers relayed
from a replica keep the replica's CORS headers; an origin outside `server.cors_origins` gets nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.servers import Server, start_emulator, start_proxy

KEY = "sk-cors-team"
FREE = "sk-cors-free"  # no request quota: what does not test the 429 does not spend it
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False,
        "options": {"num_predict": 2}}
ALLOWED = "http://localhost:5173"
EXPOSED = {"retry-after", "x-service-limits", "x-request-id"}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server, Server]]:
    tmp: Path = tmp_path_factory.mktemp("cors")
    emulator = start_emulator(tmp, name="cors-emu")
    tenants = {"tenants": [{"name": "team", "keys": [KEY], "requests_per_minute": 1},
                           {"name": "free", "keys": [FREE]}],
               "anonymous": {"allow": False}}
    default = start_proxy(tmp, [emulator.url], tenants, name="cors-default")
    custom = start_proxy(tmp, [emulator.url], {
        **tenants, "server": {"cors_origins": ["https://*.example.com", "http://[::1]:*", "https://app?.test"]}},
        name="cors-custom")
    yield emulator, default, custom
    for server in (default, custom, emulator):
        server.stop()


def _exposed(response: httpx.Response) -> set[str]:
    return {name.strip().lower()
            for name in response.headers.get("Access-Control-Expose-Headers", "").split(",") if name}


def test_the_proxys_own_errors_are_readable_by_an_allowed_origin(
        servers: tuple[Server, Server, Server]) -> None:
    _, proxy, _ = servers
    origin = {"Origin": ALLOWED}
    unauthorized = httpx.post(f"{proxy.url}/api/chat", headers=origin, json=CHAT, timeout=30)
    assert unauthorized.status_code == 401
    assert unauthorized.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "Origin" in unauthorized.headers.get_list("Vary")
    assert _exposed(unauthorized) == EXPOSED

    headers = {**origin, "Authorization": f"Bearer {KEY}"}
    served = httpx.post(f"{proxy.url}/api/chat", headers=headers, json=CHAT, timeout=30)
    limited = httpx.post(f"{proxy.url}/api/chat", headers=headers, json=CHAT, timeout=30)
    assert served.status_code == 200 and limited.status_code == 429, limited.text
    # Relayed: the replica's own header (it allows the origin by its defaults), with ours exposed.
    assert served.headers.get_list("Access-Control-Allow-Origin") == [ALLOWED]
    assert _exposed(served) == EXPOSED
    # The proxy's own 429: readable, with when to retry.
    assert limited.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "Retry-After" in limited.headers and _exposed(limited) == EXPOSED

    # Built by the proxy from every replica's answer: readable as Ollama's own /api/tags is.
    tags = httpx.get(f"{proxy.url}/api/tags", headers={**origin, "Authorization": f"Bearer {FREE}"},
                     timeout=30)
    assert tags.status_code == 200 and tags.headers["Access-Control-Allow-Origin"] == ALLOWED


def test_other_origins_and_requests_without_origin_get_nothing(
        servers: tuple[Server, Server, Server]) -> None:
    emulator, proxy, _ = servers
    for origin in ("https://evil.example", "http://localhost.evil.example", "null"):
        refused = httpx.post(f"{proxy.url}/api/chat", headers={"Origin": origin}, json=CHAT, timeout=30)
        assert refused.status_code == 401
        assert "Access-Control-Allow-Origin" not in refused.headers
        assert "Access-Control-Expose-Headers" not in refused.headers
        # The replica's refusal of that origin is relayed as it is (its 403, empty), nothing added.
        direct = httpx.get(f"{emulator.url}/api/version", headers={"Origin": origin}, timeout=30)
        through = httpx.get(f"{proxy.url}/api/version", timeout=30,
                            headers={"Origin": origin, "Authorization": f"Bearer {FREE}"})
        assert through.status_code == direct.status_code == 403
        assert "Access-Control-Allow-Origin" not in through.headers
    plain = httpx.post(f"{proxy.url}/api/chat", json=CHAT, timeout=30)
    assert plain.status_code == 401
    assert not any(name.lower().startswith("access-control-") for name in plain.headers)


def test_configured_patterns_replace_the_default_list(servers: tuple[Server, Server, Server]) -> None:
    _, _, proxy = servers
    good = httpx.post(f"{proxy.url}/api/chat", headers={"Origin": "https://app.example.com"}, json=CHAT,
                      timeout=30)
    assert good.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    # Ollama's patterns: `*` is any run of characters, everything else is itself (not a shell glob,
    # where `[::1]` would be a character class and `?` any character).
    for origin in ("http://[::1]:8080", "https://app?.test"):
        allowed = httpx.post(f"{proxy.url}/api/chat", headers={"Origin": origin}, json=CHAT, timeout=30)
        assert allowed.headers.get("Access-Control-Allow-Origin") == origin
    for origin in (ALLOWED, "https://example.com.evil.net", "http://app.example.com", "http://::1:8080",
                   "https://app1.test"):
        refused = httpx.post(f"{proxy.url}/api/chat", headers={"Origin": origin}, json=CHAT, timeout=30)
        assert "Access-Control-Allow-Origin" not in refused.headers, origin


def test_any_origin_is_answered_with_a_star(tmp_path: Path) -> None:
    emulator = start_emulator(tmp_path, name="cors-star-emu")
    proxy = start_proxy(tmp_path, [emulator.url], {
        "tenants": [{"name": "team", "keys": [KEY]}], "anonymous": {"allow": False},
        "server": {"cors_origins": ["*"]}},
        name="cors-star")
    try:
        refused = httpx.post(f"{proxy.url}/api/chat", headers={"Origin": "https://anything.test"},
                             json=CHAT, timeout=30)
        assert refused.status_code == 401
        assert refused.headers["Access-Control-Allow-Origin"] == "*"
        assert _exposed(refused) == EXPOSED
    finally:
        proxy.stop()
        emulator.stop()
