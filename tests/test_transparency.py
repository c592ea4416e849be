"""Byte fidelity: for every route of reference §2, what a client gets through the proxy is what it gets
straight from Ollama: status, framing, headers (hop-by-hop aside) and body bytes.

Two identical emulators (same seed, frozen clock) receive the same request sequence, one directly and one
through the proxy, so even stateful routes (pull, copy, delete, blobs) must match byte for byte.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest

from tests.support.servers import Server, start_emulator, start_proxy

BLOB = b"\x00\x01binary blob\xff" * 300
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()

# (method, path, body, extra headers): every route of reference §2 plus the fallbacks.
REQUESTS: list[tuple[str, str, bytes | None, dict[str, str]]] = [
    ("GET", "/", None, {}),
    ("HEAD", "/", None, {}),
    ("GET", "/api/version", None, {}),
    ("HEAD", "/api/version", None, {}),
    ("GET", "/api/status", None, {}),
    ("GET", "/api/tags", None, {}),
    ("HEAD", "/api/tags", None, {}),
    ("GET", "/api/ps", None, {}),
    ("POST", "/api/show", b'{"model":"llama3.2"}', {}),
    ("POST", "/api/show", b'{"model":"llama3.2","verbose":true}', {}),
    ("POST", "/api/generate", b'{"model":"llama3.2","prompt":"Why <is> the sky & blue?"}', {}),
    ("POST", "/api/generate", b'{"model":"llama3.2","prompt":"Say hi","stream":false}', {}),
    ("POST", "/api/generate", b'{"model":"llama3.2"}', {}),
    ("POST", "/api/generate", b'{"model":"llama3.2","keep_alive":0}', {}),
    ("POST", "/api/chat", b'{"model":"qwen3","messages":[{"role":"user","content":"Hi"}]}', {}),
    ("POST", "/api/chat", b'{"model":"llama3.2","stream":false,"messages":[{"role":"user",'
                          b'"content":"Weather?"}],"tools":[{"type":"function","function":{"name":'
                          b'"get_weather","parameters":{"type":"object","properties":{"city":'
                          b'{"type":"string"}},"required":["city"]}}}]}', {}),
    ("POST", "/api/chat", b'{"model":"llama3.2","messages":[]}', {}),
    ("POST", "/api/embed", b'{"model":"nomic-embed-text","input":["a","b"]}', {}),
    ("POST", "/api/embeddings", b'{"model":"nomic-embed-text","prompt":"a"}', {}),
    ("GET", "/api/ps", None, {}),
    # errors of §9
    ("POST", "/api/generate", b'{"model":"nope","prompt":"x"}', {}),
    ("POST", "/api/embed", b'{"model":"nope","input":"x"}', {}),
    ("POST", "/api/show", b'{"model":"nope"}', {}),
    ("POST", "/api/generate", b'{"model":"llama3.2","prompt":"x","keep_alive":"-1"}', {}),
    ("POST", "/api/chat", b'{"model":"llama3.2","think":true,"messages":[{"role":"user",'
                          b'"content":"x"}]}', {}),
    ("POST", "/api/generate", b'{"model":"llama3.2","prompt":"x","stream":"yes"}', {}),
    # management
    ("POST", "/api/pull", b'{"model":"llama3.1"}', {}),
    ("POST", "/api/pull", b'{"model":"gemma3","stream":false}', {}),
    ("POST", "/api/pull", b'{"model":"does-not-exist"}', {}),
    ("POST", "/api/push", b'{"model":"llama3.1"}', {}),
    ("POST", "/api/copy", b'{"source":"llama3.1","destination":"copied"}', {}),
    ("POST", "/api/copy", b'{"source":"missing","destination":"copied2"}', {}),
    ("DELETE", "/api/delete", b'{"model":"copied"}', {}),
    ("DELETE", "/api/delete", b'{"model":"copied"}', {}),
    ("HEAD", f"/api/blobs/{BLOB_DIGEST}", None, {}),
    ("POST", f"/api/blobs/{BLOB_DIGEST}", BLOB, {}),
    ("POST", f"/api/blobs/{BLOB_DIGEST}", BLOB, {}),
    ("HEAD", f"/api/blobs/{BLOB_DIGEST}", None, {}),
    ("POST", "/api/blobs/sha256:" + "0" * 64, b"wrong", {}),
    ("POST", "/api/create", b'{"model":"mine","from":"llama3.2","system":"be brief"}', {}),
    ("GET", "/api/tags", None, {}),
    ("GET", "/api/experimental/model-recommendations", None, {}),
    # OpenAI and Anthropic compatibility
    ("POST", "/v1/chat/completions", b'{"model":"llama3.2","messages":[{"role":"user","content":'
                                     b'"Hi"}]}', {}),
    ("POST", "/v1/chat/completions", b'{"model":"llama3.2","stream":true,"stream_options":'
                                     b'{"include_usage":true},"messages":[{"role":"user",'
                                     b'"content":"Hi"}]}', {}),
    ("POST", "/v1/chat/completions", b'{"model":"nope","messages":[{"role":"user","content":'
                                     b'"x"}]}', {}),
    ("POST", "/v1/chat/completions", b'{"model":"llama3.2","messages":[]}', {}),
    ("POST", "/v1/completions", b'{"model":"llama3.2","prompt":"Once"}', {}),
    ("POST", "/v1/completions", b'{"model":"llama3.2","prompt":"Once","stream":true}', {}),
    ("POST", "/v1/embeddings", b'{"model":"nomic-embed-text","input":"a"}', {}),
    ("GET", "/v1/models", None, {}),
    ("GET", "/v1/models/llama3.2", None, {}),
    ("GET", "/v1/models/nope", None, {}),
    ("POST", "/v1/messages", b'{"model":"llama3.2","max_tokens":16,"messages":[{"role":"user",'
                             b'"content":"Hi"}]}', {}),
    ("POST", "/v1/messages", b'{"model":"llama3.2","max_tokens":16,"stream":true,"messages":'
                             b'[{"role":"user","content":"Hi"}]}', {}),
    ("POST", "/v1/responses", b'{"model":"llama3.2","input":"Hi","instructions":"Be brief"}', {}),
    ("POST", "/v1/responses", b'{"model":"llama3.2","input":[{"role":"user","content":"Hi"}],'
                              b'"stream":true}', {}),
    ("POST", "/v1/audio/transcriptions",
     b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nllama3.2\r\n--b\r\n'
     b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n'
     b'Content-Type: audio/wav\r\n\r\nRIFF0000\r\n--b--\r\n',
     {"Content-Type": "multipart/form-data; boundary=b"}),
    # ollama.com account routes of a daemon that is not signed in
    ("POST", "/api/me", b"{}", {}),
    ("POST", "/api/signout", b"{}", {}),
    ("DELETE", "/api/user/keys/abc", None, {}),
    ("POST", "/api/experimental/web_search", b'{"query":"x"}', {}),
    ("POST", "/api/experimental/web_fetch", b'{"url":"http://x"}', {}),
    # router fallbacks and unknown routes
    ("GET", "/api/generate", None, {}),
    ("GET", "/api/nothing", None, {}),
    ("PATCH", "/api/nothing", b"{}", {}),
    ("POST", "/api/generate/", b"{}", {}),
    ("GET", "/api/tags/", None, {}),
    ("GET", "/api/tags?x=1", None, {}),
    ("OPTIONS", "/api/chat", None, {"Origin": "http://localhost:3000",
                                    "Access-Control-Request-Method": "POST"}),
    ("POST", "/api/chat", b'{"model":"llama3.2","messages":[{"role":"user","content":"x"}]}',
     {"Origin": "https://evil.example"}),
]

# Bodies the proxy refuses itself, before any step (a body the chain cannot read never goes through):
# Ollama's status and `error` text, plus the proxy's `code`.
REFUSED_BY_THE_PROXY: list[tuple[str, bytes, int, str]] = [
    ("/api/chat", b"", 400, "missing request body"),
    ("/api/chat", b'{"model":"llama3.2","messages":[', 400, "unexpected EOF"),
]

_MESSAGES = b'"messages":[{"role":"user","content":"x"}]'
# Bodies that name no model (absent, "" or a `null` body), which the proxy refuses itself as Ollama's
# handler for the route does: 404 `model '' not found` on generate and embed and on the /v1 routes Ollama
# runs on them (completions, embeddings), 400 `model is required` on the others. (path, body, status)
NO_MODEL: list[tuple[str, bytes, int]] = [
    *[("/api/generate", body, 404) for body in (b'{"prompt":"x"}', b'{"model":"","prompt":"x"}', b"null")],
    *[("/api/embed", body, 404) for body in (b'{"input":"x"}', b'{"model":"","input":"x"}', b"null")],
    *[("/api/chat", body, 400) for body in (b"{" + _MESSAGES + b"}", b'{"model":"",' + _MESSAGES + b"}",
                                            b"null")],
    *[("/api/embeddings", body, 400) for body in (b'{"prompt":"x"}', b'{"model":"","prompt":"x"}',
                                                  b"null")],
    ("/v1/completions", b'{"prompt":"x"}', 404),
    ("/v1/completions", b'{"model":"","prompt":"x"}', 404),
    ("/v1/embeddings", b'{"input":"x"}', 404),
    ("/v1/embeddings", b'{"model":"","input":"x"}', 404),
    ("/v1/chat/completions", b"{" + _MESSAGES + b"}", 400),
    ("/v1/chat/completions", b'{"model":"",' + _MESSAGES + b"}", 400),
    ("/v1/responses", b'{"input":"x"}', 400),
    ("/v1/messages", b'{"max_tokens":5,' + _MESSAGES + b"}", 400),
]

_IGNORED_HEADERS = {"date", "server", "connection", "keep-alive"}
# What the proxy adds by design (X-Service-Limits and X-Request-Id on every response, X-Queue-Wait-Ms
# on admitted inference responses); checked separately.
_PROXY_HEADERS = {"x-service-limits", "x-request-id", "x-queue-wait-ms"}


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server, Server]]:
    tmp: Path = tmp_path_factory.mktemp("twins")
    direct = start_emulator(tmp, name="direct")
    behind = start_emulator(tmp, name="behind")
    proxy = start_proxy(tmp, [behind.url])
    yield direct, behind, proxy
    for server in (proxy, behind, direct):
        server.stop()


def _exchange(client: httpx.Client, base: str, method: str, path: str, body: bytes | None,
              headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    response = client.request(method, base + path, content=body, headers=headers)
    kept = {k.lower(): v for k, v in response.headers.items()
            if k.lower() not in _IGNORED_HEADERS | _PROXY_HEADERS}
    return response.status_code, kept, response.content


def test_every_route_is_byte_identical_through_the_proxy(
        twins: tuple[Server, Server, Server]) -> None:
    direct, _, proxy = twins
    with httpx.Client(timeout=30) as client:
        for method, path, body, headers in REQUESTS:
            expected = _exchange(client, direct.url, method, path, body, headers)
            got = _exchange(client, proxy.url, method, path, body, headers)
            assert got[0] == expected[0], (method, path, got[2][:200])
            assert got[1] == expected[1], (method, path)
            assert got[2] == expected[2], (method, path)


def test_unreadable_bodies_are_refused_in_ollamas_shape(twins: tuple[Server, Server, Server]) -> None:
    direct, _, proxy = twins
    with httpx.Client(timeout=30) as client:
        for path, body, status, error in REFUSED_BY_THE_PROXY:
            expected = client.post(direct.url + path, content=body)
            assert (expected.status_code, expected.json()) == (status, {"error": error})
            got = client.post(proxy.url + path, content=body)
            assert got.status_code == 400, (path, body)
            assert got.headers["content-type"] == expected.headers["content-type"]
            assert got.json() == {"error": error, "code": "invalid_request"}


@pytest.mark.parametrize("path,body,status", NO_MODEL)
def test_no_model_is_refused_as_ollamas_route_refuses_it(
        twins: tuple[Server, Server, Server], path: str, body: bytes, status: int) -> None:
    """Status, content type and error object as Ollama's (the emulator's, straight), plus the proxy's
    `code`; on /v1 OpenAI's `type` too (`not_found_error` for the 404s)."""
    direct, _, proxy = twins
    code = "model_not_found" if status == 404 else "invalid_request"
    with httpx.Client(timeout=30) as client:
        expected = client.post(direct.url + path, content=body)
        got = client.post(proxy.url + path, content=body)
    assert (expected.status_code, got.status_code) == (status, status), (got.text, expected.text)
    assert got.headers["content-type"] == expected.headers["content-type"]
    if path == "/v1/messages":  # Anthropic's object, less the request_id only Ollama's has
        assert got.json() == {"type": "error", "error": expected.json()["error"]}
    elif path.startswith("/v1/"):
        assert got.json() == {"error": {**expected.json()["error"], "code": code}}
    else:
        assert got.json() == {**expected.json(), "code": code}


def test_the_ollama_client_reads_a_missing_models_404(twins: tuple[Server, Server, Server]) -> None:
    """The official client's `ResponseError.status_code` is Ollama's: 404 on generate and embed, 400 on
    chat. Its `generate(model="")` refuses an empty name itself (pydantic), so the body without a model
    goes through the method `generate` sends with (`_request`), which is the client's reading of the
    answer that is tested."""
    direct, _, proxy = twins
    for server in (direct, proxy):
        client = ollama.Client(host=server.url)
        for path, body, status, error in (
                ("/api/generate", {"prompt": "x", "stream": False}, 404, "model '' not found"),
                ("/api/embed", {"input": "x"}, 404, "model '' not found"),
                ("/api/chat", {"messages": [{"role": "user", "content": "x"}], "stream": False}, 400,
                 "model is required")):
            with pytest.raises(ollama.ResponseError) as caught:
                client._request(ollama.GenerateResponse, "POST", path, json=body)
            assert (caught.value.status_code, caught.value.error) == (status, error), (server.url, path)


def test_the_proxy_adds_only_its_service_limits(twins: tuple[Server, Server, Server]) -> None:
    _, _, proxy = twins
    response = httpx.get(f"{proxy.url}/api/tags")
    assert response.headers["x-service-limits"].startswith("v=1; max_body_bytes=33554432")


def test_framing_is_kept(twins: tuple[Server, Server, Server]) -> None:
    """Small bodies keep Content-Length, large ones and streams stay chunked (Go's 2 KiB rule)."""
    _, _, proxy = twins
    with httpx.Client(timeout=30) as client:
        small = client.get(f"{proxy.url}/api/version")
        assert small.headers["content-length"] == str(len(small.content))
        large = client.post(f"{proxy.url}/api/show", content=b'{"model":"qwen3","verbose":true}')
        assert large.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in large.headers
        assert large.json()["model_info"]["tokenizer.ggml.tokens"][:3] == ["<unk>", "<s>", "</s>"]


def test_host_is_rewritten_for_the_loopback_guard(twins: tuple[Server, Server, Server]) -> None:
    """Ollama on loopback refuses a foreign Host with an empty 403; through the proxy it is served."""
    direct, _, proxy = twins
    foreign = {"Host": "ollama.example.com"}
    with httpx.Client(timeout=30) as client:
        refused = client.get(f"{direct.url}/api/tags", headers=foreign)
        assert refused.status_code == 403 and refused.content == b""
        served = client.get(f"{proxy.url}/api/tags", headers=foreign)
        assert served.status_code == 200 and "models" in served.json()
