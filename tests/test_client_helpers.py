"""shared-ollama-client (clients/python) with the real official clients: `ollama.Client` /
`ollama.AsyncClient` and the OpenAI SDK wrapped by its retrying transport, against the proxy answering 429
(a tenant's requests_per_minute) and 503 (backpressure's queue full) with Retry-After, and against a small
local server that answers exactly what the policy must handle (crafted 429/502/503/504, x-should-retry,
retry-after-ms, HTTP-date, long waits, a stream cut off mid-way, headers that never come). Attempts are
counted and timed below the helper by a recording inner transport. Also: X-Service-Limits, chunking with
the emulator's own tokenizer, ordered batched embedding, early stream exit cancelling upstream, and the
Python examples run as subprocesses against an emulated fleet behind the proxy."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import email.utils
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
from aiohttp import web
from shared_ollama_client import (
    AsyncRetryTransport,
    RetryPolicy,
    RetryTransport,
    aembed_documents,
    astream_chat,
    chunk_text,
    embed_documents,
    estimate_tokens,
    limits,
    stream_chat,
)

from proxy.emulator.vocabulary import MODEL_PATH
from proxy.tokens import SentencePieceTokenizer
from tests.support.servers import Server, free_port, start_emulator, start_proxy
from tests.support.threaded import ThreadedApp

ROOT = Path(__file__).resolve().parent.parent
ADMIN, BURST, SLOW_REFILL, SECRET = "sk-admin", "sk-burst", "sk-slow-refill", "sk-secret-key-123"
PROMPT = "a very private prompt"
CHAT_OK = {"model": "m", "created_at": "2026-01-01T00:00:00Z",
           "message": {"role": "assistant", "content": "hello"}, "done": True, "done_reason": "stop"}


# --- attempts recorded below the helper -------------------------------------------------------------

@dataclass
class Attempt:
    sent: float
    received: float
    status: int | None  # None: the attempt raised (connection failure, timeout)
    headers: dict[str, str] = field(default_factory=dict)


class Recorder(httpx.BaseTransport):
    """The real HTTP transport, with each attempt the retry transport makes written down."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.attempts: list[Attempt] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        sent = time.monotonic()
        try:
            response = self.inner.handle_request(request)
        except Exception:
            self.attempts.append(Attempt(sent, time.monotonic(), None))
            raise
        self.attempts.append(Attempt(sent, time.monotonic(), response.status_code,
                                     {k.lower(): v for k, v in response.headers.items()}))
        return response

    def close(self) -> None:
        self.inner.close()


class AsyncRecorder(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.attempts: list[Attempt] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        sent = time.monotonic()
        response = await self.inner.handle_async_request(request)
        self.attempts.append(Attempt(sent, time.monotonic(), response.status_code,
                                     {k.lower(): v for k, v in response.headers.items()}))
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def told_s(headers: dict[str, str]) -> float:
    """The wait a refusal asked for, read here independently of the helper."""
    if "retry-after-ms" in headers:
        return float(headers["retry-after-ms"]) / 1000
    return float(headers["retry-after"])


def assert_waited_as_told(attempts: list[Attempt]) -> None:
    """Every retry started no earlier than the answer before it said, and not absurdly later."""
    for before, after in itertools.pairwise(attempts):
        gap = after.sent - before.received
        told = told_s(before.headers)
        assert told <= gap <= told * 1.1 + 2.0, (told, gap, before.status)


# --- a local server answering exactly what a test scripts -------------------------------------------

Action = Callable[[web.Request], Awaitable[web.StreamResponse]]


def answer(status: int, body: dict[str, Any] | None = None, **headers: str) -> Action:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(body if body is not None else {"error": f"status {status}"},
                                 status=status, headers={k.replace("_", "-"): v for k, v in headers.items()})
    return handler


async def cut_stream(request: web.Request) -> web.StreamResponse:
    """A 200 NDJSON stream that breaks after its first line (the replica died mid-answer)."""
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    line = {**CHAT_OK, "done": False}
    line.pop("done_reason")
    await response.write(json.dumps(line).encode() + b"\n")
    await asyncio.sleep(0.1)
    assert request.transport is not None
    request.transport.close()
    return response


async def slow_headers(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(3)
    return web.json_response(CHAT_OK)


class Scripted:
    """Serves the scripted actions in turn (the last one repeats) and counts requests and bodies."""

    def __init__(self, *actions: Action) -> None:
        self.actions = list(actions)
        self.requests = 0
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.server = ThreadedApp(app)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.read())
        self.headers.append(dict(request.headers))
        action = self.actions[min(self.requests, len(self.actions) - 1)]
        self.requests += 1
        return await action(request)

    def __enter__(self) -> Scripted:
        self.server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__(*exc)

    @property
    def url(self) -> str:
        return self.server.url


def client(url: str, recorder: Recorder | None = None, **policy: Any) -> ollama.Client:
    transport = RetryTransport(recorder, policy=RetryPolicy(**policy))
    return ollama.Client(host=url, transport=transport, headers={"Authorization": f"Bearer {SECRET}"})


def chat(c: ollama.Client) -> ollama.ChatResponse:
    return c.chat(model="m", messages=[{"role": "user", "content": PROMPT}])


# --- the policy, precisely, against the scripted server ---------------------------------------------

def test_waits_as_told_then_succeeds(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="shared_ollama_client")
    recorder = Recorder()
    with Scripted(answer(429, Retry_After="1"), answer(200, CHAT_OK)) as server:
        result = chat(client(server.url, recorder))
        assert result.message.content == "hello" and server.requests == 2
        assert server.bodies[0] == server.bodies[1]  # the same body, sent again
    assert [a.status for a in recorder.attempts] == [429, 200]
    assert_waited_as_told(recorder.attempts)
    lines = [r.getMessage() for r in caplog.records if r.name == "shared_ollama_client"]
    assert len(lines) == 1 and lines[0].startswith("retrying POST /api/chat in 1.")
    assert "after status 429 (attempt 2 of 5)" in lines[0]
    assert SECRET not in caplog.text and PROMPT not in caplog.text


def test_retry_after_ms_first_then_http_date() -> None:
    recorder = Recorder()
    in_2s = email.utils.format_datetime(
        datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(seconds=2),
        usegmt=True)
    with Scripted(answer(503, Retry_After="5", retry_after_ms="300"),
                  answer(503, Retry_After=in_2s), answer(200, CHAT_OK)) as server:
        chat(client(server.url, recorder))
    assert [a.status for a in recorder.attempts] == [503, 503, 200]
    first_gap = recorder.attempts[1].sent - recorder.attempts[0].received
    assert 0.3 <= first_gap < 2.0  # retry-after-ms wins over Retry-After: 5
    second_gap = recorder.attempts[2].sent - recorder.attempts[1].received
    assert 0.5 <= second_gap < 4.0  # an HTTP date about 2 s ahead (whole seconds)


def test_gateway_errors_back_off_with_jitter_then_succeed() -> None:
    recorder = Recorder()
    with Scripted(answer(502), answer(504), answer(200, CHAT_OK)) as server:
        assert chat(client(server.url, recorder, backoff_base_s=0.2)).done
    assert [a.status for a in recorder.attempts] == [502, 504, 200]
    gaps = [b.sent - a.received for a, b in itertools.pairwise(recorder.attempts)]
    assert gaps[0] <= 0.2 + 0.5 and gaps[1] <= 0.4 + 0.5  # full jitter under 0.2 s, then 0.4 s


@pytest.mark.parametrize("timeout_retries", [1, 2])
def test_a_gateway_timeout_is_retried_once_by_default(timeout_retries: int) -> None:
    """A 504 may have kept a replica busy for the whole timeout: retried `max_timeout_retries` times
    (once by default), not `max_attempts` times."""
    recorder = Recorder()
    over = {} if timeout_retries == 1 else {"max_timeout_retries": timeout_retries}
    with Scripted(answer(504), answer(504), answer(200, CHAT_OK)) as server:
        if timeout_retries == 1:
            with pytest.raises(ollama.ResponseError) as refused:
                chat(client(server.url, recorder, backoff_base_s=0.05, **over))
            assert refused.value.status_code == 504
        else:
            assert chat(client(server.url, recorder, backoff_base_s=0.05, **over)).done
    assert [a.status for a in recorder.attempts] == [504, 504, 200][:timeout_retries + 1]
    with pytest.raises(ValueError, match="max_timeout_retries"):
        RetryPolicy(max_timeout_retries=-1)


@pytest.mark.parametrize("status", [400, 429, 503])
def test_should_retry_false_is_never_retried(status: int) -> None:
    body = {"error": "request needs 9000 tokens, more than the quota", "code": "quota_exceeded"}
    with Scripted(answer(status, body, x_should_retry="false"), answer(200, CHAT_OK)) as server:
        with pytest.raises(ollama.ResponseError) as refused:
            chat(client(server.url))
        assert server.requests == 1
    assert refused.value.status_code == status
    assert refused.value.error == "request needs 9000 tokens, more than the quota"


def test_other_statuses_are_not_retried() -> None:
    with Scripted(answer(500, {"error": "model runner crashed"}), answer(200, CHAT_OK)) as server:
        with pytest.raises(ollama.ResponseError, match="model runner crashed"):
            chat(client(server.url))
        assert server.requests == 1


def test_gives_up_after_max_attempts_with_a_readable_error() -> None:
    recorder = Recorder()
    body = {"error": "queue for llama3.2 is full", "code": "overload", "retry_after_s": 1}
    with Scripted(answer(503, body, retry_after_ms="100")) as server:
        started = time.monotonic()
        with pytest.raises(ollama.ResponseError) as refused:
            chat(client(server.url, recorder, max_attempts=3))
        assert server.requests == 3 and time.monotonic() - started < 5
    assert refused.value.status_code == 503 and refused.value.error == "queue for llama3.2 is full"
    assert_waited_as_told(recorder.attempts)


@pytest.mark.parametrize(("retry_after", "policy"), [
    ("120", {}),  # over the 60 s a client should ever sleep through
    ("10", {"max_total_s": 3.0}),  # longer than what is left of the budget
])
def test_long_waits_are_returned_at_once(retry_after: str, policy: dict[str, Any]) -> None:
    with Scripted(answer(429, {"error": "tenant t is over 3 requests per minute"},
                         Retry_After=retry_after)) as server:
        started = time.monotonic()
        with pytest.raises(ollama.ResponseError, match="over 3 requests per minute") as refused:
            chat(client(server.url, **policy))
        assert time.monotonic() - started < 2 and server.requests == 1
    assert refused.value.status_code == 429


def test_budget_bounds_the_total_time() -> None:
    with Scripted(answer(503, retry_after_ms="700")) as server:
        started = time.monotonic()
        with pytest.raises(ollama.ResponseError):
            chat(client(server.url, max_attempts=50, max_total_s=2.0))
        took = time.monotonic() - started
        # Waits of 0.7-0.77 s: a third wait would end after the 2 s budget, so it is not started (a slow
        # machine may stop after the first wait already); 50 attempts would take 35 s.
        assert server.requests in (2, 3) and 0.7 <= took < 2.0 + 1.0


def test_a_started_stream_is_never_retried() -> None:
    with Scripted(cut_stream, answer(200, CHAT_OK)) as server:
        stream = client(server.url).chat(model="m", messages=[{"role": "user", "content": "x"}],
                                         stream=True)
        with pytest.raises(httpx.HTTPError):
            list(stream)
        assert server.requests == 1


def test_a_read_timeout_is_never_retried() -> None:
    with Scripted(slow_headers) as server:
        c = ollama.Client(host=server.url, timeout=httpx.Timeout(5, read=0.5),
                          transport=RetryTransport())
        with pytest.raises(httpx.ReadTimeout):
            chat(c)
        time.sleep(0.2)
        assert server.requests == 1


def test_connection_refused_is_retried_then_surfaces(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="shared_ollama_client")
    recorder = Recorder()
    with pytest.raises(ConnectionError):  # ollama's own error for a connection failure
        chat(client(f"http://127.0.0.1:{free_port()}", recorder, max_attempts=3, backoff_base_s=0.05))
    assert [a.status for a in recorder.attempts] == [None, None, None]
    assert sum("after a connection failure" in r.getMessage() for r in caplog.records) == 2


def test_connection_refused_then_the_server_comes_up() -> None:
    port = free_port()
    app = web.Application()

    async def ok(request: web.Request) -> web.StreamResponse:
        return web.json_response(CHAT_OK)

    app.router.add_post("/api/chat", ok)
    server = ThreadedApp(app, port)  # the client must try the port before anything listens there
    timer = threading.Timer(0.5, server.__enter__)
    timer.start()
    try:
        assert chat(client(server.url, backoff_base_s=0.2, backoff_max_s=0.4, max_attempts=20)).done
    finally:
        timer.join()
        server.__exit__()


def test_a_body_that_cannot_be_replayed_is_not_retried() -> None:
    refused = answer(503, Retry_After="1")
    with (Scripted(refused, refused, answer(200, CHAT_OK)) as server,
          httpx.Client(base_url=server.url, transport=RetryTransport()) as plain):
        streamed = plain.post("/api/chat", content=iter([b'{"model":', b'"m"}']))
        assert streamed.status_code == 503 and server.requests == 1
        replayable = plain.post("/api/chat", content=b'{"model":"m"}')
        assert replayable.status_code == 200 and server.requests == 3


async def test_async_client_waits_as_told() -> None:
    recorder = AsyncRecorder()
    with Scripted(answer(429, Retry_After="1"), answer(200, CHAT_OK)) as server:
        c = ollama.AsyncClient(host=server.url, transport=AsyncRetryTransport(recorder))
        result = await c.chat(model="m", messages=[{"role": "user", "content": "x"}])
        assert result.message.content == "hello" and server.requests == 2
    assert_waited_as_told(recorder.attempts)


async def test_async_wait_is_cancellable() -> None:
    with Scripted(answer(503, Retry_After="30")) as server:
        c = ollama.AsyncClient(host=server.url, transport=AsyncRetryTransport())
        task = asyncio.ensure_future(c.chat(model="m", messages=[{"role": "user", "content": "x"}]))
        await asyncio.sleep(0.5)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 1 and server.requests == 1


# --- against the proxy ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("client-helpers")


@pytest.fixture(scope="module")
def fast(tmp: Path) -> Iterator[Server]:
    server = start_emulator(tmp, decode_tokens_per_s=400, name="helpers-emu")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def limited(tmp: Path, fast: Server) -> Iterator[Server]:
    """A proxy whose tenants have request rates: 60 a minute (1 s refill), 3 a minute (20 s refill)."""
    server = start_proxy(tmp, [fast.url], {
        "admin": {"keys": [ADMIN]},
        "tenants": [{"name": "burst", "keys": [BURST], "requests_per_minute": 60},
                    {"name": "slow-refill", "keys": [SLOW_REFILL], "requests_per_minute": 3}]},
        name="helpers-limited")
    yield server
    server.stop()


def exhaust(proxy: Server, key: str) -> None:
    """Use up the tenant's request bucket (cheap embeds) until the proxy refuses one."""
    with httpx.Client(base_url=proxy.url, headers={"Authorization": f"Bearer {key}"}) as plain:
        for _ in range(300):
            if plain.post("/api/embed", json={"model": "nomic-embed-text", "input": "x"}).status_code == 429:
                return
    raise AssertionError("the bucket never emptied")


def proxy_client(proxy: Server, key: str, recorder: Recorder | None = None, **policy: Any) -> ollama.Client:
    return ollama.Client(host=proxy.url, headers={"Authorization": f"Bearer {key}"},
                         transport=RetryTransport(recorder, policy=RetryPolicy(**policy)))


def until_refused(call: Callable[[], Any], recorder: Recorder) -> tuple[Any, list[Attempt]]:
    """Call through the helper faster than the bucket refills until a call meets a 429 (the helper then
    waits and succeeds): that call's result and attempts."""
    for _ in range(300):
        recorder.attempts.clear()
        result = call()
        if any(a.status == 429 for a in recorder.attempts):
            return result, list(recorder.attempts)
    raise AssertionError("never refused")


def test_proxy_rate_limit_waited_as_told(limited: Server) -> None:
    recorder = Recorder()
    c = proxy_client(limited, BURST, recorder)
    answer_, attempts = until_refused(
        lambda: c.generate(model="llama3.2", prompt="hello", options={"num_predict": 4}), recorder)
    assert answer_.done and answer_.eval_count == 4
    statuses = [a.status for a in attempts]
    assert statuses[0] == 429 and statuses[-1] == 200 and set(statuses) == {429, 200}
    assert_waited_as_told(attempts)
    assert told_s(attempts[0].headers) <= 1.0  # 60 a minute refills one a second
    seen = c._client._transport  # the transport keeps the latest X-Service-Limits
    assert isinstance(seen, RetryTransport) and seen.last_limits is not None
    assert seen.last_limits.version == 1 and seen.last_limits.requests_per_minute == 60


def test_proxy_refusal_longer_than_the_budget_is_readable_at_once(limited: Server) -> None:
    exhaust(limited, SLOW_REFILL)
    recorder = Recorder()
    started = time.monotonic()
    with pytest.raises(ollama.ResponseError) as refused:
        proxy_client(limited, SLOW_REFILL, recorder, max_total_s=5).generate(model="llama3.2", prompt="x")
    assert time.monotonic() - started < 3 and len(recorder.attempts) == 1
    assert told_s(recorder.attempts[0].headers) > 5  # 3 a minute: 20 s to refill one
    assert refused.value.status_code == 429
    assert refused.value.error == "tenant slow-refill is over 3 requests per minute"


def test_openai_sdk_through_the_helper(limited: Server) -> None:
    recorder = Recorder()
    sdk = openai.OpenAI(base_url=f"{limited.url}/v1", api_key=BURST, max_retries=0,
                        http_client=httpx.Client(transport=RetryTransport(recorder)))
    completion, attempts = until_refused(lambda: sdk.chat.completions.create(
        model="llama3.2", max_tokens=4, messages=[{"role": "user", "content": "hi"}]), recorder)
    assert completion.choices[0].message.content
    assert attempts[0].status == 429 and attempts[-1].status == 200
    assert_waited_as_told(attempts)

    exhaust(limited, SLOW_REFILL)
    strict = openai.OpenAI(base_url=f"{limited.url}/v1", api_key=SLOW_REFILL, max_retries=0,
                           http_client=httpx.Client(transport=RetryTransport(policy=RetryPolicy(
                               max_total_s=5))))
    with pytest.raises(openai.RateLimitError, match="over 3 requests per minute"):
        strict.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "hi"}])


@pytest.fixture(scope="module")
def slow(tmp: Path) -> Iterator[Server]:
    """One slot at 0.5 s per request."""
    server = start_emulator(tmp, fixed_clock=False, decode_tokens_per_s=20, output_tokens="10,10",
                            name="helpers-slow")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def queue_of_one(tmp: Path, slow: Server) -> Iterator[Server]:
    server = start_proxy(tmp, [slow.url], {"admin": {"keys": [ADMIN]},
                                           "chain": {"backpressure": {"max_queue_size": 1}}},
                         name="helpers-bp")
    yield server
    server.stop()


def _queued(proxy: Server) -> int:
    models = httpx.get(f"{proxy.url}/system/queue", headers={"Authorization": f"Bearer {ADMIN}"}
                       ).json()["models"]
    return sum(int(m["queued"]) for m in models.values())


@contextlib.contextmanager
def occupied(proxy: Server, requests: int, **options: Any) -> Iterator[None]:
    """`requests` generations held open on raw sockets (one running, the rest queued) until the block
    ends; closing the sockets is the client going away, which frees the queue and the slot."""
    body = json.dumps({"model": "llama3.2", "prompt": "hello", "options": options}).encode()
    head = (f"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sockets = []
    try:
        for _ in range(requests):
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            sock.sendall(head + body)
            sockets.append(sock)
        deadline = time.monotonic() + 10
        while _queued(proxy) < requests - 1:  # the queue (max_queue_size 1) is full
            assert time.monotonic() < deadline
            time.sleep(0.02)
        yield
    finally:
        for sock in sockets:
            sock.close()


def test_proxy_queue_full_waited_as_told(queue_of_one: Server) -> None:
    recorder = Recorder()
    c = proxy_client(queue_of_one, "ollama", recorder)
    c.generate(model="llama3.2", prompt="warm up")  # the model is loaded
    recorder.attempts.clear()
    with occupied(queue_of_one, 2):  # 0.5 s each: done within the Retry-After
        result = c.generate(model="llama3.2", prompt="hi")
    assert result.done
    assert recorder.attempts[0].status == 503 and recorder.attempts[-1].status == 200
    assert all(a.status in (503, 200) for a in recorder.attempts)
    assert_waited_as_told(recorder.attempts)


@pytest.fixture(scope="module")
def long_answers(tmp: Path) -> Iterator[Server]:
    """One slot at 10 s per answer (200 tokens at 20 a second)."""
    server = start_emulator(tmp, fixed_clock=False, decode_tokens_per_s=20, output_tokens="200,200",
                            name="helpers-long")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def long_queue_of_one(tmp: Path, long_answers: Server) -> Iterator[Server]:
    server = start_proxy(tmp, [long_answers.url], {"admin": {"keys": [ADMIN]},
                                                   "chain": {"backpressure": {"max_queue_size": 1}}},
                         name="helpers-long-bp")
    yield server
    server.stop()


def test_proxy_queue_full_gives_up_within_bounds(long_queue_of_one: Server, long_answers: Server) -> None:
    recorder = Recorder()
    c = proxy_client(long_queue_of_one, "ollama", recorder, max_attempts=3, max_total_s=6)
    with occupied(long_queue_of_one, 2):  # full for 10 s at least
        started = time.monotonic()
        with pytest.raises(ollama.ResponseError) as refused:
            c.generate(model="llama3.2", prompt="hi")
        took = time.monotonic() - started
    # Within both bounds: at most 3 attempts, no wait that would end after 6 s.
    assert 1 <= len(recorder.attempts) <= 3 and {a.status for a in recorder.attempts} == {503}
    assert took < 6 + 2
    if len(recorder.attempts) < 3:  # stopped early: the next wait would have passed the budget
        told = told_s(recorder.attempts[-1].headers)
        assert recorder.attempts[-1].received - started + told > 6
    assert refused.value.status_code == 503 and "queue" in refused.value.error
    deadline = time.monotonic() + 10
    while long_answers.stats()["active"] or _queued(long_queue_of_one):  # the sockets' close cancelled
        assert time.monotonic() < deadline, long_answers.stats()
        time.sleep(0.05)


# --- limits, chunking, embedding, streaming --------------------------------------------------------

def test_limits_from_a_proxy_answer(limited: Server) -> None:
    response = httpx.post(f"{limited.url}/api/embed", headers={"Authorization": f"Bearer {BURST}"},
                          json={"model": "nomic-embed-text", "input": "x"}, timeout=10)
    parsed = limits(response)
    assert parsed is not None and parsed.version == 1 and parsed.understood
    assert parsed.requests_per_minute == 60
    assert parsed.max_body_bytes == int(parsed.raw["max_body_bytes"]) > 0
    assert limits({"x-service-limits": "v=2; requests_per_minute=60"}).requests_per_minute is None  # type: ignore[union-attr]


def _corpus(long_word: bool = True) -> str:
    import argparse
    import inspect
    import json as json_module
    import textwrap

    docs = [inspect.getdoc(m) or "" for m in (json_module, argparse, textwrap, collections)]
    docs.append("Tokenizers differ. Some count words! Others count bytes? " * 40)
    if long_word:
        docs.append("x" * 5000)  # one word longer than any chunk
    return "\n\n".join(docs)


def test_chunks_fit_the_models_tokenizer() -> None:
    tokenizer = SentencePieceTokenizer.from_file(MODEL_PATH)  # the emulator's vocabulary
    text = _corpus()
    for overlap in (0, 30):
        chunks = chunk_text(text, max_tokens=120, overlap=overlap, count_tokens=tokenizer.count)
        assert len(chunks) > 10 and max(tokenizer.count(c) for c in chunks) <= 120
        assert chunks == chunk_text(text, max_tokens=120, overlap=overlap, count_tokens=tokenizer.count)
    assert "".join("".join(chunk_text(text, 120, count_tokens=tokenizer.count)).split()) == "".join(
        text.split())  # everything, in order
    # Sized by the estimate, prose and code fit the real vocabulary too (the estimate over-counts).
    prose = _corpus(long_word=False)
    estimated = chunk_text(prose, max_tokens=120)
    assert max(tokenizer.count(c) for c in estimated) <= 120
    assert sum(map(estimate_tokens, estimated)) > sum(map(tokenizer.count, estimated))


def test_embed_documents_batches_in_order(limited: Server, fast: Server) -> None:
    chunks = chunk_text(_corpus(), max_tokens=200)[:9]
    c = proxy_client(limited, "ollama")
    one_by_one = [c.embed(model="nomic-embed-text", input=chunk).embeddings[0] for chunk in chunks]
    before = fast.stats()["models"]["nomic-embed-text:latest"]["completed"]
    batched = embed_documents(c, "nomic-embed-text", chunks, batch_size=2, concurrency=3)
    assert len(batched) == len(chunks)
    assert [[round(v, 6) for v in e] for e in batched] == [[round(v, 6) for v in e] for e in one_by_one]
    assert fast.stats()["models"]["nomic-embed-text:latest"]["completed"] - before == 5  # ceil(9 / 2)
    with httpx.Client(base_url=limited.url, transport=RetryTransport()) as plain:
        assert embed_documents(plain, "nomic-embed-text", chunks[:3], batch_size=2) == batched[:3]


def test_embed_documents_starts_nothing_after_a_failure(limited: Server) -> None:
    """A failed batch stops the batches not yet started, even while an earlier batch is still running
    (the caller's client is real; only its first call is held until the second has failed)."""
    real = proxy_client(limited, "ollama")
    failed = threading.Event()
    calls: list[str] = []

    class Caller:
        def embed(self, model: str, input: list[str], **options: Any) -> Any:
            calls.append(input[0])
            if input[0] == "chunk-0":  # the slow first batch
                failed.wait(30)
                time.sleep(2.0)  # before: every other batch started in this time
                return real.embed(model=model, input=input, **options)
            if input[0] == "chunk-1":
                try:
                    return real.embed(model="no-such-embedder", input=input, **options)
                finally:
                    failed.set()
            return real.embed(model=model, input=input, **options)

    chunks = [f"chunk-{i}" for i in range(30)]
    with pytest.raises(ollama.ResponseError):
        embed_documents(Caller(), "nomic-embed-text", chunks, batch_size=1, concurrency=2)
    assert failed.is_set() and len(calls) < 10, len(calls)


def test_leaving_a_stream_early_cancels_upstream(long_queue_of_one: Server, long_answers: Server) -> None:
    c = ollama.Client(host=long_queue_of_one.url, transport=RetryTransport())
    before = long_answers.stats()["cancelled"]
    messages = [{"role": "user", "content": "tell me a long story"}]
    started = time.monotonic()
    pieces = list(stream_chat(c, "llama3.2", messages, max_chars=5))
    assert pieces and sum(map(len, pieces)) >= 5
    deadline = time.monotonic() + 10
    while not (long_answers.stats()["cancelled"] > before and long_answers.stats()["active"] == 0):
        assert time.monotonic() < deadline, long_answers.stats()
        time.sleep(0.05)
    assert time.monotonic() - started < 8  # the whole answer would take 10 s


async def test_async_helpers(limited: Server, long_queue_of_one: Server, long_answers: Server) -> None:
    """aembed_documents keeps order through ollama.AsyncClient; astream_chat's early exit cancels."""
    chunks = chunk_text(_corpus(), max_tokens=200)[:7]
    aclient = ollama.AsyncClient(host=limited.url, transport=AsyncRetryTransport())
    batched = await aembed_documents(aclient, "nomic-embed-text", chunks, batch_size=3, concurrency=2)
    single = [(await aclient.embed(model="nomic-embed-text", input=c)).embeddings[0] for c in chunks]
    assert [[round(v, 6) for v in e] for e in batched] == [[round(v, 6) for v in e] for e in single]
    # A failure is raised as itself, as embed_documents raises it (not an ExceptionGroup that
    # `except ollama.ResponseError` misses).
    with pytest.raises(ollama.ResponseError):
        await aembed_documents(aclient, "no-such-embedder", chunks, batch_size=3, concurrency=2)
    with pytest.raises(ollama.ResponseError):
        embed_documents(proxy_client(limited, "ollama"), "no-such-embedder", chunks, batch_size=3)

    before = long_answers.stats()["cancelled"]
    streaming = ollama.AsyncClient(host=long_queue_of_one.url, transport=AsyncRetryTransport())
    pieces = astream_chat(streaming, "llama3.2", [{"role": "user", "content": "a long story"}])
    received = ""
    async for piece in pieces:
        received += piece
        if len(received) >= 5:
            break
    await pieces.aclose()
    deadline = time.monotonic() + 10
    while not (long_answers.stats()["cancelled"] > before and long_answers.stats()["active"] == 0):
        assert time.monotonic() < deadline, long_answers.stats()
        await asyncio.sleep(0.05)


# --- the Python examples, each against an emulated fleet behind the proxy ---------------------------

@dataclass
class Fleet:
    proxy: Server
    replicas: list[Server]

    def cancelled(self) -> int:
        return sum(int(r.stats()["cancelled"]) for r in self.replicas)


@pytest.fixture(scope="module")
def fleet(tmp: Path) -> Iterator[Fleet]:
    """Two emulated replicas behind a proxy; the examples' tenant may send 60 requests a minute, so the
    retry example's burst of 70 meets 429s."""
    replicas = [start_emulator(tmp, decode_tokens_per_s=100, fixed_clock=False, name=f"fleet-{i}",
                               seed=i) for i in range(2)]
    proxy = start_proxy(tmp, [r.url for r in replicas], {
        "tenants": [{"name": "examples", "keys": ["sk-examples"], "requests_per_minute": 60}]},
        name="helpers-fleet")
    yield Fleet(proxy, replicas)
    proxy.stop()
    for replica in replicas:
        replica.stop()


def run_example(command: list[str], fleet: Fleet) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "SOP_", "OTEL_"))}
    env.update(OLLAMA_HOST=fleet.proxy.url, OLLAMA_API_KEY="sk-examples", PYTHONUNBUFFERED="1")
    done = subprocess.run(command, env=env, check=False, capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_python_quickstart(fleet: Fleet) -> None:
    out = run_example([sys.executable, "examples/python/quickstart.py"], fleet).stdout
    assert out.startswith("answer: ") and "answer tokens)" in out


def test_python_retry_after(fleet: Fleet) -> None:
    out = run_example([sys.executable, "examples/python/retry_after.py"], fleet).stdout
    assert "finished 70 of 70 jobs" in out
    waited = int(out.split("the helper waited ")[1].split()[0])
    assert waited >= 1, out  # the burst was bigger than the tenant's bucket


def test_python_streaming_abort(fleet: Fleet) -> None:
    before = fleet.cancelled()
    out = run_example([sys.executable, "examples/python/streaming_abort.py"], fleet).stdout
    assert out.count("closed the stream after") == 2
    deadline = time.monotonic() + 10
    while fleet.cancelled() < before + 2:  # both streams were cancelled at the replicas
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_python_rag(fleet: Fleet) -> None:
    out = run_example([sys.executable, "examples/python/rag.py"], fleet).stdout
    assert "embedded " in out and "retrieved: " in out and "\nanswer: " in out
    assert int(out.split("embedded ")[1].split()[0]) >= 3


@pytest.mark.parametrize(("scenario", "config"), [
    ("rate", {"requests_per_minute": 60}, ),  # a tenant at 60 a minute, the queue roomy
    ("queue", {"max_queue_size": 4}),  # no rate limit, a queue of 4 before one slot
])
def test_burst_with_and_without_the_helper(tmp: Path, scenario: str, config: dict[str, Any]) -> None:
    """The closing-note comparison: a burst of 70 jobs, 8 at a time, larger than the tenant's rate or
    the model's queue. Asserted: the helper finishes every job and the bare client does not; the times
    are printed (run with -s), not asserted."""
    emulator = start_emulator(tmp, decode_tokens_per_s=200, fixed_clock=False, name=f"burst-{scenario}")
    rpm = {"requests_per_minute": config["requests_per_minute"]} if "requests_per_minute" in config else {}
    tenants = [{"name": name, "keys": [f"sk-{name}"], **rpm} for name in ("bare", "helper")]
    queue = {"max_queue_size": config.get("max_queue_size", 64)}
    proxy = start_proxy(tmp, [emulator.url], {"tenants": tenants, "chain": {"backpressure": queue}},
                        name=f"burst-{scenario}-proxy")
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "SOP_", "OTEL_"))}
        env.update(OLLAMA_HOST=proxy.url, BARE_KEY="sk-bare", HELPER_KEY="sk-helper", JOBS="70",
                   WORKERS="8")
        done = subprocess.run([sys.executable, "examples/python/burst_compare.py"], env=env, check=False,
                              capture_output=True, text=True, timeout=170, cwd=ROOT)
        assert done.returncode == 0, done.stdout + done.stderr
        print(f"\nscenario {scenario}: {config}\n{done.stdout}")
        rows = [line for line in done.stdout.splitlines() if line.startswith(("| bare", "| ollama"))]
        assert len(rows) == 2 and "| 70/70 " not in rows[0] and "| 70/70 (100 %) |" in rows[1], done.stdout
    finally:
        proxy.stop()
        emulator.stop()
