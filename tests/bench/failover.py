"""`make bench-failover`: a replica killed under streaming load (bench-and-reliability.md B7).

Two emulated replicas (4 slots each, 40-token answers at 25 tokens/s) behind the proxy; 40 streaming
generations arrive over 4 s; one replica is killed 1 s in and started again once the run ends. Reported:
requests failed before their first byte (the target is 0: they are retried elsewhere), streams cut
mid-way (at most those running on the killed replica), refusals, time from the kill to the ejection, and
from the restart to re-admission. Loopback only, bounded, ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from tests.support.metrics import metric
from tests.support.servers import Server, free_port, start_emulator, start_proxy

REQUESTS = 40
KILL_AT_S = 1.0


def _replica(tmp: Path, name: str, port: int) -> Server:
    return start_emulator(tmp, name=name, port=port, decode_tokens_per_s=25.0, output_tokens="40,40",
                          fixed_clock=False, extra=["--num-parallel", "4"])


def _status(proxy: Server, name: str) -> str:
    return str(httpx.get(f"{proxy.url}/system/profile", timeout=5).json()["replicas"][name]["status"])


async def _one(session: aiohttp.ClientSession, proxy: Server, index: int) -> str:
    await asyncio.sleep(index * 0.1)
    async with session.post(f"{proxy.url}/api/generate",
                            json={"model": "llama3.2", "prompt": f"question {index}"}) as response:
        if response.status != 200:
            return f"refused {response.status} {(await response.json()).get('code')}"
        lines = [json.loads(line) async for line in response.content if line.strip()]
    if lines and lines[-1].get("done"):
        return "ok"
    return f"cut after {len(lines) - 1} chunks" if len(lines) > 1 else "failed before first byte"


async def _load(proxy: Server, victim: Server) -> tuple[list[str], int, float | None]:
    """The streaming load, the kill 1 s in, and the time until the proxy ejected the victim."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        tasks = [asyncio.create_task(_one(session, proxy, i)) for i in range(REQUESTS)]
        await asyncio.sleep(KILL_AT_S)
        streaming = (await asyncio.to_thread(victim.stats))["active"]
        killed = time.monotonic()
        await asyncio.to_thread(victim.kill)
        ejected_after = None
        while ejected_after is None and time.monotonic() - killed < 60:
            if await asyncio.to_thread(_status, proxy, "b") == "ejected":
                ejected_after = time.monotonic() - killed
            await asyncio.sleep(0.02)
        return list(await asyncio.gather(*tasks)), streaming, ejected_after


def run() -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="sop-failover-"))
    port = free_port()
    a = _replica(tmp, "a", free_port())
    b = _replica(tmp, "b", port)
    servers = [a, b]
    try:
        for server in (a, b):
            httpx.post(f"{server.url}/api/generate", json={"model": "llama3.2"}, timeout=30)
        proxy = start_proxy(tmp, [{"url": a.url, "name": "a", "num_parallel": 4},
                                  {"url": b.url, "name": "b", "num_parallel": 4}],
                            {"telemetry": {"access_log": False}})
        servers.append(proxy)
        outcomes, streaming_on_b, ejected_after = asyncio.run(_load(proxy, b))
        restarted = time.monotonic()
        servers.append(_replica(tmp, "b-again", port))
        while _status(proxy, "b") != "healthy" and time.monotonic() - restarted < 120:
            time.sleep(0.05)
        readmitted_after = time.monotonic() - restarted
        kinds = Counter("cut mid-stream" if o.startswith("cut") else o for o in outcomes)
        return {"requests": REQUESTS, "streaming_on_killed_replica": streaming_on_b,
                "outcomes": dict(kinds),
                "failed_before_first_byte": kinds.get("failed before first byte", 0),
                "retries": metric(proxy.url, "sop_balancer_retries_total") or 0,
                "ejected_after_s": ejected_after, "readmitted_after_s": readmitted_after}
    finally:
        for server in servers:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/failover.json"))
    args = parser.parse_args()
    report = run()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
