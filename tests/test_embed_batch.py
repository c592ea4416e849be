"""embed_batch in a real proxy in front of the emulator: concurrent requests of several routes and tenants
go upstream as one /api/embed call and come back in order in their own shapes, identical inputs are sent
once, each tenant is charged its own inputs, one bad input fails only its own request, a lone request
and a client that leaves are handled."""

from __future__ import annotations

import asyncio
import re
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from proxy.embeddings import read_answer
from tests.support.metrics import metric
from tests.support.polling import wait_for
from tests.support.servers import Server, start_emulator, start_proxy

MODEL = "nomic-embed-text"
KEYS = {"a": "sk-batch-a", "b": "sk-batch-b"}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_emulator(tmp_path_factory.mktemp("embed-batch-emu"), name="embed-batch-emu")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, emulator: Server) -> Iterator[Server]:
    # A window far longer than the 2 ms default, so that requests sent together on a loaded CI machine
    # surely meet in one batch.
    server = start_proxy(tmp_path_factory.mktemp("embed-batch-proxy"), [emulator.url], {
        "tenants": [{"name": "a", "keys": [KEYS["a"]], "tokens_per_minute": 1_000_000},
                    {"name": "b", "keys": [KEYS["b"]], "tokens_per_minute": 1_000_000},
                    {"name": "system", "keys": ["sk-batch-system"]}],
        "models": {MODEL: {"options": {"num_ctx": 2048}}},
        "plugins": [{"name": "embed_batch", "window_s": 0.5, "tenant": "system"}]}, name="embed-batch")
    yield server
    server.stop()


def _calls(emulator: Server) -> int:
    return int(emulator.stats()["requests"].get("POST /api/embed", 0))


async def _send(proxy: Server, requests: list[tuple[str, str, dict[str, Any]]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as client:
        return await asyncio.gather(*(
            client.post(f"{proxy.url}{path}", content=orjson.dumps(body),
                        headers={"Authorization": f"Bearer {KEYS[tenant]}"})
            for tenant, path, body in requests))


def _direct(emulator: Server, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{emulator.url}{path}", json=body, timeout=30)


def test_concurrent_requests_go_upstream_as_one_batch(proxy: Server, emulator: Server) -> None:
    assert httpx.post(f"{proxy.url}/api/embed", json={"model": MODEL, "input": "warm"},
                      headers={"Authorization": f"Bearer {KEYS['a']}"}, timeout=30).status_code == 200
    requests = [
        ("a", "/api/embed", {"model": MODEL, "input": ["first", "shared text"]}),
        ("b", "/api/embed", {"model": MODEL, "input": ["list one", "shared text", "list two"]}),
        ("a", "/v1/embeddings", {"model": MODEL, "input": ["shared text", "openai words"]}),
        ("b", "/v1/embeddings", {"model": MODEL, "input": "encoded", "encoding_format": "base64"}),
        *[("a", "/api/embed", {"model": MODEL, "input": f"client {i}"}) for i in range(6)],
    ]
    calls = _calls(emulator)
    replies = asyncio.run(_send(proxy, requests))
    assert [r.status_code for r in replies] == [200] * len(requests), [r.text for r in replies]
    # Two batches: limits pins options.num_ctx on /api/embed bodies (Ollama's /v1 route takes no
    # options), and requests with different options are never mixed.
    assert _calls(emulator) == calls + 2
    assert [r.headers["x-embed-batch"] for r in replies] == [
        "requests=8", "requests=8", "requests=2", "requests=2", *["requests=8"] * 6]
    for (_, path, body), reply in zip(requests, replies, strict=True):
        direct = _direct(emulator, path, body)
        if path == "/v1/embeddings" and "encoding_format" not in body:
            # Same vectors, field order and newline; usage is the request's own share of the batch.
            assert re.sub(rb'"usage":\{.*\}', b"", reply.content) == \
                re.sub(rb'"usage":\{.*\}', b"", direct.content)
            assert reply.headers["content-type"] == "application/json"
        elif path == "/v1/embeddings":
            assert reply.json()["data"][0]["embedding"] == direct.json()["data"][0]["embedding"]
        else:
            got, want = read_answer(path, reply.content), read_answer(path, direct.content)
            assert got is not None and want is not None and got.vectors == want.vectors
            assert reply.headers["content-type"] == "application/json; charset=utf-8"
    # "shared text" was asked twice in the /api/embed batch and sent once.
    assert metric(proxy.url, "sop_plugin_embed_batch_inputs_total", sent="deduplicated") == 1
    # The batch ran once as `system`; each caller's own request carries its share of the batch's tokens
    # (what quotas settle its reservation with), and the shares add up to what the replica counted.
    def logged() -> list[str] | None:  # the access lines follow the responses: polled
        lines = proxy.log().splitlines()
        batch = [line for line in lines if "tenant=system" in line and '"POST /api/embed" 200' in line]
        ours = [line for line in lines[-len(requests) - 2:] if re.search(r"tenant=(a|b) ", line)]
        return lines if len(batch) >= 2 and len(ours) >= len(requests) else None

    lines = wait_for(logged, 10, "every access line")
    batch = [line for line in lines if "tenant=system" in line and '"POST /api/embed" 200' in line]
    assert len(batch) == 2
    batch_tokens = sum(int(re.search(r"in_tokens=(\d+)", line).group(1))  # type: ignore[union-attr]
                       for line in batch)
    shares = [int(m.group(1)) for line in lines[-len(requests) - 2:]
              if re.search(r"tenant=(a|b) ", line) and (m := re.search(r"in_tokens=(\d+)", line))]
    assert len(shares) == len(requests) and sum(shares) > batch_tokens  # "shared text" paid by both
    # The OpenAI client reads a batched answer (base64 by default).
    async def with_openai() -> list[Any]:
        client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key=KEYS["b"], max_retries=0)
        return await asyncio.gather(*(client.embeddings.create(model=MODEL, input=f"sdk {i}")
                                      for i in range(3)))
    calls = _calls(emulator)
    answers = asyncio.run(with_openai())
    assert _calls(emulator) == calls + 1
    for i, answer in enumerate(answers):
        want = _direct(emulator, "/v1/embeddings", {"model": MODEL, "input": f"sdk {i}"}).json()
        vector = want["data"][0]["embedding"]
        assert struct.pack(f"<{len(vector)}f", *answer.data[0].embedding) == \
            struct.pack(f"<{len(vector)}f", *vector)


def test_one_bad_input_fails_only_its_own_request(proxy: Server, emulator: Server) -> None:
    good = {"model": MODEL, "input": "short enough", "truncate": False}
    bad = {"model": MODEL, "input": ["fine", "word " * 3000], "truncate": False}
    other = {"model": MODEL, "input": ["also short"], "truncate": False}
    replies = asyncio.run(_send(proxy, [("a", "/api/embed", good), ("b", "/api/embed", bad),
                                        ("a", "/api/embed", other)]))
    assert [r.status_code for r in replies] == [200, 400, 200]
    # Refused by the proxy's context guard (the input is over the model's context), or by Ollama with its
    # own error when the proxy does not know the context yet: either way only this request fails.
    assert (replies[1].json().get("code") == "prompt_too_long"
            or replies[1].content == _direct(emulator, "/api/embed", bad).content)
    for reply, body in ((replies[0], good), (replies[2], other)):
        got = read_answer("/api/embed", reply.content)
        want = read_answer("/api/embed", _direct(emulator, "/api/embed", body).content)
        assert got is not None and want is not None and got.vectors == want.vectors
    # A batch fails and is split only when the bad input reached Ollama (the guard did not know the
    # context); refused by the guard, the bad request never joined a batch.
    failed = metric(proxy.url, "sop_plugin_embed_batch_batches_total", result="failed")
    assert failed == (0 if replies[1].json().get("code") == "prompt_too_long" else 1)


def test_a_lone_request_and_the_legacy_route_go_on_by_themselves(proxy: Server,
                                                                emulator: Server) -> None:
    calls = _calls(emulator)
    alone = httpx.post(f"{proxy.url}/api/embed", json={"model": MODEL, "input": "by itself"},
                       headers={"Authorization": f"Bearer {KEYS['a']}"}, timeout=30)
    assert alone.status_code == 200 and "x-embed-batch" not in alone.headers
    assert alone.content == _direct(emulator, "/api/embed", {"model": MODEL, "input": "by itself"}).content
    assert _calls(emulator) == calls + 2  # its own call and the direct one
    legacy = asyncio.run(_send(proxy, [("a", "/api/embeddings", {"model": MODEL, "prompt": f"p{i}"})
                                       for i in range(2)]))
    assert all(r.status_code == 200 and "x-embed-batch" not in r.headers for r in legacy)


def test_a_client_that_leaves_is_left_out_of_the_batch(proxy: Server, emulator: Server) -> None:
    sent = metric(proxy.url, "sop_plugin_embed_batch_inputs_total", sent="yes") or 0

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            def post(text: str) -> Any:
                return client.post(f"{proxy.url}/api/embed", json={"model": MODEL, "input": text},
                                   headers={"Authorization": f"Bearer {KEYS['b']}"})
            leaving = asyncio.ensure_future(post("leaves early"))
            staying = [asyncio.ensure_future(post(f"stays {i}")) for i in range(2)]
            await asyncio.sleep(0.15)  # inside the 0.5 s window: all three are waiting
            leaving.cancel()
            return list(await asyncio.gather(*staying))

    replies = asyncio.run(scenario())
    assert [r.headers.get("x-embed-batch") for r in replies] == ["requests=2"] * 2
    deadline = time.monotonic() + 10
    while metric(proxy.url, "sop_plugin_embed_batch_inputs_total", sent="yes") != sent + 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_behind_embed_cache_batched_vectors_are_cached(tmp_path: Path, emulator: Server) -> None:
    proxy = start_proxy(tmp_path, [emulator.url], {
        "models": {MODEL: {"options": {"num_ctx": 2048}}},
        "chain": {"health": {"probe_interval_s": 0.5}},
        "plugins": [{"name": "embed_cache"}, {"name": "embed_batch", "window_s": 0.5}]},
        name="embed-batch-cache")
    try:
        deadline = time.monotonic() + 20
        while "x-embed-cache" not in httpx.post(f"{proxy.url}/api/embed", timeout=30, json={
                "model": MODEL, "input": "warm"}).headers:  # the digest is known after the first probes
            assert time.monotonic() < deadline
            time.sleep(0.2)
        bodies = [{"model": MODEL, "input": f"cached after batch {i}"} for i in range(4)]

        async def send() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as client:
                return list(await asyncio.gather(*(client.post(f"{proxy.url}/api/embed", json=body)
                                                   for body in bodies)))
        calls = _calls(emulator)
        first = asyncio.run(send())
        assert [r.headers.get("x-embed-batch") for r in first] == ["requests=4"] * 4
        assert [r.headers["x-embed-cache"] for r in first] == ["hits=0; misses=1"] * 4
        assert _calls(emulator) == calls + 1
        again = asyncio.run(send())
        assert [r.headers["x-embed-cache"] for r in again] == ["hits=1; misses=0"] * 4
        assert _calls(emulator) == calls + 1  # all four answered from the cache
        for before, after in zip(first, again, strict=True):
            got, want = read_answer("/api/embed", after.content), read_answer("/api/embed", before.content)
            assert got is not None and want is not None and got.vectors == want.vectors
    finally:
        proxy.stop()


def test_batches_are_bounded_in_inputs_and_bytes(tmp_path: Path, emulator: Server) -> None:
    proxy = start_proxy(tmp_path, [emulator.url], {
        "models": {MODEL: {"options": {"num_ctx": 2048}}},
        "plugins": [{"name": "embed_batch", "window_s": 0.5, "max_batch_inputs": 3,
                     "max_batch_bytes": 64}]}, name="embed-batch-bounds")
    try:
        assert httpx.post(f"{proxy.url}/api/embed", json={"model": MODEL, "input": "warm"},
                          timeout=30).status_code == 200

        async def send(bodies: list[dict[str, Any]]) -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as client:
                return list(await asyncio.gather(*(client.post(f"{proxy.url}/api/embed", json=body)
                                                   for body in bodies)))
        calls = _calls(emulator)
        replies = asyncio.run(send([{"model": MODEL, "input": f"bounded {i}"} for i in range(6)]))
        assert all(r.status_code == 200 for r in replies)
        assert [r.headers.get("x-embed-batch") for r in replies] == ["requests=3"] * 6
        assert _calls(emulator) == calls + 2  # two full batches, each sent as soon as it was full
        # Bytes: two 40-byte inputs do not fit one 64-byte batch; one input over the bound goes alone.
        calls = _calls(emulator)
        replies = asyncio.run(send([{"model": MODEL, "input": "x" * 40}, {"model": MODEL, "input": "y" * 40},
                                    {"model": MODEL, "input": "z" * 100}]))
        assert all(r.status_code == 200 and "x-embed-batch" not in r.headers for r in replies)
        assert _calls(emulator) == calls + 3
    finally:
        proxy.stop()


def test_batched_requests_are_charged_their_share_by_quotas(tmp_path: Path, emulator: Server) -> None:
    """The plugin answers a batched request itself: quotas settle its reservation with its share of
    the batch's tokens, as for a request answered by a replica (not a refund: batching is no way
    around tokens_per_minute)."""
    proxy = start_proxy(tmp_path, [emulator.url], {
        "admin": {"keys": ["sk-batch-admin"]},
        # 600 a minute refills 10 a second: slow enough to see the charge.
        "tenants": [{"name": "meter", "keys": ["sk-batch-meter"], "tokens_per_minute": 600},
                    {"name": "system", "keys": ["sk-batch-system"]}],
        "plugins": [{"name": "embed_batch", "window_s": 0.5, "tenant": "system"}]}, name="charged")
    try:
        async def send() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as client:
                return await asyncio.gather(*(client.post(
                    f"{proxy.url}/api/embed", headers={"Authorization": "Bearer sk-batch-meter"},
                    json={"model": MODEL, "input": " ".join(["word"] * 25) + f" {i}"})
                    for i in range(4)))

        replies = asyncio.run(send())
        assert [r.status_code for r in replies] == [200] * 4, [r.text for r in replies]
        assert all(r.headers.get("X-Embed-Batch") == "requests=4" for r in replies)
        shares = sum(int(r.json()["prompt_eval_count"]) for r in replies)
        quotas = httpx.get(f"{proxy.url}/system/quotas",
                           headers={"Authorization": "Bearer sk-batch-admin"}).json()
        charged = 600 - float(quotas["tenants"]["meter"]["tokens_per_minute"]["remaining"])
        # The shares, less what refilled since (10 a second; a loaded machine may take a few).
        assert shares - 50 <= charged <= shares + 1, (shares, charged)
    finally:
        proxy.stop()


@pytest.fixture(scope="module")
def slow_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """An emulator that takes its time over embeddings (about 170 tokens a second), so that a batch is
    still upstream when its clients leave or their deadline passes."""
    server = start_emulator(tmp_path_factory.mktemp("embed-batch-slow"), load_s=0,
                            extra=["--profile", "cpu-small"], name="embed-batch-slow")
    yield server
    server.stop()


def test_a_client_that_leaves_after_its_batch_went_upstream_is_charged_its_prompt(
        tmp_path: Path, slow_emulator: Server) -> None:
    """The replica embeds a batch's inputs whoever stays for the answer: a client that leaves after its
    batch was sent is charged its prompt, as one the forwarder had sent is, not refunded (leaving
    just after the batch left would otherwise have the fleet embed for free, past tokens_per_minute)."""
    proxy = start_proxy(tmp_path, [slow_emulator.url], {
        "admin": {"keys": ["sk-batch-admin"]},
        "tenants": [{"name": "meter", "keys": ["sk-batch-meter"], "tokens_per_minute": 600},
                    {"name": "system", "keys": ["sk-batch-system"]}],
        "plugins": [{"name": "embed_batch", "window_s": 0.2, "tenant": "system"}]}, name="abandon")
    text = " ".join(f"word{i}" for i in range(40))

    def remaining() -> float:
        quotas = httpx.get(f"{proxy.url}/system/quotas",
                           headers={"Authorization": "Bearer sk-batch-admin"}).json()
        return float(quotas["tenants"]["meter"]["tokens_per_minute"]["remaining"])

    try:
        async def scenario() -> None:
            async with httpx.AsyncClient(timeout=30) as client:
                posts = [asyncio.ensure_future(client.post(
                    f"{proxy.url}/api/embed", headers={"Authorization": "Bearer sk-batch-meter"},
                    json={"model": MODEL, "input": f"{text} {i}"})) for i in range(2)]
                # The batch is upstream once the replica works on it; then both clients leave.
                started = time.monotonic() + 15
                while not slow_emulator.stats()["active"]:
                    assert time.monotonic() < started and not any(p.done() for p in posts)
                    await asyncio.sleep(0.02)
                for post in posts:
                    post.cancel()
                await asyncio.gather(*posts, return_exceptions=True)

        asyncio.run(scenario())
        # Each prompt is about 80 tokens: about 160 charged once both reservations are settled (not
        # refunded, which would leave 600); 10 a second refill meanwhile.
        wait_for(lambda: remaining() < 600 - 100, what="the abandoned prompts charged")
    finally:
        proxy.stop()


def test_a_batched_request_is_answered_504_at_its_deadline(tmp_path: Path, slow_emulator: Server) -> None:
    """A request waiting for its batch's answer keeps its deadline (X-Deadline-S here): 504 when it
    passes, as the forwarder answers, not the batch's answer whenever it comes."""
    proxy = start_proxy(tmp_path, [slow_emulator.url], {
        "plugins": [{"name": "embed_batch", "window_s": 0.05}]}, name="batch-deadline")
    text = " ".join(f"word{i}" for i in range(150))  # about 500 tokens: 3 s each for this replica
    try:
        async def scenario() -> list[tuple[httpx.Response, float]]:
            async with httpx.AsyncClient(timeout=30) as client:
                async def one(i: int) -> tuple[httpx.Response, float]:
                    started = time.monotonic()
                    reply = await client.post(f"{proxy.url}/api/embed", headers={"X-Deadline-S": "1"},
                                              json={"model": MODEL, "input": f"{text} {i}"})
                    return reply, time.monotonic() - started
                return list(await asyncio.gather(*(one(i) for i in range(2))))

        for reply, took in asyncio.run(scenario()):
            assert reply.status_code == 504, reply.text
            assert reply.headers.get("x-should-retry") == "false"
            assert took < 3.5, took  # the batch takes about 6 s
    finally:
        proxy.stop()


def test_a_batch_is_split_by_each_inputs_tokens_not_its_bytes(proxy: Server, emulator: Server) -> None:
    """Two tenants' inputs of about the same length in bytes, one token-dense (a digit and a space a
    token each), one not (a long word is a few tokens): each is charged about what the replica counts
    for it alone, not half the batch (bytes would move the dense one's cost to the other)."""
    dense = " ".join("7" for _ in range(400))
    sparse = " ".join("internationalization" for _ in range(40))
    alone = {text: int(_direct(emulator, "/api/embed", {"model": MODEL, "input": text}).json()[
        "prompt_eval_count"]) for text in (dense, sparse)}
    replies = asyncio.run(_send(proxy, [("a", "/api/embed", {"model": MODEL, "input": dense}),
                                        ("b", "/api/embed", {"model": MODEL, "input": sparse})]))
    assert [r.headers.get("x-embed-batch") for r in replies] == ["requests=2"] * 2, [r.text for r in replies]
    for reply, text in zip(replies, (dense, sparse), strict=True):
        charged = int(reply.json()["prompt_eval_count"])
        assert abs(charged - alone[text]) <= 10, (charged, alone)


def test_a_batch_whose_requests_all_left_is_cancelled(tmp_path: Path) -> None:
    """Every request of a batch gone (here: their deadline passed, 504) while the replica has not
    answered: the batch's call is cancelled, as the forwarder's is when its client leaves. Before, it
    held its queue slot and the replica until `timeout_s` (120 s) for nobody, and the next embedding
    request waited behind it (503 queue_timeout after 30 s)."""
    emulator = start_emulator(tmp_path, name="embed-batch-left-emu")
    proxy = start_proxy(tmp_path, [emulator.url], {
        "tenants": [{"name": "team", "keys": ["sk-batch-team"]}, {"name": "system", "keys": ["sk-sys"]}],
        "plugins": [{"name": "embed_batch", "window_s": 0.2, "tenant": "system"}]}, name="embed-batch-left")
    try:
        headers = {"Authorization": "Bearer sk-batch-team"}
        assert httpx.post(f"{proxy.url}/api/embed", json={"model": MODEL, "input": "warm"}, headers=headers,
                          timeout=30).status_code == 200
        assert httpx.post(f"{emulator.url}/_emulator/faults", timeout=5, json={
            "hang_before_headers": True, "count": 1, "paths": ["/api/embed"]}).status_code == 200

        async def scenario() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as client:
                return list(await asyncio.gather(*(client.post(
                    f"{proxy.url}/api/embed", json={"model": MODEL, "input": f"hangs {i}"},
                    headers={**headers, "X-Deadline-S": "1"}) for i in range(2))))

        replies = asyncio.run(scenario())
        assert [(r.status_code, r.headers.get("x-should-retry")) for r in replies] == [(504, "false")] * 2
        # The batch's own request ended with them (its client, the plugin, left) ...
        wait_for(lambda: any(re.search(r'"POST /api/embed" 499 .*tenant=system', line)
                             for line in proxy.log().splitlines()), 10, "the batch's call cancelled")
        # ... and the next request is served at once, not queued behind it.
        started = time.monotonic()
        reply = httpx.post(f"{proxy.url}/api/embed", json={"model": MODEL, "input": "after"}, headers=headers,
                           timeout=15)
        assert reply.status_code == 200 and time.monotonic() - started < 10, reply.text
    finally:
        proxy.stop()
        emulator.stop()


def test_in_shadow_mode_a_batch_is_reported_and_nothing_is_sent_for_it(tmp_path: Path,
                                                                      emulator: Server) -> None:
    """Shadowed, the batch's answers would be discarded and every request served upstream by itself:
    sending the batch as well had the replica embed every input twice (before: one call more than
    requests, the batch's). Each request is told it would have been batched, and only the requests
    themselves go upstream."""
    proxy = start_proxy(tmp_path, [emulator.url], {
        "tenants": [{"name": "a", "keys": [KEYS["a"]]}],
        "models": {MODEL: {"options": {"num_ctx": 2048}}},
        "plugins": [{"name": "embed_batch", "window_s": 0.5, "mode": "shadow"}]}, name="batch-shadow")
    try:
        requests = [("a", "/api/embed", {"model": MODEL, "input": [f"shadowed {i}", "shared"]})
                    for i in range(3)]
        calls = _calls(emulator)
        replies = asyncio.run(_send(proxy, requests))
        assert [r.status_code for r in replies] == [200] * 3, [r.text for r in replies]
        assert [r.headers.get("x-shadow-decision") for r in replies] == ["embed_batch=batched"] * 3
        assert all("x-embed-batch" not in r.headers for r in replies)
        assert _calls(emulator) == calls + 3  # the three requests, and no batch besides
        for (_, path, body), reply in zip(requests, replies, strict=True):  # served as they came
            assert orjson.loads(reply.content)["embeddings"] == \
                orjson.loads(_direct(emulator, path, body).content)["embeddings"]
    finally:
        proxy.stop()
