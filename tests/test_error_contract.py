"""The server side of the client contract: every error code is in the README's table with its status,
`Retry-After` never asks for more than 60 s (a longer wait says `x-should-retry: false`), `retry-after-ms`
rides beside it, and `x-should-retry: false` is on every answer that retrying cannot change. Checked
against a real proxy and emulator, and with the official OpenAI SDK counting what it sends."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from proxy.errors import MAX_RETRY_AFTER_S, ProxyError
from tests.support.polling import wait_for
from tests.support.servers import Server, free_port, start_emulator, start_proxy

README = Path(__file__).resolve().parent.parent / "README.md"
ADMIN, FREE, TEAM = "sk-contract-admin", "sk-contract-free", "sk-contract-team"
EXTRA_CODES = {"too_many_connections": "503", "upstream_reset_after_response_started": "(stream)",
               "bad_request": "400"}
"""Codes written outside the ProxyError tree: the edge's raw refusals (a connection past the cap, a
head aiohttp cannot parse) and the mid-stream record."""


def _all_errors() -> dict[str, int]:
    found: dict[str, int] = {}
    pending: list[type[ProxyError]] = [ProxyError]
    while pending:
        cls = pending.pop()
        found.setdefault(cls.code, cls.status)
        pending.extend(cls.__subclasses__())
    return found


def _readme_table() -> dict[str, str]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Client Usage Guidelines"):]
    return {code: status for code, status in
            re.findall(r"^\| `([a-z_]+)` \| ([^|]+?) \|", section, flags=re.M)}


def test_every_error_code_is_documented_with_its_status() -> None:
    table = _readme_table()
    for code, status in _all_errors().items():
        assert table.get(code) == str(status), (code, status, table.get(code))
    for code, status in EXTRA_CODES.items():
        assert table.get(code) == status, code
    assert set(table) == set(_all_errors()) | set(EXTRA_CODES), set(table) ^ (
        set(_all_errors()) | set(EXTRA_CODES))


def test_every_service_limits_key_is_documented() -> None:
    """Each key the proxy may put in X-Service-Limits is in docs/CLIENTS.md's list of v=1 keys: clients
    are told to ignore unknown keys, so an undocumented one is a limit nobody can rely on."""
    root = README.parent
    sources = [*root.glob("proxy/**/*.py"), *root.glob("middlewares/*.py"), *root.glob("plugins/*.py")]
    keys = {key for path in sources
            for key in re.findall(r'service_limits\["([a-z_]+)"\]', path.read_text(encoding="utf-8"))}
    assert {"max_body_bytes", "max_prompt_tokens", "deadline_s", "requests_per_minute"} <= keys, keys
    clients = (root / "docs" / "CLIENTS.md").read_text(encoding="utf-8")
    listed = clients[clients.index("- Keys in v=1 today:"):]
    listed = listed[:listed.index("\n\n")]
    assert sorted(k for k in keys if f"`{k}`" not in listed) == []


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    tmp = tmp_path_factory.mktemp("contract")
    emulator = start_emulator(tmp, name="contract-emu")
    proxy = start_proxy(tmp, [emulator.url], {
        "admin": {"keys": [ADMIN]},
        "tenants": [{"name": "free", "keys": [FREE]},
                    {"name": "team", "keys": [TEAM], "requests_per_minute": 30}],
        "server": {"max_body_bytes": 4096},
        "chain": {"limits": {"max_prompt_tokens": 64}}}, name="contract-proxy")
    yield emulator, proxy
    proxy.stop()
    emulator.stop()


def _generate(proxy: Server, key: str | None, **body: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{proxy.url}/api/generate", headers=headers, timeout=30,
                      json={"model": "llama3.2", "prompt": "hi", "stream": False, **body})


def test_a_wait_longer_than_60_s_is_capped_and_final(tmp_path: Path) -> None:
    """A replica ejected for 120 s: the 503's honest wait is two minutes. The header asks for 60 at
    most and says not to retry automatically; the body keeps the estimate for a human to read."""
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = start_proxy(tmp_path, [dead], {"chain": {"health": {
        "base_ejection_s": 120, "probe_interval_s": 0.3, "probe_timeout_s": 0.5}}}, name="capped")
    try:
        wait_for(lambda: httpx.get(f"{proxy.url}/readyz").status_code == 503, 30, "the replica ejected")
        refused = _generate(proxy, None)
        assert refused.status_code == 503 and refused.json()["code"] == "no_healthy_upstream"
        assert refused.headers["retry-after"] == str(int(MAX_RETRY_AFTER_S))
        assert refused.headers["retry-after-ms"] == str(int(MAX_RETRY_AFTER_S * 1000))
        assert refused.headers["x-should-retry"] == "false"
        assert refused.json()["retry_after_s"] > MAX_RETRY_AFTER_S  # the real estimate
        # The OpenAI SDK obeys it: one request, no retries, a readable error.
        client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="ollama", max_retries=2)
        before = proxy.log().count('"POST /v1/chat/completions"')
        with pytest.raises(openai.APIStatusError) as error:
            client.chat.completions.create(model="llama3.2",
                                           messages=[{"role": "user", "content": "x"}])
        assert error.value.status_code == 503 and "no healthy replica" in str(error.value)
        # The access line follows the response: polled, then counted (the SDK's retries, had it
        # made any, all happened before it raised).
        wait_for(lambda: proxy.log().count('"POST /v1/chat/completions"') > before, 10, "its line")
        assert proxy.log().count('"POST /v1/chat/completions"') == before + 1
    finally:
        proxy.stop()


def test_a_short_wait_gives_both_retry_headers(servers: tuple[Server, Server]) -> None:
    _, proxy = servers
    answers = [_generate(proxy, TEAM) for _ in range(40)]  # 30 per minute: some are refused
    refused = [a for a in answers if a.status_code == 429]
    assert refused, [a.status_code for a in answers]
    for answer in refused:
        seconds = int(answer.headers["retry-after"])
        millis = int(answer.headers["retry-after-ms"])
        assert 1 <= seconds <= 2 and (seconds - 1) * 1000 < millis <= seconds * 1000
        assert "x-should-retry" not in answer.headers


@pytest.mark.parametrize("case", ["prompt_too_long", "unauthorized", "forbidden",
                                  "request_payload_too_large", "invalid_request", "model_not_found"])
def test_answers_retrying_cannot_change_say_so(servers: tuple[Server, Server], case: str) -> None:
    _, proxy = servers
    if case == "prompt_too_long":
        answer = _generate(proxy, FREE, prompt="word " * 400)
    elif case == "unauthorized":
        answer = _generate(proxy, "sk-nobody")
    elif case == "forbidden":
        answer = httpx.post(f"{proxy.url}/api/pull", json={"model": "x"},
                            headers={"Authorization": f"Bearer {FREE}"})
    elif case == "request_payload_too_large":
        answer = _generate(proxy, FREE, prompt="x" * 8000)
    elif case == "invalid_request":
        answer = httpx.post(f"{proxy.url}/api/chat", json={"messages": []},
                            headers={"Authorization": f"Bearer {FREE}"})
    else:
        answer = httpx.post(f"{proxy.url}/api/generate", json={"prompt": "no model"},
                            headers={"Authorization": f"Bearer {FREE}"})
    assert answer.json()["code"] == case, answer.text
    assert answer.headers["x-should-retry"] == "false"
    assert "retry-after" not in answer.headers and "retry_after_s" not in answer.json()
