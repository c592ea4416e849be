"""Hot reload (issue 14): a changed file or SIGHUP applies keys, tenants, limits, models, step modes,
plugins and replicas without a restart and without failing a request in flight; a bad file changes
nothing and says why (log line, metric, `/system/config`); restart-only settings say so; secrets never
show. Real proxy processes in front of real emulators, driven by aiohttp clients under load."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import yaml

from tests.support.polling import until, wait_for
from tests.support.servers import Server, start_emulator, start_proxy

KEY_A = "sk-reload-team-a-0001"
KEY_B = "sk-reload-team-a-0002"
ADMIN = "sk-reload-admin-0001"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def emulators(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    """Two replicas; 50 tokens/s and 40-80 token answers: a stream lasts about a second."""
    tmp = tmp_path_factory.mktemp("reload-emu")
    one = start_emulator(tmp, name="reload-emu1", decode_tokens_per_s=50, output_tokens="40,80",
                         extra=["--num-parallel", "4"])
    two = start_emulator(tmp, name="reload-emu2", decode_tokens_per_s=50, output_tokens="40,80",
                         extra=["--num-parallel", "4"])
    yield one, two
    one.stop()
    two.stop()


def _config(upstreams: list[Server], *, keys: list[str], max_prompt_tokens: int = 4096,
            watch_s: float = 0.2, limits: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"server": {"listen": "127.0.0.1:0", "config_watch_s": watch_s, **extra.pop("server", {})},
            "admin": {"keys": [ADMIN]},
            "tenants": extra.pop("tenants", [{"name": "team-a", "keys": keys}]),
            "upstreams": [{"url": u.url, "num_parallel": 4} for u in upstreams],
            "chain": {"limits": {"max_prompt_tokens": max_prompt_tokens, **(limits or {})},
                      **extra.pop("chain", {})}, **extra}


def _upstreams(*servers: Server) -> list[dict[str, Any]]:
    return [{"url": u.url, "num_parallel": 4} for u in servers]


def _write(path: Path, data: dict[str, Any] | str) -> None:
    """Replace the file by a rename, as editors and Kubernetes do (the watch must see a new inode)."""
    text = data if isinstance(data, str) else yaml.safe_dump(data)
    fresh = path.with_suffix(".new")
    fresh.write_text(text)
    os.replace(fresh, path)


def _system_config(proxy: Server) -> dict[str, Any]:
    response = httpx.get(f"{proxy.url}/system/config", headers=ADMIN_HEADERS, timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _metric(proxy: Server, name: str, **labels: str) -> float:
    """The value of the sample `name` whose labels include `labels` (0 when there is none)."""
    text = httpx.get(f"{proxy.url}/metrics", headers=ADMIN_HEADERS, timeout=10).text
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(w in line for w in wanted):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _generate(proxy: Server, key: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(f"{proxy.url}/api/generate", headers={"Authorization": f"Bearer {key}"},
                                 json={"model": "llama3.2", "prompt": "hi", "stream": False})


class Load:
    """Streams and unary requests with KEY_A, back to back, until stopped; every outcome recorded."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.results: list[tuple[str, float, float, str]] = []
        """(kind, started, ended, outcome): outcome is "ok" or what went wrong."""
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _stream(self, session: aiohttp.ClientSession) -> str:
        body = {"model": "llama3.2", "messages": [{"role": "user", "content": "tell me more"}]}
        async with session.post(f"{self.url}/api/chat", json=body) as response:
            if response.status != 200:
                return f"HTTP {response.status}: {(await response.text())[:200]}"
            last = b""
            async for line in response.content:
                if line.strip():
                    last = line
            record = yaml.safe_load(last) if last else {}
            if not record.get("done") or "error" in record:
                return f"stream ended without done: {last[:200]!r}"
            return "ok"

    async def _unary(self, session: aiohttp.ClientSession) -> str:
        body = {"model": "llama3.2", "prompt": "why is the sky blue", "stream": False}
        async with session.post(f"{self.url}/api/generate", json=body) as response:
            if response.status != 200:
                return f"HTTP {response.status}: {(await response.text())[:200]}"
            data = await response.json()
            return "ok" if data.get("done") else f"not done: {str(data)[:200]}"

    async def _worker(self, kind: str) -> None:
        headers = {"Authorization": f"Bearer {KEY_A}"}
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    outcome = await (self._stream(session) if kind == "stream" else self._unary(session))
                except (aiohttp.ClientError, TimeoutError) as exc:
                    outcome = f"{type(exc).__name__}: {exc}"
                self.results.append((kind, started, time.monotonic(), outcome))

    def start(self, streams: int = 4, unary: int = 4) -> None:
        self._tasks = [asyncio.create_task(self._worker(kind))
                       for kind in ["stream"] * streams + ["unary"] * unary]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def failures(self) -> list[tuple[str, float, float, str]]:
        return [r for r in self.results if r[3] != "ok"]

    def spanning(self, moment: float) -> int:
        """Requests that were in flight at `moment` and completed."""
        return sum(1 for _, started, ended, outcome in self.results
                   if started < moment < ended and outcome == "ok")


async def test_reload_under_load_drops_nothing_and_a_bad_file_changes_nothing(
        emulators: tuple[Server, Server], tmp_path: Path) -> None:
    one, two = emulators
    proxy = start_proxy(tmp_path, _upstreams(one, two), _config([one, two], keys=[KEY_A]), name="reload")
    assert proxy.config_path is not None
    load = Load(proxy.url)
    try:
        load.start()
        await until(lambda: sum(1 for r in load.results if r[3] == "ok") >= 8, timeout_s=60,
                    what="load running on both replicas")
        start_version = _system_config(proxy)["version"]

        # 1. Keys, limits and a replica change while streams and unary requests are in flight.
        _write(proxy.config_path, _config([one], keys=[KEY_A, KEY_B], max_prompt_tokens=2048))
        applied = await until(lambda: (c := _system_config(proxy))["version"] > start_version and c,
                              timeout_s=30, what="the reload to be applied")
        reloaded_at = time.monotonic()
        last = applied["last_reload"]
        assert last["outcome"] == "applied" and last["trigger"] == "file", last
        assert {"tenants", "upstreams", "chain.limits.max_prompt_tokens"} <= set(last["changed"])
        assert applied["config"]["chain"]["limits"]["max_prompt_tokens"] == 2048
        assert [u["url"] for u in applied["config"]["upstreams"]] == [one.url]
        # Secrets never show: the keys are redacted, their count is kept.
        text = str(applied)
        assert KEY_A not in text and KEY_B not in text and ADMIN not in text
        assert applied["config"]["tenants"][0]["keys"] == ["<redacted>", "<redacted>"]

        response = await _generate(proxy, KEY_B)
        assert response.status_code == 200, response.text
        assert "max_prompt_tokens=2048" in response.headers["X-Service-Limits"]

        # The removed replica finishes what it serves, then gets nothing more.
        await until(lambda: not _system_config(proxy)["draining_upstreams"], timeout_s=60,
                    what="the removed replica to drain")
        # Drained, it leaves the books: /system/queue and the in-flight gauge name only replica one.
        kept = {f"127.0.0.1:{one.port}"}  # a replica's name by default: its host and port
        async with httpx.AsyncClient(headers=ADMIN_HEADERS, timeout=10) as admin:
            queue = (await admin.get(f"{proxy.url}/system/queue")).json()
            metrics = (await admin.get(f"{proxy.url}/metrics")).text
        assert {name for model in queue["models"].values() for name in model["in_flight"]} <= kept
        gauge = [line for line in metrics.splitlines() if line.startswith("sop_upstream_in_flight{")]
        assert gauge and all(any(f'"{name}"' in line for name in kept) for line in gauge), gauge
        served_two = two.stats()
        served_one = one.stats()

        def total(stats: dict[str, Any]) -> int:
            return int(stats["completed"] + stats["cancelled"])

        await until(lambda: total(one.stats()) >= total(served_one) + 10, timeout_s=60,
                    what="more requests served after the drain")
        assert total(two.stats()) == total(served_two), "the removed replica still got requests"

        # 2. A bad file: refused, logged, counted, shown; the previous configuration keeps serving.
        refused_before = _metric(proxy, "sop_config_reloads_total", outcome="refused")
        _write(proxy.config_path, "tenants: [ {name: team-a, keys: [" + KEY_A + "\n")
        refused = await until(lambda: (c := _system_config(proxy))["refused"] and c, timeout_s=30,
                              what="the bad file to be refused")
        assert refused["version"] == applied["version"]
        assert refused["last_reload"]["outcome"] == "refused"
        assert "invalid YAML" in refused["last_reload"]["error"]
        assert KEY_A not in refused["last_reload"]["error"], "the error quoted the file"
        assert _metric(proxy, "sop_config_reloads_total", outcome="refused") == refused_before + 1
        assert _metric(proxy, "sop_config_refused") == 1
        assert _metric(proxy, "sop_config_version") == applied["version"]
        # A file that parses but breaks a rule: refused with the key path.
        _write(proxy.config_path, _config([one], keys=[KEY_A, KEY_B],
                                          chain={"backpressure": {"max_queue_size": -1}}))
        await until(lambda: "max_queue_size" in (_system_config(proxy)["last_reload"]["error"] or ""),
                    timeout_s=30, what="the invalid value to be refused")
        assert _system_config(proxy)["version"] == applied["version"]
        response = await _generate(proxy, KEY_B)
        assert response.status_code == 200, response.text
        assert "max_prompt_tokens=2048" in response.headers["X-Service-Limits"]
        await until(lambda: sum(1 for r in load.results if r[2] > time.monotonic() - 0.5) > 0,
                    timeout_s=30, what="the load still being served")
    finally:
        await load.stop()
        log = proxy.log()
        proxy.stop()
    # For the record (pytest -s): how much was in flight across the reload.
    print(f"\nreload under load: {len(load.results)} requests, {len(load.failures())} failed, "
          f"{load.spanning(reloaded_at)} in flight across the reload")
    assert not load.failures(), load.failures()[:5]
    assert load.spanning(reloaded_at) >= 2, "no request was in flight across the reload"
    assert sum(1 for r in load.results if r[0] == "stream") >= 10
    assert "configuration version 2 applied (file)" in log
    assert "configuration reload refused (file); still serving version 2" in log
    assert KEY_A not in log and KEY_B not in log


def test_sighup_applies_keys_plugins_and_modes_and_says_what_needs_a_restart(
        emulators: tuple[Server, Server], tmp_path: Path) -> None:
    one, _ = emulators
    # No file watch (a setting only a restart changes): only SIGHUP reloads.
    proxy = start_proxy(tmp_path, [one.url], {"server": {"config_watch_s": 0}}, name="reload-hup")
    assert proxy.config_path is not None
    _write(proxy.config_path, _config([one], keys=[KEY_A], watch_s=0))
    headers_a = {"Authorization": f"Bearer {KEY_A}"}
    headers_b = {"Authorization": f"Bearer {KEY_B}"}
    long_chat = {"model": "llama3.2", "stream": False, "messages": [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "word " * 60}
        for i in range(20)]}
    try:
        for _ in range(30):  # a storm: coalesced into few reloads, the proxy stays up
            proxy.process.send_signal(signal.SIGHUP)
        first = wait_for(lambda: (c := _system_config(proxy))["last_reload"]["trigger"] == "sighup" and c,
                         what="the first SIGHUP reload")
        assert proxy.process.poll() is None
        assert first["version"] == 2  # the file as written above (the keys): one applied reload
        assert sum(1 for r in first["history"] if r["trigger"] == "sighup") < 30
        assert httpx.get(f"{proxy.url}/api/tags", headers=headers_a, timeout=10).status_code == 200
        before = _system_config(proxy)["version"]

        # Rotate the key, add a plugin, and change the listen address.
        _write(proxy.config_path, _config(
            [one], keys=[KEY_B], watch_s=0, server={"listen": "127.0.0.1:1"},
            plugins=[{"name": "trim_history", "budget_tokens": 300, "keep_last_turns": 2}]))
        # Nothing happens until SIGHUP (no watch): a request still sees the old key.
        assert httpx.get(f"{proxy.url}/api/tags", headers=headers_a, timeout=10).status_code == 200
        assert _system_config(proxy)["version"] == before
        proxy.process.send_signal(signal.SIGHUP)
        config = wait_for(lambda: (c := _system_config(proxy))["version"] > before and c,
                          what="the SIGHUP reload")
        assert config["last_reload"]["trigger"] == "sighup"
        assert config["restart_required"] == ["server.listen"]
        assert "; plugins: trim_history (added)" in proxy.log()
        assert "server.listen" not in config["last_reload"]["changed"]
        assert config["config"]["server"]["listen"] == "127.0.0.1:0"  # the running value
        assert _metric(proxy, "sop_config_restart_required") == 1
        assert httpx.get(f"{proxy.url}/api/tags", headers=headers_a, timeout=10).status_code == 401
        assert httpx.get(f"{proxy.url}/api/tags", headers=headers_b, timeout=10).status_code == 200
        trimmed = httpx.post(f"{proxy.url}/api/chat", headers=headers_b, json=long_chat, timeout=30)
        assert trimmed.status_code == 200, trimmed.text
        assert trimmed.headers.get("X-History-Trimmed", "").startswith("turns=")
        decisions = _metric(proxy, "sop_plugin_trim_history_decisions_total", decision="trimmed")
        assert decisions >= 1

        # Change the plugin's settings: it is rebuilt, and its counter keeps its total.
        _write(proxy.config_path, _config(
            [one], keys=[KEY_B], watch_s=0,
            plugins=[{"name": "trim_history", "budget_tokens": 400, "keep_last_turns": 2}]))
        version = _system_config(proxy)["version"]
        proxy.process.send_signal(signal.SIGHUP)
        config = wait_for(lambda: (c := _system_config(proxy))["version"] > version and c,
                          what="the plugin reload")
        assert config["restart_required"] == []
        assert "; plugins: trim_history (rebuilt)" in proxy.log()
        again = httpx.post(f"{proxy.url}/api/chat", headers=headers_b, json=long_chat, timeout=30)
        assert again.headers.get("X-History-Trimmed", "").startswith("turns=")
        assert _metric(proxy, "sop_plugin_trim_history_decisions_total", decision="trimmed") \
            >= decisions + 1

        # Remove it, and put limits in shadow with a small limit: the long chat goes through
        # untouched, with the decision limits would have taken.
        _write(proxy.config_path, _config([one], keys=[KEY_B], watch_s=0, max_prompt_tokens=100,
                                          limits={"mode": "shadow"}))
        version = config["version"]
        proxy.process.send_signal(signal.SIGHUP)
        wait_for(lambda: _system_config(proxy)["version"] > version, what="the plugin removal")
        # Before: "plugins rebuilt: trim_history" for a plugin that was removed.
        assert "; plugins: trim_history (removed)" in proxy.log()
        plain = httpx.post(f"{proxy.url}/api/chat", headers=headers_b, json=long_chat, timeout=30)
        assert plain.status_code == 200 and "X-History-Trimmed" not in plain.headers
        assert "limits=prompt_too_long" in plain.headers.get("X-Shadow-Decision", "")

        # Model profiles and tenant quotas: a model's own prompt limit applies, and a quota appears.
        _write(proxy.config_path, _config(
            [one], keys=[KEY_B], watch_s=0, limits={"deadline_s": 77},
            models={"llama3.2": {"max_prompt_tokens": 50}},
            tenants=[{"name": "team-a", "keys": [KEY_B], "requests_per_minute": 600}]))
        version = _system_config(proxy)["version"]
        proxy.process.send_signal(signal.SIGHUP)
        wait_for(lambda: _system_config(proxy)["version"] > version, what="the models reload")
        refused = httpx.post(f"{proxy.url}/api/chat", headers=headers_b, json=long_chat, timeout=30)
        assert refused.status_code == 400 and refused.json()["code"] == "prompt_too_long", refused.text
        assert "max_prompt_tokens=50" in refused.headers["X-Service-Limits"]
        assert "deadline_s=77" in refused.headers["X-Service-Limits"]
        short = httpx.post(f"{proxy.url}/api/chat", headers=headers_b, timeout=30, json={
            "model": "llama3.2", "stream": False, "messages": [{"role": "user", "content": "hi"}]})
        assert short.status_code == 200, short.text
        assert "requests_per_minute=600" in short.headers["X-Service-Limits"]

        # Add a replica: it is probed, and serves (asked by name: placement would rather keep using
        # the replica that has the model loaded than load it on the new one).
        _, two = emulators
        served = two.stats()["completed"]
        _write(proxy.config_path, {**_config([one, two], keys=[KEY_B], watch_s=0)})
        version = _system_config(proxy)["version"]
        proxy.process.send_signal(signal.SIGHUP)
        wait_for(lambda: _system_config(proxy)["version"] > version, what="the replica's addition")
        ready = wait_for(lambda: (r := httpx.get(f"{proxy.url}/readyz", timeout=10).json())
                         ["upstreams"].get(f"127.0.0.1:{two.port}") == "healthy" and r,
                         what="the new replica probed healthy")
        assert len(ready["upstreams"]) == 2

        response = httpx.post(f"{proxy.url}/api/generate", timeout=30,
                              headers={**ADMIN_HEADERS, "X-Ollama-Replica": f"127.0.0.1:{two.port}"},
                              json={"model": "llama3.2", "prompt": "hi", "stream": False})
        assert response.status_code == 200, response.text
        assert two.stats()["completed"] == served + 1
    finally:
        proxy.stop()


def test_system_config_is_admin_only(emulators: tuple[Server, Server], tmp_path: Path) -> None:
    one, _ = emulators
    restart = "ssh -i /keys/sk-restart-secret-01 {host} systemctl restart ollama"
    # Credentials in the replica's URL, and a Redis password as a query parameter (redis-py takes it).
    with_credentials = one.url.replace("http://", "http://bob:sk-upstream-pass-01@")
    proxy = start_proxy(tmp_path, [{"url": with_credentials, "restart_command": restart}],
                        {"admin": {"keys": [ADMIN]}, "tenants": [{"name": "t", "keys": [KEY_A]}],
                         "state": {"backend": "memory", "url": "redis://:sk-redis-pass-01@127.0.0.1:1/0"},
                         "plugins": [{"name": "embed_cache",
                                      "redis_url": "redis://127.0.0.1:1/0?password=sk-redis-query-01"}]},
                        name="reload-admin")
    try:
        assert httpx.get(f"{proxy.url}/system/config", timeout=10).status_code == 401
        tenant = httpx.get(f"{proxy.url}/system/config", headers={"Authorization": f"Bearer {KEY_A}"},
                           timeout=10)
        assert tenant.status_code == 403
        config = _system_config(proxy)
        assert config["version"] == 1 and config["last_reload"]["trigger"] == "start"
        assert config["restart_only"] == ["server", "forwarding", "state", "telemetry"]
        profile = httpx.get(f"{proxy.url}/system/profile", headers={"Authorization": f"Bearer {ADMIN}"},
                            timeout=10).json()
        shown = f"{config} {profile} {proxy.log()}"  # nor the replicas' view, nor the start-up line
        for secret in (ADMIN, KEY_A, "sk-restart-secret-01", "sk-redis-pass-01", "sk-upstream-pass-01",
                       "sk-redis-query-01"):
            assert secret not in shown, secret
        assert config["config"]["upstreams"][0]["restart_command"] == "<redacted>"
    finally:
        proxy.stop()


def test_a_file_caught_mid_write_is_never_applied(emulators: tuple[Server, Server], tmp_path: Path) -> None:
    """Rewriting the file in place (`open(path, "w")`, then the text) leaves it empty for a moment:
    applied, that would serve the defaults, with no keys at all. Neither the watch nor SIGHUP applies
    an empty file, and an in-place edit is applied once it holds still."""
    one, _ = emulators
    proxy = start_proxy(tmp_path, [one.url], _config([one], keys=[KEY_A], watch_s=0.2,
                                                     anonymous={"allow": False}), name="reload-midwrite")
    assert proxy.config_path is not None
    text = proxy.config_path.read_text()
    keyless = f"{proxy.url}/api/tags"
    try:
        assert httpx.get(keyless, timeout=10).status_code == 401
        with proxy.config_path.open("w"):  # truncated, and held empty well past a check of the watch
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                assert httpx.get(keyless, timeout=10).status_code == 401
                time.sleep(0.05)
        refused = wait_for(lambda: (c := _system_config(proxy))["refused"] and c, what="a refusal")
        assert refused["version"] == 1 and "empty" in refused["last_reload"]["error"]
        proxy.process.send_signal(signal.SIGHUP)
        wait_for(lambda: _system_config(proxy)["last_reload"]["trigger"] == "sighup", what="SIGHUP")
        assert _system_config(proxy)["version"] == 1
        assert httpx.get(keyless, timeout=10).status_code == 401

        # Written back in place (truncated, then written): applied once, whole.
        edited = text.replace(KEY_A, KEY_B)
        proxy.config_path.write_text(edited)
        wait_for(lambda: httpx.get(keyless, headers={"Authorization": f"Bearer {KEY_B}"},
                                   timeout=10).status_code == 200, what="the edited file applied")
        config = _system_config(proxy)
        assert not config["refused"] and config["version"] == 2
        assert httpx.get(keyless, timeout=10).status_code == 401
    finally:
        proxy.stop()


def test_a_reload_refused_while_applying_leaves_the_served_file_s_digest(
        emulators: tuple[Server, Server], tmp_path: Path) -> None:
    """A file that loads but cannot be applied (here a model's tokenizer file that is not one) is
    refused whole: `/system/config` still describes the file in force, its sha256 and what waits for a
    restart, not the refused one's."""
    one, _ = emulators
    proxy = start_proxy(tmp_path, [one.url], {"server": {"config_watch_s": 0}}, name="reload-apply")
    assert proxy.config_path is not None
    try:
        _write(proxy.config_path, _config([one], keys=[KEY_A], watch_s=0))
        proxy.process.send_signal(signal.SIGHUP)
        served = wait_for(lambda: (c := _system_config(proxy))["version"] == 2 and c,
                          what="the first reload")
        assert served["restart_required"] == [] and served["sha256"]
        broken = tmp_path / "broken.model"
        broken.write_bytes(b"not a sentencepiece model")
        _write(proxy.config_path, _config(
            [one], keys=[KEY_B], watch_s=0, server={"listen": "127.0.0.1:1"},
            models={"llama3.2": {"tokenizer": str(broken)}}))
        proxy.process.send_signal(signal.SIGHUP)
        config = wait_for(lambda: (c := _system_config(proxy))["last_reload"]["outcome"] == "refused"
                          and c, what="the refused reload")
        assert "tokenizer" in config["last_reload"]["error"]
        assert config["refused"] is True
        assert config["version"] == 2
        assert config["sha256"] == served["sha256"]  # the file in force, not the refused one
        assert config["restart_required"] == []  # the refused file's listen waits for nothing
        assert _metric(proxy, "sop_config_restart_required") == 0
        headers_a = {"Authorization": f"Bearer {KEY_A}"}
        assert httpx.get(f"{proxy.url}/api/tags", headers=headers_a, timeout=10).status_code == 200
    finally:
        proxy.stop()
