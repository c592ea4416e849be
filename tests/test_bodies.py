"""Bodies are read as Ollama reads them (Go's encoding/json), through a real proxy and emulator.

Every body here is sent as raw bytes: a JSON library on the client side would normalise the very things
under test (lone surrogates, out-of-range numbers, invalid UTF-8, duplicate and case-variant keys).
What Go accepts, the chain understands (limits, canonical options and the queue still apply); what Go
refuses is Ollama's 400 before any step; an inference body the chain cannot read is refused (fail closed).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from proxy import gojson
from proxy.context import RequestContext
from proxy.offload import PARSE_OFFLOAD_BYTES, parsed_json
from proxy.ollama import classify
from tests.support.servers import Server, start_emulator, start_proxy
from tests.support.stall import healthz_waits

WORDS = "the quarterly incident review covers deployment rollbacks and customer impact ".split()
LONG = " ".join(WORDS[i % len(WORDS)] for i in range(200)).encode()
"""About 200 tokens: four times the proxy's limit of 50."""


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bodies")


@pytest.fixture(scope="module")
def emulator(tmp: Path) -> Iterator[Server]:
    server = start_emulator(tmp, fixed_clock=False, name="bodies-emu")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(tmp: Path, emulator: Server) -> Iterator[Server]:
    server = start_proxy(tmp, [emulator.url], {
        "models": {"qwen3": {"options": {"num_ctx": 2048}}},
        "chain": {"limits": {"max_prompt_tokens": 50}}}, name="bodies")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def limits_off(tmp: Path, emulator: Server) -> Iterator[Server]:
    server = start_proxy(tmp, [emulator.url], {"chain": {"limits": {"mode": "off"}}},
                         name="bodies-off")
    yield server
    server.stop()


def _post(server: Server, path: str, body: bytes) -> httpx.Response:
    return httpx.post(server.url + path, content=body, timeout=30)


def _posts(emulator: Server) -> dict[str, int]:
    """Requests the emulator received, by route, leaving out the health probes (GET)."""
    return {k: v for k, v in emulator.stats()["requests"].items() if not k.startswith("GET ")}


# What Go's decoder accepts but orjson refuses (or reads differently): each wraps a generate body whose
# prompt is LONG. The proxy must see the prompt, count it and refuse it.
GO_ACCEPTS: dict[str, bytes] = {
    "lone high surrogate": b'{"model":"llama3.2","stream":false,"x":"\\ud800","prompt":"%s"}',
    "lone low surrogate first": b'{"model":"llama3.2","stream":false,"x":"\\udc00\\ud83d","prompt":"%s"}',
    "out of range number": b'{"model":"llama3.2","stream":false,"x":1e400,"prompt":"%s"}',
    "negative out of range": b'{"model":"llama3.2","stream":false,"x":[-1e999],"prompt":"%s"}',
    "huge integer": b'{"model":"llama3.2","stream":false,"x":' + b"9" * 400 + b',"prompt":"%s"}',
    "invalid utf-8": b'{"model":"llama3.2","stream":false,"x":"\xff\xfe\xc3","prompt":"%s"}',
    "invalid utf-8 in the prompt": b'{"model":"llama3.2","stream":false,"prompt":"\xe2\x82%s"}',
    "bytes after the value": b'{"model":"llama3.2","stream":false,"prompt":"%s"} {"not": "read"}',
    "garbage after the value": b'{"model":"llama3.2","stream":false,"prompt":"%s"}garbage',
    "duplicate key, last wins": b'{"model":"llama3.2","stream":false,"prompt":"hi","prompt":"%s"}',
    "case-variant keys": b'{"MODEL":"llama3.2","Stream":false,"PROMPT":"%s"}',
    "case variant after the exact key": b'{"model":"llama3.2","stream":false,"prompt":"hi","pRoMpT":"%s"}',
    "long s folds onto s": b'{"model":"llama3.2","stream":false,"prompt":"hi","\xc5\xbfystem":"%s"}',
}


@pytest.mark.parametrize("name", list(GO_ACCEPTS))
def test_limits_apply_to_every_body_go_accepts(proxy: Server, name: str) -> None:
    body = GO_ACCEPTS[name].replace(b"%s", LONG)
    response = _post(proxy, "/api/generate", body)
    assert response.status_code == 400, (name, response.text[:200])
    assert response.json()["code"] == "prompt_too_long", name


def test_limits_apply_to_chat_messages_with_case_variant_fields(proxy: Server) -> None:
    body = (b'{"model":"llama3.2","stream":false,"x":"\\ud800","messages":'
            b'[{"ROLE":"user","Content":"%s"}]}').replace(b"%s", LONG)
    response = _post(proxy, "/api/chat", body)
    assert response.status_code == 400 and response.json()["code"] == "prompt_too_long"
    openai = b'{"model":"llama3.2","x":1e400,"messages":[{"role":"user","CONTENT":"%s"}]}'
    response = _post(proxy, "/v1/chat/completions", openai.replace(b"%s", LONG))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "prompt_too_long"


def test_short_bodies_go_accepts_are_served_and_queued(proxy: Server) -> None:
    """Under the limit, the same decorations are served; the queue admitted them (X-Queue-Wait-Ms is
    set by backpressure only)."""
    for name in ("lone high surrogate", "out of range number", "duplicate key, last wins"):
        body = GO_ACCEPTS[name].replace(b"%s", b"say hi")
        response = _post(proxy, "/api/generate", body)
        assert response.status_code == 200, (name, response.text[:200])
        assert "x-queue-wait-ms" in response.headers, name
        assert response.json()["done"] is True


def test_options_are_rewritten_whatever_else_the_body_holds(proxy: Server, emulator: Server) -> None:
    """num_ctx is held to the canonical value even next to fields orjson refuses, and the rewritten
    body is valid for Go: the emulator (which refuses invalid UTF-8 with a 500) serves it."""
    warm = _post(proxy, "/api/generate", b'{"model":"qwen3","prompt":"hi","stream":false,"think":false}')
    assert warm.status_code == 200
    loads = emulator.stats()["loads"]
    for extra in (b'"x":"\\ud800"', b'"x":1e400', b'"x":"\xff"', b'"big":' + b"7" * 30):
        body = (b'{"model":"qwen3","prompt":"hi","stream":false,"think":false,'
                b'"options":{"num_ctx":100000},' + extra + b"}")
        response = _post(proxy, "/api/generate", body)
        assert response.status_code == 200, (extra, response.text[:200])
        assert response.headers["x-options-rewritten"] == "num_ctx=100000->2048", extra
    assert emulator.stats()["loads"] == loads  # no reload: every request reached the same runner


def test_a_number_go_refuses_for_its_field_is_ollamas_400(proxy: Server, emulator: Server) -> None:
    body = b'{"model":"llama3.2","prompt":"hi","stream":false,"options":{"num_ctx":1e400}}'
    response = _post(proxy, "/api/generate", body)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    error = response.json()
    assert error["code"] == "invalid_request" and "cannot unmarshal number 1e400" in error["error"]
    assert _posts(emulator) == _posts(emulator)  # stable while idle
    before = _posts(emulator)
    _post(proxy, "/api/generate", body)
    assert _posts(emulator) == before  # the replica never saw it
    # The OpenAI and Anthropic structs have no `options`: Go skips it there, and so does the check.
    for path, extra in (("/v1/chat/completions", b""), ("/v1/messages", b',"max_tokens":4')):
        skipped = b'{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"options":{"x":1e400}' \
            + extra + b"}"
        assert _post(proxy, path, skipped).status_code == 200, path


GO_REFUSES: dict[str, bytes] = {
    "NaN": b'{"model":"llama3.2","prompt":"hi","x":NaN}',
    "Infinity": b'{"model":"llama3.2","prompt":"hi","x":Infinity}',
    "-Infinity": b'{"model":"llama3.2","prompt":"hi","x":-Infinity}',
    "trailing comma": b'{"model":"llama3.2","prompt":"hi",}',
    "single quotes": b"{'model':'llama3.2','prompt':'hi'}",
    "comment": b'{"model":"llama3.2" /* c */,"prompt":"hi"}',
    "line comment first": b'// c\n{"model":"llama3.2","prompt":"hi"}',
    "byte order mark": b'\xef\xbb\xbf{"model":"llama3.2","prompt":"hi"}',
    "control character": b'{"model":"llama3.2","prompt":"a\x01b"}',
    "bad escape": b'{"model":"llama3.2","prompt":"\\x41"}',
    "short unicode escape": b'{"model":"llama3.2","prompt":"\\u12"}',
    "leading zero": b'{"model":"llama3.2","prompt":"hi","x":01}',
    "truncated": b'{"model":"llama3.2","prompt":"hi"',
    "bare word": b"model",
    "whitespace only": b" \n\t ",
}


@pytest.mark.parametrize("name", list(GO_REFUSES))
def test_what_go_refuses_is_ollamas_400_before_the_chain(proxy: Server, emulator: Server,
                                                         name: str) -> None:
    before = _posts(emulator)
    response = _post(proxy, "/api/generate", GO_REFUSES[name])
    assert response.status_code == 400, (name, response.text[:200])
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    error = response.json()
    assert error["code"] == "invalid_request", name
    assert error["error"] and "\n" not in error["error"], name
    assert _posts(emulator) == before  # never forwarded


def test_go_error_texts(proxy: Server) -> None:
    cases = {b'{"model":"llama3.2","prompt":"hi","x":NaN}':
             "invalid character 'N' looking for beginning of value",
             b'{"model":"llama3.2","prompt":"hi"': "unexpected EOF",
             b" ": "missing request body",
             b"{'model':1}": "invalid character '\\'' looking for beginning of object key string"}
    for body, text in cases.items():
        assert _post(proxy, "/api/chat", body).json()["error"] == text, body


def test_refusals_take_the_routes_dialect(proxy: Server) -> None:
    response = _post(proxy, "/v1/chat/completions", b'{"model":"llama3.2","messages":[],"x":NaN}')
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["code"] == "invalid_request"
    response = _post(proxy, "/v1/messages", b'{"model":"llama3.2","max_tokens":5,"messages":[],}')
    assert response.status_code == 400 and response.json()["type"] == "error"
    response = _post(proxy, "/api/show", b'{"model":"llama3.2","verbose":NaN}')
    assert response.status_code == 400 and response.json()["code"] == "invalid_request"


UNREADABLE: list[bytes] = [
    b"[]", b'"llama3.2"', b"5", b"null", b"{}", b'{"model":""}', b'{"model":null}', b'{"model":5}',
    b'{"model":["llama3.2"]}', b'{"model":{"name":"llama3.2"}}', b'{"model":true}',
    b'{"name":"llama3.2","prompt":"hi"}',
]
INFERENCE_ROUTES = ["/api/generate", "/api/chat", "/api/embed", "/api/embeddings",
                    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
                    "/v1/messages"]
NO_MODEL: set[bytes] = {b"null", b"{}", b'{"model":""}', b'{"model":null}',
                        b'{"name":"llama3.2","prompt":"hi"}'}
"""The unreadable bodies that name no model: Ollama's handler answers them 404 `model '' not found` on
the routes of NO_MODEL_404 (generate, embed and the /v1 routes it runs on them), 400 elsewhere."""
NO_MODEL_404 = {"/api/generate", "/api/embed", "/v1/completions", "/v1/embeddings"}


@pytest.mark.parametrize("path", INFERENCE_ROUTES)
def test_inference_bodies_the_chain_cannot_read_are_refused(proxy: Server, limits_off: Server,
                                                            emulator: Server, path: str) -> None:
    """Not an object, or no model as a string: 400 in the route's shape (no model: 404 where Ollama
    says so), in every limits mode."""
    for server in (proxy, limits_off):
        before = _posts(emulator)
        for body in UNREADABLE:
            response = _post(server, path, body)
            text = response.text
            if body in NO_MODEL and path in NO_MODEL_404:
                assert response.status_code == 404, (path, body, text[:200])
                assert "model '' not found" in text and "model_not_found" in text, (path, body)
                continue
            assert response.status_code == 400, (path, body, text[:200])
            assert "invalid_request" in text or "invalid_request_error" in text, (path, body)
        empty = httpx.post(server.url + path, timeout=30)
        assert empty.status_code == 400 and "missing request body" in empty.text, path
        assert _posts(emulator) == before, path  # nothing reached the replica


def test_limits_off_still_reads_bodies_as_go_does(limits_off: Server) -> None:
    response = _post(limits_off, "/api/generate", GO_REFUSES["NaN"])
    assert response.status_code == 400 and response.json()["code"] == "invalid_request"
    served = _post(limits_off, "/api/generate",
                   GO_ACCEPTS["lone high surrogate"].replace(b"%s", b"hi"))
    assert served.status_code == 200 and "x-queue-wait-ms" in served.headers


def test_rewritten_bodies_keep_what_go_would_read() -> None:
    """The re-encoding keeps out-of-range numbers as written and replaces what Go replaces, so Go reads
    the rewritten body as it would have read the original."""
    raw = (b'{"model":"m","x":1e400,"y":' + b"1" * 30 + b',"z":"\\ud800\xff","MODEL":"n",'
           b'"options":{"NUM_CTX":1}}')
    value, slow = gojson.loads(raw)
    view = gojson.request_view(value, raw, slow)
    assert view["model"] == "n"
    assert view["options"] == {"NUM_CTX": 1}  # map keys are exact in Go: not a struct field
    encoded = gojson.dumps(view)
    assert b'"x":1e400' in encoded and b'"y":' + b"1" * 30 in encoded
    assert json.loads(encoded)["z"] == "\ufffd\ufffd"
    encoded.decode("utf-8")  # valid UTF-8 throughout


def test_go_folds_non_ascii_letters_onto_field_names(proxy: Server) -> None:
    """Go matches `\\u0131nput` (dotless i) to `input` and `\\u017fystem` (long s) to `system`: so does
    the chain, at the top level and inside an Anthropic content block (a Go struct)."""
    embed = '{"model":"nomic-embed-text","\u0131nput":"%s"}'.encode().replace(b"%s", LONG)
    response = _post(proxy, "/api/embed", embed)
    assert response.status_code == 400 and response.json()["code"] == "prompt_too_long"
    tool_use = ('{"model":"llama3.2","max_tokens":5,"messages":[{"role":"assistant","content":[{"type":'
                '"tool_use","id":"t1","name":"f","\u0131nput":{"q":"%s"}}]},{"role":"user","content":"hi"}]}'
                ).encode().replace(b"%s", LONG)
    response = _post(proxy, "/v1/messages", tool_use)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "more than the limit" in response.json()["error"]["message"]
    assert gojson.go_fold("\u0131nput") == gojson.go_fold("INPUT")
    assert gojson.go_fold("\u212aeep_alive") == gojson.go_fold("keep_alive")
    assert gojson.go_fold("stre\u00e4m") != gojson.go_fold("stream")


def test_a_responses_reasoning_item_counts_toward_the_prompt_limit(proxy: Server) -> None:
    """Ollama renders a Responses `reasoning` item's `encrypted_content` as an assistant turn's
    thinking: ~200 tokens there are refused under the limit of 50 (they were not counted)."""
    body = (b'{"model":"llama3.2","input":[{"type":"reasoning","summary":[],"encrypted_content":"%s"},'
            b'{"role":"user","content":"hi"}]}').replace(b"%s", LONG)
    response = _post(proxy, "/v1/responses", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "prompt_too_long"


@pytest.mark.parametrize("path", ["/api/generate", "/api/chat", "/api/embed", "/api/embeddings",
                                  "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                  "/v1/messages"])
def test_go_type_errors_name_the_routes_own_request_type(proxy: Server, emulator: Server,
                                                          path: str) -> None:
    """As Ollama's decoder names them (`api.GenerateRequest`, `openai.ChatCompletionRequest`), which
    the proxy answers for it: the same text as the replica would give."""
    for body in (b"[]", b"7"):
        ours, theirs = _post(proxy, path, body), _post(emulator, path, body)
        assert ours.status_code == theirs.status_code == 400
        assert _message(ours.json()) == _message(theirs.json()), (path, body)
    struct = {"/api/generate": "GenerateRequest", "/api/chat": "ChatRequest",
              "/api/embed": "EmbedRequest", "/api/embeddings": "EmbeddingRequest"}.get(path)
    if struct is not None:  # the native routes decode `model` first
        wrong = _post(proxy, path, b'{"model":5}').json()["error"]
        assert wrong == f"json: cannot unmarshal number into Go struct field {struct}.model of type string"
        big = _post(proxy, path, b'{"model":"llama3.2","options":{"num_ctx":1e400}}').json()["error"]
        assert big == ("json: cannot unmarshal number 1e400 into Go struct field "
                       f"{struct}.options of type float64")


def _message(error: dict[str, Any]) -> str:
    inner = error["error"]
    return str(inner["message"] if isinstance(inner, dict) else inner)


def test_go_error_texts_name_the_container(proxy: Server) -> None:
    cases = {b'{"model":"llama3.2" "prompt":"hi"}':
             "invalid character '\"' after object key:value pair",
             b'{"model":"llama3.2","messages":[{"role":"user"} {}]}':
             "invalid character '{' after array element",
             b'{"model":"llama3.2","prompt":"hi",}':
             "invalid character '}' looking for beginning of object key string"}
    for body, text in cases.items():
        assert _post(proxy, "/api/chat", body).json()["error"] == text, body


def test_what_ollama_renders_into_the_prompt_is_counted(proxy: Server) -> None:
    """The prompt limit covers everything Ollama puts in front of the model, not only `prompt` and
    `content`: an earlier exchange's `context` token ids, `suffix`, `system`, and tool schemas."""
    bodies = {
        "/api/generate": [
            {"model": "llama3.2", "prompt": "hi", "stream": False, "context": list(range(300))},
            {"model": "llama3.2", "prompt": "hi", "stream": False, "suffix": LONG.decode()},
            {"model": "llama3.2", "prompt": "hi", "stream": False, "system": LONG.decode()}],
        "/api/chat": [
            {"model": "llama3.2", "stream": False, "messages": [{"role": "user", "content": "hi"}],
             "tools": [{"type": "function", "function": {"name": "f", "description": LONG.decode(),
                                                         "parameters": {"type": "object"}}}]}],
    }
    for path, cases in bodies.items():
        for body in cases:
            response = _post(proxy, path, json.dumps(body).encode())
            assert response.status_code == 400, (path, list(body))
            assert response.json()["code"] == "prompt_too_long"
    served = _post(proxy, "/api/generate", json.dumps({
        "model": "llama3.2", "prompt": "hi", "stream": False, "context": [1, 2, 3]}).encode())
    assert served.status_code == 200


def test_bodies_nested_deeper_than_orjson_writes_are_counted_and_rewritten(proxy: Server) -> None:
    """Go decodes JSON nested up to 10,000 levels; orjson writes 255. A body 300 levels deep (a tool
    schema, a `format`) is counted and rewritten like any other, where the proxy answered 500."""
    nested = b"[" * 300 + b"]" * 300
    schema = b'{"type":"array","items":' * 300 + b'{"type":"string"}' + b"}" * 300
    served = _post(proxy, "/api/generate", b'{"model":"qwen3","prompt":"hi","stream":false,'
                   b'"options":{"num_predict":2},"format":' + nested + b"}")
    assert served.status_code == 200, served.text[:200]  # num_ctx added: the body was written again
    assert served.headers["x-options-rewritten"] == "num_ctx=+2048"
    counted = {
        "/api/chat": b'{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"hi"}],'
                     b'"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object",'
                     b'"properties":{"a":' + schema + b"}}}}]}",
        "/v1/messages": b'{"model":"llama3.2","max_tokens":5,"messages":[{"role":"assistant","content":'
                        b'[{"type":"tool_use","id":"t","name":"f","input":{"a":' + nested + b'}}]},'
                        b'{"role":"user","content":"hi"}]}',
    }
    for path, body in counted.items():  # the nested JSON is rendered into the prompt: over 50 tokens
        response = _post(proxy, path, body)
        assert response.status_code == 400, (path, response.status_code, response.text[:200])
        assert "more than the limit of 50 tokens" in response.text


def test_a_deep_body_beside_a_large_flat_part_is_rewritten_without_stalling_the_proxy(
        proxy: Server) -> None:
    """One branch nested past orjson's 254 levels made the rewrite (num_ctx added) write the WHOLE body
    from Python, one orjson call per number, on the event loop: 6 MB took ~3 s, and /healthz waited
    as long. Now the flat part is one orjson call. A deep part too large to open is a 400."""
    junk = b"[" + b",".join([b"1"] * 3_000_000) + b"]"
    body = (b'{"model":"qwen3","prompt":"hi","stream":false,"options":{"num_predict":2},"junk":' + junk
            + b',"format":' + b"[" * 300 + b"]" * 300 + b"}")
    with healthz_waits(proxy.url) as waits:
        served = _post(proxy, "/api/generate", body)
    assert served.status_code == 200, served.text[:200]
    assert served.headers["x-options-rewritten"] == "num_ctx=+2048"
    assert waits and max(waits) < 1.0, max(waits)  # ~3 s while the body was written from Python

    too_large = (b'{"model":"qwen3","prompt":"hi","stream":false,"format":[' + b"[" * 300 + b"]" * 300
                 + b"," + junk[1:] + b"}")  # the deep array holds the 3,000,000 numbers itself
    started = time.perf_counter()
    refused = _post(proxy, "/api/generate", too_large)
    took = time.perf_counter() - started
    assert refused.status_code == 400, (refused.status_code, refused.text[:200])
    assert refused.json() == {"code": "invalid_request", "error": "the body nests deeper than 254 levels "
                              "and is too large for the proxy to rewrite"}
    assert took < 2.0, took  # not written number by number first
    chat = (b'{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"hi"}],'
            b'"tools":[' + b"[" * 300 + b"]" * 300 + b"," + junk[1:] + b"}")
    refused = _post(proxy, "/v1/chat/completions", chat)  # counted (tools are rendered), not rewritten
    assert refused.status_code == 400, (refused.status_code, refused.text[:200])
    assert refused.json()["error"]["code"] == "invalid_request"


def test_a_lone_surrogate_in_a_deeply_nested_body_is_replaced(proxy: Server) -> None:
    """A lone surrogate escape is U+FFFD to Go at any depth; replacing it walked the body by recursion,
    and a body 700 levels deep (Go takes 10,000) answered 500."""
    nested = b"[" * 700 + b'"\\udc00"' + b"]" * 700
    served = _post(proxy, "/api/generate", b'{"model":"llama3.2","prompt":"hi \\ud800","stream":false,'
                   b'"options":{"num_predict":2},"unknown":' + nested + b"}")
    assert served.status_code == 200, served.text[:200]


def test_the_model_follows_every_rewrite_of_the_body() -> None:
    """`ctx.model` is kept per parsed body; a plugin that edits the parsed body in place and hands
    it back (an alias plugin) must not leave the steps acting on the old name."""
    ctx = RequestContext(request_id="r", route=classify("POST", "/api/chat"),
                         body=b'{"model":"gpt-4o","messages":[]}')
    assert ctx.model == "gpt-4o"
    body = ctx.json()
    body["model"] = "llama3.2"
    ctx.replace_json(body)  # the same object, edited
    assert ctx.model == "llama3.2" and b'"llama3.2"' in (ctx.body or b"")
    ctx.restore_body(b'{"model":"gpt-4o"}', {"model": "gpt-4o"})
    assert ctx.model == "gpt-4o"


def test_a_large_body_is_parsed_in_a_worker_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A body over PARSE_OFFLOAD_BYTES is parsed in a worker thread; every later step that asks
    (each plugin, then limits) gets the cached view without another thread hop."""
    hops: list[object] = []
    real = asyncio.to_thread

    async def counted(fn: Any, *args: Any) -> Any:
        hops.append(fn)
        return await real(fn, *args)

    monkeypatch.setattr(asyncio, "to_thread", counted)
    prompt = "word " * (PARSE_OFFLOAD_BYTES // 4)
    ctx = RequestContext(request_id="r", route=classify("POST", "/api/generate"),
                         body=orjson.dumps({"model": "llama3.2", "prompt": prompt}))

    async def steps() -> None:
        for _ in range(3):
            assert (await parsed_json(ctx))["model"] == "llama3.2"

    asyncio.run(steps())
    assert len(hops) == 1


@pytest.mark.parametrize("body,text", [
    (b'{"model":"llama3.2","x":-Infinity}', "invalid character 'I' in numeric literal"),
    (b'{"model":"llama3.2","x":-}', "invalid character '}' in numeric literal"),
    (b'{"model":"llama3.2","x":- 1}', "invalid character ' ' in numeric literal"),
    (b'{"model":"llama3.2","x":-', "unexpected EOF"),
    (b'{"model":"llama3.2","x":Infinity}', "invalid character 'I' looking for beginning of value"),
])
def test_a_minus_sign_without_digits_is_gos_numeric_literal_error(proxy: Server, body: bytes,
                                                                  text: str) -> None:
    """Go's scanner, after a minus sign, wants a digit and names the character it found instead."""
    with pytest.raises(gojson.GoJSONError) as error:
        gojson.loads(body)
    assert str(error.value) == text
    assert _post(proxy, "/api/generate", body).json()["error"] == text


@pytest.mark.parametrize("second", [b'"options"', b'"OPTIONS"', b'"\\u006fption\\u0073"',
                                    b'"option\xc5\xbf"'])
def test_options_written_twice_are_merged_as_go_merges_a_map(proxy: Server, second: bytes) -> None:
    """`options` is a map to Ollama (map[string]any), and Go decodes a key that comes again into the
    map it already holds, keeping its entries ("Unmarshal reuses the existing map, keeping existing
    entries"): Ollama runs with num_ctx 100000 here. The proxy kept only the last object, saw no
    num_ctx, and passed the body on untouched: one tenant could reload a shared model at will."""
    body = (b'{"model":"llama3.2","prompt":"hi","stream":false,"options":{"num_ctx":100000},'
            + second + b':{"num_predict":2}}')
    response = _post(proxy, "/api/generate", body)
    assert response.status_code == 200, response.text[:200]
    assert response.headers.get("x-options-rewritten") == "num_ctx=100000->4096"
    assert response.json()["eval_count"] <= 2  # the later object's entries hold too


@pytest.mark.parametrize("second", [b'"messages"', b'"Messages"', b'"me\\u0073sages"'])
def test_openai_messages_written_twice_are_read_into_the_first_ones(proxy: Server, second: bytes) -> None:
    """Ollama's /v1/chat/completions decodes into `[]openai.Message`, a plain struct: Go decodes the
    elements of an array that comes again into the elements it already holds, so a field the later
    element leaves out keeps the earlier value (golang/go#21092). Ollama renders the first `content`
    here; the proxy counted only the later array (a few tokens), so a prompt of any size went past the
    limit."""
    body = (b'{"model":"llama3.2","messages":[{"role":"user","content":"%s"}],' + second
            + b':[{"role":"user"}]}').replace(b"%s", LONG)
    response = _post(proxy, "/v1/chat/completions", body)
    assert response.status_code == 400, response.text[:200]
    assert response.json()["error"]["code"] == "prompt_too_long"


def test_anthropic_messages_written_twice_are_read_into_the_first_ones(proxy: Server) -> None:
    """/v1/messages decodes into `[]anthropic.MessageParam`, a plain struct too: the same reading."""
    body = (b'{"model":"llama3.2","max_tokens":2,"messages":[{"role":"user","content":"%s"}],'
            b'"messages":[{"role":"user"}]}').replace(b"%s", LONG)
    response = _post(proxy, "/v1/messages", body)
    assert response.status_code == 400, response.text[:200]
    assert response.json()["error"]["message"].startswith("prompt is ")


def test_anthropic_tools_written_twice_are_read_into_the_first_ones(proxy: Server) -> None:
    """`[]anthropic.Tool` is a plain struct as well: a later `tools` array that leaves out the
    description keeps the earlier one, which Ollama renders into the prompt."""
    body = (b'{"model":"llama3.2","max_tokens":2,"messages":[{"role":"user","content":"hi"}],'
            b'"tools":[{"name":"lookup","description":"%s"}],"tools":[{"name":"lookup"}]}'
            ).replace(b"%s", LONG)
    response = _post(proxy, "/v1/messages", body)
    assert response.status_code == 400, response.text[:200]
    assert response.json()["error"]["message"].startswith("prompt is ")
