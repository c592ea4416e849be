"""`make bench`: what the proxy costs, measured against the upstream reached directly, in the same invocation.

Two proxy configurations side by side (issue 16), each in front of the same fast fake Ollama
(tests/bench/fast_upstream.py: canned answers, a few microseconds each, so the bench measures the proxy):
    full  the whole chain: a tenant key with quotas (requests, tokens, concurrency), limits with the
          model's options, backpressure with the replica's slots declared, health, balancer, OTLP tracing
          of every request (sample ratio 1) to a local receiver (tests/bench/otlp_sink.py, its own
          process), the access log on
    bare  no tenant, no tracing, no access log
and, as the floor, the least an aiohttp reverse proxy does (tests/bench/passthrough.py: read, forward over a
keep-alive pool, relay).
Requests come from a lean closed-loop client (tests/bench/loadclient.py) so that the client does not eat
the CPU the proxy needs: client, proxy, upstream and receiver share this machine's cores, as issue 16's
figures did. Reported per configuration: added p50/p99 at concurrency 1 (against the direct run),
throughput and proxy CPU per request (process user+system time from /proc) at concurrency 32, proxy CPU
per streamed chunk (200-chunk NDJSON streams), and for the full chain the RSS per open stream with
`--streams` streams held open at once (default 9,900: each stream holds two descriptors in the proxy,
and this machine's hard RLIMIT_NOFILE is 20,000; the proxy raises its soft limit to the hard one and caps
its connections to fit). Then the issue's targets, each MET or MISSED, also in the JSON (`targets`).

Not a test: nothing here asserts a time. Every server is a real process on 127.0.0.1; every loop is
bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import resource
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from tests.bench.loadclient import closed_loop, request_bytes
from tests.support.servers import Server, start_module, start_proxy

UNARY = {"model": "llama3.2", "stream": False, "options": {"num_predict": 1},
         "messages": [{"role": "user", "content": "ping"}]}
CHAIN_KEY = "sk-bench-tenant"
TARGETS = {
    "full.cpu_us_per_request_c32": ("<=", 250.0, "proxy CPU per request at c=32 (us)"),
    "full.added_p50_ms_c1": ("<=", 0.5, "added p50 at c=1 (ms)"),
    "full.added_p99_ms_c1": ("<=", 2.0, "added p99 at c=1 (ms)"),
    "full.requests_per_s_c32": (">=", 3000.0, "requests per second at c=32"),
    "full.cpu_us_per_chunk": ("<=", 30.0, "proxy CPU per streamed chunk (us)"),
    "memory.kib_per_stream": ("<=", 48.0, "proxy RSS per open stream (KiB)"),
    "memory.streams": (">=", 10000.0, "concurrent streams in one process"),
}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _cpu_s(server: Server) -> float:
    times = psutil.Process(server.process.pid).cpu_times()
    return float(times.user + times.system)


def _rss(server: Server) -> int:
    return int(psutil.Process(server.process.pid).memory_info().rss)


def configurations(upstream: str, sink: str, streams: int) -> dict[str, dict[str, Any]]:
    """The proxy configuration files of `full` and `bare` (the upstream entry included)."""
    # The replica's slots declared (the fake answers at once, so they never fill): the bench measures
    # the chain's cost, not a queue.
    replica = {"url": upstream, "num_parallel": max(64, streams + 100)}
    server = {"max_connections": streams + 100}
    full = {"server": server, "upstreams": [replica],
            "telemetry": {"otlp_endpoint": sink, "otlp_protocol": "http/protobuf",
                          "sample_ratio": 1.0},
            "tenants": [{"name": "bench", "keys": [CHAIN_KEY], "requests_per_minute": 10_000_000,
                         "tokens_per_minute": 10_000_000_000, "max_concurrent": 100_000}],
            "models": {"llama3.2": {"options": {"num_ctx": 4096}}}}
    bare = {"server": server, "upstreams": [replica], "telemetry": {"access_log": False}}
    return {"full": full, "bare": bare}


async def _unary(proxy: Server, key: str | None, quick: bool,
                 direct_c1: list[float]) -> dict[str, float]:
    body = json.dumps(UNARY).encode()
    headers = {"Authorization": f"Bearer {key}"} if key else None
    request = request_bytes("127.0.0.1", "/api/chat", body, headers)
    await closed_loop("127.0.0.1", proxy.port, request, 500, 8)  # warm: pools, caches, JIT-free paths
    c1, _ = await closed_loop("127.0.0.1", proxy.port, request, 1000 if quick else 3000, 1)
    total = 5000 if quick else 20000
    cpu_before = _cpu_s(proxy)
    _, wall = await closed_loop("127.0.0.1", proxy.port, request, total, 32)
    cpu = _cpu_s(proxy) - cpu_before
    return {
        "proxy_p50_ms_c1": _pct(c1, 0.5) * 1e3, "proxy_p99_ms_c1": _pct(c1, 0.99) * 1e3,
        "added_p50_ms_c1": (_pct(c1, 0.5) - _pct(direct_c1, 0.5)) * 1e3,
        "added_p99_ms_c1": (_pct(c1, 0.99) - _pct(direct_c1, 0.99)) * 1e3,
        "requests_per_s_c32": total / wall,
        "cpu_us_per_request_c32": cpu / total * 1e6,
    }


async def _stream_cpu(proxy: Server, key: str | None, streams: int) -> dict[str, float]:
    body = {"model": "llama3.2", "prompt": "stream"}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    lines = 0
    semaphore = asyncio.Semaphore(16)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     headers=headers) as session:
        async def one() -> None:
            nonlocal lines
            async with semaphore, session.post(f"{proxy.url}/api/generate", json=body) as response:
                async for _ in response.content:
                    lines += 1

        await one()
        lines = 0
        cpu_before = _cpu_s(proxy)
        await asyncio.gather(*(one() for _ in range(streams)))
        cpu = _cpu_s(proxy) - cpu_before
    return {"streams": streams, "lines": lines, "cpu_us_per_chunk": cpu / lines * 1e6}


async def _stream_memory(proxy: Server, key: str, streams: int) -> dict[str, Any]:
    """Hold `streams` streams open through the proxy at once (the fake sends a head and one line, then
    nothing); RSS per open stream, and whether every one got its first line."""
    body = {"model": "llama3.2", "prompt": "hold"}
    connector = aiohttp.TCPConnector(limit=0)
    opened: list[aiohttp.ClientResponse] = []
    failures = 0
    reasons: Counter[str] = Counter()
    async with aiohttp.ClientSession(connector=connector, headers={"Authorization": f"Bearer {key}"},
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        rss_before = _rss(proxy)
        semaphore = asyncio.Semaphore(256)  # the connection storm stays under the listen backlog

        async def open_one() -> None:
            nonlocal failures
            async with semaphore:
                try:
                    response = await session.post(f"{proxy.url}/api/generate", json=body)
                    await response.content.readline()
                except (aiohttp.ClientError, OSError) as exc:
                    failures += 1
                    reasons[type(exc).__name__] += 1
                    return
                if response.status != 200:
                    failures += 1
                    text = (await response.text())[:80]
                    reasons[f"HTTP {response.status} {text}"] += 1
                    response.close()
                    return
                opened.append(response)

        start = time.perf_counter()
        await asyncio.gather(*(open_one() for _ in range(streams)))
        open_s = time.perf_counter() - start
        await asyncio.sleep(1.0)
        rss_open = _rss(proxy)
        fds = psutil.Process(proxy.process.pid).num_fds()
        for response in opened:
            response.close()
    return {"streams": float(len(opened)), "attempted": float(streams), "reasons": dict(reasons),
            "failures": float(failures), "open_all_s": open_s, "proxy_fds": float(fds),
            "kib_per_stream": (rss_open - rss_before) / max(1, len(opened)) / 1024,
            "rss_mib_before": rss_before / 2**20, "rss_mib_open": rss_open / 2**20}


def _judge(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path, (op, bound, label) in TARGETS.items():
        section, key = path.split(".")
        value = float(report[section][key])
        met = value <= bound if op == "<=" else value >= bound
        out[path] = {"label": label, "value": value, "target": f"{op} {bound:g}", "met": met}
    return out


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


async def run(quick: bool, streams: int) -> dict[str, Any]:
    # The bench client holds one descriptor per stream.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tmp = Path(tempfile.mkdtemp(prefix="sop-bench-"))
    upstream = start_module(tmp, "tests.bench.fast_upstream", "--chunks", "200")
    sink = start_module(tmp, "tests.bench.otlp_sink")
    configs = configurations(upstream.url, sink.url, streams)
    proxies: dict[str, Server] = {}
    floor = start_module(tmp, "tests.bench.passthrough", "--upstream", upstream.url)
    try:
        for name, config in configs.items():
            replicas = config.pop("upstreams")
            proxies[name] = start_proxy(tmp, replicas, config, name=name)
        direct_request = request_bytes("127.0.0.1", "/api/chat", json.dumps(UNARY).encode())
        await closed_loop("127.0.0.1", upstream.port, direct_request, 500, 8)
        direct_c1, _ = await closed_loop("127.0.0.1", upstream.port, direct_request,
                                         1000 if quick else 3000, 1)
        total = 5000 if quick else 20000
        _, direct_wall = await closed_loop("127.0.0.1", upstream.port, direct_request, total, 32)
        report: dict[str, Any] = {
            "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform(), "nofile": [soft, hard]},
            "direct": {"p50_ms_c1": _pct(direct_c1, 0.5) * 1e3, "p99_ms_c1": _pct(direct_c1, 0.99) * 1e3,
                       "requests_per_s_c32": total / direct_wall},
        }
        servers: dict[str, Server] = {**proxies, "floor": floor}
        for name, proxy in servers.items():
            key = CHAIN_KEY if name == "full" else None
            report[name] = await _unary(proxy, key, quick, direct_c1)
            report[name].update(await _stream_cpu(proxy, key, 50 if quick else 200))
            report[name]["rss_mib"] = _rss(proxy) / 2**20
        report["memory"] = await _stream_memory(proxies["full"], CHAIN_KEY,
                                                min(streams, 1000) if quick else streams)
        await asyncio.sleep(1.5)  # the last span batch
        async with aiohttp.ClientSession() as session, session.get(f"{sink.url}/stats") as response:
            report["otlp_sink"] = await response.json()
        report["count_4k"] = count_4k_prompt()
    finally:
        for proxy in proxies.values():
            proxy.stop()
        floor.stop()
        upstream.stop()
        sink.stop()
    report["targets"] = _judge(report)
    return report


def _print(report: dict[str, Any]) -> None:
    print(f"machine: {report['machine']}")
    d = report["direct"]
    print(f"direct: p50 {d['p50_ms_c1']:.3f} ms, p99 {d['p99_ms_c1']:.3f} ms at c=1; "
          f"{d['requests_per_s_c32']:,.0f} req/s at c=32")
    rows = [("added p50 at c=1", "added_p50_ms_c1", "{:.3f} ms"),
            ("added p99 at c=1", "added_p99_ms_c1", "{:.3f} ms"),
            ("req/s at c=32", "requests_per_s_c32", "{:,.0f}"),
            ("proxy CPU per request (c=32)", "cpu_us_per_request_c32", "{:.0f} us"),
            ("proxy CPU per streamed chunk", "cpu_us_per_chunk", "{:.1f} us"),
            ("RSS after the runs", "rss_mib", "{:.0f} MiB")]
    print(f"{'':<32}{'full chain + tracing':>24}{'bare':>16}{'aiohttp floor':>16}")
    for label, key, fmt in rows:
        print(f"{label:<32}{fmt.format(report['full'][key]):>24}{fmt.format(report['bare'][key]):>16}"
              f"{fmt.format(report['floor'][key]):>16}")
    m = report["memory"]
    print(f"memory (full chain): {m['streams']:.0f} of {m['attempted']:.0f} streams open at once "
          f"({m['failures']:.0f} failed), {m['kib_per_stream']:.1f} KiB RSS per stream, "
          f"{m['proxy_fds']:.0f} descriptors, opened in {m['open_all_s']:.1f} s")
    print(f"OTLP receiver: {report['otlp_sink']}")
    c = report["count_4k"]
    print(f"counting a {c['tokens']}-token prompt: {c['cold_ms']:.2f} ms cold, {c['warm_ms']:.2f} ms "
          f"warm, {c['chat_warm_ms']:.2f} ms as a chat, {c['full_encode_ms']:.2f} ms as one full "
          "encode (the worker-thread path for bodies over 16 KiB; GIL released)")
    for target in report["targets"].values():
        print(f"target {target['label']} {target['target']}: {'MET' if target['met'] else 'MISSED'} "
              f"({target['value']:,.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/overhead.json"))
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--streams", type=int, default=9900,
                        help="streams held open at once for the memory figure")
    args = parser.parse_args()
    import uvloop

    report = uvloop.run(run(args.quick, args.streams))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    _print(report)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
