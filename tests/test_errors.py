"""The one error renderer (proxy/rendering.py) in every (dialect, phase) pair, read by the clients that read
it in production: the official `openai` and `ollama` packages, and Anthropic's documented shape as JSON.

Two layers: the renderer served as it is by a bare aiohttp app (every error class, fast), and the real
proxy in front of the real emulator (a refusal before headers, and a stream the idle timeout breaks after
them), so what a client sees is what the proxy actually sends.
"""

from __future__ import annotations

import email.utils
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from proxy import errors
from proxy.rendering import error_object, render, status_of, stream_error_record, told_wait_s
from tests.support.polling import wait_for
from tests.support.servers import Server, start_emulator, start_proxy

ANTHROPIC_ERROR_TYPES = {"invalid_request_error", "authentication_error", "permission_error",
                         "not_found_error", "request_too_large", "rate_limit_error", "api_error",
                         "overloaded_error"}
"""Anthropic's documented error types (docs.anthropic.com, errors)."""

CASES: list[tuple[type[errors.ProxyError], float | None]] = [
    (errors.InvalidRequest, None), (errors.ModelNotFound, None), (errors.PromptTooLong, None),
    (errors.Unauthorized, None), (errors.Forbidden, None), (errors.RequestPayloadTooLarge, None),
    (errors.RateLimited, 7.2),
    (errors.QuotaExceeded, 30.0), (errors.RequestExceedsQuota, None), (errors.Overload, 2.0),
    (errors.NoHealthyUpstream, 1.0), (errors.UpstreamConnectFailure, None),
    (errors.UpstreamResponseTimeout, None), (errors.ShuttingDown, 1.0), (errors.InternalProxyError, None),
]
OPENAI_CLASSES = {400: openai.BadRequestError, 401: openai.AuthenticationError,
                  403: openai.PermissionDeniedError, 404: openai.NotFoundError, 413: openai.APIStatusError,
                  429: openai.RateLimitError,
                  500: openai.InternalServerError, 502: openai.InternalServerError,
                  503: openai.InternalServerError, 504: openai.InternalServerError}
STREAM_CODES = ["upstream_response_timeout", "upstream_reset_after_response_started", "shutting_down"]


def _error(cls: type[errors.ProxyError], retry_after_s: float | None) -> errors.ProxyError:
    return cls(f"refused by {cls.__name__} <\"quoted\">", retry_after_s=retry_after_s)


def _harness() -> web.Application:
    """Serves the renderer's output as it is: `/{dialect}/{index}` before headers (CASES[index]) and
    `/{dialect}/stream/{code}` after one good chunk, in the content type the dialect streams in."""

    async def before(request: web.Request) -> web.Response:
        cls, retry = CASES[int(request.match_info["index"])]
        status, headers, body = render(request.match_info["dialect"], _error(cls, retry))
        return web.Response(status=status, headers=headers, body=body)

    async def after(request: web.Request) -> web.StreamResponse:
        dialect = request.match_info["dialect"]
        code = request.match_info["code"]
        content_type = "application/x-ndjson" if dialect == "ollama" else "text/event-stream"
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        if dialect == "ollama":
            await response.write(b'{"model":"m","created_at":"2026-08-21T18:50:01Z","message":'
                                 b'{"role":"assistant","content":"Hi"},"done":false}\n')
        elif dialect == "openai":
            await response.write(b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
                                 b'"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\n')
        else:
            await response.write(b'event: message_start\ndata: {"type":"message_start"}\n\n')
        record = stream_error_record(content_type, f"{code} happened", code, dialect)
        assert record is not None
        await response.write(record)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/{dialect}/stream/{code}/{rest:.*}", after)
    app.router.add_route("*", "/{dialect}/{index:\\d+}/{rest:.*}", before)
    return app


@pytest.fixture
async def harness() -> AsyncIterator[str]:
    server = TestServer(_harness(), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


# Before headers ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("index", range(len(CASES)), ids=[c.__name__ for c, _ in CASES])
async def test_openai_sdk_reads_the_error_before_headers(harness: str, index: int) -> None:
    cls, retry = CASES[index]
    client = openai.AsyncOpenAI(base_url=f"{harness}/openai/{index}/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    exc = caught.value
    assert type(exc) is OPENAI_CLASSES[cls.status]
    assert exc.status_code == cls.status
    assert exc.code == cls.code
    # Ollama's /v1 types: not_found_error for a 404 (reference section 7), else by the status.
    assert exc.type == ("not_found_error" if cls.status == 404
                        else "invalid_request_error" if cls.status < 500 else "api_error")
    assert isinstance(exc.body, dict) and exc.body["message"] == _error(cls, retry).message
    if cls.should_retry is False:
        assert exc.response.headers["x-should-retry"] == "false"
        assert "retry-after" not in exc.response.headers
    elif retry is not None:
        assert exc.response.headers["retry-after"] == str(max(1, -int(-retry // 1)))
    await client.close()


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c.__name__ for c, _ in CASES])
async def test_ollama_client_reads_the_error_before_headers(harness: str, index: int) -> None:
    cls, retry = CASES[index]
    client = ollama.AsyncClient(host=f"{harness}/ollama/{index}")
    with pytest.raises(ollama.ResponseError) as caught:
        await client.chat(model="m", messages=[{"role": "user", "content": "x"}], stream=False)
    assert caught.value.status_code == cls.status
    assert caught.value.error == _error(cls, retry).message
    async with httpx.AsyncClient() as raw:
        response = await raw.post(f"{harness}/ollama/{index}/api/chat", json={})
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    body = response.json()
    assert body["code"] == cls.code
    assert body.get("retry_after_s") == (None if retry is None else -int(-retry // 1))


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c.__name__ for c, _ in CASES])
async def test_anthropic_shape_before_headers(harness: str, index: int) -> None:
    cls, retry = CASES[index]
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{harness}/anthropic/{index}/v1/messages", json={})
    assert response.status_code == cls.status
    body = response.json()
    assert set(body) == {"type", "error"} and body["type"] == "error"
    assert set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] in ANTHROPIC_ERROR_TYPES
    assert body["error"]["message"] == _error(cls, retry).message
    expected = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                503: "overloaded_error"}
    assert body["error"]["type"] == expected.get(cls.status, "api_error")


# After headers -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("code", STREAM_CODES)
async def test_openai_sdk_raises_on_the_final_record(harness: str, code: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{harness}/openai/stream/{code}/v1", api_key="k", max_retries=0)
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], stream=True)
    received: list[str | None] = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received == ["Hi"]  # what came before the failure is delivered, then the error
    assert caught.value.message == f"{code} happened"
    assert caught.value.code == code and caught.value.type == "api_error"
    await client.close()


@pytest.mark.parametrize("code", STREAM_CODES)
async def test_ollama_client_raises_on_the_final_record(harness: str, code: str) -> None:
    client = ollama.AsyncClient(host=f"{harness}/ollama/stream/{code}")
    received: list[str] = []
    with pytest.raises(ollama.ResponseError) as caught:
        async for part in await client.chat(model="m", messages=[{"role": "user", "content": "x"}],
                                            stream=True):
            received.append(part.message.content or "")
    assert received == ["Hi"]
    assert caught.value.error == f"{code} happened"


def _sse_events(text: str) -> list[tuple[str | None, dict[str, Any]]]:
    events: list[tuple[str | None, dict[str, Any]]] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name = None
        data = ""
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data += line[len("data: "):]
        events.append((name, json.loads(data)))
    return events


@pytest.mark.parametrize("code", STREAM_CODES)
async def test_anthropic_final_record_is_an_error_event(harness: str, code: str) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{harness}/anthropic/stream/{code}/v1/messages", json={})
    events = _sse_events(response.text)
    name, data = events[-1]
    assert name == "error"
    kind = "overloaded_error" if code == "shutting_down" else "api_error"  # 503 vs 502/504
    assert data == {"type": "error", "error": {"type": kind, "message": f"{code} happened"}}


def test_both_phases_share_one_error_object() -> None:
    # The final record of a stream carries the object the same failure would have had before headers.
    for dialect, content_type, prefix in (("ollama", "application/x-ndjson", b""),
                                          ("openai", "text/event-stream", b"data: "),
                                          ("anthropic", "text/event-stream", b"event: error\ndata: ")):
        for code in STREAM_CODES:
            record = stream_error_record(content_type, "m", code, dialect)
            assert record is not None and record.startswith(prefix)
            assert record.endswith(b"\n")
            payload = json.loads(record[len(prefix):])
            assert payload == error_object(dialect, status_of(code), code, "m")
    assert stream_error_record("application/json", "m", "upstream_response_timeout", "ollama") is None
    assert status_of("shutting_down") == 503 and status_of("upstream_response_timeout") == 504
    assert status_of("upstream_reset_after_response_started") == 502


# Through the real proxy ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stalling(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A proxy whose idle timeout (0.2 s) breaks every stream of a 2 token/s emulator after headers, and
    which refuses prompts over 64 tokens."""
    tmp: Path = tmp_path_factory.mktemp("errors")
    emulator = start_emulator(tmp, decode_tokens_per_s=2, name="errors-emu")
    proxy = start_proxy(tmp, [emulator.url], {"forwarding": {"idle_timeout_s": 0.2},
                                              "chain": {"limits": {"max_prompt_tokens": 64}}}, name="errors")
    yield proxy
    proxy.stop()
    emulator.stop()


def test_proxy_refusal_before_headers_in_each_dialect(stalling: Server) -> None:
    client = openai.OpenAI(base_url=f"{stalling.url}/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="", messages=[{"role": "user", "content": "x"}])
    assert caught.value.code == "invalid_request" and caught.value.type == "invalid_request_error"
    assert caught.value.body == {"message": "model is required", "type": "invalid_request_error",
                                 "param": None, "code": "invalid_request"}
    native = httpx.post(f"{stalling.url}/api/chat", json={"messages": []}, timeout=10)
    assert native.status_code == 400
    assert native.json() == {"error": "model is required", "code": "invalid_request"}
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=stalling.url).chat(model="llama3.2", stream=False, messages=[
            {"role": "user", "content": "many words " * 100}])
    assert refused.value.status_code == 400
    assert refused.value.error.startswith("prompt is ") and "more than the limit of 64 tokens" in \
        refused.value.error
    anthropic = httpx.post(f"{stalling.url}/v1/messages", json={"max_tokens": 5, "messages": []}, timeout=10)
    assert anthropic.status_code == 400
    assert anthropic.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                           "message": "model is required"}}


def test_no_model_is_a_404_where_ollama_says_so(stalling: Server) -> None:
    """/v1/completions and /v1/embeddings run on Ollama's generate and embed, which answer a request
    without a model 404 `model '' not found`: the OpenAI SDK raises NotFoundError, typed
    `not_found_error` as Ollama's /v1 types a 404; chat stays 400 (test above)."""
    client = openai.OpenAI(base_url=f"{stalling.url}/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.NotFoundError) as completion:
        client.completions.create(model="", prompt="x")
    with pytest.raises(openai.NotFoundError) as embedding:
        client.embeddings.create(model="", input="x")
    for caught in (completion, embedding):
        assert caught.value.body == {"message": "model '' not found", "type": "not_found_error",
                                     "param": None, "code": "model_not_found"}
        assert caught.value.response.headers["x-should-retry"] == "false"


def test_a_refusal_names_its_access_line(stalling: Server) -> None:
    """Every answer carries the access line's id as X-Request-Id, which the OpenAI SDK reports with
    its error (`request_id`): a user's refusal can be found in the log."""
    client = openai.OpenAI(base_url=f"{stalling.url}/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="", messages=[{"role": "user", "content": "x"}])
    request_id = caught.value.request_id
    assert request_id
    wait_for(lambda: f"{request_id} " in stalling.log(), what="the refusal's access line")
    served = httpx.get(f"{stalling.url}/api/tags", timeout=10)
    assert served.status_code == 200 and served.headers["X-Request-Id"] not in ("", request_id)


def test_proxy_stream_broken_after_headers_in_each_dialect(stalling: Server) -> None:
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(ollama.ResponseError) as native:
        for _ in ollama.Client(host=stalling.url).chat(model="llama3.2", messages=messages, stream=True):
            pass
    assert native.value.error == "upstream sent nothing for 0.2s"
    client = openai.OpenAI(base_url=f"{stalling.url}/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.APIError) as broken:
        for _ in client.chat.completions.create(model="llama3.2", messages=[{"role": "user", "content": "x"}],
                                                stream=True):
            pass
    assert broken.value.code == "upstream_response_timeout" and broken.value.type == "api_error"
    with httpx.stream("POST", f"{stalling.url}/v1/messages", timeout=10, json={
            "model": "llama3.2", "max_tokens": 50, "stream": True, "messages": messages}) as response:
        assert response.status_code == 200
        text = response.read().decode()
    name, data = _sse_events(text)[-1]
    assert name == "error"
    assert data == {"type": "error", "error": {"type": "api_error",
                                               "message": "upstream sent nothing for 0.2s"}}


def test_a_told_wait_is_read_as_clients_read_it() -> None:
    """`told_wait_s`: retry-after-ms first, then Retry-After in seconds or as an HTTP date; anything
    else (garbage, negative, infinite) is no wait at all, so the proxy says its own."""
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    past = email.utils.formatdate(now - 30, usegmt=True)
    cases: list[tuple[dict[str, str], float | None]] = [
        ({"Retry-After": "7"}, 7.0), ({"Retry-After": " 2.5 "}, 2.5), ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "1500", "Retry-After": "9"}, 1.5),
        ({"retry-after-ms": "x", "Retry-After": "9"}, 9.0),
        ({"Retry-After": date}, 30.0), ({"Retry-After": past}, 0.0), ({"Retry-After": "soon 3"}, None),
        ({"Retry-After": "-1"}, None), ({"Retry-After": "inf"}, None), ({"Retry-After": "nan"}, None),
        ({"Retry-After": "1e400"}, None), ({}, None)]
    for headers, expected in cases:
        assert told_wait_s(CIMultiDict(headers), now=now) == expected, headers
