"""The plugin seam: a third-party plugin installed by entry point (the one docs/PLUGINS.md shows, as written)
runs in a real proxy at its slot, with its config validated, its span and decisions, shadow mode, fail-open,
response observers, and sub-requests that go through the chain under an identity."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy import plugin_chain
from proxy.config import TelemetryConfig
from proxy.plugin import (
    Plugin,
    PluginConfig,
    PluginError,
    PluginServices,
    Subrequests,
    discover,
    structure_plugins,
)
from proxy.telemetry.setup import build_telemetry
from tests.support.metrics import metric
from tests.support.polling import wait_for
from tests.support.servers import Server, start_emulator, start_proxy
from tests.support.stall import healthz_waits

DOC = Path(__file__).resolve().parent.parent / "docs" / "PLUGINS.md"
ADMIN, TEAM = "sk-plugin-admin", "sk-plugin-team"

# Two more plugins for the parts the documented example does not exercise: answering before
# backpressure from a sub-request, and failing.
EXTRA = textwrap.dedent('''
    from __future__ import annotations

    import asyncio
    from typing import Any

    import attrs
    from aiohttp import web

    from proxy.plugin import Plugin, PluginConfig


    @attrs.frozen(kw_only=True)
    class EchoConfig(PluginConfig):
        tenant: str = "team"


    class EchoVersion(Plugin):
        """Answers /api/embed for model `echo` itself, with the replica's version fetched through the
        chain as a sub-request (so the sub-request shows up in the access log under `tenant`)."""

        name = "echo_version"
        slot = "before_backpressure"
        config_class = EchoConfig

        async def on_request(self, request: web.Request, ctx: Any, decide: Any) -> Any:
            if ctx.model != "echo":
                decide("pass")
                return None
            status, body = await self.services.subrequests.post_json(
                "/api/show", {"model": "llama3.2"}, tenant=self.config.tenant)
            decide("answered")
            return web.json_response({"sub_status": status, "has_details": "details" in (body or {})})


    class Broken(Plugin):
        name = "broken"
        slot = "before_limits"

        async def on_request(self, request: web.Request, ctx: Any, decide: Any) -> Any:
            ctx.replace_json({"model": "llama3.2", "messages": []})  # undone when it fails
            raise RuntimeError("boom")


    @attrs.frozen(kw_only=True)
    class InPlaceConfig(PluginConfig):
        fail_before_rewrite: bool = False


    class InPlace(Plugin):
        """Keeps the newest message only, editing the parsed body in place before replace_json (which
        context.py allows); with `fail_before_rewrite`, it raises between the two."""

        name = "in_place"
        slot = "before_limits"
        config_class = InPlaceConfig

        async def on_request(self, request: web.Request, ctx: Any, decide: Any) -> Any:
            body = ctx.json()
            body["messages"] = body["messages"][-1:]
            if self.config.fail_before_rewrite:
                raise RuntimeError("boom")
            ctx.replace_json(body)
            decide("trimmed")
            return None


    @attrs.frozen(kw_only=True)
    class StreamsConfig(PluginConfig):
        then: str = "return"


    class StreamsItself(Plugin):
        """Answers by streaming a response of its own, then returns it, raises or returns None."""

        name = "streams_itself"
        slot = "before_backpressure"
        config_class = StreamsConfig

        async def on_request(self, request: web.Request, ctx: Any, decide: Any) -> Any:
            response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await response.prepare(request)
            await response.write(b'{"from":"plugin"}\\n')
            if self.config.then == "raise":
                raise RuntimeError("boom")
            if self.config.then == "none":
                return None
            await response.write_eof()
            return response


    class Hangs(Plugin):
        """Waits for something that never comes (an external call without a timeout)."""

        name = "hangs"
        slot = "before_backpressure"

        async def on_request(self, request: web.Request, ctx: Any, decide: Any) -> Any:
            ctx.response_headers["X-Hangs"] = "waiting"  # undone: a shadow plugin changes nothing
            await asyncio.Event().wait()


    class AwaitsACancelledFuture(Plugin):
        """Awaits work someone else cancelled (a shared task a stop() or another request ended)."""

        name = "awaits_cancelled"
        slot = "before_limits"

        async def on_request(self, request: web.Request, ctx: Any, decide: Any) -> Any:
            ctx.replace_json({"model": "llama3.2", "messages": []})  # undone when it fails
            future = asyncio.get_running_loop().create_future()
            future.cancel()
            await future


    class Chatty(Plugin):
        """Puts the request's own id in its decision (a number, a name...: unbounded)."""

        name = "chatty"
        slot = "before_limits"

        async def on_request(self, request: web.Request, ctx: Any, decide: Any) -> Any:
            if ctx.json()["messages"][-1]["content"] == "fail":
                raise RuntimeError("boom")
            decide(f"seen_{ctx.request_id}_" + "x" * 100)
            return None
''')


def _doc_plugin_source() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "docs/PLUGINS.md lost its example"
    return blocks[0]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory on PYTHONPATH holding the example plugins and a dist-info that declares them as
    entry points, which is what `pip install` of a plugin package leaves behind."""
    root = tmp_path_factory.mktemp("plugin-site")
    (root / "example_plugins").mkdir()
    (root / "example_plugins" / "__init__.py").write_text("")
    (root / "example_plugins" / "max_messages.py").write_text(_doc_plugin_source())
    (root / "example_plugins" / "extra.py").write_text(EXTRA)
    info = root / "example_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: example-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[shared_ollama_proxy.plugins]\n"
        "max_messages = example_plugins.max_messages:MaxMessages\n"
        "echo_version = example_plugins.extra:EchoVersion\n"
        "broken = example_plugins.extra:Broken\n"
        "in_place = example_plugins.extra:InPlace\n"
        "streams_itself = example_plugins.extra:StreamsItself\n"
        "hangs = example_plugins.extra:Hangs\n"
        "awaits_cancelled = example_plugins.extra:AwaitsACancelledFuture\n"
        "chatty = example_plugins.extra:Chatty\n")
    return root


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_emulator(tmp_path_factory.mktemp("plugin-emu"), name="plugin-emu")
    yield server
    server.stop()


def _proxy(tmp: Path, emulator: Server, site: Path, plugins: list[dict[str, object]],
           name: str) -> Server:
    return start_proxy(tmp, [emulator.url], {
        "admin": {"keys": [ADMIN]}, "tenants": [{"name": "team", "keys": [TEAM]}],
        "plugins": plugins}, name=name, env={"PYTHONPATH": str(site)})


def _chat(proxy: Server, turns: int) -> httpx.Response:
    messages = [{"role": "system", "content": "be brief"}, *_turns(turns)]
    return httpx.post(f"{proxy.url}/api/chat", headers={"Authorization": f"Bearer {TEAM}"}, timeout=30,
                      json={"model": "llama3.2", "messages": messages, "stream": False})


def test_the_documented_plugin_runs_from_its_entry_point(tmp_path: Path, emulator: Server,
                                                         site: Path) -> None:
    proxy = _proxy(tmp_path, emulator, site, [{"name": "max_messages", "keep": 3}], "plugin-doc")
    try:
        trimmed = _chat(proxy, 7)
        assert trimmed.status_code == 200, trimmed.text
        assert trimmed.headers["x-max-messages"] == "dropped=4"
        # The replica counted the prompt the plugin produced: system + the newest 3 turns.
        kept = [{"role": "system", "content": "be brief"}, *_turns(7)[-3:]]
        assert trimmed.json()["prompt_eval_count"] == _count_direct(emulator, kept)
        assert "x-max-messages" not in _chat(proxy, 3).headers
        # Its observer saw the whole response, and its decisions are counted.
        deadline = time.monotonic() + 10
        while "relayed" not in proxy.log():
            assert time.monotonic() < deadline, proxy.log()[-2000:]
            time.sleep(0.05)
        name = "sop_plugin_max_messages_decisions_total"
        assert metric(proxy.url, name, decision="trimmed") == 1
        assert metric(proxy.url, name, decision="kept") == 1
    finally:
        proxy.stop()


def _turns(turns: int) -> list[dict[str, str]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"}
            for i in range(turns)]


def _chat_direct(emulator: Server, turns: int) -> int:
    return _count_direct(emulator, [{"role": "system", "content": "be brief"}, *_turns(turns)])


def _count_direct(emulator: Server, messages: list[dict[str, str]]) -> int:
    reply = httpx.post(f"{emulator.url}/api/chat", timeout=30,
                       json={"model": "llama3.2", "messages": messages, "stream": False})
    return int(reply.json()["prompt_eval_count"])


def test_shadow_mode_reports_and_changes_nothing(tmp_path: Path, emulator: Server, site: Path) -> None:
    proxy = _proxy(tmp_path, emulator, site, [{"name": "max_messages", "keep": 3, "mode": "shadow"}],
                   "plugin-shadow")
    try:
        reply = _chat(proxy, 7)
        assert reply.status_code == 200
        assert reply.headers["x-shadow-decision"] == "max_messages=trimmed"
        assert "x-max-messages" not in reply.headers
        assert reply.json()["prompt_eval_count"] == _chat_direct(emulator, 7)
    finally:
        proxy.stop()


def test_a_failing_plugin_fails_open_and_its_rewrite_is_undone(tmp_path: Path, emulator: Server,
                                                               site: Path) -> None:
    proxy = _proxy(tmp_path, emulator, site, [{"name": "broken"}], "plugin-broken")
    closed = _proxy(tmp_path, emulator, site, [{"name": "broken", "fail": "closed"}], "plugin-closed")
    try:
        reply = _chat(proxy, 5)
        assert reply.status_code == 200 and reply.json()["prompt_eval_count"] == _chat_direct(emulator, 5)
        assert "plugin broken failed" in proxy.log() and "RuntimeError" in proxy.log()
        refused = _chat(closed, 5)
        assert refused.status_code == 500 and refused.json()["code"] == "internal_error"
    finally:
        proxy.stop()
        closed.stop()


def test_a_body_go_refuses_keeps_its_error_through_a_failing_plugin(tmp_path: Path, emulator: Server,
                                                                    site: Path) -> None:
    """A body Go cannot read is Ollama's 400 with Go's message. Undoing a failed plugin's rewrite used to
    put back the body with a view of None and no error, so the proxy then answered as if the model were
    missing. The answer must be what the replica itself says."""
    proxy = _proxy(tmp_path, emulator, site, [{"name": "broken"}], "plugin-broken-invalid")
    try:
        for body in (b'{"model": "llama3.2", "messages": [], "stream": fals}', b'{"model": "llama3.2", '):
            direct = httpx.post(f"{emulator.url}/api/chat", content=body, timeout=30)
            reply = httpx.post(f"{proxy.url}/api/chat", content=body, timeout=30,
                               headers={"Authorization": f"Bearer {TEAM}"})
            assert direct.status_code == 400, direct.text
            # Go's own message (the proxy's refusals add their `code`).
            assert (reply.status_code, reply.json()["error"]) == (400, direct.json()["error"]), body
    finally:
        proxy.stop()


def test_fail_closed_fails_only_where_the_plugin_enforces(tmp_path: Path, emulator: Server,
                                                          site: Path) -> None:
    """`fail: closed` used to fail the request in shadow mode too, and for the tenants a canary only
    shadows: trying a plugin in shadow, or rolling it out to one tenant, took everybody's requests
    down when it failed. Shadow changes nothing, its failures included."""
    shadow = _proxy(tmp_path, emulator, site, [{"name": "broken", "fail": "closed", "mode": "shadow"}],
                    "plugin-closed-shadow")
    canary = start_proxy(tmp_path, [emulator.url], {
        "tenants": [{"name": "team", "keys": [TEAM]}, {"name": "pilot", "keys": ["sk-plugin-pilot"]}],
        "plugins": [{"name": "broken", "fail": "closed",
                     "rollout": {"enforce_share": 0.0, "tenants": ["pilot"]}}]},
        name="plugin-closed-canary", env={"PYTHONPATH": str(site)})
    try:
        reply = _chat(shadow, 5)
        assert reply.status_code == 200 and reply.json()["prompt_eval_count"] == _chat_direct(emulator, 5)
        assert _chat(canary, 5).status_code == 200  # team: shadowed
        pilot = httpx.post(f"{canary.url}/api/chat", headers={"Authorization": "Bearer sk-plugin-pilot"},
                           timeout=30, json={"model": "llama3.2", "messages": _turns(5), "stream": False})
        assert pilot.status_code == 500 and pilot.json()["code"] == "internal_error"  # enforced
    finally:
        shadow.stop()
        canary.stop()


def test_an_edit_in_place_is_undone_in_shadow_mode_and_on_failure(tmp_path: Path, emulator: Server,
                                                                  site: Path) -> None:
    """A plugin that edits the parsed body in place and is in shadow mode, or fails before its
    replace_json, changes nothing: limits count what goes upstream, the client's bytes (it used to
    count the edited view while the original prompt went upstream: max_prompt_tokens bypassed)."""
    over = [{"role": "user", "content": "many words in an old turn " * 60}, *_turns(1)]
    for n, entry in enumerate([{"name": "in_place", "mode": "shadow"},
                               {"name": "in_place", "fail_before_rewrite": True},
                               {"name": "in_place"}]):
        proxy = start_proxy(tmp_path, [emulator.url], {
            "tenants": [{"name": "team", "keys": [TEAM], "max_prompt_tokens": 100}],
            "plugins": [entry]}, name=f"plugin-in-place-{n}", env={"PYTHONPATH": str(site)})
        try:
            reply = httpx.post(f"{proxy.url}/api/chat", headers={"Authorization": f"Bearer {TEAM}"},
                               timeout=30, json={"model": "llama3.2", "messages": over, "stream": False})
            if entry.get("mode") == "shadow" or entry.get("fail_before_rewrite"):
                assert reply.status_code == 400, (entry, reply.text)
                assert reply.json()["code"] == "prompt_too_long"
            else:  # enforced, the edit is the rewrite: what it kept is what is counted and sent
                assert reply.status_code == 200, reply.text
                assert reply.json()["prompt_eval_count"] == _count_direct(emulator, over[-1:])
        finally:
            proxy.stop()


def _raw_exchange(proxy: Server, request: bytes) -> bytes:
    """Send `request` on a fresh connection and read what comes back until it closes (or 5 s pass)."""
    host, port = proxy.url.removeprefix("http://").split(":")
    received = b""
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(65536):
                received += chunk
    return received


def test_a_response_a_plugin_started_itself_is_the_only_one_on_the_connection(
        tmp_path: Path, emulator: Server, site: Path) -> None:
    """A plugin that streams an answer of its own is the request's answer when enforced; in shadow
    mode, or when it fails or returns None after starting it, the proxy cannot take those bytes back,
    and used to send the forwarder's response after them on the same connection, where a keep-alive
    client (or a pooling load balancer) reads it as the answer to its next request. Now nothing
    follows the plugin's response, and the connection ends after it (at once, cut short, when the
    plugin did not hand it back finished)."""
    body = b'{"model":"llama3.2","messages":[{"role":"user","content":"x"}],"stream":false}'
    request = (b"POST /api/chat HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    for n, (entry, finished) in enumerate([({"name": "streams_itself"}, True),
                                           ({"name": "streams_itself", "mode": "shadow"}, True),
                                           ({"name": "streams_itself", "then": "raise"}, False),
                                           ({"name": "streams_itself", "then": "none"}, False)]):
        proxy = _proxy(tmp_path, emulator, site, [entry], f"plugin-streams-{n}")
        try:
            before = emulator.stats()["completed"]
            received = _raw_exchange(proxy, request)
            assert received.count(b"HTTP/1.1 ") == 1, (entry, received)
            assert b'{"from":"plugin"}' in received
            assert received.endswith(b"\r\n0\r\n\r\n") == finished, (entry, received)
            assert emulator.stats()["completed"] == before  # nothing went upstream
            assert httpx.get(f"{proxy.url}/healthz", timeout=10).status_code == 200  # still serving
        finally:
            proxy.stop()


def test_a_plugin_that_hangs_is_cut_off_at_the_request_deadline(tmp_path: Path, emulator: Server,
                                                                site: Path) -> None:
    """A plugin that never returns used to hold the request, and the tenant's concurrency place,
    for good (the deadline was only checked once the forwarder ran); now the request ends with the
    deadline's 504 shortly after it passes, and its place is given back."""
    proxy = start_proxy(tmp_path, [emulator.url], {
        "admin": {"keys": [ADMIN]},
        "tenants": [{"name": "team", "keys": [TEAM], "max_concurrent": 1}],
        "plugins": [{"name": "hangs", "mode": "shadow"}]}, name="plugin-hangs",
        env={"PYTHONPATH": str(site)})
    try:
        for _ in range(2):  # the second finds the place the first held given back
            started = time.monotonic()
            reply = httpx.post(f"{proxy.url}/api/chat", timeout=30,
                               headers={"Authorization": f"Bearer {TEAM}", "X-Deadline-S": "1"},
                               json={"model": "llama3.2", "messages": _turns(1), "stream": False})
            assert reply.status_code == 504, reply.text
            assert reply.json()["code"] == "upstream_response_timeout"
            assert reply.headers["x-should-retry"] == "false"
            assert "x-hangs" not in reply.headers  # in shadow mode, on the deadline too
            assert time.monotonic() - started < 10
        quotas = httpx.get(f"{proxy.url}/system/quotas", timeout=10,
                           headers={"Authorization": f"Bearer {ADMIN}"}).json()
        assert quotas["tenants"]["team"]["in_flight"] == 0
    finally:
        proxy.stop()


def test_a_cancellation_the_request_did_not_get_is_a_plugin_failure(tmp_path: Path, emulator: Server,
                                                                    site: Path) -> None:
    """A plugin that awaits a future someone else cancelled raises CancelledError although its request
    was not cancelled: that used to end the request without any response (as if the client had left);
    it is the plugin's failure, and the request goes on without it (fail open) or fails with 500."""
    proxy = _proxy(tmp_path, emulator, site, [{"name": "awaits_cancelled"}], "plugin-cancelled")
    closed = _proxy(tmp_path, emulator, site, [{"name": "awaits_cancelled", "fail": "closed"}],
                    "plugin-cancelled-closed")
    try:
        reply = _chat(proxy, 3)
        assert reply.status_code == 200, reply.text
        assert reply.json()["prompt_eval_count"] == _chat_direct(emulator, 3)
        assert "plugin awaits_cancelled failed" in proxy.log()
        refused = _chat(closed, 3)
        assert refused.status_code == 500 and refused.json()["code"] == "internal_error"
    finally:
        proxy.stop()
        closed.stop()


def test_a_large_body_is_parsed_off_the_event_loop_with_plugins_configured(
        tmp_path: Path, emulator: Server, site: Path) -> None:
    """Every plugin step read the parsed body first, parsing it on the event loop when nothing had:
    an 11 MB body orjson refuses (a lone surrogate escape: Go's reading, in Python, ~3 s) held every
    other request of the process that long whenever a plugin was configured, where limits alone
    parses it in a worker. Now the plugins parse it as limits does."""
    turn = b'{"role":"user","content":"word word word \\ud800 word"}'
    body = b'{"model":"llama3.2","stream":false,"messages":[' + b",".join([turn] * 200_000) + b"]}"
    proxy = _proxy(tmp_path, emulator, site, [{"name": "max_messages", "keep": 3}], "plugin-large")
    try:
        with healthz_waits(proxy.url) as waits:
            reply = httpx.post(f"{proxy.url}/api/chat", content=body, timeout=60, headers={
                "Authorization": f"Bearer {TEAM}", "Content-Type": "application/json"})
        assert reply.status_code in (200, 400), reply.text[:200]
    finally:
        proxy.stop()
    assert waits and max(waits) < 1.0, max(waits)  # ~3 s while the body was parsed on the loop


def test_a_plugin_decisions_cannot_grow_the_metrics_without_bound(tmp_path: Path, emulator: Server,
                                                                 site: Path) -> None:
    """Each distinct decide() string used to become a new series of the plugin's decision counter:
    a plugin that puts an id or a number in it grew /metrics by a series per request. At most
    MAX_DECISIONS distinct ones are counted (further ones as `other`), each cut to 64 characters."""
    proxy = _proxy(tmp_path, emulator, site, [{"name": "chatty"}], "plugin-chatty")
    name = "sop_plugin_chatty_decisions_total"
    bound = 32  # proxy.plugin.MAX_DECISIONS
    try:
        with httpx.Client(timeout=30) as client:
            for _ in range(bound + 20):
                reply = client.post(f"{proxy.url}/api/chat", headers={"Authorization": f"Bearer {TEAM}"},
                                    json={"model": "llama3.2", "messages": _turns(1), "stream": False})
                assert reply.status_code == 200
            # The proxy's own outcomes are a fixed set, never folded into `other`.
            failing = client.post(f"{proxy.url}/api/chat", headers={"Authorization": f"Bearer {TEAM}"},
                                  json={"model": "llama3.2", "stream": False,
                                        "messages": [{"role": "user", "content": "fail"}]})
            assert failing.status_code == 200  # fails open
        series = [family for family in text_string_to_metric_families(
            httpx.get(f"{proxy.url}/metrics", timeout=5).text) if family.name + "_total" == name]
        samples = [s for family in series for s in family.samples if s.name == name]
        assert len(samples) == bound + 2, len(samples)
        assert sum(s.value for s in samples) == bound + 21
        assert metric(proxy.url, name, decision="other") == 20
        assert metric(proxy.url, name, decision="failed") == 1
        assert all(len(s.labels["decision"]) <= 64 for s in samples)
    finally:
        proxy.stop()


def test_an_answer_before_backpressure_uses_a_subrequest_through_the_chain(
        tmp_path: Path, emulator: Server, site: Path) -> None:
    proxy = _proxy(tmp_path, emulator, site, [{"name": "echo_version", "tenant": "team"}], "plugin-echo")
    try:
        before = emulator.stats()["completed"]
        reply = httpx.post(f"{proxy.url}/api/embed", json={"model": "echo", "input": "x"}, timeout=30)
        assert reply.status_code == 200, reply.text
        assert reply.json() == {"sub_status": 200, "has_details": True}
        assert emulator.stats()["completed"] == before  # answered here: no generation ran
        # The sub-request went through ingress and the chain as tenant `team`; the credential that
        # carried it never reached the replica or the log.
        lines = wait_for(lambda: [line for line in proxy.log().splitlines()
                                  if '"POST /api/show" 200' in line], 10, "the access line")
        assert "tenant=team" in lines[-1]
        assert "X-SOP-Internal" not in proxy.log()
    finally:
        proxy.stop()


def test_plugin_config_is_validated_with_the_key_path(site: Path) -> None:
    sys.path.insert(0, str(site))
    try:
        available = discover()
        assert {"max_messages", "echo_version", "broken"} <= set(available)
        with pytest.raises(PluginError, match=r"plugins\[0\]\.keep: must be > 0"):
            structure_plugins([{"name": "max_messages", "keep": 0}], available)
        with pytest.raises(PluginError, match=r"plugins\[1\]: unknown key\(s\) bogus"):
            structure_plugins([{"name": "broken"}, {"name": "max_messages", "bogus": 1}], available)
        with pytest.raises(PluginError, match=r"plugins\[0\]\.name: unknown plugin 'nope'"):
            structure_plugins([{"name": "nope"}], available)
    finally:
        sys.path.remove(str(site))


def test_check_config_knows_the_installed_plugins(tmp_path: Path, site: Path) -> None:
    config = tmp_path / "plugins.yaml"
    config.write_text("plugins:\n  - {name: max_messages, keep: -1}\n")
    result = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(config)],
                            capture_output=True, text=True, check=False,
                            env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1 and "plugins[0].keep: must be > 0" in result.stderr


class _HangsOnStart(Plugin):
    name = "hangs_on_start"

    async def start(self) -> None:
        await asyncio.Event().wait()


class _HangsOnStop(Plugin):
    name = "hangs_on_stop"

    async def stop(self) -> None:
        await asyncio.Event().wait()


def test_a_plugin_start_or_stop_that_hangs_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A start() that never returns used to hold the reload lock for good (every later reload, a
    fixed configuration included, waited behind it), and a stop() that never returns kept the process
    from exiting after SIGTERM and a reload from retiring its plugins. Both are bounded now: the reload
    (or the start-up) is refused with the plugin's name, and the stop is given up (logged)."""
    monkeypatch.setattr(plugin_chain, "START_TIMEOUT_S", 0.2, raising=False)
    monkeypatch.setattr(plugin_chain, "STOP_TIMEOUT_S", 0.2, raising=False)
    telemetry = build_telemetry(TelemetryConfig())
    chain = plugin_chain.PluginChain(telemetry, PluginServices(telemetry, Subrequests()), "forward")

    async def scenario() -> None:
        chain.set_initial([(_HangsOnStop, PluginConfig(name="hangs_on_stop"))])
        lifecycle = chain.lifecycle(web.Application())
        await anext(lifecycle)
        with pytest.raises(RuntimeError, match=r"plugin hangs_on_start did not start within 0\.2s"):
            await asyncio.wait_for(
                chain.replace([(_HangsOnStart, PluginConfig(name="hangs_on_start"))]), 5)
        await chain.abandon()  # what the reloader does with a refused reload
        assert [s.plugin.name for s in chain.steps] == ["hangs_on_stop"]  # still serving as before
        # The application stops: the plugin's stop is given up, the process can exit.
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(lifecycle), 5)

    asyncio.run(scenario())
