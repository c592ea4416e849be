"""Learned parallelism and queue budgets (issue 15): with `max_in_flight: auto` (the default) the proxy
learns how many requests each replica really serves at once from Ollama's own timings (the time a request
queued inside Ollama is `total_duration` minus load, prompt-eval and eval durations), up and down, never
keeping more than one request beyond the real slots inside Ollama; a request waiting on a model load gets
`cold_queue_timeout_s`, one waiting for a busy but ready replica `queue_timeout_s`. Real proxy and
emulator processes on loopback, driven by aiohttp clients."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from tests.support.polling import until
from tests.support.servers import Server, start_emulator, start_proxy

BODY = {"model": "llama3.2", "prompt": "count", "stream": False, "options": {"num_predict": 20}}


def _limit(proxy: Server, replica: Server) -> int | None:
    gate = httpx.get(f"{proxy.url}/system/queue", timeout=10).json()["models"].get("llama3.2:latest")
    if gate is None:
        return None
    limit = gate["limits"].get(f"127.0.0.1:{replica.port}")
    return None if limit is None else int(limit)


class Sampler(threading.Thread):
    """Samples, until stopped, the proxy's limit for the replica: how many requests it lets inside."""

    def __init__(self, proxy: Server, replica: Server) -> None:
        super().__init__(daemon=True)
        self.proxy = proxy
        self.replica = replica
        self.max_limit = 0
        self.samples = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.max_limit = max(self.max_limit, _limit(self.proxy, self.replica) or 0)
            self.samples += 1
            self.done.wait(0.01)


async def _drive(url: str, clients: int, requests: int, queued: list[float] | None = None) -> list[int]:
    """`clients` closed-loop clients sending `requests` in all; returns the statuses, and appends to
    `queued` the time each request queued inside the replica (its own timings say)."""
    statuses: list[int] = []
    left = [requests]

    async def client(session: aiohttp.ClientSession) -> None:
        while left[0] > 0:
            left[0] -= 1
            async with session.post(f"{url}/api/generate", json=BODY) as response:
                data = await response.json()
                statuses.append(response.status)
                if queued is not None and response.status == 200:
                    spent = sum(data.get(k, 0) for k in ("load_duration", "prompt_eval_duration",
                                                         "eval_duration"))
                    queued.append((data["total_duration"] - spent) / 1e9)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return statuses


@pytest.fixture(scope="module")
def four_slots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_emulator(tmp_path_factory.mktemp("slots4"), name="slots4", decode_tokens_per_s=200,
                            extra=["--num-parallel", "4"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_emulator(tmp_path_factory.mktemp("slots1"), name="slots1", decode_tokens_per_s=200,
                            extra=["--num-parallel", "1"])
    yield server
    server.stop()


async def test_told_nothing_it_learns_four_slots_and_keeps_at_most_one_extra(four_slots: Server,
                                                                              tmp_path: Path) -> None:
    proxy = start_proxy(tmp_path, [four_slots.url], name="learn-up")  # num_parallel unset: 1
    sampler = Sampler(proxy, four_slots)
    queued: list[float] = []
    try:
        await _drive(proxy.url, clients=1, requests=1)  # the gate exists: sample it from the start
        sampler.start()
        statuses = await _drive(proxy.url, clients=10, requests=160, queued=queued)
        assert statuses.count(200) == len(statuses), sorted(set(statuses))
        limit = _limit(proxy, four_slots)
        assert limit is not None and 4 <= limit <= 5, limit
        profile = (await asyncio.to_thread(httpx.get, f"{proxy.url}/system/profile", timeout=10)).json()
        slots = profile["slots"][f"127.0.0.1:{four_slots.port}"]["llama3.2"]
        assert slots["how"] == "learned" and slots["declared"] == 1 and slots["max_in_flight"] == limit
        metrics = (await asyncio.to_thread(httpx.get, f"{proxy.url}/metrics", timeout=10)).text
        assert any(line.startswith("sop_upstream_max_in_flight{") and line.endswith(f" {limit}.0")
                   for line in metrics.splitlines()), "no learned-limit gauge"
    finally:
        sampler.done.set()
        sampler.join(5)
        proxy.stop()
    # Probing one slot beyond the four: never more than one request beyond them inside the replica,
    # and few requests ever queued there.
    assert sampler.samples > 20 and sampler.max_limit <= 5, (sampler.samples, sampler.max_limit)
    assert sum(1 for q in queued if q > 0.05) <= len(queued) // 10, sorted(queued)[-10:]


async def test_told_too_many_it_learns_down_to_the_one_real_slot(one_slot: Server, tmp_path: Path) -> None:
    proxy = start_proxy(tmp_path, [{"url": one_slot.url, "num_parallel": 4}], name="learn-down")
    try:
        statuses = await _drive(proxy.url, clients=8, requests=60)
        assert statuses.count(200) == len(statuses)
        await until(lambda: _limit(proxy, one_slot) == 1, what="the limit learned down to 1")
        queue = (await asyncio.to_thread(httpx.get, f"{proxy.url}/system/queue", timeout=10)
                 ).json()["models"]["llama3.2:latest"]
        assert queue["ollama_queued"][f"127.0.0.1:{one_slot.port}"] >= 1
    finally:
        proxy.stop()


async def test_one_slot_told_nothing_never_more_than_one_extra_inside(one_slot: Server,
                                                                       tmp_path: Path) -> None:
    proxy = start_proxy(tmp_path, [one_slot.url], name="learn-one")
    sampler = Sampler(proxy, one_slot)
    queued: list[float] = []
    try:
        await _drive(proxy.url, clients=1, requests=1)
        sampler.start()
        statuses = await _drive(proxy.url, clients=8, requests=80, queued=queued)
        assert statuses.count(200) == len(statuses)
    finally:
        sampler.done.set()
        sampler.join(5)
        proxy.stop()
    assert sampler.samples > 20 and sampler.max_limit <= 2, (sampler.samples, sampler.max_limit)
    assert sum(1 for q in queued if q > 0.05) <= len(queued) // 10, sorted(queued)[-10:]


async def test_a_fixed_max_in_flight_is_never_learned(one_slot: Server, tmp_path: Path) -> None:
    proxy = start_proxy(tmp_path, [{"url": one_slot.url, "num_parallel": 4}],
                        {"chain": {"backpressure": {"max_in_flight": 3}}}, name="learn-fixed")
    try:
        await _drive(proxy.url, clients=6, requests=30)
        assert _limit(proxy, one_slot) == 3
    finally:
        proxy.stop()


async def test_a_model_load_gets_the_cold_budget_a_busy_replica_the_ready_one(tmp_path: Path) -> None:
    emulator = start_emulator(tmp_path, name="cold", decode_tokens_per_s=50, load_s=3,
                              output_tokens="300,300",
                              extra=["--num-parallel", "1"])
    proxy = start_proxy(tmp_path, [emulator.url], {"chain": {"backpressure": {
        "max_in_flight": 1, "queue_timeout_s": 1.0, "cold_queue_timeout_s": 60.0}}}, name="cold-proxy")
    short: dict[str, Any] = {**BODY, "options": {"num_predict": 5}}
    try:
        async with aiohttp.ClientSession(base_url=proxy.url,
                                         timeout=aiohttp.ClientTimeout(total=60)) as session:

            async def post(body: dict[str, Any]) -> tuple[int, dict[str, Any], float]:
                async with session.post("/api/generate", json=body) as response:
                    return (response.status, await response.json(),
                            float(response.headers.get("X-Queue-Wait-Ms", "0")))

            # Cold: the first request loads the model (3 s); the second waits longer than
            # queue_timeout_s behind that load, on the cold budget.
            first = asyncio.create_task(post(short))
            await until(lambda: emulator.stats()["loading"], what="the model loading")
            cold = await post(short)
            assert (await first)[0] == 200
            assert cold[0] == 200, cold
            assert cold[2] > 1000, "the second request did not wait behind the load"
            # Warm and busy: a long request holds the only slot; the next one gets queue_timeout_s.
            long = asyncio.create_task(post({**BODY, "options": {"num_predict": 200}}))
            await until(lambda: emulator.stats()["active"] == 1, what="the long request running")
            status, body, _ = await post(short)
            assert status == 503 and body["code"] == "queue_timeout", body
            assert "waiting for a slot" in body["error"]
            assert (await long)[0] == 200
    finally:
        proxy.stop()
        emulator.stop()


def test_cold_budget_is_capped_at_the_client_header_timeout() -> None:
    from proxy.config import ConfigError, structure

    with pytest.raises(ConfigError, match="cold_queue_timeout_s"):
        structure({"chain": {"backpressure": {"cold_queue_timeout_s": 301}}})
    assert structure({}).chain.backpressure.cold_queue_timeout_s <= 300
