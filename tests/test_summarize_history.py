"""summarize_history in a real proxy (CLI, `plugins:` configured) in front of the emulator: the oldest turns
become one summary written by a small model through the chain (as the configured tenant), cached by the
turns summarized so the next turn reuses it byte for byte (memory, and Redis shared by two proxies), the
time budget falls back to trimming and finishes the summary in the background, /api/generate keeps its
question, limits' `prompt_policy: summarize` uses the same summarizer, and the summary's span carries the
sub-request's GenAI CLIENT span under it."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy import gojson
from tests.support.metrics import metric
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.polling import wait_for
from tests.support.redis_server import RedisServer
from tests.support.servers import Server, start_emulator, start_proxy
from tests.support.stall import healthz_stall_during

KEY = "sk-summary-team"
BUDGET = 300
CHAT = "POST /api/chat"
SYSTEM = {"role": "system", "content": "You answer briefly."}
CALL = {"role": "assistant", "content": "",
        "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}
RESULT = {"role": "tool", "content": "Oslo: 4 degrees and rain."}
TENANTS = [{"name": "team", "keys": [KEY]}, {"name": "summaries", "keys": ["sk-summaries-unused"]}]


def _turn(i: int) -> dict[str, str]:
    role = "user" if i % 2 == 0 else "assistant"
    return {"role": role, "content": f"turn {i}: " + "lorem ipsum dolor sit amet " * 6}


def _history(turns: int) -> list[dict[str, Any]]:
    return [SYSTEM, *(_turn(i) for i in range(turns)), CALL, RESULT,
            {"role": "user", "content": "And what should I wear?"}]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_emulator(tmp_path_factory.mktemp("summary-emu"), name="summary-emu",
                            decode_tokens_per_s=2000, load_s=0)
    yield server
    server.stop()


def _plugin(**overrides: Any) -> dict[str, Any]:
    return {"name": "summarize_history", "model": "qwen3", "budget_tokens": BUDGET,
            "keep_last_turns": 2, "summary_max_tokens": 24, "tenant": "summaries",
            "time_budget_s": 20, **overrides}


def _proxy(tmp: Path, emulator: Server, name: str, plugins: list[dict[str, Any]],
           **config: Any) -> Server:
    return start_proxy(tmp, [emulator.url], {"tenants": TENANTS, "plugins": plugins, **config},
                       name=name)


def _chat(proxy: Server, messages: list[dict[str, Any]]) -> httpx.Response:
    reply = httpx.post(f"{proxy.url}/api/chat", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                       json={"model": "llama3.2", "messages": messages, "stream": False,
                             "options": {"num_predict": 1}})
    assert reply.status_code == 200, reply.text
    return reply


def _chats(emulator: Server) -> int:
    return int(emulator.stats()["requests"].get(CHAT, 0))


def _header(reply: httpx.Response, name: str) -> dict[str, int]:
    return {k: int(v) for k, v in (part.split("=") for part in reply.headers[name].split("; "))}


def _poll(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def _timed_out_then_cached(proxy: Server, messages: list[dict[str, Any]]) -> None:
    """After a request that fell back on the trim for want of time: the fallback is counted once, and
    the summary it stopped waiting for is finished in the background and cached for the next turn."""
    assert metric(proxy.url, "sop_summarize_history_fallbacks_total", reason="timeout") == 1
    _poll(lambda: "tenant=summaries" in proxy.log())
    later = _chat(proxy, messages)
    assert _header(later, "x-history-summarized")["cached"] == 1


def test_the_oldest_turns_become_one_cached_summary_and_the_next_turn_reuses_it(
        tmp_path: Path, emulator: Server) -> None:
    proxy = _proxy(tmp_path, emulator, "summary", [_plugin()])
    try:
        messages = _history(10)
        chats = _chats(emulator)
        first = _chat(proxy, messages)
        summarized = _header(first, "x-history-summarized")
        # The 10 old turns (not the tool call and its result, not the last 2 groups) were summarized.
        assert summarized["turns"] == 10 and summarized["cached"] == 0 and summarized["tokens"] > 0
        received = first.json()["prompt_eval_count"]
        assert received <= BUDGET
        assert _chats(emulator) == chats + 2  # the summary's sub-request, then the chat itself
        # The summary was charged to the configured tenant, through the chain.
        wait_for(lambda: any('"POST /api/chat" 200' in line and "tenant=summaries" in line
                             for line in proxy.log().splitlines()), 10, "the summary's access line")
        # The same conversation again: the cached summary, nothing new upstream but the chat.
        again = _chat(proxy, messages)
        assert _header(again, "x-history-summarized") == {**summarized, "cached": 1}
        assert again.json()["prompt_eval_count"] == received
        assert _chats(emulator) == chats + 3
        # The next turn: two more messages. The same 10 turns are summarized (the prefix the replica
        # saw stays the same), from the cache.
        longer = [*messages, {"role": "assistant", "content": "A raincoat."},
                  {"role": "user", "content": "And shoes?"}]
        next_turn = _chat(proxy, longer)
        assert _header(next_turn, "x-history-summarized")["cached"] == 1
        assert _header(next_turn, "x-history-summarized")["turns"] == 10
        assert _chats(emulator) == chats + 4
        assert metric(proxy.url, "sop_summarize_history_cache_hits_total") == 2
        assert metric(proxy.url, "sop_summarize_history_tokens_saved_total") > 0
        # A small chat costs nothing: no header, no sub-request.
        small = _chat(proxy, [{"role": "user", "content": "hi"}])
        assert "x-history-summarized" not in small.headers and _chats(emulator) == chats + 5
    finally:
        proxy.stop()


def test_a_slow_summary_falls_back_to_trimming_and_finishes_in_the_background(
        tmp_path: Path) -> None:
    slow = start_emulator(tmp_path, name="summary-slow", decode_tokens_per_s=20, load_s=0)
    proxy = _proxy(tmp_path, slow, "summary-slow", [_plugin(time_budget_s=0.2, summary_max_tokens=30)])
    try:
        messages = _history(10)
        first = _chat(proxy, messages)
        assert "x-history-summarized" not in first.headers
        assert _header(first, "x-history-trimmed")["turns"] > 0
        assert first.json()["prompt_eval_count"] <= BUDGET
        _timed_out_then_cached(proxy, messages)
    finally:
        proxy.stop()
        slow.stop()


def test_no_summary_is_written_when_none_can_make_the_prompt_fit(tmp_path: Path,
                                                                  emulator: Server) -> None:
    """An agent loop whose tool result alone is over the budget (tool calls and results are always kept):
    no summary of the older turns can make the prompt fit. It is trimmed at once, without a summary
    sub-request; before, every such request (the same one again too) had a summary written, and waited
    for it, only to fall back to the trim (the second one a summary of the first)."""
    proxy = _proxy(tmp_path, emulator, "summary-hopeless", [_plugin()])
    try:
        big = {"role": "tool", "content": "result " + "lorem ipsum dolor sit amet " * 80}
        messages = [SYSTEM, *(_turn(i) for i in range(8)), CALL, big, {"role": "user", "content": "So?"}]
        chats = _chats(emulator)
        for _ in range(2):
            reply = _chat(proxy, messages)
            assert "x-history-summarized" not in reply.headers
            assert _header(reply, "x-history-trimmed")["turns"] == 8
        assert _chats(emulator) == chats + 2  # the chats themselves, no summary
        assert metric(proxy.url, "sop_summarize_history_fallbacks_total", reason="too_long") == 2
        assert "tenant=summaries" not in proxy.log()
    finally:
        proxy.stop()


def test_an_unknown_summary_model_fails_open_to_a_trim(tmp_path: Path, emulator: Server) -> None:
    proxy = _proxy(tmp_path, emulator, "summary-missing", [_plugin(model="no-such-model")])
    try:
        reply = _chat(proxy, _history(10))
        assert "x-history-summarized" not in reply.headers
        assert _header(reply, "x-history-trimmed")["turns"] > 0
        assert metric(proxy.url, "sop_summarize_history_fallbacks_total", reason="failed") == 1
    finally:
        proxy.stop()


def test_generate_keeps_the_question_and_summarizes_the_front(tmp_path: Path, emulator: Server) -> None:
    proxy = _proxy(tmp_path, emulator, "summary-generate", [_plugin(generate_tail_tokens=40)])
    try:
        question = "Question: which clause covers renewal?"
        prompt = "Contract text. " * 300 + "\n\n" + question
        reply = httpx.post(f"{proxy.url}/api/generate", headers={"Authorization": f"Bearer {KEY}"},
                           timeout=60, json={"model": "llama3.2", "prompt": prompt, "stream": False,
                                             "options": {"num_predict": 1}})
        assert reply.status_code == 200, reply.text
        assert reply.json()["prompt_eval_count"] <= BUDGET
        header = _header(reply, "x-history-summarized")
        assert header["turns"] == 1 and header["cached"] == 0 and header["tokens"] > 500
    finally:
        proxy.stop()


def test_limits_prompt_policy_summarize_uses_the_summarizer_or_truncates_without_it(
        tmp_path: Path, emulator: Server) -> None:
    limits = {"chain": {"limits": {"max_prompt_tokens": BUDGET, "prompt_policy": "summarize"}}}
    with_plugin = _proxy(tmp_path, emulator, "summary-limits", [_plugin(budget_tokens=None)], **limits)
    without = _proxy(tmp_path, emulator, "summary-limits-none", [], **limits)
    try:
        summarized = _chat(with_plugin, _history(10))
        assert _header(summarized, "x-history-summarized")["turns"] == 10
        assert summarized.json()["prompt_eval_count"] <= BUDGET
        # Small prompts never reach the summarizer (the plugin itself has no budget).
        assert "x-history-summarized" not in _chat(with_plugin, _history(1)).headers
        truncated = _chat(without, _history(10))
        assert "x-prompt-truncated" in truncated.headers
        assert truncated.json()["prompt_eval_count"] <= BUDGET
    finally:
        with_plugin.stop()
        without.stop()


def test_limits_summarize_leaves_a_tenant_outside_its_rollout_alone(tmp_path: Path,
                                                                     emulator: Server) -> None:
    """limits in enforce mode with `prompt_policy: summarize` under a rollout that enforces for nobody
    (enforce_share 0): every tenant is in shadow, so an over-long history is only reported
    (X-Shadow-Decision limits=summarize, `shadow_summarize`) and reaches the model whole."""
    proxy = _proxy(tmp_path, emulator, "summary-rollout", [_plugin(budget_tokens=None)], chain={"limits": {
        "max_prompt_tokens": BUDGET, "prompt_policy": "summarize",
        "rollout": {"enforce_share": 0.0, "tenants": []}}})
    try:
        before = _chats(emulator)
        reply = _chat(proxy, _history(10))
        assert "x-history-summarized" not in reply.headers
        assert reply.headers["x-shadow-decision"] == "limits=summarize"
        assert reply.json()["prompt_eval_count"] > BUDGET  # the history as the client sent it
        assert _chats(emulator) == before + 1  # no summary sub-request
        assert metric(proxy.url, "sop_limits_decisions_total", decision="shadow_summarize") == 1
        assert metric(proxy.url, "sop_limits_decisions_total", decision="summarized") is None
    finally:
        proxy.stop()


def test_no_summary_is_written_from_an_empty_transcript(tmp_path: Path, emulator: Server) -> None:
    """A limit smaller than the summarizer's instruction leaves no room for any of the conversation in the
    summary's request: no summary (a trim), where the model was asked to summarize an empty transcript
    and what it made up replaced the turns."""
    # The caller's own limit (the summaries tenant has none: the summary's request is not refused).
    tenants = [{"name": "team", "keys": [KEY], "max_prompt_tokens": 45},
               {"name": "summaries", "keys": ["sk-summaries-unused"]}]
    proxy = _proxy(tmp_path, emulator, "summary-no-room", [_plugin(budget_tokens=None, keep_last_turns=1)],
                   tenants=tenants, chain={"limits": {"prompt_policy": "summarize"}})
    try:
        messages = [*({"role": "user" if i % 2 == 0 else "assistant",
                       "content": f"turn {i}: my name is Bob and I like {i} apples"} for i in range(6)),
                    {"role": "user", "content": "What is my name?"}]
        reply = _chat(proxy, messages)
        assert "x-history-summarized" not in reply.headers
        assert _header(reply, "x-history-trimmed")["turns"] > 0
        assert reply.json()["prompt_eval_count"] <= 45
        assert metric(proxy.url, "sop_summarize_history_fallbacks_total", reason="failed") == 1
        assert "tenant=summaries" not in proxy.log()
    finally:
        proxy.stop()


def test_redis_shares_summaries_between_proxies_and_its_failure_falls_back_to_memory(
        tmp_path: Path, emulator: Server) -> None:
    redis = RedisServer(tmp_path)
    plugin = _plugin(redis_url=redis.url)
    one = _proxy(tmp_path, emulator, "summary-redis-1", [plugin])
    two = _proxy(tmp_path, emulator, "summary-redis-2", [plugin])
    try:
        messages = _history(12)
        assert _header(_chat(one, messages), "x-history-summarized")["cached"] == 0
        chats = _chats(emulator)
        shared = _chat(two, messages)
        assert _header(shared, "x-history-summarized")["cached"] == 1
        assert _chats(emulator) == chats + 1  # no summary written by the second proxy
        redis.kill()
        other = [{**m, "content": "another conversation, " + m["content"]} if m["role"] != "system"
                 else m for m in _history(12)]
        assert _header(_chat(two, other), "x-history-summarized")["cached"] == 0
        assert _header(_chat(two, other), "x-history-summarized")["cached"] == 1  # from memory
        assert "Redis unavailable" in two.log()
    finally:
        one.stop()
        two.stop()
        redis.stop()


def test_the_summary_span_holds_the_subrequests_client_span(tmp_path: Path, emulator: Server) -> None:
    with OtlpReceiver() as receiver:
        proxy = _proxy(tmp_path, emulator, "summary-otlp", [_plugin()], telemetry={
            "otlp_endpoint": receiver.url, "otlp_protocol": "http/protobuf"})
        try:
            _chat(proxy, _history(10))

            def spans() -> list[Any]:
                return receiver.spans()

            _poll(lambda: any(s.name == "sop.summarize_history.summary" for s in spans())
                  and sum(s.name == "chat qwen3" for s in spans()) >= 1)
            summary = next(s for s in spans() if s.name == "sop.summarize_history.summary")
            by_id = {s.span_id: s for s in spans()}
            client = next(s for s in spans() if s.name == "chat qwen3")
            # Walk up from the sub-request's CLIENT span: it reaches the summary span, in one trace.
            parent, seen = client, 0
            while parent.parent_span_id and parent.span_id != summary.span_id and seen < 20:
                parent, seen = by_id[parent.parent_span_id], seen + 1
            assert parent.span_id == summary.span_id
            assert client.trace_id == summary.trace_id
            root = next(s for s in spans() if s.name == "POST /api/chat"
                        and s.span_id == summary.parent_span_id)
            attributes = {kv.key for kv in root.attributes}
            assert {"sop.summarize_history.turns", "sop.summarize_history.tokens_saved",
                    "sop.summarize_history.cached"} <= attributes
        finally:
            proxy.stop()


def test_the_official_client_streams_a_summarized_chat_and_shadow_mode_changes_nothing(
        tmp_path: Path, emulator: Server) -> None:
    import ollama

    proxy = _proxy(tmp_path, emulator, "summary-client", [_plugin()])
    shadow = _proxy(tmp_path, emulator, "summary-shadow", [_plugin(mode="shadow")])
    try:
        client = ollama.Client(host=proxy.url, headers={"Authorization": f"Bearer {KEY}"})
        parts = list(client.chat(model="llama3.2", messages=_history(10), stream=True,
                                 options={"num_predict": 3}))
        assert parts[-1].done and parts[-1].prompt_eval_count is not None
        assert parts[-1].prompt_eval_count <= BUDGET
        full = _chat(shadow, _history(10))
        assert full.headers["x-shadow-decision"] == "summarize_history=summarized"
        assert "x-history-summarized" not in full.headers
        assert full.json()["prompt_eval_count"] > BUDGET  # the replica got the whole history
    finally:
        proxy.stop()
        shadow.stop()


def test_configuration_is_validated_with_the_key_path() -> None:
    from proxy.config import ConfigError, structure

    def refused(entry: dict[str, Any]) -> str:
        with pytest.raises(ConfigError) as caught:
            structure({"plugins": [entry]})
        return str(caught.value)

    assert "plugins[0].budget_tokens" in refused(_plugin(budget_tokens=0))
    assert "plugins[0]" in refused(_plugin(no_such_key=1))
    assert "plugins[0]" in refused({"name": "summarize_history"})  # `model` is required
    assert "plugins[0].redis_url" in refused(_plugin(redis_url="http://not-redis"))
    assert "plugins[0].relevance.keep" in refused({"name": "trim_history",
                                                   "relevance": {"model": "m", "keep": 0}})
    assert "plugins[0].tenant: unknown tenant 'summaries'" in refused(_plugin())
    config = structure({"chain": {"limits": {"prompt_policy": "summarize"}},
                        "models": {"llama3.2": {"prompt_policy": "summarize"}},
                        "tenants": [{"name": "summaries", "keys": ["sk-summaries-000001"]}],
                        "plugins": [_plugin(budget_tokens=None)]})
    assert config.chain.limits.prompt_policy == "summarize"


def test_a_client_that_leaves_loses_nothing_and_background_work_is_bounded(tmp_path: Path) -> None:
    slow = start_emulator(tmp_path, name="summary-bounded", decode_tokens_per_s=20, load_s=0)
    proxy = _proxy(tmp_path, slow, "summary-bounded",
                   [_plugin(time_budget_s=30, summary_max_tokens=30, max_background_jobs=1)])
    try:
        messages = _history(10)
        # The client gives up while its summary is being written (the request is cancelled).
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{proxy.url}/api/chat", headers={"Authorization": f"Bearer {KEY}"},
                       timeout=0.5, json={"model": "llama3.2", "messages": messages, "stream": False})
        # Meanwhile the one background job is taken: another conversation is trimmed at once.
        other = [{**m, "content": "other " + m["content"]} if m["role"] == "user" else m
                 for m in messages]
        busy = _chat(proxy, other)
        assert "x-history-summarized" not in busy.headers and "x-history-trimmed" in busy.headers
        assert metric(proxy.url, "sop_summarize_history_fallbacks_total", reason="busy") == 1
        # The summary the first client left behind is finished and cached for its next turn.
        _poll(lambda: "tenant=summaries" in proxy.log())
        later = _chat(proxy, messages)
        assert _header(later, "x-history-summarized")["cached"] == 1
    finally:
        proxy.stop()
        slow.stop()


def test_the_subrequest_credential_never_follows_a_redirect(tmp_path: Path) -> None:
    """A replica answering the summary's sub-request with a 307 to another origin: the proxy relays it
    (transparent), and the sub-request stops there. Following it would hand the internal credential,
    which names any tenant, to that origin."""
    from aiohttp import web

    from tests.support.threaded import ThreadedApp

    caught: list[dict[str, str]] = []

    async def catch(request: web.Request) -> web.Response:
        caught.append(dict(request.headers))
        return web.json_response({})

    catcher = web.Application()
    catcher.router.add_route("*", "/{tail:.*}", catch)
    with ThreadedApp(catcher) as elsewhere:
        async def replica_route(request: web.Request) -> web.Response:
            if request.path == "/api/tags":
                return web.json_response({"models": [{"name": n, "model": n, "digest": "d"}
                                                      for n in ("llama3.2:latest", "qwen3:latest")]})
            if request.path in ("/api/ps", "/api/version"):
                return web.json_response({"models": [], "version": "0.12.0"})
            body = await request.json()
            if request.path == "/api/chat" and body.get("model") == "qwen3":  # the summary: elsewhere
                raise web.HTTPTemporaryRedirect(f"{elsewhere.url}/api/chat")
            return web.json_response({"model": body.get("model"), "done": True, "prompt_eval_count": 5,
                                      "eval_count": 1,
                                      "message": {"role": "assistant", "content": "ok"}})

        replica = web.Application()
        replica.router.add_route("*", "/{tail:.*}", replica_route)
        with ThreadedApp(replica) as upstream:
            proxy = start_proxy(tmp_path, [upstream.url], {"tenants": TENANTS,
                                                           "plugins": [_plugin(time_budget_s=5)]},
                                name="redirect")
            try:
                wait_for(lambda: "-> healthy" in proxy.log(), what="the first probe")
                _chat(proxy, _history(10))  # answered all the same (the summary fails open)
            finally:
                proxy.stop()
    assert caught == [], caught


def test_a_tenant_gets_no_summary_another_tenant_paid_for(tmp_path: Path, emulator: Server) -> None:
    """Summaries are kept per tenant (`cache_scope: tenant`, the default): a conversation another
    tenant sent is no cache hit, so `cached=1` (or a fast answer) cannot tell anyone what it held."""
    rival = "sk-summary-rival"
    proxy = start_proxy(tmp_path, [emulator.url], {
        "tenants": [*TENANTS, {"name": "rival", "keys": [rival]}], "plugins": [_plugin()]},
        name="scoped")
    try:
        messages = _history(10)
        assert _header(_chat(proxy, messages), "x-history-summarized")["cached"] == 0
        assert _header(_chat(proxy, messages), "x-history-summarized")["cached"] == 1
        other = httpx.post(f"{proxy.url}/api/chat", headers={"Authorization": f"Bearer {rival}"},
                           timeout=60, json={"model": "llama3.2", "messages": messages,
                                             "stream": False, "options": {"num_predict": 1}})
        assert other.status_code == 200, other.text
        assert _header(other, "x-history-summarized")["cached"] == 0
    finally:
        proxy.stop()


def test_a_large_chat_is_counted_off_the_event_loop(tmp_path: Path, emulator: Server) -> None:
    """Counting and hashing megabytes of history takes about a second: in a worker thread (as limits
    counts), so the process answers others meanwhile (/healthz here), where it stalled for it."""
    proxy = _proxy(tmp_path, emulator, "summary-large", [_plugin(keep_last_turns=1)])
    try:
        history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}: " + "z " * 5000}
                   for i in range(600)]  # about 6 MB, 3 million tokens
        body = gojson.dumps({"model": "llama3.2", "stream": False, "options": {"num_predict": 1},
                             "messages": [*history, {"role": "user", "content": "So?"}]})
        worst, summarized = healthz_stall_during(proxy.url, "/api/chat", body, KEY,
                                                 "x-history-summarized", 3)
        assert all(header.startswith("turns=") for header in summarized), summarized
        assert worst < 0.8, worst  # stalled for 1.25-1.45 s per request on the event loop
    finally:
        proxy.stop()


def test_a_deadline_shorter_than_the_time_budget_bounds_the_wait_for_a_summary(tmp_path: Path) -> None:
    """A client's X-Deadline-S below `time_budget_s`: the request stops waiting for its summary at its
    deadline and falls back to the trim (the forwarder then answers the deadline's 504 at once), and the
    summary goes on in the background. (Before: the plugin runner cut the wait off a second past the
    deadline, the 504 came that late and no fallback was counted.)"""
    slow = start_emulator(tmp_path, name="summary-deadline", decode_tokens_per_s=20, load_s=0)
    proxy = _proxy(tmp_path, slow, "summary-deadline",
                   [_plugin(time_budget_s=30, summary_max_tokens=60)])
    try:
        messages = _history(10)
        started = time.monotonic()
        reply = httpx.post(f"{proxy.url}/api/chat", timeout=30,
                           headers={"Authorization": f"Bearer {KEY}", "X-Deadline-S": "1"},
                           json={"model": "llama3.2", "messages": messages, "stream": False})
        elapsed = time.monotonic() - started
        assert reply.status_code == 504, reply.text
        assert reply.json()["code"] == "upstream_response_timeout"
        assert "in plugin" not in reply.json()["error"]
        assert elapsed < 1.8, elapsed  # the runner's cut-off comes a whole second after the deadline
        _timed_out_then_cached(proxy, messages)
    finally:
        proxy.stop()
        slow.stop()


def test_a_trim_that_does_not_fit_is_truncated_further_not_replaced(tmp_path: Path,
                                                                   emulator: Server) -> None:
    """The turns kept verbatim (keep_last_turns) are over the limit by themselves: the summarizer trims
    what it may (X-History-Trimmed) and limits truncates on from there. It truncated the client's own
    body again instead, so the trim was thrown away while its header stayed: the two headers claimed
    more turns dropped than the chat had."""
    long_turns = [{"role": "user" if i % 2 == 0 else "assistant",
                   "content": f"turn {i}: " + "lorem ipsum dolor sit amet " * 20} for i in range(8)]
    messages = [SYSTEM, *long_turns, {"role": "user", "content": "And what should I wear?"}]
    limits = {"chain": {"limits": {"max_prompt_tokens": BUDGET, "prompt_policy": "summarize"}}}
    proxy = _proxy(tmp_path, emulator, "summary-limits-trim",
                   [_plugin(budget_tokens=None, keep_last_turns=4)], **limits)
    try:
        reply = _chat(proxy, messages)
        trimmed = _header(reply, "x-history-trimmed")["turns"]
        truncated = re.fullmatch(r"dropped (\d+) oldest message\(s\)", reply.headers["x-prompt-truncated"])
        assert truncated is not None and trimmed >= 1, reply.headers
        assert trimmed + int(truncated.group(1)) <= len(long_turns), reply.headers
        assert reply.json()["prompt_eval_count"] <= BUDGET
    finally:
        proxy.stop()
