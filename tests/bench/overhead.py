"""`make bench`: what the proxy costs, measured against a baseline run in the same invocation.

The same requests go straight to an emulated Ollama (the baseline) and through the proxy in front of an
identical one. Reported: added unary latency p50/p99 at concurrency 1 and 64, proxy CPU per request and per
streamed chunk (process CPU time from /proc via psutil), and proxy memory per open stream with 1,000
concurrent streams. Every server is a real process on 127.0.0.1; every loop is bounded.

Not a test: nothing here asserts a time. It prints a table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from tests.support.servers import Server, start_emulator, start_proxy

# The overhead runs measure the proxy, not Ollama's queueing: the emulators get enough slots for every
# concurrent request (Ollama's default of one slot per model would serialise them).
SLOTS = ["--num-parallel", "4096"]
UNARY = {"model": "llama3.2", "stream": False, "options": {"num_predict": 1},
         "messages": [{"role": "user", "content": "ping"}]}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _closed_loop(session: aiohttp.ClientSession, url: str, total: int, concurrency: int
                       ) -> list[float]:
    latencies: list[float] = []
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            async with session.post(url, json=UNARY) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"unexpected status {response.status}")
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def _cpu_s(server: Server) -> float:
    times = psutil.Process(server.process.pid).cpu_times()
    return float(times.user + times.system)


def _rss(server: Server) -> int:
    return int(psutil.Process(server.process.pid).memory_info().rss)


async def _unary(direct: Server, proxy: Server, session: aiohttp.ClientSession, total: int,
                 concurrency: int) -> dict[str, float]:
    await _closed_loop(session, f"{direct.url}/api/chat", 100, concurrency)
    await _closed_loop(session, f"{proxy.url}/api/chat", 100, concurrency)
    base = await _closed_loop(session, f"{direct.url}/api/chat", total, concurrency)
    cpu_before = _cpu_s(proxy)
    through = await _closed_loop(session, f"{proxy.url}/api/chat", total, concurrency)
    cpu = _cpu_s(proxy) - cpu_before
    return {
        "direct_p50_ms": _pct(base, 0.5) * 1e3, "direct_p99_ms": _pct(base, 0.99) * 1e3,
        "proxy_p50_ms": _pct(through, 0.5) * 1e3, "proxy_p99_ms": _pct(through, 0.99) * 1e3,
        "added_p50_ms": (_pct(through, 0.5) - _pct(base, 0.5)) * 1e3,
        "added_p99_ms": (_pct(through, 0.99) - _pct(base, 0.99)) * 1e3,
        "ratio_p50": _pct(through, 0.5) / _pct(base, 0.5),
        "ratio_p99": _pct(through, 0.99) / _pct(base, 0.99),
        "proxy_cpu_us_per_request": cpu / total * 1e6,
        "throughput_ratio": statistics.fmean(base) / statistics.fmean(through),
    }


async def _stream_cpu(proxy: Server, session: aiohttp.ClientSession, streams: int,
                      tokens: int) -> dict[str, float]:
    body = {"model": "llama3.2", "prompt": "stream", "options": {"num_predict": tokens}}
    chunks = 0

    async def one() -> None:
        nonlocal chunks
        async with session.post(f"{proxy.url}/api/generate", json=body) as response:
            async for _ in response.content:
                chunks += 1

    cpu_before = _cpu_s(proxy)
    semaphore = asyncio.Semaphore(16)

    async def bounded() -> None:
        async with semaphore:
            await one()

    await asyncio.gather(*(bounded() for _ in range(streams)))
    cpu = _cpu_s(proxy) - cpu_before
    return {"streams": streams, "lines": chunks,
            "proxy_cpu_us_per_chunk": cpu / chunks * 1e6}


async def _stream_memory(direct: Server, proxy: Server, streams: int) -> dict[str, float]:
    """Open `streams` slow streams at once, through the proxy and then directly; RSS per open stream."""
    # 1,000 tokens/s single-stream with the plateau model means ~1.5 tokens/s per stream at 1,000
    # streams: each stream's first line comes within a second and then trickles, held open.
    body = {"model": "llama3.2", "prompt": "hold"}
    results: dict[str, float] = {}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        for label, server, measured in (("proxy", proxy, proxy), ("direct", direct, direct)):
            rss_before = _rss(measured)
            responses: list[aiohttp.ClientResponse] = []

            async def open_one(target: Server = server,
                               opened: list[aiohttp.ClientResponse] = responses) -> None:
                response = await session.post(f"{target.url}/api/generate", json=body)
                await response.content.readline()
                opened.append(response)

            start = time.perf_counter()
            await asyncio.gather(*(open_one() for _ in range(streams)))
            opened = time.perf_counter() - start
            await asyncio.sleep(1.0)
            rss_open = _rss(measured)
            for response in responses:
                response.close()
            results[f"{label}_kib_per_stream"] = (rss_open - rss_before) / streams / 1024
            results[f"{label}_open_all_s"] = opened
            await asyncio.sleep(1.0)
    results["streams"] = streams
    return results


CHAIN_KEY = "sk-bench-tenant"
CHAIN_CONFIG = {
    "telemetry": {"access_log": False},
    "tenants": [{"name": "bench", "keys": [CHAIN_KEY], "requests_per_minute": 10_000_000,
                 "tokens_per_minute": 10_000_000_000, "max_concurrent": 100_000}],
    "models": {"llama3.2": {"options": {"num_ctx": 4096}}},
}


def count_4k_prompt() -> dict[str, float]:
    """Time to count a 4K-token prompt with the model's vocabulary: cold (first sight of its words) and
    warm (segment cache filled), and the same prompt as a chat."""
    from proxy.emulator.vocabulary import MODEL_PATH
    from proxy.ollama import classify
    from proxy.prompts import count_prompt
    from proxy.tokens import SentencePieceTokenizer

    words = Path(__file__).read_text().split()
    tokenizer = SentencePieceTokenizer.from_file(MODEL_PATH)
    count = 0
    while tokenizer.count_offloadable(" ".join(words[i % len(words)] for i in range(count))) < 4096:
        count += 25
    text = " ".join(words[i % len(words)] for i in range(count))
    fresh = SentencePieceTokenizer.from_file(MODEL_PATH)  # an empty segment cache
    start = time.perf_counter()
    tokens = fresh.count(text)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(20):
        tokenizer.count_offloadable(text)
    full_encode = (time.perf_counter() - start) / 20
    runs = 200
    start = time.perf_counter()
    for _ in range(runs):
        tokenizer.count(text)
    warm = (time.perf_counter() - start) / runs
    body = {"messages": [{"role": "system", "content": "Answer from the context."},
                         {"role": "user", "content": text}]}
    chat_route = classify("POST", "/api/chat")
    start = time.perf_counter()
    for _ in range(runs):
        count_prompt(chat_route, body, tokenizer)
    chat = (time.perf_counter() - start) / runs
    return {"tokens": tokens, "cold_ms": cold * 1e3, "warm_ms": warm * 1e3, "chat_warm_ms": chat * 1e3,
            "full_encode_ms": full_encode * 1e3}


async def _chain_cost(direct: Server, chained: Server, session: aiohttp.ClientSession,
                      total: int) -> dict[str, float]:
    """CPU per request through the proxy with limits and quotas on (a tenant key, limits that never
    bite, canonical options), against the same requests direct."""
    headers = {"Authorization": f"Bearer {CHAIN_KEY}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     headers=headers) as keyed:
        result = await _unary(direct, chained, keyed, total, 64)
    del session
    return result


async def run(quick: bool) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="sop-bench-"))
    direct = start_emulator(tmp, fixed_clock=False, name="direct", extra=SLOTS)
    behind = start_emulator(tmp, fixed_clock=False, name="behind", output_tokens="200,200",
                            extra=SLOTS)
    # Every proxy declares its replica's slots (the emulators run with 4096), as a deployment would:
    # with Ollama's default of one, backpressure would queue and the bench would measure the queue.
    proxy = start_proxy(tmp, [{"url": behind.url, "num_parallel": 4096}],
                        {"telemetry": {"access_log": False}})
    chained_upstream = start_emulator(tmp, fixed_clock=False, name="chained-upstream", extra=SLOTS)
    chained = start_proxy(tmp, [{"url": chained_upstream.url, "num_parallel": 4096}], CHAIN_CONFIG,
                          name="chained")
    slow_direct = start_emulator(tmp, fixed_clock=False, decode_tokens_per_s=1000, name="slow-direct",
                                 output_tokens="100000,100000", extra=SLOTS)
    slow_behind = start_emulator(tmp, fixed_clock=False, decode_tokens_per_s=1000, name="slow-behind",
                                 output_tokens="100000,100000", extra=SLOTS)
    slow_proxy = start_proxy(tmp, [{"url": slow_behind.url, "num_parallel": 4096}],
                             {"telemetry": {"access_log": False}},
                             name="slow-proxy")
    servers = [direct, behind, proxy, slow_direct, slow_behind, slow_proxy, chained_upstream, chained]
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            report: dict[str, Any] = {
                "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform()},
                "unary_c1": await _unary(direct, proxy, session, 300 if quick else 2000, 1),
                "unary_c64": await _unary(direct, proxy, session, 1000 if quick else 6000, 64),
                "stream": await _stream_cpu(proxy, session, 50 if quick else 200, 200),
                "chain_c64": await _chain_cost(direct, chained, session, 1000 if quick else 6000),
            }
        report["memory"] = await _stream_memory(slow_direct, slow_proxy, 200 if quick else 1000)
        report["count_4k"] = count_4k_prompt()
    finally:
        for server in servers:
            server.stop()
    return report


def _print(report: dict[str, Any]) -> None:
    print(f"machine: {report['machine']}")
    print(f"{'unary':<10}{'direct p50':>12}{'proxy p50':>12}{'added p50':>12}{'ratio':>8}"
          f"{'direct p99':>12}{'proxy p99':>12}{'added p99':>12}{'ratio':>8}{'CPU/req':>10}")
    for key in ("unary_c1", "unary_c64", "chain_c64"):
        r = report[key]
        print(f"{key:<10}{r['direct_p50_ms']:>10.2f}ms{r['proxy_p50_ms']:>10.2f}ms"
              f"{r['added_p50_ms']:>10.2f}ms{r['ratio_p50']:>7.2f}x{r['direct_p99_ms']:>10.2f}ms"
              f"{r['proxy_p99_ms']:>10.2f}ms{r['added_p99_ms']:>10.2f}ms{r['ratio_p99']:>7.2f}x"
              f"{r['proxy_cpu_us_per_request']:>8.0f}us")
    s = report["stream"]
    print(f"stream: {s['streams']} streams, {s['lines']} NDJSON lines, "
          f"proxy CPU {s['proxy_cpu_us_per_chunk']:.1f} us per chunk")
    c = report["count_4k"]
    print(f"counting a {c['tokens']}-token prompt: {c['cold_ms']:.2f} ms cold, {c['warm_ms']:.2f} ms "
          f"warm, {c['chat_warm_ms']:.2f} ms as a chat, {c['full_encode_ms']:.2f} ms as one full "
          "encode (the worker-thread path for bodies over 16 KiB; GIL released)")
    print("chain_c64 = the proxy with limits and quotas on (tenant key, canonical options)")
    m = report["memory"]
    print(f"memory at {m['streams']} concurrent open streams: proxy {m['proxy_kib_per_stream']:.1f} KiB "
          f"per stream (upstream emulator {m['direct_kib_per_stream']:.1f} KiB); all opened in "
          f"{m['proxy_open_all_s']:.2f}s through the proxy vs {m['direct_open_all_s']:.2f}s direct")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/overhead.json"))
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    args = parser.parse_args()
    import uvloop

    report = uvloop.run(run(args.quick))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    _print(report)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
