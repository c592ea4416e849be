"""`make bench-embed` (second part): embedding throughput of 64 concurrent single-input clients.

Two upstreams, three paths each: straight to the upstream (the baseline), through the proxy without
plugins, and through the proxy with embed_batch at its defaults (2 ms window, 64 inputs per batch).
- `emulated`: the emulator on the `cpu-small` profile, the one `make calibrate` measured on the real
  engine (calibrate prints the figures; the shipped profiles/cpu-small.yaml holds them): every call costs
  `prefill_base_s + tokens / embed_tokens_per_s`, one slot per embedding model (nomic-embed-text), as
  Ollama gives embedding models.
- `real`: llama.cpp itself (xllamacpp, Gemma 3 270M, mean pooling, 2 threads) behind the emulator's Ollama
  API with 4 slots (`--num-parallel 4`, as calibrate runs it); the proxy is told the same 4 slots.
Every path gets the same number of requests with inputs of the same length (distinct per request).
Reported: wall time, requests/s, latency p50/p95, upstream /api/embed calls, the proxy's CPU per request
(process CPU time via psutil), the throughput ratio to the baseline and the machine's load average
around the row. Every server is a real process on 127.0.0.1 and every loop is bounded. Not a test: it
prints figures and asserts nothing. The proxy, the client, the emulator and llama.cpp share the machine's
cores: the real rows measure that contention too, and anything else running skews them (run it on an
otherwise idle machine; the load column says whether it was).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import httpx
import psutil

from proxy.emulator.profile import load_profile
from tests.support.servers import Server, start_emulator, start_proxy

CLIENTS = 64


@attrs.frozen
class Upstream:
    """One upstream the three paths are measured against."""

    label: str
    model: str
    emulator_args: list[str]
    slots: int
    """What the proxy is told of the upstream (`num_parallel`): the slots the model really has."""


def _upstream(name: str, profile: str) -> Upstream:
    if name == "emulated":
        return Upstream(f"emulated, {profile} profile", "nomic-embed-text", ["--profile", profile], 1)
    if name == "real":
        from proxy.emulator.llamacpp import default_gguf

        # Fails loudly without the `real` extra: the bench must not quietly measure less than it says.
        return Upstream("real llama.cpp (Gemma 3 270M)", "gemma3:270m",
                        ["--engine", "llama.cpp", "--gguf", str(default_gguf()), "--num-parallel", "4"],
                        4)
    raise SystemExit(f"unknown upstream {name!r}: emulated or real")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _text(run: int, index: int) -> str:
    """The same length on every path (token counts are the cost), distinct per request and per run."""
    return f"run {run:02d} chunk {index:04d} of a document about rivers and stones"


async def _run(url: str, model: str, requests: int, run: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    queue = list(range(requests))

    async def client(session: aiohttp.ClientSession) -> None:
        while queue:
            index = queue.pop()
            start = time.perf_counter()
            async with session.post(f"{url}/api/embed",
                                    json={"model": model, "input": _text(run, index)}) as response:
                answer = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{url}: unexpected status {response.status}: {answer[:300]!r}")
            latencies.append(time.perf_counter() - start)

    connector = aiohttp.TCPConnector(limit=CLIENTS)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(CLIENTS)))
        return time.perf_counter() - started, latencies


def _calls(emulator: Server) -> int:
    return int(emulator.stats()["requests"].get("POST /api/embed", 0))


def _cpu_s(server: Server) -> float:
    times = psutil.Process(server.process.pid).cpu_times()
    return float(times.user + times.system)


@attrs.frozen
class Row:
    path: str
    wall_s: float
    latencies: list[float]
    calls: int
    proxy_cpu_ms: float | None
    load: tuple[float, float]
    """The machine's 1-minute load average before and after: other work on the cores skews the real
    engine most (llama.cpp's threads wait for each other at every layer)."""


def measure(upstream: Upstream, requests: int, tmp: Path, first_run: int) -> list[Row]:
    rows: list[Row] = []
    emulator = start_emulator(tmp, fixed_clock=False, name="emu", extra=upstream.emulator_args)
    try:
        paths: list[tuple[str, list[dict[str, Any]] | None]] = [
            ("direct", None), ("proxy", []), ("proxy + embed_batch", [{"name": "embed_batch"}])]
        for offset, (label, plugins) in enumerate(paths):
            proxy = None
            try:
                url = emulator.url
                if plugins is not None:
                    # The queue and deadline bounds raised to the client's: a slow engine (a loaded
                    # machine) must show up as lower throughput, not as 503 queue_timeout answers.
                    chain = {"backpressure": {"queue_timeout_s": 600}, "limits": {"deadline_s": 600}}
                    proxy = start_proxy(tmp, [{"url": emulator.url, "num_parallel": upstream.slots}],
                                        {"plugins": plugins, "chain": chain}, name="proxy")
                    url = proxy.url
                # Warm: the model loaded, the proxy's pools open and the model known to its plugins.
                for _ in range(3):
                    httpx.post(f"{url}/api/embed", timeout=120,
                               json={"model": upstream.model, "input": "warm"}).raise_for_status()
                before = _calls(emulator)
                cpu_before = _cpu_s(proxy) if proxy is not None else 0.0
                load_before = os.getloadavg()[0]
                wall, latencies = asyncio.run(_run(url, upstream.model, requests, first_run + offset))
                cpu = (_cpu_s(proxy) - cpu_before) / requests * 1e3 if proxy is not None else None
                rows.append(Row(label, wall, latencies, _calls(emulator) - before, cpu,
                                (load_before, os.getloadavg()[0])))
            finally:
                if proxy is not None:
                    proxy.stop()
    finally:
        emulator.stop()
    return rows


def report(upstream: Upstream, requests: int, rows: list[Row]) -> None:
    base = rows[0].wall_s
    print(f"\n{upstream.label}: {CLIENTS} concurrent clients, {requests} single-input /api/embed "
          f"requests of {upstream.model}")
    print(f"{'path':22} {'wall s':>7} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} {'calls':>6} "
          f"{'in/call':>7} {'proxy CPU ms/req':>17} {'vs direct':>10} {'load':>10}")
    for row in rows:
        cpu = f"{row.proxy_cpu_ms:17.2f}" if row.proxy_cpu_ms is not None else f"{'-':>17}"
        print(f"{row.path:22} {row.wall_s:7.2f} {len(row.latencies) / row.wall_s:7.1f} "
              f"{_pct(row.latencies, 0.5) * 1e3:7.0f} {_pct(row.latencies, 0.95) * 1e3:7.0f} "
              f"{row.calls:6d} {requests / max(row.calls, 1):7.1f} {cpu} {base / row.wall_s:9.2f}x "
              f"{row.load[0]:4.1f}->{row.load[1]:<4.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=256, help="requests per path (default 256)")
    parser.add_argument("--upstreams", default="emulated,real",
                        help="comma-separated: emulated, real (default both)")
    parser.add_argument("--profile", default="cpu-small",
                        help="the emulated upstream's timing profile (default cpu-small, calibrated)")
    args = parser.parse_args()
    names = [n.strip() for n in args.upstreams.split(",") if n.strip()]
    if "emulated" in names:
        profile = load_profile(args.profile)
        embed = profile.for_model("nomic-embed-text")
        print(f"profile {profile.name}: an embedding call costs {embed.prefill_base_s * 1e3:.0f} ms + "
              f"tokens / {embed.embed_tokens_per_s:g} tokens/s")
    with tempfile.TemporaryDirectory() as tmp_name:
        for number, name in enumerate(names):
            upstream = _upstream(name, args.profile)
            rows = measure(upstream, args.requests, Path(tmp_name), first_run=number * 10)
            report(upstream, args.requests, rows)


if __name__ == "__main__":
    main()
