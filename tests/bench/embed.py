"""`make bench-embed` (second part): embedding throughput of 64 concurrent single-input clients.

Three paths measured in one run against emulators on the calibrated `cpu-small` profile (the real
engine's embedding timings: 18 ms per call + 170 tokens/s, one slot per embedding model, as Ollama):
straight to the emulator (baseline), through the proxy without plugins, and through the proxy with
embed_batch at its defaults (2 ms window). Each run sends `--requests` distinct inputs; reported: wall
time, requests/s, latency p50/p95, upstream calls, and the ratio to the baseline. Every server is a real
process on 127.0.0.1 and every loop is bounded. Not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.servers import Server, start_emulator, start_proxy

MODEL = "nomic-embed-text"
CLIENTS = 64


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _run(url: str, requests: int, tag: str) -> tuple[float, list[float]]:
    latencies: list[float] = []
    queue = list(range(requests))

    async def client(session: aiohttp.ClientSession) -> None:
        while queue:
            index = queue.pop()
            start = time.perf_counter()
            async with session.post(f"{url}/api/embed", json={
                    "model": MODEL, "input": f"{tag} chunk number {index} of a document"}) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"unexpected status {response.status}")
            latencies.append(time.perf_counter() - start)

    connector = aiohttp.TCPConnector(limit=CLIENTS)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        async with session.post(f"{url}/api/embed", json={"model": MODEL, "input": "warm"}) as warm:
            await warm.read()
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(CLIENTS)))
        return time.perf_counter() - started, latencies


def _calls(emulator: Server) -> int:
    return int(emulator.stats()["requests"].get("POST /api/embed", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=256)
    args = parser.parse_args()
    rows: list[tuple[str, float, list[float], int]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for label, plugins in (("direct (emulator)", None), ("proxy", []),
                               ("proxy + embed_batch", [{"name": "embed_batch"}])):
            emulator = start_emulator(tmp, fixed_clock=False, name=f"emu-{len(rows)}",
                                      extra=["--profile", "cpu-small"])
            proxy = None
            try:
                url = emulator.url
                if plugins is not None:
                    config: dict[str, Any] = {"plugins": plugins}
                    proxy = start_proxy(tmp, [emulator.url], config, name=f"proxy-{len(rows)}")
                    url = proxy.url
                before = _calls(emulator)
                wall, latencies = asyncio.run(_run(url, args.requests, label))
                rows.append((label, wall, latencies, _calls(emulator) - before - 1))
            finally:
                if proxy is not None:
                    proxy.stop()
                emulator.stop()
    base = rows[0][1]
    print(f"{CLIENTS} concurrent clients, {args.requests} single-input /api/embed requests, cpu-small")
    print(f"{'path':22} {'wall s':>8} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'calls':>6} "
          f"{'vs direct':>10}")
    for label, wall, latencies, calls in rows:
        print(f"{label:22} {wall:8.2f} {len(latencies) / wall:8.1f} {_pct(latencies, 0.5) * 1e3:8.0f} "
              f"{_pct(latencies, 0.95) * 1e3:8.0f} {calls:6d} {base / wall:9.2f}x")


if __name__ == "__main__":
    main()
