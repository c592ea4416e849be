"""Client-chosen model names cannot grow metric labels, per-model state or upstream traffic.

A model label is a model some replica lists (or one configured under `models:`), anything else is
`other`; queues, measurements and tokenizers exist only for real models; a name no replica serves is
answered by the replica's own 404 without any `/api/show`. Bounded load on loopback only.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.upstreams import PROVISIONAL_LABELS
from tests.support.servers import Server, start_emulator, start_proxy

NAMES = 2000
CONCURRENCY = 32


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cardinality")


@pytest.fixture(scope="module")
def emulator(tmp: Path) -> Iterator[Server]:
    server = start_emulator(tmp, fixed_clock=False, name="cardinality-emu")
    yield server
    server.stop()


def _wait_for_listing(proxy: Server, model: str = "qwen3:latest", timeout_s: float = 30.0) -> None:
    """Until health's first /api/tags probe is in (seen on a configured model): what the replica has
    on disk is known."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        models = httpx.get(f"{proxy.url}/system/profile", timeout=10).json()["models"]
        if models.get(model, {}).get("on_disk"):
            return
        time.sleep(0.1)
    raise AssertionError("the proxy never learned the replica's models")


async def _storm(url: str, names: list[str]) -> list[int]:
    limit = asyncio.Semaphore(CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def one(name: str) -> int:
            async with limit, session.post(f"{url}/api/generate", json={
                    "model": name, "prompt": "hi", "stream": False}) as response:
                await response.read()
                return response.status
        return await asyncio.gather(*(one(name) for name in names))


def _model_labels(metrics: str) -> set[str]:
    return {sample.labels["gen_ai_request_model"] for family in text_string_to_metric_families(metrics)
            for sample in family.samples if "gen_ai_request_model" in sample.labels}


def _shows(emulator: Server) -> int:
    return int(emulator.stats()["requests"].get("POST /api/show", 0))


def test_random_model_names_stay_bounded(tmp: Path, emulator: Server) -> None:
    proxy = start_proxy(tmp, [emulator.url], {"models": {"qwen3": {"max_prompt_tokens": 1000}}},
                        name="cardinality")
    try:
        _wait_for_listing(proxy)
        real = httpx.post(f"{proxy.url}/api/generate", json={
            "model": "llama3.2", "prompt": "hi", "stream": False}, timeout=30)
        assert real.status_code == 200
        shows = _shows(emulator)  # the real model's vocabulary was fetched once, above
        names = [f"m{secrets.token_hex(8)}:{secrets.token_hex(2)}" for _ in range(NAMES)]
        statuses = asyncio.run(_storm(proxy.url, names))
        assert set(statuses) == {404}  # the replica's own answer for a model it does not have
        assert _shows(emulator) == shows  # not one /api/show for a name no replica lists

        metrics = httpx.get(f"{proxy.url}/metrics", timeout=30).text
        assert len(metrics) < 200_000
        labels = _model_labels(metrics)
        assert "llama3.2" in labels and "other" in labels
        assert labels <= {"", "other", "llama3.2", "qwen3", "nomic-embed-text"}

        queue = httpx.get(f"{proxy.url}/system/queue", timeout=10).json()["models"]
        assert set(queue) <= {"llama3.2:latest", "qwen3:latest", "nomic-embed-text:latest"}
        profile = httpx.get(f"{proxy.url}/system/profile", timeout=10).json()["models"]
        assert set(profile) <= {"llama3.2:latest", "qwen3:latest", "nomic-embed-text:latest"}

        # Real models keep their own labels, whatever case or tag spelling the client used.
        for spelling in ("LLaMA3.2", "llama3.2:latest"):
            served = httpx.post(f"{proxy.url}/api/generate", json={
                "model": spelling, "prompt": "hi", "stream": False}, timeout=30)
            assert served.status_code == 200
        labels = _model_labels(httpx.get(f"{proxy.url}/metrics", timeout=30).text)
        assert labels <= {"", "other", "llama3.2", "qwen3", "nomic-embed-text"}
    finally:
        proxy.stop()


def test_without_listings_labels_and_queues_stay_capped(tmp: Path, emulator: Server) -> None:
    """Health off: no replica's listing is ever known. The first 32 names seen keep a label of their
    own (so an honest fleet's models are not all `other` at start), the rest are `other`; per-model
    queues stay under their cap."""
    proxy = start_proxy(tmp, [emulator.url], {"chain": {"health": {"mode": "off"}}},
                        name="cardinality-nohealth")
    try:
        served = httpx.post(f"{proxy.url}/api/generate", json={
            "model": "llama3.2", "prompt": "hi", "stream": False}, timeout=30)
        assert served.status_code == 200
        names = [f"n{secrets.token_hex(8)}" for _ in range(300)]
        assert set(asyncio.run(_storm(proxy.url, names))) == {404}
        labels = _model_labels(httpx.get(f"{proxy.url}/metrics", timeout=30).text)
        assert "llama3.2" in labels and "other" in labels
        assert len(labels - {"", "other", "llama3.2"}) <= PROVISIONAL_LABELS
        queue = httpx.get(f"{proxy.url}/system/queue", timeout=10).json()["models"]
        assert len(queue) <= 256
    finally:
        proxy.stop()
