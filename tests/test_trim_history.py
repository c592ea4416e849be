"""trim_history in a real proxy (CLI, `plugins:` configured) in front of the emulator: the native and /v1
chat routes are trimmed to the budget, counted with the model's tokenizer (the replica's own
prompt_eval_count proves what it received), system prompts and tool calls with their results kept,
relevance by embeddings computed on the fleet and cached, and a small chat costs nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy import gojson
from proxy.tokens import SentencePieceTokenizer
from tests.support.metrics import metric
from tests.support.polling import wait_for
from tests.support.servers import Server, start_emulator, start_proxy
from tests.support.stall import healthz_stall_during

KEY = "sk-trim-team"
BUDGET = 300
EMBED = "POST /api/embed"
SYSTEM = {"role": "system", "content": "You answer briefly."}
CALL = {"role": "assistant", "content": "",
        "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}
RESULT = {"role": "tool", "content": "Oslo: 4 degrees and rain."}
TOKENIZER = SentencePieceTokenizer.from_file(
    Path(__file__).resolve().parent.parent / "proxy" / "emulator" / "data" / "emulator.model")
CALL_TOKENS = TOKENIZER.count(gojson.dumps(CALL["tool_calls"]).decode())
"""The emulator's template does not render tool calls, real templates do and the proxy counts them:
what the replica's prompt_eval_count lacks for a prompt holding CALL."""


def _turn(i: int) -> dict[str, str]:
    role = "user" if i % 2 == 0 else "assistant"
    return {"role": role, "content": f"turn {i}: " + "lorem ipsum dolor sit amet " * 6}


def _history(turns: int) -> list[dict[str, Any]]:
    """System, two old turns, a tool call with its result, then `turns` long turns, then a question."""
    return [SYSTEM, _turn(0), _turn(1), CALL, RESULT, *(_turn(i) for i in range(2, 2 + turns)),
            {"role": "user", "content": "And what should I wear?"}]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_emulator(tmp_path_factory.mktemp("trim-emu"), name="trim-emu")
    yield server
    server.stop()


def _proxy(tmp: Path, emulator: Server, plugin: dict[str, Any], name: str) -> Server:
    return start_proxy(tmp, [emulator.url], {
        "tenants": [{"name": "team", "keys": [KEY]}],
        "plugins": [{"name": "trim_history", **plugin}]}, name=name)


def _direct_count(emulator: Server, messages: list[dict[str, Any]]) -> int:
    reply = httpx.post(f"{emulator.url}/api/chat", timeout=30, json={
        "model": "llama3.2", "messages": messages, "stream": False, "options": {"num_predict": 1}})
    assert reply.status_code == 200, reply.text
    return int(reply.json()["prompt_eval_count"])


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, emulator: Server) -> Iterator[Server]:
    server = _proxy(tmp_path_factory.mktemp("trim"), emulator, {"budget_tokens": BUDGET}, "trim")
    yield server
    server.stop()


def _expected(messages: list[dict[str, Any]], emulator: Server,
              also: tuple[dict[str, Any], ...] = ()) -> list[dict[str, Any]]:
    """What the plugin must keep, computed from the replica's own counts (not from the plugin's code):
    system, the tool call and its result, the question (and `also`), then the newest turns while the
    whole fits."""
    pinned = {id(m) for m in (messages[0], CALL, RESULT, messages[-1], *also)}
    turns = [m for m in messages[1:-1] if id(m) not in pinned]
    kept: set[int] = set()
    for turn in reversed(turns):
        ordered = [m for m in messages if id(m) in pinned | kept | {id(turn)}]
        if _direct_count(emulator, ordered) + (CALL_TOKENS if CALL in ordered else 0) > BUDGET:
            break
        kept.add(id(turn))
    return [m for m in messages if id(m) in pinned | kept]


def test_native_chat_is_trimmed_to_the_budget_keeping_system_and_tool_results(
        proxy: Server, emulator: Server) -> None:
    messages = _history(8)
    full = _direct_count(emulator, messages)
    assert full > BUDGET
    expected = _expected(messages, emulator)
    reply = httpx.post(f"{proxy.url}/api/chat", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                       json={"model": "llama3.2", "messages": messages, "stream": False,
                             "options": {"num_predict": 1}})
    assert reply.status_code == 200, reply.text
    received = reply.json()["prompt_eval_count"]
    assert received == _direct_count(emulator, expected) <= BUDGET - CALL_TOKENS
    dropped = len(messages) - len(expected)
    assert reply.headers["x-history-trimmed"] == f"turns={dropped}; tokens={full - received}"
    assert CALL in expected and RESULT in expected  # never separated, never dropped


def test_roles_are_read_as_ollama_reads_them_in_any_case(proxy: Server, emulator: Server) -> None:
    """Ollama lower-cases a message's role (api.Message's decoding): `System` is the system prompt, `Tool`
    a tool result, `User` the question. Kept as their lower-case spelling is; before, they were turns
    like any other, so the system prompt was dropped and a tool call separated from its result."""
    messages = _history(8)
    expected = _expected(messages, emulator)

    def spelled(message: dict[str, Any]) -> dict[str, Any]:
        return {**message, "role": message["role"].capitalize() if message["role"] != "assistant"
                else "ASSISTANT"}

    shouting = [spelled(m) for m in messages]
    reply = httpx.post(f"{proxy.url}/api/chat", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                       json={"model": "llama3.2", "messages": shouting, "stream": False,
                             "options": {"num_predict": 1}})
    assert reply.status_code == 200, reply.text
    full = _direct_count(emulator, messages)
    received = reply.json()["prompt_eval_count"]
    assert received == _direct_count(emulator, expected)
    assert reply.headers["x-history-trimmed"] == \
        f"turns={len(messages) - len(expected)}; tokens={full - received}"


def test_openai_chat_is_trimmed_and_a_small_chat_is_left_alone(proxy: Server, emulator: Server) -> None:
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=KEY, max_retries=0)
    messages: list[Any] = [m for m in _history(8) if m not in (CALL, RESULT)]
    full = _direct_count(emulator, messages)
    raw = client.chat.completions.with_raw_response.create(model="llama3.2", messages=messages,
                                                           max_tokens=1)
    completion = raw.parse()
    assert completion.usage is not None
    assert completion.usage.prompt_tokens <= BUDGET
    turns, saved = raw.headers["x-history-trimmed"].split("; ")
    assert int(turns.removeprefix("turns=")) > 0
    assert int(saved.removeprefix("tokens=")) == full - completion.usage.prompt_tokens
    small = client.chat.completions.with_raw_response.create(
        model="llama3.2", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert "x-history-trimmed" not in small.headers
    assert metric(proxy.url, "sop_plugin_trim_history_decisions_total", decision="pass") >= 1
    assert metric(proxy.url, "sop_plugin_trim_history_decisions_total", decision="trimmed") >= 1


def test_anthropic_messages_keep_the_top_level_system_prompt(proxy: Server) -> None:
    messages = [m for m in _history(8) if m not in (SYSTEM, CALL, RESULT)]
    reply = httpx.post(f"{proxy.url}/v1/messages", timeout=30,
                       headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
                       json={"model": "llama3.2", "max_tokens": 1, "system": "You answer briefly.",
                             "messages": messages})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["input_tokens"] <= BUDGET
    assert reply.headers["x-history-trimmed"].startswith("turns=")


def test_relevance_keeps_the_older_turn_that_matches_the_question(tmp_path: Path,
                                                                   emulator: Server) -> None:
    proxy = _proxy(tmp_path, emulator, {"budget_tokens": BUDGET, "relevance": {
        "model": "nomic-embed-text", "keep": 1}}, "trim-relevance")
    try:
        question = "Where did we leave the blue umbrella?"
        messages = [SYSTEM, {"role": "user", "content": question}, *(_turn(i) for i in range(1, 10)),
                    {"role": "user", "content": question}]
        before = emulator.stats()["requests"]
        first = httpx.post(f"{proxy.url}/api/chat", headers={"Authorization": f"Bearer {KEY}"},
                           timeout=30, json={"model": "llama3.2", "messages": messages,
                                             "stream": False, "options": {"num_predict": 1}})
        assert first.status_code == 200, first.text
        assert first.headers["x-history-trimmed"].startswith("turns=")
        # The old turn identical to the question scores highest and is kept; the replica got it.
        received = first.json()["prompt_eval_count"]
        with_relevant = _expected(messages, emulator, also=(messages[1],))
        by_recency = _expected(messages, emulator)
        assert received == _direct_count(emulator, with_relevant) <= BUDGET
        assert received != _direct_count(emulator, by_recency)
        after_first = emulator.stats()["requests"]
        embeds = after_first.get(EMBED, 0) - before.get(EMBED, 0)
        assert embeds == 1  # one batch sub-request, through the chain
        second = httpx.post(f"{proxy.url}/api/chat", headers={"Authorization": f"Bearer {KEY}"},
                            timeout=30, json={"model": "llama3.2", "messages": messages,
                                              "stream": False, "options": {"num_predict": 1}})
        assert second.json()["prompt_eval_count"] == received
        assert emulator.stats()["requests"].get(EMBED, 0) == after_first.get(EMBED, 0)
        assert 'POST /api/embed" 200' in proxy.log() and "tenant=team" in proxy.log()
    finally:
        proxy.stop()


def test_names_the_fleet_lacks_cost_no_lookup_and_reach_the_log_escaped(tmp_path: Path,
                                                                        emulator: Server) -> None:
    """The plugin asks for the model's tokenizer as limits does: a name no replica has gets the
    estimate, without an /api/show to a replica (a client cannot make the proxy query the fleet per
    random name) and without a log line carrying the name as sent."""
    proxy = _proxy(tmp_path, emulator, {"name": "trim_history", "budget_tokens": 50}, "unknown")
    try:
        # Once the first probe listed the replica's models (before it, any name may be real).
        wait_for(lambda: "-> healthy" in proxy.log(), what="the first probe")
        shows = emulator.stats()["requests"].get("POST /api/show", 0)
        forged = "nosuch\n2026-12-03 07:00:00,000 INFO proxy.access FORGED tenant=admin \x1b[31m"
        for model in (forged, *(f"random-{i}" for i in range(5))):
            httpx.post(f"{proxy.url}/api/chat", headers={"Authorization": f"Bearer {KEY}"},
                       timeout=30, json={"model": model, "stream": False,
                                         "messages": [{"role": "user", "content": "hello " * 100}]})
        assert emulator.stats()["requests"].get("POST /api/show", 0) == shows
        log = proxy.log()
        assert not any(line.startswith("2026-12-03 07:00:00,000") for line in log.splitlines())
        assert "\x1b" not in log
    finally:
        proxy.stop()


def test_a_large_chat_is_counted_off_the_event_loop(proxy: Server) -> None:
    """Counting megabytes of history takes about a second: in a worker thread (as limits counts), so
    the process answers others meanwhile (/healthz here), where it stalled for the whole count."""
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}: " + "z " * 5000}
               for i in range(600)]  # about 6 MB, 3 million tokens
    body = gojson.dumps({"model": "llama3.2", "stream": False, "options": {"num_predict": 1},
                         "messages": [*history, {"role": "user", "content": "So?"}]})
    worst, trimmed = healthz_stall_during(proxy.url, "/api/chat", body, KEY, "x-history-trimmed", 3)
    assert all(header.startswith("turns=600;") for header in trimmed), trimmed
    assert worst < 0.8, worst  # stalled for 1.25-1.45 s per request on the event loop


def test_the_question_of_a_tool_loop_is_kept(proxy: Server, emulator: Server) -> None:
    """In a tool loop the newest groups are a tool call and its result (always kept): the latest user
    message, the question they serve, stays too, also when what must be kept is alone over the
    budget (then only it is kept)."""
    question = {"role": "user", "content": "What is the total of the rows in the report?"}
    call = {"role": "assistant", "content": "",
            "tool_calls": [{"function": {"name": "fetch_report", "arguments": {}}}]}
    call_tokens = TOKENIZER.count(gojson.dumps(call["tool_calls"]).decode())

    def send(messages: list[dict[str, Any]]) -> httpx.Response:
        reply = httpx.post(f"{proxy.url}/api/chat", headers={"Authorization": f"Bearer {KEY}"},
                           timeout=30, json={"model": "llama3.2", "messages": messages, "stream": False,
                                             "options": {"num_predict": 1}})
        assert reply.status_code == 200, reply.text
        return reply

    # Older turns go, the question stays.
    result = {"role": "tool", "content": " ".join(f"row{i}" for i in range(60))}
    messages = [SYSTEM, *(_turn(i) for i in range(6)), question, call, result]
    assert _direct_count(emulator, messages) > BUDGET
    reply = send(messages)
    assert reply.headers["x-history-trimmed"].startswith("turns=")
    kept = [SYSTEM, question, call, result]
    assert reply.json()["prompt_eval_count"] >= _direct_count(emulator, kept)
    assert _direct_count(emulator, kept) + call_tokens <= BUDGET
    # The tool result alone is over the budget: what must be kept stays (the question with it), the
    # older turns go.
    result = {"role": "tool", "content": " ".join(f"row{i} value{i}" for i in range(200))}
    messages = [SYSTEM, _turn(0), _turn(1), question, call, result]
    kept = [SYSTEM, question, call, result]
    assert _direct_count(emulator, kept) > BUDGET
    reply = send(messages)
    assert reply.headers["x-history-trimmed"].startswith("turns=")
    assert reply.json()["prompt_eval_count"] == _direct_count(emulator, kept)


@pytest.mark.parametrize("scope", ["tenant", "shared"])
def test_relevance_embeddings_are_cached_per_tenant_unless_shared(tmp_path: Path, emulator: Server,
                                                                  scope: str) -> None:
    """Under `cache_scope: tenant` (the default) one tenant's cached turn embeddings do not serve
    another (whose trim would come faster, telling it what the first one's chats held); `shared`
    uses the same entries for all."""
    relevance: dict[str, Any] = {"model": "nomic-embed-text", "keep": 1}
    if scope == "shared":
        relevance["cache_scope"] = "shared"
    proxy = start_proxy(tmp_path, [emulator.url], {
        "tenants": [{"name": "team", "keys": [KEY]}, {"name": "other", "keys": ["sk-trim-other"]}],
        "plugins": [{"name": "trim_history", "budget_tokens": BUDGET, "relevance": relevance}]},
        name=f"trim-scope-{scope}")
    try:
        question = "Where did we leave the green bicycle?"
        messages = [SYSTEM, {"role": "user", "content": question}, *(_turn(i) for i in range(1, 10)),
                    {"role": "user", "content": question}]

        def chat(key: str) -> int:
            before = emulator.stats()["requests"].get(EMBED, 0)
            reply = httpx.post(f"{proxy.url}/api/chat", headers={"Authorization": f"Bearer {key}"},
                               timeout=30, json={"model": "llama3.2", "messages": messages,
                                                 "stream": False, "options": {"num_predict": 1}})
            assert reply.status_code == 200, reply.text
            assert reply.headers["x-history-trimmed"].startswith("turns=")
            return int(emulator.stats()["requests"].get(EMBED, 0) - before)

        assert chat(KEY) == 1
        assert chat(KEY) == 0  # cached for its own tenant
        assert chat("sk-trim-other") == (1 if scope == "tenant" else 0)
    finally:
        proxy.stop()


def test_a_deadline_shorter_than_the_relevance_timeout_bounds_the_wait_for_embeddings(
        tmp_path: Path, emulator: Server) -> None:
    """A client's X-Deadline-S below `relevance.timeout_s`, embeddings that never come: the trim stops
    waiting for them at the request's deadline and goes on by recency (the forwarder then answers the
    deadline's 504 at once). (Before: the plugin runner cut the wait off a second past the deadline, a
    late 504 'in plugin trim_history'.)"""
    proxy = _proxy(tmp_path, emulator, {"budget_tokens": BUDGET, "relevance": {
        "model": "nomic-embed-text", "keep": 1, "timeout_s": 30}}, "trim-relevance-deadline")
    try:
        hang = httpx.post(f"{emulator.url}/_emulator/faults",
                          json={"hang_before_headers": True, "count": 1, "paths": ["/api/embed"]})
        assert hang.status_code == 200, hang.text
        started = time.monotonic()
        reply = httpx.post(f"{proxy.url}/api/chat", timeout=30,
                           headers={"Authorization": f"Bearer {KEY}", "X-Deadline-S": "1"},
                           json={"model": "llama3.2", "messages": _history(12), "stream": False})
        elapsed = time.monotonic() - started
        assert reply.status_code == 504, reply.text
        assert reply.json()["code"] == "upstream_response_timeout"
        assert "in plugin" not in reply.json()["error"]
        assert elapsed < 1.8, elapsed  # the runner's cut-off comes a whole second after the deadline
    finally:
        httpx.delete(f"{emulator.url}/_emulator/faults")
        proxy.stop()
