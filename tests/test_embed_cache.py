"""embed_cache in a real proxy in front of the emulator: full hits answered without a slot or an upstream
call, partial hits that send only the misses, each route's exact bytes, the official clients, a model
whose digest changes, the shared Redis tier and its failure, the metrics, and the memory bound."""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import orjson
import pytest
import redis as redis_client

from plugins.embed_cache import _ENTRY_OVERHEAD_BYTES, MemoryStore
from proxy.embeddings import read_answer
from proxy.plugin import PluginError, structure_plugins
from tests.support.metrics import metric
from tests.support.polling import wait_for
from tests.support.redis_server import RedisServer
from tests.support.servers import Server, start_emulator, start_proxy

MODEL = "nomic-embed-text"
TEAM, SYSTEM, RIVAL = "sk-embed-team", "sk-embed-system", "sk-embed-rival"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_emulator(tmp_path_factory.mktemp("embed-cache-emu"), name="embed-cache-emu")
    yield server
    server.stop()


def _proxy(tmp: Path, emulator: Server, name: str, **plugin: Any) -> Server:
    return start_proxy(tmp, [emulator.url], {
        "tenants": [{"name": "team", "keys": [TEAM], "tokens_per_minute": 1_000_000},
                    {"name": "rival", "keys": [RIVAL]}, {"name": "system", "keys": [SYSTEM]}],
        "chain": {"health": {"probe_interval_s": 0.5}},
        # limits pins num_ctx (part of the key) to the loaded context once it sees the model loaded;
        # a configured value keeps it the same from the first request on.
        "models": {MODEL: {"options": {"num_ctx": 2048}}},
        "plugins": [{"name": "embed_cache", **plugin}]}, name=name)


def _post(server: Server, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", content=orjson.dumps(body), timeout=30,
                      headers={"Authorization": f"Bearer {TEAM}", "Content-Type": "application/json"})


def _warm(proxy: Server, path: str = "/api/embed", text: str = "warm-up") -> None:
    """Wait until the proxy knows the model's digest (the first probes), which caching needs."""
    deadline = time.monotonic() + 20
    while True:
        reply = _post(proxy, path, {"model": MODEL, "input": text} if path != "/api/embeddings"
                      else {"model": MODEL, "prompt": text})
        assert reply.status_code == 200, reply.text
        if "x-embed-cache" in reply.headers:
            return
        assert time.monotonic() < deadline, proxy.log()[-2000:]
        time.sleep(0.2)


def _f32(values: list[float]) -> bytes:
    """Vectors compared as the float32 Ollama holds (base64 carries those; JSON their shortest text)."""
    return struct.pack(f"<{len(values)}f", *values)


def _embed_calls(emulator: Server, path: str = "/api/embed") -> int:
    return sum(count for key, count in emulator.stats()["requests"].items() if path in key)


def test_a_full_hit_uses_no_slot_and_no_upstream_call(tmp_path: Path, emulator: Server) -> None:
    proxy = _proxy(tmp_path, emulator, "cache-hit")
    try:
        _warm(proxy)
        body = {"model": MODEL, "input": ["alpha text", "beta text"]}
        first = _post(proxy, "/api/embed", body)
        assert first.headers["x-embed-cache"] == "hits=0; misses=2"
        direct = httpx.post(f"{emulator.url}/api/embed", json=body, timeout=30)
        calls, completed = _embed_calls(emulator), emulator.stats()["completed"]
        second = _post(proxy, "/api/embed", body)
        assert second.status_code == 200
        assert second.headers["x-embed-cache"] == "hits=2; misses=0"
        assert (_embed_calls(emulator), emulator.stats()["completed"]) == (calls, completed)
        # The vectors are the bytes Ollama wrote (Go's float32 formatting), in Ollama's shape.
        hit, upstream = read_answer("/api/embed", second.content), read_answer("/api/embed", direct.content)
        assert hit is not None and upstream is not None and hit.vectors == upstream.vectors
        assert second.content.startswith(b'{"model":"nomic-embed-text","embeddings":[[')
        assert second.headers["content-type"] == "application/json; charset=utf-8"
        assert hit.tokens == upstream.tokens  # the counts the vectors were cached with
        # The official client reads the answer like Ollama's.
        reply = ollama.Client(host=proxy.url, headers={"Authorization": f"Bearer {TEAM}"}).embed(
            model=MODEL, input=["alpha text", "beta text"])
        assert [list(v) for v in reply.embeddings] == orjson.loads(direct.content)["embeddings"]
        assert _embed_calls(emulator) == calls
        assert metric(proxy.url, "sop_plugin_embed_cache_lookups_total", result="hit") == 4
        assert metric(proxy.url, "sop_plugin_embed_cache_hit_ratio") == pytest.approx(4 / 7)
    finally:
        proxy.stop()


def test_a_partial_hit_sends_only_the_misses_and_merges_in_order(tmp_path: Path,
                                                                 emulator: Server) -> None:
    proxy = _proxy(tmp_path, emulator, "cache-partial")
    try:
        _warm(proxy)
        singles = {}
        for text in ("one fish", "two fish"):
            reply = _post(proxy, "/api/embed", {"model": MODEL, "input": text})
            assert reply.headers["x-embed-cache"] == "hits=0; misses=1"
            singles[text] = orjson.loads(reply.content)["prompt_eval_count"]
        calls = _embed_calls(emulator)
        body = {"model": MODEL, "input": ["one fish", "red fish", "two fish", "red fish"]}
        merged = _post(proxy, "/api/embed", body)
        assert merged.status_code == 200, merged.text
        assert merged.headers["x-embed-cache"] == "hits=2; misses=2"
        assert _embed_calls(emulator) == calls + 1  # one sub-request, for the misses
        direct = httpx.post(f"{emulator.url}/api/embed", json=body, timeout=30)
        got, want = read_answer("/api/embed", merged.content), read_answer("/api/embed", direct.content)
        assert got is not None and want is not None and got.vectors == want.vectors
        # Tokens: the cached inputs' own counts plus what the replica counted for "red fish" (sent once).
        red = httpx.post(f"{emulator.url}/api/embed", json={"model": MODEL, "input": "red fish"},
                         timeout=30).json()["prompt_eval_count"]
        assert got.tokens == singles["one fish"] + singles["two fish"] + 2 * red
        # The sub-request went through the chain under the caller's tenant (no system tenant set).
        assert any('"POST /api/embed" 200' in line and "tenant=team" in line
                   for line in proxy.log().splitlines()[-10:])
        again = _post(proxy, "/api/embed", body)
        assert again.headers["x-embed-cache"] == "hits=4; misses=0"
        assert _embed_calls(emulator) == calls + 3  # the sub-request and the two direct calls above
    finally:
        proxy.stop()


def test_each_route_keeps_its_shape_and_options_change_the_key(tmp_path: Path,
                                                               emulator: Server) -> None:
    proxy = _proxy(tmp_path, emulator, "cache-routes")
    try:
        _warm(proxy)
        # Legacy /api/embeddings: float64, its own vectors; the hit is byte-identical to Ollama's answer.
        legacy = {"model": MODEL, "prompt": "legacy words"}
        assert _post(proxy, "/api/embeddings", legacy).headers["x-embed-cache"] == "hits=0; misses=1"
        hit = _post(proxy, "/api/embeddings", legacy)
        assert hit.headers["x-embed-cache"] == "hits=1; misses=0"
        assert hit.content == httpx.post(f"{emulator.url}/api/embeddings", json=legacy, timeout=30).content
        # /v1/embeddings with the official OpenAI client (base64 by default), then floats by hand.
        client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=TEAM, max_retries=0)
        first = client.embeddings.create(model=MODEL, input=["open words", "more words"])
        again = client.embeddings.create(model=MODEL, input=["open words", "more words"])
        assert [d.embedding for d in again.data] == [d.embedding for d in first.data]
        floats = {"model": MODEL, "input": ["open words", "more words"]}
        direct = httpx.post(f"{emulator.url}/v1/embeddings", json=floats, timeout=30)
        _post(proxy, "/v1/embeddings", floats)
        served = _post(proxy, "/v1/embeddings", floats)
        assert served.headers["x-embed-cache"] == "hits=2; misses=0"
        assert served.headers["content-type"] == "application/json"
        assert served.content == direct.content  # same vectors, usage, field order and final newline
        assert _f32(first.data[0].embedding) == _f32(direct.json()["data"][0]["embedding"])
        b64 = _post(proxy, "/v1/embeddings", {**floats, "encoding_format": "base64"})
        assert b64.headers["x-embed-cache"] == "hits=2; misses=0"
        assert base64.b64decode(b64.json()["data"][1]["embedding"]) == _f32(
            direct.json()["data"][1]["embedding"])
        # Options that change the vectors are part of the key.
        cut = _post(proxy, "/api/embed", {"model": MODEL, "input": "open words", "dimensions": 8})
        assert cut.headers["x-embed-cache"] == "hits=0; misses=1"
        assert len(cut.json()["embeddings"][0]) == 8
        # What the cache cannot answer exactly goes on untouched.
        tokens = _post(proxy, "/v1/embeddings", {"model": MODEL, "input": [[1, 2, 3]]})
        assert "x-embed-cache" not in tokens.headers
    finally:
        proxy.stop()


def test_a_partial_hit_keeps_the_requests_deadline(tmp_path: Path, emulator: Server) -> None:
    """The misses' sub-request is bounded by the request's own deadline (X-Deadline-S here): 504 with
    x-should-retry: false when it passes, as the forwarder answers, and the sub-request is cancelled.
    Before, the request waited for the plugin's timeout_s (120 s by default) and then got the queue's
    503 for a deadline long gone."""
    proxy = _proxy(tmp_path, emulator, "cache-deadline", tenant="system")
    try:
        _warm(proxy)
        assert _post(proxy, "/api/embed", {"model": MODEL, "input": "cached before"}).status_code == 200
        assert httpx.post(f"{emulator.url}/_emulator/faults", timeout=5, json={
            "hang_before_headers": True, "count": 1, "paths": ["/api/embed"]}).status_code == 200
        started = time.monotonic()
        reply = httpx.post(f"{proxy.url}/api/embed", timeout=30, json={
            "model": MODEL, "input": ["cached before", "not cached yet"]}, headers={
            "Authorization": f"Bearer {TEAM}", "X-Deadline-S": "1"})
        assert reply.status_code == 504, reply.text
        assert reply.json()["code"] == "upstream_response_timeout"
        assert reply.headers["x-should-retry"] == "false"
        assert time.monotonic() - started < 5
        wait_for(lambda: any('"POST /api/embed" 499' in line and "tenant=system" in line
                             for line in proxy.log().splitlines()), 10, "the sub-request cancelled")
    finally:
        httpx.delete(f"{emulator.url}/_emulator/faults", timeout=5)
        proxy.stop()


def test_a_new_digest_invalidates(tmp_path: Path) -> None:
    emulator = start_emulator(tmp_path, name="cache-digest-emu")
    proxy = _proxy(tmp_path, emulator, "cache-digest")
    try:
        _warm(proxy)
        body = {"model": MODEL, "input": "stable text"}
        old = _post(proxy, "/api/embed", body).json()["embeddings"][0]
        assert _post(proxy, "/api/embed", body).headers["x-embed-cache"] == "hits=1; misses=0"
        # The model is replaced under the same name by another (other digest, other vector size).
        assert httpx.post(f"{emulator.url}/api/copy", timeout=30,
                          json={"source": "llama3.2", "destination": MODEL}).status_code == 200
        direct = httpx.post(f"{emulator.url}/api/embed", json=body, timeout=30).json()["embeddings"][0]
        assert len(direct) != len(old)
        deadline = time.monotonic() + 30
        while True:  # until the probes report the new digest; a stale hit would never end this loop
            reply = _post(proxy, "/api/embed", body)
            # While /api/ps and /api/tags disagree on the digest (a probe has seen one, not yet the
            # other), nothing is cached: the answer is the replica's, without the header.
            if reply.json()["embeddings"][0] == direct and "x-embed-cache" in reply.headers:
                break
            assert time.monotonic() < deadline, "the cache kept answering the replaced model's vectors"
            time.sleep(0.3)
        assert reply.headers["x-embed-cache"] == "hits=0; misses=1"
    finally:
        proxy.stop()
        emulator.stop()


def test_replicas_holding_different_digests_cache_nothing(tmp_path: Path) -> None:
    """A rolling re-pull: one replica holds the new model under the name, the other still the old one, and
    a request may be served by either. Nothing is cached then (the key's digest could name the other
    model), so once every replica holds the new model no old vector is answered: before, the vectors the
    old replica computed were cached under the digest found first (the new one) and answered for ever."""
    first = start_emulator(tmp_path, name="cache-rollout-a")
    second = start_emulator(tmp_path, name="cache-rollout-b")
    proxy = start_proxy(tmp_path, [first.url, second.url], {
        "chain": {"health": {"probe_interval_s": 0.3}},
        "models": {MODEL: {"options": {"num_ctx": 2048}}},
        "plugins": [{"name": "embed_cache"}]}, name="cache-rollout")

    def tags_probes(server: Server) -> int:
        return int(server.stats()["requests"].get("GET /api/tags", 0))

    def replace(server: Server) -> None:
        """The model replaced under its name (other digest, other vector size); returns once the proxy
        has listed the replica's models twice since."""
        seen = tags_probes(server)
        assert httpx.post(f"{server.url}/api/copy", timeout=30,
                          json={"source": "llama3.2", "destination": MODEL}).status_code == 200
        wait_for(lambda: tags_probes(server) >= seen + 2, 20, "two listings of the new model")

    try:
        _warm(proxy)
        replace(first)
        new_size = len(httpx.post(f"{first.url}/api/embed", json={"model": MODEL, "input": "x"},
                                  timeout=30).json()["embeddings"][0])
        texts = [f"rollout text {i}" for i in range(6)]
        for text in texts:  # served by either replica while they differ
            reply = _post(proxy, "/api/embed", {"model": MODEL, "input": text})
            assert reply.status_code == 200 and "x-embed-cache" not in reply.headers, reply.headers
        replace(second)
        deadline = time.monotonic() + 20
        for text in texts:
            while len(_post(proxy, "/api/embed", {"model": MODEL, "input": text}).json()[
                    "embeddings"][0]) != new_size:
                assert time.monotonic() < deadline, "an old model's vector answered from the cache"
                time.sleep(0.3)
        # Agreed again on the new digest: cached as before (polled: the listing that tells the two
        # replicas agree may land after the loop's last request, whose answer was then not cached).
        wait_for(lambda: _post(proxy, "/api/embed", {"model": MODEL, "input": texts[0]}).headers.get(
            "x-embed-cache") == "hits=1; misses=0", 20, "a cache hit once the replicas agree")
    finally:
        proxy.stop()
        first.stop()
        second.stop()


def test_redis_is_shared_by_replicas_and_its_failure_falls_back_to_memory(
        tmp_path: Path, emulator: Server) -> None:
    redis = RedisServer(tmp_path)
    first = _proxy(tmp_path, emulator, "cache-redis-a", redis_url=redis.url, tenant="system")
    second = _proxy(tmp_path, emulator, "cache-redis-b", redis_url=redis.url, redis_timeout_s=0.5)
    try:
        _warm(first, text="redis warm a")
        _warm(second, text="redis warm b")
        body = {"model": MODEL, "input": ["shared one", "shared two"]}
        assert _post(first, "/api/embed", body).headers["x-embed-cache"] == "hits=0; misses=2"
        deadline = time.monotonic() + 10
        shared = redis_client.Redis.from_url(redis.url)
        while len(shared.keys("sop:embed:*")) < 4:  # both warm-ups and both inputs; written in the background
            assert time.monotonic() < deadline
            time.sleep(0.05)
        shared.close()
        calls = _embed_calls(emulator)
        reply = _post(second, "/api/embed", body)
        assert reply.headers["x-embed-cache"] == "hits=2; misses=0"
        assert _embed_calls(emulator) == calls
        # Redis frozen (accepts, never answers): each call is bounded, the request is served anyway.
        redis.pause()
        try:
            started = time.monotonic()
            frozen = _post(second, "/api/embed", {"model": MODEL, "input": ["while frozen"]})
            assert frozen.status_code == 200 and frozen.headers["x-embed-cache"] == "hits=0; misses=1"
            assert time.monotonic() - started < 10
        finally:
            redis.resume()
        # Redis gone: requests still succeed, served from memory or upstream, never a 500.
        redis.kill()
        again = _post(second, "/api/embed", body)
        assert again.status_code == 200 and again.headers["x-embed-cache"] == "hits=2; misses=0"
        fresh = _post(second, "/api/embed", {"model": MODEL, "input": ["after redis", "shared one"]})
        assert fresh.status_code == 200 and fresh.headers["x-embed-cache"] == "hits=1; misses=1"
        assert "embed_cache: Redis failed" in second.log()
        # A partial hit with a system tenant: the sub-request runs as `system`, the caller pays its
        # misses on its own request (its token reservation settles with the misses' count).
        partial = _post(first, "/api/embed", {"model": MODEL, "input": ["shared one", "only first"]})
        assert partial.headers["x-embed-cache"] == "hits=1; misses=1"
        assert any('"POST /api/embed" 200' in line and "tenant=system" in line
                   for line in first.log().splitlines()[-10:])
    finally:
        first.stop()
        second.stop()
        redis.stop()


def test_the_memory_store_is_bounded_in_bytes_with_lru() -> None:
    vector = b"[" + b"0.1," * 60 + b"0.1]"
    entry = len(vector) + 32 + _ENTRY_OVERHEAD_BYTES  # vector, key, fixed cost per entry
    store = MemoryStore(max_bytes=3 * entry + entry // 2)  # three fit, not four
    for index in range(5):
        store.put(bytes([index]) * 32, vector, index)
        if index == 2:
            assert store.get(bytes([0]) * 32) is not None  # used: the oldest is now entry 1
    assert store.bytes == 3 * entry and len(store) == 3
    assert store.get(bytes([1]) * 32) is None and store.get(bytes([2]) * 32) is None
    assert store.get(bytes([0]) * 32) == (vector, 0) and store.get(bytes([4]) * 32) == (vector, 4)
    store.put(b"k" * 32, b"x" * 2000, 1)  # bigger than the whole cache: not kept, nothing evicted
    assert len(store) == 3


METER_HEADERS = {"Authorization": "Bearer sk-embed-meter"}


def test_a_client_gone_while_its_misses_are_upstream_pays_its_prompt(tmp_path: Path,
                                                                     emulator: Server) -> None:
    """With `tenant` set, the misses' sub-request is the system tenant's: a client that leaves while
    it is upstream is charged its prompt, as when its deadline passes there and as a client that
    leaves a request the forwarder had sent (before: nothing, so a partly cached request given up
    just before its answer had its misses embedded for free)."""
    proxy = start_proxy(tmp_path, [emulator.url], {
        "admin": {"keys": ["sk-embed-admin"]},
        "tenants": [{"name": "meter", "keys": ["sk-embed-meter"], "tokens_per_minute": 1200},
                    {"name": "system", "keys": [SYSTEM]}],
        "chain": {"health": {"probe_interval_s": 0.5}},
        "models": {MODEL: {"options": {"num_ctx": 2048}}},
        "plugins": [{"name": "embed_cache", "tenant": "system"}]}, name="cache-gone")
    meter = {"Authorization": "Bearer sk-embed-meter"}

    def remaining() -> float:
        quotas = httpx.get(f"{proxy.url}/system/quotas", timeout=5,
                           headers={"Authorization": "Bearer sk-embed-admin"}).json()
        return float(quotas["tenants"]["meter"]["tokens_per_minute"]["remaining"])

    try:
        deadline = time.monotonic() + 20
        while "x-embed-cache" not in httpx.post(f"{proxy.url}/api/embed", headers=meter, timeout=30,
                                                json={"model": MODEL, "input": "cached"}).headers:
            assert time.monotonic() < deadline, proxy.log()[-2000:]
            time.sleep(0.2)
        assert httpx.post(f"{emulator.url}/_emulator/faults", timeout=5, json={
            "hang_before_headers": True, "count": 1, "paths": ["/api/embed"]}).status_code == 200
        wait_for(lambda: remaining() >= 1199, 10, "the warm-up's tokens refilled")
        with pytest.raises(httpx.TimeoutException):  # gone while the misses are upstream
            httpx.post(f"{proxy.url}/api/embed", headers=meter, timeout=1, json={
                "model": MODEL, "input": ["cached", " ".join(["hello"] * 150)]})
        wait_for(lambda: any('"POST /api/embed" 499' in line and "tenant=system" in line
                             for line in proxy.log().splitlines()), 10, "the sub-request cancelled")
        # The prompt's ~450 tokens kept once the plugin has unwound and the request settled (less 20 a
        # second refilled since: waited for 5 s at most, well within the 12 s the gap takes to close);
        # nothing charged: ~1,200 throughout.
        wait_for(lambda: 1200 - remaining() >= 200, 5, "the prompt charged")
    finally:
        httpx.delete(f"{emulator.url}/_emulator/faults", timeout=5)
        proxy.stop()


def _metered_shadow_proxy(tmp: Path, emulator: Server, name: str) -> Server:
    """embed_cache in shadow mode, for tenant `meter` (1,200 tokens a minute: 20 refill a second)."""
    return start_proxy(tmp, [emulator.url], {
        "admin": {"keys": ["sk-embed-admin"]},
        "tenants": [{"name": "meter", "keys": ["sk-embed-meter"], "tokens_per_minute": 1200}],
        "chain": {"health": {"probe_interval_s": 0.5}},
        "models": {MODEL: {"options": {"num_ctx": 2048}}},
        "plugins": [{"name": "embed_cache", "mode": "shadow"}]}, name=name)


def _meter_remaining(proxy: Server) -> float:
    """Tokens left in tenant `meter`'s minute, as /system/quotas says."""
    quotas = httpx.get(f"{proxy.url}/system/quotas", timeout=5,
                       headers={"Authorization": "Bearer sk-embed-admin"}).json()
    return float(quotas["tenants"]["meter"]["tokens_per_minute"]["remaining"])


def _embed_until_shadow_hit(proxy: Server, body: dict[str, Any]) -> httpx.Response:
    """Send `body` as tenant `meter` until the shadowed cache reports a hit for it (its first answer is
    cached once the replica's digest is known); that reply."""
    deadline = time.monotonic() + 20
    while (reply := httpx.post(f"{proxy.url}/api/embed", json=body, headers=METER_HEADERS, timeout=30)
           ).headers.get("x-shadow-decision") != "embed_cache=hit":
        assert reply.status_code == 200 and time.monotonic() < deadline, reply.headers
        time.sleep(0.3)
    return reply


def test_shadow_mode_reports_the_hit_and_goes_upstream(tmp_path: Path, emulator: Server) -> None:
    proxy = _proxy(tmp_path, emulator, "cache-shadow", mode="shadow")
    try:
        body = {"model": MODEL, "input": "shadowed"}
        deadline = time.monotonic() + 20
        while (reply := _post(proxy, "/api/embed", body)).headers.get("x-shadow-decision") != \
                "embed_cache=hit":  # cached as it went upstream, once the digest is known
            assert time.monotonic() < deadline, reply.headers
            time.sleep(0.2)
        calls = _embed_calls(emulator)
        reply = _post(proxy, "/api/embed", body)
        assert reply.headers["x-shadow-decision"] == "embed_cache=hit"
        assert "x-embed-cache" not in reply.headers and _embed_calls(emulator) == calls + 1
    finally:
        proxy.stop()


def test_a_shadow_hit_leaves_the_request_accounted_as_the_forwarder_serves_it(tmp_path: Path,
                                                                             emulator: Server) -> None:
    """In shadow mode the hit's answer is discarded and the request goes upstream; what the answer had
    recorded (a first byte, complete, 0 tokens) goes with it. Before, it stayed: a request whose
    deadline passed after the replica had it (504) was charged the discarded answer's 0 tokens instead
    of its prompt, and its access line said in_tokens=0."""
    proxy = _metered_shadow_proxy(tmp_path, emulator, "cache-shadow-charge")
    headers = METER_HEADERS
    try:
        body = {"model": MODEL, "input": " ".join(f"word{i}" for i in range(40))}
        reply = _embed_until_shadow_hit(proxy, body)
        prompt = int(reply.json()["prompt_eval_count"])
        assert httpx.post(f"{emulator.url}/_emulator/faults", timeout=5, json={
            "hang_before_headers": True, "count": 1, "paths": ["/api/embed"]}).status_code == 200
        before = _meter_remaining(proxy)
        reply = httpx.post(f"{proxy.url}/api/embed", json=body, timeout=30,
                           headers={**headers, "X-Deadline-S": "1"})
        assert reply.status_code == 504 and reply.headers["x-shadow-decision"] == "embed_cache=hit"
        # Its prompt, less what refilled meanwhile (20 a second).
        assert before - _meter_remaining(proxy) >= prompt - 60, (before, prompt)
        line = wait_for(lambda: next((line for line in proxy.log().splitlines()
                                      if '"POST /api/embed" 504' in line), None), 10, "the 504's line")
        assert "in_tokens=0" not in line
    finally:
        httpx.delete(f"{emulator.url}/_emulator/faults", timeout=5)
        proxy.stop()


def test_a_shadow_partial_hit_sends_nothing_upstream_of_its_own(tmp_path: Path, emulator: Server) -> None:
    """In shadow mode a partial hit's answer would be discarded and the whole request served upstream:
    sending its misses first (a sub-request, as the caller when `tenant` is unset) had the replica embed
    them twice and charged the caller for both (before: two upstream calls, the misses' tokens charged
    twice). It reports `partial`, sends nothing of its own, and caches the whole answer as a miss does."""
    proxy = _metered_shadow_proxy(tmp_path, emulator, "cache-shadow-partial")
    headers = METER_HEADERS
    try:
        cached = " ".join(f"kept{i}" for i in range(40))
        _embed_until_shadow_hit(proxy, {"model": MODEL, "input": cached})
        body = {"model": MODEL, "input": [cached, " ".join(f"new{i}" for i in range(40))]}
        wait_for(lambda: _meter_remaining(proxy) >= 1199, 20, "a full bucket")
        calls, before = _embed_calls(emulator), time.monotonic()
        reply = httpx.post(f"{proxy.url}/api/embed", json=body, headers=headers, timeout=30)
        spent, elapsed = 1200 - _meter_remaining(proxy), time.monotonic() - before
        assert reply.status_code == 200 and reply.headers["x-shadow-decision"] == "embed_cache=partial"
        assert _embed_calls(emulator) == calls + 1  # the request itself, and nothing else
        # Charged the request's own count once (less what refilled meanwhile: 20 tokens a second).
        prompt = int(reply.json()["prompt_eval_count"])
        assert prompt - 20 * elapsed - 2 <= spent <= prompt + 2, (spent, prompt)
        # Its answer was cached as it went by: the same request is now a whole hit.
        again = httpx.post(f"{proxy.url}/api/embed", json=body, headers=headers, timeout=30)
        assert again.headers["x-shadow-decision"] == "embed_cache=hit"
    finally:
        proxy.stop()


def test_config_is_validated_with_the_key_path() -> None:
    with pytest.raises(PluginError, match=r"plugins\[0\]\.max_bytes: must be > 0"):
        structure_plugins([{"name": "embed_cache", "max_bytes": 0}])
    with pytest.raises(PluginError, match=r"plugins\[0\]\.redis_url: expected a redis://"):
        structure_plugins([{"name": "embed_cache", "redis_url": "http://127.0.0.1:6379"}])
    with pytest.raises(PluginError, match=r"plugins\[1\]\.window_s: must be > 0 and <= 1"):
        structure_plugins([{"name": "embed_cache"}, {"name": "embed_batch", "window_s": 5}])
    with pytest.raises(PluginError, match=r"plugins\[0\]: unknown key\(s\) ttl"):
        structure_plugins([{"name": "embed_batch", "ttl": 5}])


@pytest.mark.parametrize("scope", ["tenant", "shared"])
def test_a_tenant_learns_nothing_from_another_tenants_vectors(tmp_path: Path, emulator: Server,
                                                              scope: str) -> None:
    """`cache_scope: tenant` (the default): what one tenant embedded is no hit for another, so a hit
    (its header, or its speed) cannot tell a tenant what another sent. `shared` is the operator's
    choice for a corpus every team embeds: then it is."""
    proxy = _proxy(tmp_path, emulator, f"scope-{scope}", **({"cache_scope": "shared"}
                                                            if scope == "shared" else {}))
    try:
        _warm(proxy)
        secret = {"model": MODEL, "input": "the merger closes on friday"}
        assert _post(proxy, "/api/embed", secret).headers["x-embed-cache"] == "hits=0; misses=1"
        assert _post(proxy, "/api/embed", secret).headers["x-embed-cache"] == "hits=1; misses=0"
        probe = httpx.post(f"{proxy.url}/api/embed", json=secret, timeout=30,
                           headers={"Authorization": f"Bearer {RIVAL}"})
        assert probe.status_code == 200
        assert probe.headers["x-embed-cache"] == ("hits=0; misses=1" if scope == "tenant"
                                                  else "hits=1; misses=0")
    finally:
        proxy.stop()


def _rss_bytes(server: Server) -> int:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the proxy's RSS from /proc")
def test_the_memory_bound_counts_what_entries_really_cost(tmp_path: Path, emulator: Server) -> None:
    """`max_bytes` bounds real memory: with tiny vectors (dimensions 1) most of an entry is overhead,
    and the bytes the cache counts (its gauge) must cover what the process grew by holding them, not
    a fraction of it."""
    proxy = _proxy(tmp_path, emulator, "embed-cache-memory", max_bytes=256 * 1024 * 1024)
    try:
        _warm(proxy)
        body = {"model": MODEL, "input": [f"warm {i}" for i in range(2000)], "dimensions": 1}
        assert _post(proxy, "/api/embed", body).status_code == 200  # buffers of this size, once
        counted_before = metric(proxy.url, "sop_plugin_embed_cache_bytes") or 0
        rss_before = _rss_bytes(proxy)

        async def fill() -> list[int]:
            async with httpx.AsyncClient(timeout=60) as client:
                limit = asyncio.Semaphore(2)

                async def one(k: int) -> int:
                    async with limit:
                        reply = await client.post(
                            f"{proxy.url}/api/embed", headers={"Authorization": f"Bearer {TEAM}"},
                            json={"model": MODEL, "input": [f"{k}-{i}" for i in range(2000)],
                                  "dimensions": 1})
                        return reply.status_code
                return list(await asyncio.gather(*(one(k) for k in range(10))))

        assert asyncio.run(fill()) == [200] * 10
        counted = (metric(proxy.url, "sop_plugin_embed_cache_bytes") or 0) - counted_before
        grown = _rss_bytes(proxy) - rss_before
        # 20,000 entries: about 6 MB held; 96 bytes of overhead counted only about 2.6 MB of it.
        assert grown < counted * 1.5, (grown, counted)  # the old count: 2.5 times less
    finally:
        proxy.stop()


def test_a_keep_alive_ollama_refuses_is_not_answered_from_the_cache(tmp_path: Path,
                                                                     emulator: Server) -> None:
    """keep_alive does not change vectors, but a value Ollama cannot parse (not seconds, not a Go
    duration) makes it answer 400: the cache must not answer 200 in its place. A valid one is a hit."""
    proxy = _proxy(tmp_path, emulator, "cache-keep-alive")
    try:
        _warm(proxy, text="kept alive")
        assert _post(proxy, "/api/embed", {"model": MODEL, "input": "kept alive"}).headers[
            "x-embed-cache"] == "hits=1; misses=0"
        for valid in ("5m", "1h30m", "-1s", "0", 300, -1):
            reply = _post(proxy, "/api/embed", {"model": MODEL, "input": "kept alive", "keep_alive": valid})
            assert reply.status_code == 200 and reply.headers["x-embed-cache"] == "hits=1; misses=0", valid
        for invalid in ("forever", "5", "5 m", "1e3s", True):
            body = {"model": MODEL, "input": "kept alive", "keep_alive": invalid}
            reply = _post(proxy, "/api/embed", body)
            direct = httpx.post(f"{emulator.url}/api/embed", json=body, timeout=30)
            assert direct.status_code == 400
            assert (reply.status_code, reply.json()) == (400, direct.json()), invalid
            assert "x-embed-cache" not in reply.headers
    finally:
        proxy.stop()
