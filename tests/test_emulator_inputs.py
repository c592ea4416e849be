"""Malformed and wrongly typed bodies get Ollama's answers from the emulator, never a 500 or a traceback.

A real emulator (the `emulate` CLI on loopback) and a real HTTP client; bodies are raw bytes, so that a
client-side JSON library normalises nothing. Ollama reads a body with gin's ShouldBindJSON (Go's
encoding/json into the route's request struct) before its handler validates it: what Go refuses is a 400
with Go's text, in the route's error shape (native `{"error": ...}`, OpenAI's on /v1, Anthropic's on
/v1/messages).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.support.servers import Server, start_emulator


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_emulator(tmp_path_factory.mktemp("inputs"), name="inputs-emu", output_tokens="3,6")
    yield server
    server.stop()


def _post(server: Server, path: str, body: bytes) -> httpx.Response:
    return httpx.post(server.url + path, content=body, timeout=30)


def _error_text(path: str, response: httpx.Response) -> str:
    """The error message, after checking the body has the route's error shape."""
    value = response.json()
    if path == "/v1/messages":
        assert value["type"] == "error" and set(value["error"]) == {"type", "message"}, value
        return str(value["error"]["message"])
    if path.startswith("/v1/"):
        assert set(value["error"]) == {"message", "type", "param", "code"}, value
        assert value["error"]["type"] == ("invalid_request_error" if response.status_code == 400
                                          else value["error"]["type"])
        return str(value["error"]["message"])
    assert set(value) == {"error"} and isinstance(value["error"], str), value
    return str(value["error"])


def _refused(server: Server, path: str, body: bytes, text: str) -> None:
    response = _post(server, path, body)
    assert response.status_code == 400, (path, body[:80], response.text[:300])
    assert _error_text(path, response) == text


HI = b'[{"role":"user","content":"hi"}]'


@pytest.mark.parametrize("path,body", [
    ("/api/generate", b"[" * 100_000),
    ("/api/generate", b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
    ("/api/chat", b'{"model":"llama3.2","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("/v1/chat/completions", b"[" * 100_000),
    ("/v1/messages", b"[" * 100_000),
])
def test_nesting_beyond_gos_limit_is_refused(emu: Server, path: str, body: bytes) -> None:
    _refused(emu, path, body, "exceeded max depth")


@pytest.mark.parametrize("depth", [900, 1000, 1020, 1100])
@pytest.mark.parametrize("inner", [b"", b"1e400", b"5.5"])
def test_nesting_near_pythons_recursion_limit_is_answered(emu: Server, depth: int, inner: bytes) -> None:
    """Go reads 10000 levels; Python's recursion limit (about 1000) comes first. Around it the answer is
    the run or Go's refusal (`exceeded max depth`, as the proxy gives, or the value's own error), never
    a RecursionError."""
    nested = b"[" * depth + inner + b"]" * depth
    body = b'{"model":"llama3.2","prompt":"x","stream":false,"options":{"a":%s}}' % nested
    response = _post(emu, "/api/generate", body)
    assert response.status_code in (200, 400), response.text[:300]
    if response.status_code == 400:
        assert _error_text("/api/generate", response) in (
            "exceeded max depth",
            "json: cannot unmarshal number 1e400 into Go struct field GenerateRequest.options of type "
            "float64")
    else:
        assert inner != b"1e400"


def test_chat_messages_of_the_wrong_type(emu: Server) -> None:
    """api.Message decodes itself through `type Alias Message` (Ollama api/types.go), so Go names the
    Alias type for a message that is not an object, and the full field path for a field inside one."""
    chat = b'{"model":"llama3.2","stream":false,"messages":%s}'
    _refused(emu, "/api/chat", chat % b"[1,2]",
             "json: cannot unmarshal number into Go struct field ChatRequest.messages of type api.Alias")
    _refused(emu, "/api/chat", chat % b'[{"role":1,"content":"x"}]',
             "json: cannot unmarshal number into Go struct field ChatRequest.messages.role of type string")
    _refused(emu, "/api/chat", chat % b'"hi"',
             "json: cannot unmarshal string into Go struct field ChatRequest.messages of type "
             "[]api.Message")
    ok = _post(emu, "/api/chat", chat % b'[null,{"role":"USER","content":null}]')
    assert ok.status_code == 200 and ok.json()["done"] is True


def test_openai_content_part_text_must_be_a_string(emu: Server) -> None:
    body = b'{"model":"llama3.2","messages":[{"role":"user","content":[{"type":"text","text":5}]}]}'
    _refused(emu, "/v1/chat/completions", body, "invalid message format")
    _refused(emu, "/v1/chat/completions", b'{"model":"llama3.2","messages":[{"role":"user"}]}',
             "invalid message content type: <nil>")
    parts = b'{"model":"llama3.2","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}'
    assert _post(emu, "/v1/chat/completions", parts).status_code == 200


def test_openai_model_of_the_wrong_type(emu: Server) -> None:
    _refused(emu, "/v1/chat/completions", b'{"model":5,"messages":' + HI + b"}",
             "json: cannot unmarshal number into Go struct field ChatCompletionRequest.model of type "
             "string")
    _refused(emu, "/v1/chat/completions", b'{"model":"llama3.2","max_tokens":1e30,"messages":' + HI + b"}",
             "json: cannot unmarshal number 1e30 into Go struct field ChatCompletionRequest.max_tokens "
             "of type int")


@pytest.mark.parametrize("value,text", [
    (b"NaN", "invalid character 'N' looking for beginning of value"),
    (b"Infinity", "invalid character 'I' looking for beginning of value"),
    (b"1e400", "json: cannot unmarshal number 1e400 into Go struct field GenerateRequest.options of "
               "type float64"),
])
def test_numbers_go_does_not_read(emu: Server, value: bytes, text: str) -> None:
    body = b'{"model":"llama3.2","prompt":"hi","stream":false,"options":{"num_predict":%s}}' % value
    _refused(emu, "/api/generate", body, text)


def test_a_whole_float_option_is_its_integer(emu: Server) -> None:
    """Options are a map[string]any (JSON numbers are float64) that Options.FromMap sets an int field
    from by its integer part: `num_predict: 2.0` and `2` are the same run."""
    base = b'{"model":"llama3.2","prompt":"hello there","stream":false,"options":{"num_predict":%s}}'
    as_int = _post(emu, "/api/generate", base % b"2").json()
    as_float = _post(emu, "/api/generate", base % b"2.0").json()
    assert as_float["eval_count"] == as_int["eval_count"] == 2
    assert as_float["response"] == as_int["response"] and as_float["done_reason"] == "length"
    truncated = _post(emu, "/api/generate", base % b"2.9").json()
    assert truncated["eval_count"] == 2


def test_trailing_bytes_after_the_body_are_never_read(emu: Server) -> None:
    """gin decodes with a json.Decoder, which stops after the first value."""
    response = _post(emu, "/api/generate", b'{"model":"llama3.2","prompt":"hi","stream":false}garbage')
    assert response.status_code == 200 and response.json()["done"] is True


@pytest.mark.parametrize("name", ["library/llama3.2", "registry.ollama.ai/library/llama3.2:latest",
                                  "LLAMA3.2", "Library/Llama3.2:Latest"])
def test_fully_qualified_names_are_the_same_model(emu: Server, name: str) -> None:
    prompt = b'{"model":"%s","prompt":"same words","stream":false,"options":{"num_predict":3}}'
    short = _post(emu, "/api/generate", prompt % b"llama3.2").json()
    qualified = _post(emu, "/api/generate", prompt % name.encode())
    assert qualified.status_code == 200
    assert qualified.json()["model"] == name  # echoed as requested, as Ollama does
    assert qualified.json()["response"] == short["response"]
    shown = _post(emu, "/api/show", json.dumps({"model": name}).encode())
    assert shown.status_code == 200
    assert shown.json()["details"] == _post(emu, "/api/show", b'{"model":"llama3.2"}').json()["details"]
    assert _post(emu, "/v1/chat/completions",
                 json.dumps({"model": name, "messages": [{"role": "user", "content": "x"}]}).encode()
                 ).status_code == 200
    names = [m["name"] for m in httpx.get(emu.url + "/api/tags", timeout=10).json()["models"]]
    assert names.count("llama3.2:latest") == 1 and not any("library" in n for n in names)


def test_pulling_a_qualified_name_lists_one_model(emu: Server) -> None:
    before = httpx.get(emu.url + "/api/tags", timeout=10).json()["models"]
    pulled = _post(emu, "/api/pull", b'{"model":"registry.ollama.ai/library/llama3.2","stream":false}')
    assert pulled.status_code == 200
    after = [m["name"] for m in httpx.get(emu.url + "/api/tags", timeout=10).json()["models"]]
    assert sorted(after) == sorted(m["name"] for m in before)


@pytest.mark.parametrize("name", ["library/nope", "registry.ollama.ai/library/nope:latest",
                                  "someone/llama3.2", "llama3.2:other"])
def test_unknown_qualified_names_are_not_found(emu: Server, name: str) -> None:
    response = _post(emu, "/api/generate", json.dumps({"model": name, "prompt": "x"}).encode())
    assert response.status_code == 404 and response.json() == {"error": f"model '{name}' not found"}


@pytest.mark.parametrize("body,text", [
    (b'{"model":"llama3.2","prompt":"x","options":{"stop":"s"}}', 'option "stop" must be of type array'),
    (b'{"model":"llama3.2","prompt":"x","options":{"stop":[1]}}',
     'option "stop" must be of an array of strings'),
    (b'{"model":"llama3.2","prompt":"x","options":{"num_ctx":"big"}}',
     'option "num_ctx" must be of type integer'),
    (b'{"model":"llama3.2","prompt":"x","options":{"use_mmap":1}}',
     'option "use_mmap" must be of type boolean'),
])
def test_option_values_of_the_wrong_type_fail_the_run(emu: Server, body: bytes, text: str) -> None:
    """Ollama decodes `options` as a map and applies it when it schedules the run: a wrong value type is
    its 500 (reference §4.2, §9), with Go's text, not a crash."""
    response = _post(emu, "/api/generate", body)
    assert response.status_code == 500 and response.json() == {"error": text}


_WRONG = [b"5", b"1.5", b'"s"', b"true", b"[1]", b'{"a":1}', b"1e400", b"[null]", b'[{"x":[1]}]']
_VALID: dict[str, bytes] = {
    "/api/generate": b'"model":"llama3.2","prompt":"hi","stream":false',
    "/api/chat": b'"model":"qwen3","messages":[{"role":"user","content":"hi"}],"stream":false',
    "/api/embed": b'"model":"nomic-embed-text","input":"hi"',
    "/api/embeddings": b'"model":"nomic-embed-text","prompt":"hi"',
    "/api/show": b'"model":"llama3.2"',
    "/api/pull": b'"model":"llama3.2","stream":false',
    "/api/create": b'"model":"made","from":"llama3.2","stream":false',
    "/api/copy": b'"source":"llama3.2","destination":"copied"',
    "/v1/chat/completions": b'"model":"llama3.2","messages":[{"role":"user","content":"hi"}]',
    "/v1/completions": b'"model":"llama3.2","prompt":"hi"',
    "/v1/embeddings": b'"model":"nomic-embed-text","input":"hi"',
    "/v1/responses": b'"model":"llama3.2","input":"hi"',
    "/v1/messages": b'"model":"llama3.2","max_tokens":5,"messages":[{"role":"user","content":"hi"}]',
}
_FIELDS: dict[str, list[str]] = {
    "/api/generate": ["model", "prompt", "suffix", "system", "template", "context", "stream", "raw",
                      "format", "keep_alive", "images", "options", "think", "truncate", "shift",
                      "logprobs", "top_logprobs"],
    "/api/chat": ["model", "messages", "stream", "format", "keep_alive", "tools", "options", "think",
                  "truncate", "logprobs", "top_logprobs"],
    "/api/embed": ["model", "input", "keep_alive", "truncate", "dimensions", "options"],
    "/api/embeddings": ["model", "prompt", "keep_alive", "options"],
    "/api/show": ["model", "verbose", "options"],
    "/api/pull": ["model", "stream", "insecure"],
    "/api/create": ["model", "from", "files", "stream", "license", "parameters", "messages"],
    "/api/copy": ["source", "destination"],
    "/v1/chat/completions": ["model", "messages", "stream", "stream_options", "max_tokens", "seed",
                             "stop", "temperature", "top_p", "response_format", "tools", "reasoning",
                             "reasoning_effort"],
    "/v1/completions": ["model", "prompt", "max_tokens", "seed", "stop", "stream", "stream_options",
                        "temperature", "top_p", "suffix"],
    "/v1/embeddings": ["model", "input", "dimensions", "encoding_format"],
    "/v1/responses": ["model", "input", "instructions", "max_output_tokens", "temperature", "stream"],
    "/v1/messages": ["model", "max_tokens", "messages", "system", "stream", "temperature",
                     "stop_sequences"],
}
_MESSAGE_FIELDS = {"/api/chat": ["role", "content", "images", "tool_calls", "thinking"],
                   "/v1/chat/completions": ["role", "content", "tool_calls", "name"],
                   "/v1/messages": ["role", "content"]}


def _sweep() -> list[tuple[str, bytes]]:
    cases = []
    for path, fields in _FIELDS.items():
        for field in fields:
            for wrong in _WRONG:
                cases.append((path, b"{" + _VALID[path] + b',"' + field.encode() + b'":' + wrong + b"}"))
    for path, fields in _MESSAGE_FIELDS.items():
        for field in fields:
            for wrong in _WRONG:
                message = b'{"role":"user","content":"hi","' + field.encode() + b'":' + wrong + b"}"
                body = _VALID[path].replace(b'{"role":"user","content":"hi"}', message)
                cases.append((path, b"{" + body + b"}"))
        for wrong in _WRONG:
            cases.append((path, b"{" + _VALID[path].replace(b'{"role":"user","content":"hi"}', wrong)
                          + b"}"))
    return cases


_OLLAMA_500S = ("pull model manifest: file does not exist", 'option "')
"""Where Ollama itself answers 500 (reference §4.2, §6): a pull of a name the registry does not have (a
valid string in a string field), an option value of the wrong type."""


def _status_and_shape(emu: Server, path: str, body: bytes) -> int:
    response = _post(emu, path, body)
    status = response.status_code
    if status >= 400:
        text = _error_text(path, response)
        assert status < 500 or text.startswith(_OLLAMA_500S), (path, body, response.text[:300])
    return status


def test_wrong_types_in_every_field_are_answered_not_crashed(emu: Server) -> None:
    """Every field the handlers read, given every JSON kind: a 2xx, or a 4xx in the route's shape; and
    nothing in the emulator's log is a traceback."""
    statuses: dict[int, int] = {}
    for path, body in _sweep():
        status = _status_and_shape(emu, path, body)
        statuses[status] = statuses.get(status, 0) + 1
    assert statuses.get(400, 0) > 300  # the sweep does reach the decoder's refusals
    assert not _crashes(emu.log())


def test_the_log_holds_no_traceback(emu: Server) -> None:
    """After every test of this module (module order: this one runs last)."""
    assert not _crashes(emu.log())


def _crashes(log: str) -> list[str]:
    """Lines where a request ended in an exception: the serving layer's `error handling a request:
    <type>` (frames follow, the message withheld), aiohttp's own, or a bare traceback."""
    markers = ("error handling a request", "Error handling request", "Traceback")
    return [line for line in log.splitlines() if any(marker in line for marker in markers)]
