"""`make bench-workers`: throughput of `serve --workers 2` against one worker (issue 16, item 3).

One fast fake Ollama (tests/bench/fast_upstream.py: canned answers in microseconds, so the proxy is the
bottleneck), one redis-server, and the proxy three ways: 1 worker with the memory backend (the
single-process path), 1 worker with Redis (slots, fair queue and quotas shared through Redis), 2 workers
with Redis (`serve --workers 2`, SO_REUSEPORT). For each: `CONCURRENCY` closed-loop clients, each on its
own keep-alive connection (the kernel spreads connections, not requests, over the workers), send unary
`/api/chat` requests (tests/bench/loadclient.py, a lean client: little of the two cores goes to it):
`WARMUP` requests, then `MEASURED` requests timed. Printed with the ratios to the first, and written as
JSON to tests/bench/results/workers.json. On a 2-core machine the client, the fake and Redis compete
with the workers, so the figures are a floor for what 2 workers give.

Loopback only, bounded (three runs of a fixed number of requests), ends by itself.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import yaml

from tests.bench.loadclient import closed_loop, request_bytes
from tests.support.redis_server import RedisServer
from tests.support.servers import Server, start_module

SLOTS = 256
CONCURRENCY = 32
WARMUP = 2000
MEASURED = 15000
BODY = {"model": "llama3.2", "stream": False, "options": {"num_predict": 8},
        "messages": [{"role": "user", "content": "hello"}]}
OUT = Path(__file__).parent / "results" / "workers.json"


def _proxy(tmp: Path, name: str, upstream: str, workers: int, state: dict[str, Any]) -> Server:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "server": {"listen": "127.0.0.1:0"},
        "upstreams": [{"url": upstream, "num_parallel": SLOTS}],
        "chain": {"backpressure": {"max_in_flight": SLOTS}},
        "telemetry": {"access_log": False},
        "state": state}))
    return Server(["serve", "--config", str(path), "--workers", str(workers)], tmp / f"{name}.port",
                  tmp / f"{name}.log")


async def _load(port: int) -> dict[str, Any]:
    request = request_bytes("127.0.0.1", "/api/chat", json.dumps(BODY).encode())
    await closed_loop("127.0.0.1", port, request, WARMUP, CONCURRENCY)
    _, wall = await closed_loop("127.0.0.1", port, request, MEASURED, CONCURRENCY)
    return {"requests_per_s": round(MEASURED / wall, 1), "requests": MEASURED}


def main() -> None:
    import uvloop

    results: dict[str, Any] = {"concurrency": CONCURRENCY, "requests": MEASURED, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as name:
        tmp = Path(name)
        redis = RedisServer(tmp)
        upstream = start_module(tmp, "tests.bench.fast_upstream")
        try:
            setups = [("1 worker, memory", 1, {"backend": "memory"}),
                      ("1 worker, redis", 1, {"backend": "redis", "url": redis.url,
                                              "key_prefix": "bench1:"}),
                      ("2 workers, redis", 2, {"backend": "redis", "url": redis.url,
                                               "key_prefix": "bench2:"})]
            for index, (label, workers, state) in enumerate(setups):
                proxy = _proxy(tmp, f"proxy-{index}", upstream.url, workers, state)
                try:
                    results["runs"][label] = uvloop.run(_load(proxy.port))
                finally:
                    proxy.stop()
                print(label, results["runs"][label], flush=True)
        finally:
            upstream.stop()
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
