"""The `limits` step against the emulator: prompt limits counted with the model's own vocabulary (fetched
from /api/show), reject and truncate policies, shadow mode, canonical options, deadlines, X-Service-Limits
and the detection of Ollama's silent truncation."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.polling import wait_for
from tests.support.servers import Server, start_emulator, start_proxy

SHORT, CAPPED = "sk-short-deadline", "sk-capped-prompt"
WORDS = "the quarterly incident review covers deployment rollbacks and customer impact ".split()


def _words(count: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(count))


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("limits")


@pytest.fixture(scope="module")
def emulator(tmp: Path) -> Iterator[Server]:
    server = start_emulator(tmp, fixed_clock=False, decode_tokens_per_s=50, output_tokens="5,10",
                            name="limits-emu")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def limited(tmp: Path, emulator: Server) -> Iterator[Server]:
    proxy = start_proxy(tmp, [emulator.url], {
        "tenants": [{"name": "short", "keys": [SHORT], "deadline_s": 1.0},
                    {"name": "capped", "keys": [CAPPED], "max_prompt_tokens": 100}],
        "models": {"llama3.2": {"options": {"num_ctx": 2048, "keep_alive": "10m"}},
                   "qwen3": {"prompt_policy": "truncate"}},
        "chain": {"limits": {"max_prompt_tokens": 300}}}, name="limited")
    yield proxy
    proxy.stop()


def _counted(error: str) -> int:
    match = re.search(r"prompt is (\d+) tokens", error)
    assert match, error
    return int(match.group(1))


def test_count_matches_the_models_own_count(limited: Server, emulator: Server) -> None:
    """Over the limit, the proxy says how many tokens it counted; Ollama (the emulator, reached directly
    with the same body) counts exactly as many."""
    cases = [
        ("/api/generate", {"model": "llama3.2", "prompt": _words(400), "stream": False}),
        ("/api/generate", {"model": "llama3.2", "prompt": _words(300), "system": "Be brief.",
                           "stream": False}),
        ("/api/chat", {"model": "llama3.2", "stream": False, "messages": [
            {"role": "system", "content": "You answer from the context."},
            {"role": "user", "content": _words(200)}, {"role": "assistant", "content": _words(60)},
            {"role": "user", "content": "and the second  spaced\tquestion?"}]}),
    ]
    for path, body in cases:
        refused = httpx.post(limited.url + path, json=body)
        assert refused.status_code == 400 and refused.json()["code"] == "prompt_too_long"
        assert "counted with the model's tokenizer" in refused.json()["error"]
        direct = httpx.post(emulator.url + path, json=body, timeout=30).json()
        assert _counted(refused.json()["error"]) == direct["prompt_eval_count"], path


def test_reject_is_ollama_shaped_with_service_limits(limited: Server) -> None:
    refused = httpx.post(f"{limited.url}/api/chat", json={
        "model": "llama3.2", "messages": [{"role": "user", "content": _words(400)}]})
    assert refused.status_code == 400
    assert refused.headers["content-type"] == "application/json; charset=utf-8"
    assert "more than the limit of 300 tokens" in refused.json()["error"]
    limits = refused.headers["x-service-limits"]
    assert limits.startswith("v=1; ") and "max_prompt_tokens=300" in limits
    assert "deadline_s=120" in limits and "max_body_bytes=33554432" in limits
    openai = httpx.post(f"{limited.url}/v1/chat/completions", json={
        "model": "llama3.2", "messages": [{"role": "user", "content": _words(400)}]})
    assert openai.status_code == 400 and openai.json()["error"]["code"] == "prompt_too_long"
    embed = httpx.post(f"{limited.url}/api/embed", json={
        "model": "nomic-embed-text", "input": ["short", _words(400)]})
    assert embed.status_code == 400  # each input is limited on its own
    small = httpx.post(f"{limited.url}/api/embed", json={
        "model": "nomic-embed-text", "input": ["short", _words(100)]})
    assert small.status_code == 200


@pytest.mark.parametrize(("path", "body", "error"), [
    ("/api/generate", {"prompt": _words(400), "stream": False}, {"error": "model 'no-such-model' not found"}),
    ("/api/chat", {"messages": [{"role": "user", "content": _words(400)}], "stream": False},
     {"error": "model 'no-such-model' not found"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": _words(400)}]},
     {"error": {"message": "model 'no-such-model' not found", "type": "not_found_error", "param": None,
                "code": None}}),
])
def test_a_model_the_fleet_lacks_is_not_found_whatever_its_prompt(limited: Server, path: str,
                                                                  body: dict[str, object],
                                                                  error: dict[str, object]) -> None:
    # Ollama answers 404 for a model it does not have, without reading the prompt; the proxy counted the
    # prompt with its estimate first and answered 400 prompt_too_long ("shorten it, do not retry") for a
    # misspelt model name. The replica's own 404 now reaches the client, as for a short prompt.
    wait_for(lambda: httpx.get(f"{limited.url}/api/tags").json()["models"], 20, "the fleet's listing")
    answer = httpx.post(limited.url + path, json={"model": "no-such-model", **body}, timeout=30)
    assert (answer.status_code, answer.json()) == (404, error), answer.text[:200]
    assert "max_prompt_tokens=300" in answer.headers["x-service-limits"]


def test_tenant_limit_is_the_smallest(limited: Server) -> None:
    body = {"model": "llama3.2", "prompt": _words(60), "stream": False}  # ~154 tokens
    assert httpx.post(f"{limited.url}/api/generate", json=body).status_code == 200
    capped = httpx.post(f"{limited.url}/api/generate", json=body,
                        headers={"Authorization": f"Bearer {CAPPED}"})
    assert capped.status_code == 400 and "limit of 100 tokens" in capped.json()["error"]


def test_truncate_policy(limited: Server) -> None:
    messages = [{"role": "system", "content": "Keep me."},
                *[{"role": "user", "content": f"turn {i}: " + _words(40)} for i in range(12)],
                {"role": "user", "content": "the newest question"}]
    response = httpx.post(f"{limited.url}/api/chat", json={
        "model": "qwen3", "messages": messages, "stream": False, "think": False})
    assert response.status_code == 200
    assert re.fullmatch(r"dropped \d+ oldest message\(s\)", response.headers["x-prompt-truncated"])
    assert response.json()["prompt_eval_count"] <= 300
    generated = httpx.post(f"{limited.url}/api/generate", json={
        "model": "qwen3", "prompt": "HEAD " + _words(500) + " TAIL", "stream": False, "think": False})
    assert generated.status_code == 200 and generated.json()["prompt_eval_count"] <= 300
    assert "from the front of the prompt" in generated.headers["x-prompt-truncated"]


def test_truncate_policy_drops_the_oldest_items_of_a_responses_input(limited: Server) -> None:
    """/v1/responses is a chat route: `truncate` drops the oldest items of its `input` list (it answered
    400 prompt_too_long instead), keeping `instructions` and the newest turn."""
    items = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}: " + _words(40)}
             for i in range(12)]
    body = {"model": "qwen3", "instructions": "Keep me.",
            "input": [*items, {"role": "user", "content": "the newest question"}]}
    response = httpx.post(f"{limited.url}/v1/responses", json=body, timeout=30)
    assert response.status_code == 200, response.text[:200]
    dropped = re.fullmatch(r"dropped (\d+) oldest message\(s\)", response.headers["x-prompt-truncated"])
    assert dropped and 0 < int(dropped.group(1)) < 12
    assert response.json()["usage"]["input_tokens"] <= 300
    single = httpx.post(f"{limited.url}/v1/responses", json={  # one turn: nothing to drop
        "model": "qwen3", "input": _words(500)}, timeout=30)
    assert single.status_code == 400 and single.json()["error"]["code"] == "prompt_too_long"


def test_truncate_policy_keeps_developer_messages(limited: Server) -> None:
    """OpenAI's `developer` role is the system prompt of its newer models: `truncate` keeps it as it
    keeps system messages (it was the first message dropped), and drops the oldest turns instead."""
    messages = [{"role": "developer", "content": "Answer in French. " + _words(80)},
                *[{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}: " + _words(30)}
                  for i in range(8)],
                {"role": "user", "content": "the newest question"}]
    response = httpx.post(f"{limited.url}/v1/chat/completions", timeout=30, json={
        "model": "qwen3", "messages": messages, "max_tokens": 5})
    assert response.status_code == 200, response.text[:200]
    # The developer message is ~210 tokens and each turn ~80: with it kept, every older turn must go.
    assert response.headers["x-prompt-truncated"] == "dropped 8 oldest message(s)"
    assert 200 < response.json()["usage"]["prompt_tokens"] <= 300


def test_truncate_policy_keeps_a_system_prompt_whatever_the_case_of_its_role(limited: Server) -> None:
    """Ollama lower-cases a message's role: {"role": "System"} is the system prompt, kept by `truncate`
    as the lower-case spelling is (it was the first message dropped)."""
    messages = [{"role": "System", "content": "Answer in French. " + _words(80)},
                *[{"role": "User" if i % 2 == 0 else "Assistant", "content": f"turn {i}: " + _words(30)}
                  for i in range(8)],
                {"role": "User", "content": "the newest question"}]
    response = httpx.post(f"{limited.url}/api/chat", timeout=30, json={
        "model": "qwen3", "messages": messages, "stream": False, "think": False})
    assert response.status_code == 200, response.text[:200]
    assert response.headers["x-prompt-truncated"] == "dropped 8 oldest message(s)"
    assert 200 < response.json()["prompt_eval_count"] <= 300


def test_canonical_options_stop_reload_thrash(limited: Server, emulator: Server) -> None:
    response = httpx.post(f"{limited.url}/api/generate", json={
        "model": "llama3.2", "prompt": "hi", "stream": False,
        "options": {"num_ctx": 8192, "num_batch": 1024, "temperature": 0.1}})
    assert response.status_code == 200
    assert response.headers["x-options-rewritten"] == (
        "num_batch=removed, num_ctx=8192->2048, keep_alive=+10m")
    ps = httpx.get(f"{emulator.url}/api/ps").json()["models"]
    assert {m["name"]: m["context_length"] for m in ps}["llama3.2:latest"] == 2048
    loads = emulator.stats()["loads"]
    for num_ctx in (4096, 16384, 2048):  # every tenant's own num_ctx maps to the same runner
        httpx.post(f"{limited.url}/api/generate", json={
            "model": "llama3.2", "prompt": "hi", "stream": False, "options": {"num_ctx": num_ctx}})
    assert emulator.stats()["loads"] == loads


def test_deadlines(tmp: Path) -> None:
    talker = start_emulator(tmp, fixed_clock=False, decode_tokens_per_s=20, output_tokens="400,400",
                            name="talker")
    limited = start_proxy(tmp, [talker.url], {
        "tenants": [{"name": "short", "keys": [SHORT], "deadline_s": 1.0}]}, name="deadlines")
    try:
        _check_deadlines(limited)
        assert talker.stats()["active"] == 0  # every abandoned generation was cancelled upstream
    finally:
        limited.stop()
        talker.stop()


def _check_deadlines(limited: Server) -> None:
    short = {"Authorization": f"Bearer {SHORT}"}
    body = {"model": "llama3.2", "prompt": "go on"}
    start = time.monotonic()
    with httpx.stream("POST", f"{limited.url}/api/generate", json=body, headers=short,
                      timeout=30) as response:
        assert "deadline_s=1" in response.headers["x-service-limits"]
        lines = [json.loads(line) for line in response.iter_lines()]
    assert time.monotonic() - start < 3
    assert lines[-1]["code"] == "upstream_response_timeout" and "deadline" in lines[-1]["error"]
    assert len(lines) > 2  # the tokens already sent stay
    whole = httpx.post(f"{limited.url}/api/generate", json={**body, "stream": False}, headers=short)
    assert whole.status_code == 504 and whole.json()["code"] == "upstream_response_timeout"
    lowered = httpx.post(f"{limited.url}/api/generate", json={**body, "stream": False},
                         headers={"X-Deadline-S": "0.3"})
    assert lowered.status_code == 504 and "deadline_s=0.3" in lowered.headers["x-service-limits"]
    not_raised = httpx.post(f"{limited.url}/api/generate", json={**body, "stream": False},
                            headers={**short, "X-Deadline-S": "600"})
    assert not_raised.status_code == 504
    assert "deadline_s=1;" in not_raised.headers["x-service-limits"] + ";"


def test_shadow_mode_reports_and_lets_through(tmp: Path, emulator: Server) -> None:
    proxy = start_proxy(tmp, [emulator.url], {"chain": {"limits": {"mode": "shadow",
                                                                   "max_prompt_tokens": 50}}},
                        name="shadow")
    try:
        response = httpx.post(f"{proxy.url}/api/generate", json={
            "model": "llama3.2", "prompt": _words(200), "stream": False})
        assert response.status_code == 200
        assert response.headers["x-shadow-decision"] == "limits=prompt_too_long"
        metrics = httpx.get(f"{proxy.url}/metrics").text
        decisions = {s.labels["decision"]: s.value for f in text_string_to_metric_families(metrics)
                     if f.name == "sop_limits_decisions" for s in f.samples
                     if s.name.endswith("_total")}
        assert decisions.get("shadow_prompt_too_long") == 1
    finally:
        proxy.stop()


def test_silent_truncation_is_detected(tmp: Path, emulator: Server) -> None:
    """A prompt under our limit but over the model's canonical context: Ollama cuts it silently
    (prompt_eval_count drops); the proxy notices and counts it."""
    # Enforced, the context bounds the limit (the context guard): 511 tokens (Ollama cuts a prompt of
    # num_ctx tokens or more), whatever max_prompt_tokens says.
    guarded = start_proxy(tmp, [emulator.url], {"chain": {"limits": {"max_prompt_tokens": 8000}},
                                                "models": {"qwen3": {"options": {"num_ctx": 512}}}},
                          name="guarded")
    try:
        refused = httpx.post(f"{guarded.url}/api/generate", json={
            "model": "qwen3", "prompt": _words(900), "stream": False, "think": False})
        assert refused.status_code == 400 and "limit of 511 tokens" in refused.json()["error"]
    finally:
        guarded.stop()
    # In shadow the prompt reaches Ollama, which cuts it silently; the proxy notices and says so.
    proxy = start_proxy(tmp, [emulator.url], {"chain": {"limits": {"max_prompt_tokens": 8000,
                                                                   "mode": "shadow"}},
                                              "models": {"qwen3": {"options": {"num_ctx": 512}}}},
                        name="silent")
    try:
        response = httpx.post(f"{proxy.url}/api/generate", json={
            "model": "qwen3", "prompt": _words(900), "stream": False, "think": False,
            "options": {"num_ctx": 512}})
        assert response.status_code == 200 and response.json()["prompt_eval_count"] == 256
        assert response.headers["x-prompt-truncated-upstream"].endswith("evaluated=256")
        metrics = httpx.get(f"{proxy.url}/metrics").text
        counts = [s.value for f in text_string_to_metric_families(metrics)
                  if f.name == "sop_limits_truncations" for s in f.samples
                  if s.name.endswith("_total")]
        assert counts == [1.0]
    finally:
        proxy.stop()


def test_deadline_holds_with_limits_off(tmp: Path) -> None:
    """`chain.limits.mode: off` drops the prompt and option limits, not the deadline."""
    talker = start_emulator(tmp, fixed_clock=False, decode_tokens_per_s=20, output_tokens="400,400",
                            name="talker-off")
    limited = start_proxy(tmp, [talker.url], {
        "tenants": [{"name": "short", "keys": [SHORT], "deadline_s": 1.0}],
        "chain": {"limits": {"mode": "off", "max_prompt_tokens": 5}}}, name="deadlines-off")
    try:
        _check_deadlines(limited)
        served = httpx.post(f"{limited.url}/api/generate", json={
            "model": "llama3.2", "prompt": _words(50), "stream": False,
            "options": {"num_predict": 1, "num_ctx": 100000}}, timeout=30)
        assert served.status_code == 200  # over max_prompt_tokens, and options untouched: limits are off
        assert "x-options-rewritten" not in served.headers
        assert talker.stats()["active"] == 0
    finally:
        limited.stop()
        talker.stop()


def _loaded_context(proxy: Server, model: str) -> int | None:
    replicas = httpx.get(f"{proxy.url}/system/profile", timeout=10).json()["replicas"]
    for replica in replicas.values():
        for loaded in replica.get("loaded", []):
            if loaded["model"] == model:
                return int(loaded["context_length"]) if loaded["context_length"] else None
    return None


def test_reload_protection_covers_models_not_configured(tmp: Path) -> None:
    """No model is under `models:`. One loaded by its operator with num_ctx 8192 keeps that context
    whatever num_ctx tenants send; one loaded nowhere is held to Ollama's default (4096)."""
    replica = start_emulator(tmp, fixed_clock=False, name="reload-emu")
    proxy = start_proxy(tmp, [replica.url], {"chain": {"health": {"probe_interval_s": 0.2}}},
                        name="reload")
    try:
        preload = httpx.post(f"{replica.url}/api/generate", json={
            "model": "llama3.2", "options": {"num_ctx": 8192}}, timeout=30)  # load only, directly
        assert preload.status_code == 200
        deadline = time.monotonic() + 30
        while _loaded_context(proxy, "llama3.2:latest") != 8192:
            assert time.monotonic() < deadline, "the proxy never saw the loaded model"
            time.sleep(0.1)
        loads = replica.stats()["loads"]
        for options, rewritten in (({"num_ctx": 100000}, "num_ctx=100000->8192"),
                                   ({"num_ctx": 2048}, "num_ctx=2048->8192"),
                                   ({}, "num_ctx=+8192"),
                                   ({"num_ctx": 8192}, None)):
            response = httpx.post(f"{proxy.url}/api/generate", json={
                "model": "llama3.2", "prompt": "hi", "stream": False, "options": options}, timeout=30)
            assert response.status_code == 200
            assert response.headers.get("x-options-rewritten") == rewritten, options
        assert replica.stats()["loads"] == loads  # the runner was never reloaded

        first = httpx.post(f"{proxy.url}/api/generate", json={
            "model": "qwen3", "prompt": "hi", "stream": False, "think": False,
            "options": {"num_ctx": 100000}}, timeout=30)
        assert first.headers["x-options-rewritten"] == "num_ctx=100000->4096"
        for num_ctx in (32768, 512):
            again = httpx.post(f"{proxy.url}/api/generate", json={
                "model": "qwen3", "prompt": "hi", "stream": False, "think": False,
                "options": {"num_ctx": num_ctx}}, timeout=30)
            assert again.status_code == 200
        assert replica.stats()["loads"] == loads + 1  # qwen3's own first load only
        ps = httpx.get(f"{replica.url}/api/ps", timeout=10).json()["models"]
        assert {m["name"]: m["context_length"] for m in ps} == {"llama3.2:latest": 8192,
                                                              "qwen3:latest": 4096}
    finally:
        proxy.stop()
        replica.stop()


def test_x_deadline_s_is_a_plain_decimal_number(tmp: Path, emulator: Server) -> None:
    """X-Deadline-S is a decimal number of seconds (ASCII digits, an optional fraction, OWS around it);
    anything else is ignored, the deadline staying the tenant's. (It was read with Python's float():
    `1_0` lowered the deadline to 10 s, and `1e1`, an Arabic-Indic 5, `nan` and `inf` were numbers too.)"""
    proxy = start_proxy(tmp, [emulator.url], name="deadline-grammar")
    body = {"model": "llama3.2", "prompt": "hi", "stream": False}
    cases: list[tuple[bytes, str]] = [
        (b"5", "5"), (b"2.5", "2.5"), (b".5", "0.5"), (b"7.", "7"), (b"007", "7"), (b" 5 ", "5"),
        (b"\t30\t", "30"), (b"600", "120"), (b"0", "120"),
        (b"1_0", "120"), (b"1e1", "120"), (b"nan", "120"), (b"inf", "120"), (b"-1", "120"),
        (b"+5", "120"), (b"0x10", "120"), (b"5s", "120"), (b"1 0", "120"), (b"", "120"),
        ("\u0665".encode(), "120"), (b"\xef\xbc\x95", "120")]  # Arabic-Indic and full-width 5
    payload = json.dumps(body).encode()
    try:
        found = {}
        for value, _ in cases:
            # A raw socket: HTTP clients refuse to send OWS around a header value (the server must take it).
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as client:
                client.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                               b"X-Deadline-S:" + value + b"\r\nContent-Type: application/json\r\n"
                               b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
                head = b""
                while b"\r\n\r\n" not in head and (chunk := client.recv(65536)):
                    head += chunk
            assert head.startswith(b"HTTP/1.1 200 "), (value, head)
            header = re.search(rb"(?im)^x-service-limits: (.*)\r$", head)
            assert header is not None, head
            limits = dict(part.split("=", 1) for part in header[1].decode().split("; "))
            found[value] = limits["deadline_s"]
        assert found == dict(cases)
    finally:
        proxy.stop()
