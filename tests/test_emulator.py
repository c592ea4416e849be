"""The emulator behaves like Ollama on the wire: texts and statuses of §9, router fallbacks, framing,
`/api/show` arrays, load/unload, embeddings, token counts from its vocabulary, CORS and Host guards."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.emulator.app import create_emulator_app
from proxy.emulator.engine import EngineSettings
from proxy.emulator.vocabulary import default_vocabulary

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def emu(aiohttp_client: Any) -> Client:
    app = create_emulator_app(EngineSettings(seed=3, fixed_clock_ns=1_787_338_201_000_000_000))
    client: Client = await aiohttp_client(app)
    return client


@pytest.mark.parametrize("path,body,status,message", [
    ("/api/chat", b"", 400, "missing request body"),
    ("/api/chat", b'{"model":"llama3.2","messages":[', 400, "unexpected EOF"),
    ("/api/chat", b'{"model":"llama3.2",}', 400,
     "invalid character '}' looking for beginning of object key string"),
    ("/api/chat", b'{"messages":[{"role":"user","content":"x"}]}', 400, "model is required"),
    ("/api/generate", b'{"prompt":"x"}', 404, "model '' not found"),
    ("/api/embed", b'{"input":"x"}', 404, "model '' not found"),
    ("/api/embeddings", b'{"prompt":"x"}', 400, "model is required"),
    ("/api/generate", b'{"model":"nope","prompt":"x"}', 404, "model 'nope' not found"),
    ("/api/chat", b'{"model":"nope","messages":[{"role":"user","content":"x"}]}', 404,
     "model 'nope' not found"),
    ("/api/embed", b'{"model":"nope","input":"x"}', 404,
     'model "nope" not found, try pulling it first'),
    ("/api/show", b'{"model":"nope"}', 404, "model 'nope:latest' not found"),
    ("/api/generate", b'{"model":"bad name!","prompt":"x"}', 400, "invalid model name"),
    ("/api/generate", b'{"model":"llama3.2","prompt":"x","keep_alive":"-1"}', 400,
     'time: missing unit in duration "-1"'),
    ("/api/generate", b'{"model":"llama3.2","prompt":"x","keep_alive":""}', 400,
     'time: invalid duration ""'),
    ("/api/generate", b'{"model":"llama3.2","prompt":"x","keep_alive":"-"}', 400,
     'time: invalid duration "-"'),
    ("/api/generate", b'{"model":"llama3.2","prompt":"x","keep_alive":true}', 400,
     "Unsupported type: 'bool'"),
    ("/api/chat", b'{"model":"llama3.2","think":true,"messages":[{"role":"user","content":"x"}]}',
     400, '"llama3.2" does not support thinking'),
    ("/api/chat", b'{"model":"qwen3","think":"hard","messages":[{"role":"user","content":"x"}]}',
     400, 'invalid think value: "hard" (must be "high", "medium", "low", "max", true, or false)'),
    ("/api/generate", b'{"model":"nomic-embed-text","prompt":"x"}', 400,
     '"nomic-embed-text" does not support generate'),
    ("/api/chat", b'{"model":"qwen3","messages":[{"role":"user","content":"x"}],"tools":[{}],'
                  b'"stream":false}', 200, None),
    ("/api/generate", b'{"model":"llama3.2","prompt":"x","raw":true,"system":"s"}', 400,
     "raw mode does not support template, system, or context"),
    ("/api/generate", b'{"model":"llama3.2","prompt":"x","stream":"yes"}', 400,
     "json: cannot unmarshal string into Go struct field GenerateRequest.stream of type bool"),
    ("/api/generate", b'{"model":"llama3.2","prompt":"x","options":{"temperature":"hot"}}', 500,
     'option "temperature" must be of type float32'),
    ("/api/embed", b'{"model":"nomic-embed-text","input":[1,2]}', 400, "invalid input type"),
    ("/api/copy", b'{"source":"missing","destination":"x"}', 404, 'model "missing" not found'),
    ("/api/delete", b'{"model":"missing"}', 404, "model 'missing' not found"),
])
async def test_error_catalogue(emu: Client, path: str, body: bytes, status: int,
                               message: str | None) -> None:
    method = "DELETE" if path == "/api/delete" else "POST"
    response = await emu.request(method, path, data=body)
    assert response.status == status
    if message is not None:
        assert response.headers["Content-Type"] == "application/json; charset=utf-8"
        assert await response.json() == {"error": message}


async def test_router_fallbacks(emu: Client) -> None:
    wrong_method = await emu.get("/api/generate")
    assert (wrong_method.status, await wrong_method.text()) == (405, "405 method not allowed")
    assert wrong_method.headers["Allow"] == "POST"
    assert wrong_method.headers["Content-Type"] == "text/plain"
    unknown = await emu.get("/api/nothing")
    assert (unknown.status, await unknown.text()) == (404, "404 page not found")
    get_slash = await emu.get("/api/tags/", allow_redirects=False)
    assert get_slash.status == 301 and get_slash.headers["Location"] == "/api/tags"
    post_slash = await emu.post("/api/generate/", data=b"{}", allow_redirects=False,
                                headers={"X-Forwarded-Prefix": "/ollama"})
    assert post_slash.status == 307 and post_slash.headers["Location"] == "/ollama/api/generate"
    assert await post_slash.read() == b""


async def test_framing_follows_go(emu: Client) -> None:
    small = await emu.get("/api/version")
    assert small.headers["Content-Length"] == "20" and await small.read() == b'{"version":"0.33.0"}'
    large = await emu.post("/api/show", json={"model": "llama3.2", "verbose": True})
    assert large.headers.get("Transfer-Encoding") == "chunked"
    head = await emu.head("/")
    assert head.headers["Content-Length"] == "17" and await head.read() == b""
    stream = await emu.post("/api/generate", json={"model": "llama3.2", "prompt": "x"})
    assert stream.headers["Content-Type"] == "application/x-ndjson"
    lines = (await stream.read()).split(b"\n")
    assert lines[-1] == b"" and all(lines[:-1])
    assert b'"done":true' in lines[-2] and all(b'"done":false' in line for line in lines[:-2])


async def test_show_arrays_are_null_unless_verbose(emu: Client) -> None:
    plain = await (await emu.post("/api/show", json={"model": "llama3.2"})).json()
    info = plain["model_info"]
    assert info["tokenizer.ggml.tokens"] is None and info["tokenizer.ggml.scores"] is None
    assert list(info) == sorted(info)
    verbose = await (await emu.post("/api/show", json={"model": "llama3.2",
                                                       "verbose": True})).json()
    tokens = verbose["model_info"]["tokenizer.ggml.tokens"]
    vocabulary = default_vocabulary()
    assert len(tokens) == vocabulary.size == len(verbose["model_info"]["tokenizer.ggml.scores"])
    assert verbose["model_info"]["tokenizer.ggml.model"] == "llama"


async def test_show_arrays_rebuild_the_same_tokenizer(emu: Client) -> None:
    """The verbose arrays are enough to rebuild an exact SentencePiece model (what `limits` relies on)."""
    import sentencepiece as spm

    from proxy.tokens import model_proto_from_show

    info = (await (await emu.post("/api/show", json={"model": "llama3.2", "verbose": True}))
            .json())["model_info"]
    proto = model_proto_from_show(info)
    assert proto is not None
    rebuilt = spm.SentencePieceProcessor(model_proto=proto)
    for text in ("Retrieval augmented generation splits documents into chunks.",
                 "  two  spaces,\ttabs\nand newlines 12345 ünïcödé 東京"):
        assert rebuilt.encode(text) == default_vocabulary().encode(text)


async def test_prompt_counts_come_from_the_vocabulary(emu: Client) -> None:
    prompt = "Explain the difference between a list and a tuple."
    body = await (await emu.post("/api/generate", json={"model": "llama3.2", "prompt": prompt,
                                                        "stream": False})).json()
    assert body["prompt_eval_count"] == 1 + default_vocabulary().count(prompt) + 3
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
    chat = await (await emu.post("/api/chat", json={"model": "llama3.2", "messages": messages,
                                                    "stream": False})).json()
    expected = 1 + sum(4 + default_vocabulary().count(m["content"]) for m in messages) + 3
    assert chat["prompt_eval_count"] == expected


async def test_generation_is_deterministic_and_honours_num_predict(emu: Client) -> None:
    body = {"model": "llama3.2", "prompt": "x", "stream": False, "options": {"num_predict": 5}}
    first = await (await emu.post("/api/generate", json=body)).read()
    second = await (await emu.post("/api/generate", json=body)).read()
    assert first == second
    parsed = json.loads(first)
    assert parsed["eval_count"] == 5 and parsed["done_reason"] == "length"


async def test_load_unload_and_ps(emu: Client) -> None:
    loaded = await (await emu.post("/api/generate", json={"model": "llama3.2"})).json()
    assert loaded["done_reason"] == "load" and loaded["response"] == ""
    ps = await (await emu.get("/api/ps")).json()
    assert [m["name"] for m in ps["models"]] == ["llama3.2:latest"]
    unloaded = await (await emu.post("/api/chat", json={"model": "llama3.2", "messages": [],
                                                        "keep_alive": 0})).json()
    assert unloaded["done_reason"] == "unload" and unloaded["message"] == {
        "role": "assistant", "content": ""}
    assert (await (await emu.get("/api/ps")).json()) == {"models": []}


async def test_embeddings_shapes(emu: Client) -> None:
    embed = await (await emu.post("/api/embed", json={"model": "nomic-embed-text",
                                                      "input": ["a", "b"]})).json()
    assert len(embed["embeddings"]) == 2
    assert abs(sum(v * v for v in embed["embeddings"][0]) - 1) < 1e-5
    assert embed["prompt_eval_count"] > 0
    short = await (await emu.post("/api/embed", json={"model": "nomic-embed-text", "input": "a",
                                                      "dimensions": 64})).json()
    assert len(short["embeddings"][0]) == 64
    legacy = await (await emu.post("/api/embeddings", json={"model": "nomic-embed-text",
                                                            "prompt": "a"})).json()
    assert abs(sum(v * v for v in legacy["embedding"]) - 1) > 1e-3  # not normalised
    empty = await (await emu.post("/api/embed", json={"model": "nomic-embed-text"})).json()
    assert empty == {"model": "nomic-embed-text", "embeddings": []}


async def test_openai_and_anthropic_shapes(emu: Client) -> None:
    empty_models = await emu.post("/v1/chat/completions", json={"model": "llama3.2", "messages": []})
    assert empty_models.status == 400
    assert await empty_models.read() == (b'{"error":{"message":"[] is too short - \'messages\'",'
                                         b'"type":"invalid_request_error","param":null,'
                                         b'"code":null}}\n')
    missing = await emu.post("/v1/messages", json={"model": "nope", "max_tokens": 4,
                                                   "messages": [{"role": "user", "content": "x"}]})
    error = await missing.json()
    assert missing.status == 404 and error["type"] == "error"
    assert error["error"]["type"] == "not_found_error" and error["request_id"].startswith("req_")


async def test_no_models_lists(aiohttp_client: Any) -> None:
    client: Client = await aiohttp_client(create_emulator_app(models=()))
    assert await (await client.get("/v1/models")).read() == b'{"object":"list","data":null}\n'
    assert await (await client.get("/api/tags")).read() == b'{"models":[]}'


async def test_cors_and_host_guards(emu: Client) -> None:
    evil = await emu.post("/api/chat", data=b"{}", headers={"Origin": "https://evil.example"})
    assert evil.status == 403 and await evil.read() == b""
    preflight = await emu.options("/api/chat", headers={"Origin": "http://localhost:3000",
                                                        "Access-Control-Request-Method": "POST"})
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert preflight.headers["Access-Control-Max-Age"] == "43200"
    foreign = await emu.get("/api/tags", headers={"Host": "ollama.example.com"})
    assert foreign.status == 403
    private = await emu.get("/api/tags", headers={"Host": "10.1.2.3:11434"})
    assert private.status == 200


async def test_stats_count_completed_runs(emu: Client) -> None:
    await emu.post("/api/generate", json={"model": "llama3.2", "prompt": "x", "stream": False})
    stats = await (await emu.get("/_emulator/stats")).json()
    assert stats["models"]["llama3.2:latest"]["completed"] == 1
    assert stats["active"] == 0 and stats["cancelled"] == 0
