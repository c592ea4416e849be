"""The context guard in `limits`: the effective prompt limit is at most the context the model runs with
minus one (Ollama cuts a prompt of num_ctx tokens or more; on /v1, where Ollama ignores options.num_ctx,
the context it is loaded with); Ollama's silent truncation of a
non-streaming answer is reported in X-Prompt-Truncated-Upstream; `upstream_truncation: refuse` makes
Ollama answer 400 instead of cutting. Against a real proxy and an emulator whose context is small."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.emulator.vocabulary import default_vocabulary
from tests.support.metrics import metric
from tests.support.polling import wait_for
from tests.support.servers import Server, start_emulator, start_proxy

CONTEXT = 256
FAST = {"probe_interval_s": 0.3, "probe_timeout_s": 1.0}
LONG = "many words to fill the context " * 60  # a few hundred tokens: over 256


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_emulator(tmp_path_factory.mktemp("guard"), name="guard-emu",
                            extra=["--context-length", str(CONTEXT)])
    yield server
    server.stop()


def _proxy(tmp: Path, emulator: Server, name: str, **limits: Any) -> Server:
    return start_proxy(tmp, [emulator.url], {"chain": {"health": FAST, "limits": limits}}, name=name)


def _loaded(proxy: Server, emulator: Server) -> None:
    """Load llama3.2 on the replica and wait until the proxy's probes saw its context."""
    assert httpx.post(f"{emulator.url}/api/generate", json={"model": "llama3.2"}, timeout=30).is_success
    def seen() -> bool:  # the proxy's own view, from its probes (not the replica's answer)
        profile = httpx.get(f"{proxy.url}/system/profile").json()
        return f"'context_length': {CONTEXT}" in str(profile.get("replicas"))
    wait_for(seen, 20, "the proxy's probes to see the loaded context")


def test_v1_requests_are_limited_by_the_loaded_context(tmp_path: Path, emulator: Server) -> None:
    proxy = _proxy(tmp_path, emulator, "guard-v1")
    try:
        _loaded(proxy, emulator)
        short = httpx.post(f"{proxy.url}/v1/chat/completions", timeout=30, json={
            "model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert short.status_code == 200
        assert f"max_prompt_tokens={CONTEXT - 1};" in short.headers["x-service-limits"]
        refused = httpx.post(f"{proxy.url}/v1/chat/completions", timeout=30, json={
            "model": "llama3.2", "messages": [{"role": "user", "content": LONG}]})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "prompt_too_long"
        assert f"limit of {CONTEXT - 1} tokens" in refused.json()["error"]["message"]
    finally:
        proxy.stop()


def test_a_silent_cut_is_reported_before_the_headers(tmp_path: Path, emulator: Server) -> None:
    # Shadow limits let the long prompt through, as a proxy would in front of a model whose context it
    # did not know yet: Ollama cuts it, and the answer says so.
    proxy = _proxy(tmp_path, emulator, "guard-report", mode="shadow")
    try:
        _loaded(proxy, emulator)
        answer = httpx.post(f"{proxy.url}/api/generate", timeout=30, json={
            "model": "llama3.2", "prompt": LONG, "stream": False, "options": {"num_predict": 2}})
        assert answer.status_code == 200, answer.text
        evaluated = answer.json()["prompt_eval_count"]
        assert evaluated <= CONTEXT // 2 + 2  # the emulator cut it as Ollama does
        report = answer.headers["x-prompt-truncated-upstream"]
        assert report.endswith(f"evaluated={evaluated}") and "prompt_tokens=" in report
        assert (metric(proxy.url, "sop_limits_truncations_total") or 0) >= 1
        streamed = httpx.post(f"{proxy.url}/api/generate", timeout=30, json={
            "model": "llama3.2", "prompt": LONG, "options": {"num_predict": 2}})
        assert "x-prompt-truncated-upstream" not in streamed.headers  # a stream's headers went first
        assert (metric(proxy.url, "sop_limits_truncations_total") or 0) >= 2  # still counted
    finally:
        proxy.stop()


def test_refuse_makes_ollama_answer_400_instead_of_cutting(tmp_path: Path, emulator: Server) -> None:
    # Shadow limits let a prompt over qwen3's context (4096, the canonical default) through; Ollama
    # refuses it instead of cutting because the proxy asked it to (the rewrite applies in every mode,
    # as the canonical options do).
    proxy = _proxy(tmp_path, emulator, "guard-refuse", mode="shadow", upstream_truncation="refuse")
    try:
        refused = httpx.post(f"{proxy.url}/api/generate", timeout=30, json={
            "model": "qwen3", "prompt": LONG * 15, "stream": False})
        assert refused.status_code == 400, refused.text
        assert "context" in refused.json()["error"]  # Ollama's own text, relayed
        fits = httpx.post(f"{proxy.url}/api/generate", timeout=30, json={
            "model": "qwen3", "prompt": "hi", "stream": False, "options": {"num_predict": 2}})
        assert fits.status_code == 200
    finally:
        proxy.stop()


@pytest.mark.parametrize(("num_ctx", "context"), [(128.0, 128), (200.9, 200)])  # limit: context - 1
def test_a_num_ctx_sent_as_a_float_is_the_context_too(tmp_path: Path, emulator: Server,
                                                      num_ctx: float, context: int) -> None:
    # Without the canonical rewrite, the client's num_ctx is what Ollama runs with; Go reads a JSON
    # float into the int option by truncation, so 128.0 (what Python's json writes for a float) is a
    # context of 128 and 200.9 one of 200: the guard limits to it instead of letting Ollama cut the
    # prompt (it let it through, with the limit of 4096 in X-Service-Limits).
    proxy = _proxy(tmp_path, emulator, "guard-float", strip_load_options=False)
    try:
        refused = httpx.post(f"{proxy.url}/api/generate", timeout=30, json={
            "model": "llama3.2", "prompt": "word " * 200, "stream": False,
            "options": {"num_ctx": num_ctx, "num_predict": 2}})
        assert refused.status_code == 400, (refused.status_code, refused.text[:200])
        assert refused.json()["code"] == "prompt_too_long"
        assert f"limit of {context - 1} tokens" in refused.json()["error"]
        assert f"max_prompt_tokens={context - 1};" in refused.headers["x-service-limits"]
        fits = httpx.post(f"{proxy.url}/api/generate", timeout=30, json={
            "model": "llama3.2", "prompt": "hi", "stream": False,
            "options": {"num_ctx": num_ctx, "num_predict": 2}})
        assert fits.status_code == 200, fits.text
        assert f"max_prompt_tokens={context - 1};" in fits.headers["x-service-limits"]
    finally:
        proxy.stop()


def _exactly(tokens: int, frame: int = 4) -> str:
    """A prompt that renders to exactly `tokens` tokens with its `frame` (a generate prompt's: BOS and
    the 3 of the assistant header; an embedding input's: BOS and EOS, 2), counted with the emulator's
    own vocabulary."""
    vocabulary = default_vocabulary()
    text = ""
    for i in itertools.count():
        longer = f"{text} w{i}" if text else f"w{i}"
        if vocabulary.count(longer) + frame > tokens:
            break
        text = longer
    for filler in itertools.cycle("abcdefgh"):  # one character at a time up to the exact count
        if vocabulary.count(text) + frame == tokens:
            return text
        text += filler
    raise AssertionError("unreachable")


def test_a_prompt_as_long_as_the_context_is_refused_not_cut(tmp_path: Path, emulator: Server) -> None:
    # Ollama cuts a prompt of num_ctx tokens or more (it keeps about half the context), not only one
    # longer than num_ctx: the guard's limit is num_ctx - 1. It admitted a prompt of exactly num_ctx
    # tokens, which the replica then evaluated as 128 tokens out of 256.
    proxy = _proxy(tmp_path, emulator, "guard-exact", strip_load_options=False)
    try:
        options = {"num_ctx": CONTEXT, "num_predict": 2}
        refused = httpx.post(f"{proxy.url}/api/generate", timeout=30, json={
            "model": "llama3.2", "prompt": _exactly(CONTEXT), "stream": False, "options": options})
        assert refused.status_code == 400, (refused.status_code, refused.text[:200])
        assert refused.json()["code"] == "prompt_too_long"
        assert refused.json()["error"].startswith(f"prompt is {CONTEXT} tokens, more than the limit of "
                                                  f"{CONTEXT - 1} tokens")
        assert f"max_prompt_tokens={CONTEXT - 1};" in refused.headers["x-service-limits"]
        fits = httpx.post(f"{proxy.url}/api/generate", timeout=30, json={
            "model": "llama3.2", "prompt": _exactly(CONTEXT - 1), "stream": False, "options": options})
        assert fits.status_code == 200, fits.text
        assert fits.json()["prompt_eval_count"] == CONTEXT - 1  # evaluated whole, not cut
        assert "x-prompt-truncated-upstream" not in fits.headers
    finally:
        proxy.stop()


def test_an_embedding_input_as_long_as_the_context_is_embedded_whole(tmp_path: Path,
                                                                    emulator: Server) -> None:
    # An embedding input fits when it and its BOS and EOS fit the context (Ollama cuts, or with
    # `truncate: false` refuses, only a longer one): the guard's num_ctx - 1 is for prompts to generate.
    proxy = _proxy(tmp_path, emulator, "guard-embed", strip_load_options=False)
    try:
        body = {"model": "nomic-embed-text", "truncate": False, "options": {"num_ctx": CONTEXT}}
        whole = httpx.post(f"{proxy.url}/api/embed", timeout=30,
                           json={**body, "input": _exactly(CONTEXT, frame=2)})
        assert whole.status_code == 200, whole.text[:200]
        assert f"max_prompt_tokens={CONTEXT};" in whole.headers["x-service-limits"]
        refused = httpx.post(f"{proxy.url}/api/embed", timeout=30,
                             json={**body, "input": _exactly(CONTEXT + 1, frame=2)})
        assert refused.status_code == 400 and refused.json()["code"] == "prompt_too_long", refused.text
    finally:
        proxy.stop()


COMPAT = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}], "max_tokens": 2},
     "prompt_tokens"),
    ("/v1/completions", {"prompt": LONG, "max_tokens": 2}, "prompt_tokens"),
    ("/v1/responses", {"input": LONG, "max_output_tokens": 16}, "input_tokens"),
    ("/v1/messages", {"messages": [{"role": "user", "content": LONG}], "max_tokens": 2}, "input_tokens"),
]
"""Over-long prompts on the compatibility routes, and the usage field that counts the prompt evaluated."""


@pytest.mark.parametrize(("path", "body", "usage"), COMPAT)
def test_the_emulators_compatibility_routes_cut_an_over_long_prompt_as_ollama_does(
        emulator: Server, path: str, body: dict[str, Any], usage: str) -> None:
    # Ollama runs these routes through its chat and generate handlers, so an over-long prompt is cut as
    # on /api/chat (about half the context evaluated); the emulator evaluated all of it, past its
    # context.
    direct = httpx.post(f"{emulator.url}{path}", timeout=30, json={"model": "llama3.2", **body})
    assert direct.status_code == 200, direct.text
    assert direct.json()["usage"][usage] <= CONTEXT // 2 + 2


@pytest.mark.parametrize(("path", "body", "usage"), COMPAT)
def test_a_silent_cut_is_reported_on_the_compatibility_routes_too(
        tmp_path: Path, emulator: Server, path: str, body: dict[str, Any], usage: str) -> None:
    # Their answers count the prompt in `usage` (prompt_tokens, input_tokens), not prompt_eval_count:
    # the report read only the native field, so no /v1 answer ever said its prompt was cut.
    proxy = _proxy(tmp_path, emulator, "guard-v1-report", mode="shadow")
    try:
        _loaded(proxy, emulator)
        answer = httpx.post(f"{proxy.url}{path}", timeout=30, json={"model": "llama3.2", **body})
        assert answer.status_code == 200, answer.text
        evaluated = answer.json()["usage"][usage]
        assert answer.headers.get("x-prompt-truncated-upstream", "").endswith(f"; evaluated={evaluated}")
    finally:
        proxy.stop()
