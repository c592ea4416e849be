"""`make bench-workers`: throughput of `serve --workers 2` against one worker (issue 16, item 3).

One emulated Ollama with `SLOTS` slots and no delays (answers of 8 tokens at once: the proxy is the
bottleneck), one redis-server, and the proxy three ways: 1 worker with the memory backend (the
single-process path), 1 worker with Redis (slots, fair queue and quotas shared through Redis), 2 workers
with Redis (`serve --workers 2`, SO_REUSEPORT). For each: `CONCURRENCY` closed-loop clients, each on its
own keep-alive connection (the kernel spreads connections, not requests, over the workers), send unary
`/api/generate` requests for `WARMUP_S`, then requests/s is measured over `MEASURE_S`. Printed with the
ratios to the first, and written as JSON to tests/bench/results/workers.json. The client runs in this
process with uvloop: on a 2-core machine it competes with the workers, so the figures are a floor for
what 2 workers give.

Loopback only, bounded (three runs of WARMUP_S + MEASURE_S, 30 s client timeout per request), ends by
itself.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.support.redis_server import RedisServer
from tests.support.servers import Server, start_emulator

SLOTS = 256
CONCURRENCY = 32
WARMUP_S = 3.0
MEASURE_S = 10.0
BODY = {"model": "llama3.2", "prompt": "hello", "stream": False, "options": {"num_predict": 8}}
OUT = Path(__file__).parent / "results" / "workers.json"


def _proxy(tmp: Path, name: str, emulator: Server, workers: int, state: dict[str, Any]) -> Server:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "server": {"listen": "127.0.0.1:0"},
        "upstreams": [{"url": emulator.url, "num_parallel": SLOTS}],
        "chain": {"backpressure": {"max_in_flight": SLOTS}},
        "telemetry": {"access_log": False},
        "state": state}))
    return Server(["serve", "--config", str(path), "--workers", str(workers)], tmp / f"{name}.port",
                  tmp / f"{name}.log")


async def _load(url: str) -> dict[str, Any]:
    stop_at = time.monotonic() + WARMUP_S + MEASURE_S
    measure_from = time.monotonic() + WARMUP_S
    done = 0
    errors = 0

    async def client() -> None:
        nonlocal done, errors
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=30)) as session:
            while time.monotonic() < stop_at:
                async with session.post(f"{url}/api/generate", json=BODY) as response:
                    await response.read()
                now = time.monotonic()
                if measure_from <= now < stop_at:
                    if response.status == 200:
                        done += 1
                    else:
                        errors += 1

    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    return {"requests_per_s": round(done / MEASURE_S, 1), "errors": errors}


def main() -> None:
    import uvloop

    results: dict[str, Any] = {"concurrency": CONCURRENCY, "measure_s": MEASURE_S, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as name:
        tmp = Path(name)
        redis = RedisServer(tmp)
        emulator = start_emulator(tmp, fixed_clock=False, decode_tokens_per_s=0,
                                  output_tokens="8,8", name="bench-emu",
                                  extra=["--num-parallel", str(SLOTS), "--max-queue", "4096"])
        try:
            setups = [("1 worker, memory", 1, {"backend": "memory"}),
                      ("1 worker, redis", 1, {"backend": "redis", "url": redis.url,
                                              "key_prefix": "bench1:"}),
                      ("2 workers, redis", 2, {"backend": "redis", "url": redis.url,
                                               "key_prefix": "bench2:"})]
            for index, (label, workers, state) in enumerate(setups):
                proxy = _proxy(tmp, f"proxy-{index}", emulator, workers, state)
                try:
                    results["runs"][label] = uvloop.run(_load(proxy.url))
                finally:
                    proxy.stop()
                print(label, results["runs"][label], flush=True)
        finally:
            emulator.stop()
            redis.stop()
    runs = results["runs"]
    base = runs["1 worker, memory"]["requests_per_s"] or 1.0
    redis_one = runs["1 worker, redis"]["requests_per_s"] or 1.0
    results["ratios"] = {
        "1 worker redis / 1 worker memory": round(redis_one / base, 2),
        "2 workers redis / 1 worker memory": round(runs["2 workers, redis"]["requests_per_s"] / base, 2),
        "2 workers redis / 1 worker redis": round(runs["2 workers, redis"]["requests_per_s"] / redis_one,
                                                  2)}
    print(json.dumps(results, indent=2))
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
