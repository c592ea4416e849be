"""The emulator's scheduler and timing model behave like Ollama's (reference §10-§12): slots with an
unbounded wait for loaded models, 503 only for requests waiting on a load, LRU eviction, keep_alive,
reload on num_ctx, context overflow, and decode rates that plateau with concurrency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.emulator.app import create_emulator_app
from proxy.emulator.engine import CONTEXT_OVERFLOW, EngineSettings
from proxy.emulator.profile import PROFILES_DIR, ProfileSet, TimingProfile, load_profile
from proxy.emulator.scheduler import SERVER_BUSY

Client = TestClient[web.Request, web.Application]


async def _client(aiohttp_client: Any, **settings: Any) -> Client:
    profile_fields = {k: settings.pop(k) for k in list(settings) if k in TimingProfile.__annotations__}
    profiles = ProfileSet().with_defaults(**profile_fields)
    client: Client = await aiohttp_client(create_emulator_app(EngineSettings(profiles=profiles,
                                                                             **settings)))
    return client


async def _stats(client: Client) -> dict[str, Any]:
    return dict(await (await client.get("/_emulator/stats")).json())


async def _until(client: Client, predicate: Callable[[dict[str, Any]], bool], what: str,
                 timeout_s: float = 15.0) -> dict[str, Any]:
    """Poll /_emulator/stats until `predicate` holds (a loaded CI machine may be slow to get there)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = await _stats(client)
        if predicate(stats):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {stats}")
        await asyncio.sleep(0.02)


async def _generate(client: Client, model: str = "llama3.2", **extra: Any) -> dict[str, Any]:
    body = {"model": model, "prompt": "hello", "stream": False, **extra}
    response = await client.post("/api/generate", json=body)
    return {"status": response.status, **(await response.json())}


async def test_loaded_model_queues_without_bound(aiohttp_client: Any) -> None:
    """ollama#7758: with one slot and a pending queue of 1, six requests to a loaded model all wait
    and all succeed; none gets 503."""
    client = await _client(aiohttp_client, max_queue=1, decode_tokens_per_s=10,
                           output_tokens=(10, 10))
    await _generate(client)  # load it
    tasks = [asyncio.ensure_future(_generate(client)) for _ in range(6)]
    # Each run takes 1 s: all six arrive long before the first ends, even on a loaded machine.
    stats = await _until(client, lambda s: s["active"] + s["waiting"] == 6, "six requests in")
    assert stats["active"] == 1 and stats["waiting"] == 5
    results = await asyncio.gather(*tasks)
    assert all(r["status"] == 200 for r in results)
    assert (await _stats(client))["rejected"] == 0


async def test_requests_waiting_for_a_load_beyond_max_queue_get_503(aiohttp_client: Any) -> None:
    client = await _client(aiohttp_client, max_queue=2, load_s=3.0)
    first = asyncio.ensure_future(_generate(client))  # taken by the loader
    await _until(client, lambda s: s["loading"] is not None, "the load to start")
    queued = [asyncio.ensure_future(_generate(client)) for _ in range(2)]  # fill the pending queue
    await _until(client, lambda s: s["waiting"] == 3, "two requests pending behind the load")
    refused = await client.post("/api/generate", json={"model": "llama3.2", "prompt": "x"})
    assert refused.status == 503
    assert refused.headers["Content-Type"] == "application/json; charset=utf-8"
    assert await refused.read() == (b'{"error":"server busy, please try again.  '
                                    b'maximum pending requests exceeded"}')
    results = await asyncio.gather(first, *queued)
    assert all(r["status"] == 200 for r in results)
    assert results[0]["load_duration"] >= 3.0e9
    stats = await _stats(client)
    assert stats["rejected"] == 1 and stats["loads"] == 1
    v1 = await client.post("/v1/chat/completions", json={"model": "qwen3", "messages": [
        {"role": "user", "content": "x"}]})
    assert v1.status == 200  # the queue drained


async def test_lru_eviction_and_load_duration(aiohttp_client: Any) -> None:
    client = await _client(aiohttp_client, max_loaded_models=2, load_s=0.2)
    cold = await _generate(client, "llama3.2")
    warm = await _generate(client, "llama3.2")
    assert cold["load_duration"] >= 0.2e9 > warm["load_duration"]
    await _generate(client, "qwen3")
    await _generate(client, "llama3.2")  # qwen3 is now the least recently used
    await client.post("/api/embed", json={"model": "nomic-embed-text", "input": "x"})
    names = {m["name"] for m in (await (await client.get("/api/ps")).json())["models"]}
    assert names == {"llama3.2:latest", "nomic-embed-text:latest"}
    assert (await _stats(client))["loads"] == 3


async def test_keep_alive_expiry_and_unload(aiohttp_client: Any) -> None:
    client = await _client(aiohttp_client)
    await _generate(client, keep_alive="2s")
    ps = (await (await client.get("/api/ps")).json())["models"]
    assert [m["name"] for m in ps] == ["llama3.2:latest"]
    await _until(client, lambda s: s["loaded"] == [], "the keep_alive to expire")
    await _generate(client, keep_alive=0)  # real work with keep_alive 0: unloaded when done
    assert (await (await client.get("/api/ps")).json())["models"] == []
    await _generate(client, "qwen3", keep_alive=-1)
    await _generate(client, "qwen3", prompt="")  # load-only request keeps it
    assert [m["name"] for m in (await (await client.get("/api/ps")).json())["models"]] == [
        "qwen3:latest"]


async def test_num_ctx_change_reloads(aiohttp_client: Any) -> None:
    client = await _client(aiohttp_client, load_s=0.2)
    await _generate(client)
    again = await _generate(client, options={"num_ctx": 2048})
    assert again["load_duration"] >= 0.2e9
    ps = (await (await client.get("/api/ps")).json())["models"]
    assert ps[0]["context_length"] == 2048
    assert (await _stats(client))["loads"] == 2


async def test_context_overflow_truncates_silently_or_refuses(aiohttp_client: Any) -> None:
    client = await _client(aiohttp_client)
    long_prompt = "retrieval augmented generation " * 400
    cut = await _generate(client, prompt=long_prompt, options={"num_ctx": 256})
    assert cut["status"] == 200 and cut["prompt_eval_count"] == 128  # half the context kept
    refused = await _generate(client, prompt=long_prompt, options={"num_ctx": 256}, truncate=False)
    assert refused == {"status": 400, "error": CONTEXT_OVERFLOW}
    messages = [{"role": "system", "content": "Be brief."},
                *[{"role": "user", "content": f"turn {i} " + "words " * 40} for i in range(20)],
                {"role": "user", "content": "last question"}]
    chat = await (await client.post("/api/chat", json={
        "model": "llama3.2", "messages": messages, "stream": False,
        "options": {"num_ctx": 300}})).json()
    assert chat["prompt_eval_count"] <= 300  # oldest turns dropped, system and last kept


def test_decode_gap_formula_plateaus() -> None:
    profile = TimingProfile(decode_tokens_per_s=40, concurrency_plateau=1.5)
    assert profile.decode_gap_s(1) == pytest.approx(1 / 40)
    aggregate = {n: n / profile.decode_gap_s(n) for n in (1, 2, 4, 8, 64)}
    assert aggregate[1] == pytest.approx(40)
    assert aggregate[1] < aggregate[2] < aggregate[4] < aggregate[8] < aggregate[64] < 60
    assert aggregate[64] / aggregate[1] == pytest.approx(1.5, rel=0.02)
    assert TimingProfile(prefill_base_s=0.15, prefill_tokens_per_s=2500).prefill_s(5000) == \
        pytest.approx(2.15)


async def test_measured_rates_follow_the_profile(aiohttp_client: Any) -> None:
    # Slow rates (50 ms between tokens) so that a loaded machine's scheduling delay is small beside
    # them; the model predicts 4 streams at 1.33x one stream (no plateau would be 4x, no concurrency 1x).
    client = await _client(aiohttp_client, num_parallel=4, decode_tokens_per_s=20,
                           concurrency_plateau=1.5, prefill_tokens_per_s=2000,
                           output_tokens=(10, 10), embed_tokens_per_s=4000)
    await _generate(client)
    single = await _generate(client)
    single_rate = single["eval_count"] / (single["eval_duration"] / 1e9)
    assert 10 < single_rate <= 20.2
    start = time.monotonic()
    four = await asyncio.gather(*(_generate(client) for _ in range(4)))
    elapsed = time.monotonic() - start
    aggregate = 4 * 10 / elapsed
    assert 1.05 * single_rate < aggregate < 2.0 * single_rate
    assert all(r["status"] == 200 for r in four)
    prompt = "one two three four five six seven eight " * 120
    prefill = await _generate(client, prompt=prompt)
    expected_s = prefill["prompt_eval_count"] / 2000
    assert prefill["prompt_eval_duration"] / 1e9 == pytest.approx(expected_s, rel=0.3, abs=0.03)
    start = time.monotonic()
    embedded = await (await client.post("/api/embed", json={
        "model": "nomic-embed-text", "input": [prompt, prompt]})).json()
    assert time.monotonic() - start >= embedded["prompt_eval_count"] / 4000 * 0.9


def test_shipped_profiles_load_with_sources() -> None:
    for name in ("gpu-8b", "cpu-small"):
        profiles = load_profile(name)
        assert profiles.source and profiles.defaults.decode_tokens_per_s > 0
        assert (PROFILES_DIR / f"{name}.yaml").exists()
    gpu = load_profile("gpu-8b")
    assert gpu.for_model("nomic-embed-text:latest").load_s < gpu.defaults.load_s


def test_bad_profile_is_refused(tmp_path: Any) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults: {decode_tokens_per_s: -1}\n")
    with pytest.raises(ValueError, match="must be >= 0"):
        load_profile(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("defaults: {warp_speed: 9}\n")
    with pytest.raises(Exception, match="warp_speed"):
        load_profile(unknown)


async def test_cancelled_while_pending_is_dropped_and_aborts_the_load(aiohttp_client: Any) -> None:
    client = await _client(aiohttp_client, load_s=5.0)
    task = asyncio.ensure_future(client.post("/api/generate", json={"model": "llama3.2",
                                                                    "prompt": "x"}))
    await _until(client, lambda s: s["loading"] is not None, "the load to start")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Aborted: the 5 s load stops well before it would have finished.
    stats = await _until(client, lambda s: s["loading"] is None and s["cancelled"] == 1,
                         "the load to be aborted", timeout_s=4.0)
    assert stats["waiting"] == 0 and stats["loaded"] == [] and stats["loads"] == 0


def test_server_busy_text_has_two_spaces() -> None:
    assert "again.  maximum" in SERVER_BUSY
