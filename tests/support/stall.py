"""How long a proxy leaves /healthz waiting while it works on large requests: a measure of work done
on its event loop (a request handled there holds every other request of the process)."""

from __future__ import annotations

import asyncio
import time

import httpx


def healthz_stall_during(url: str, path: str, body: bytes, key: str, header: str,
                         rounds: int) -> tuple[float, list[str]]:
    """The longest /healthz answer (seconds) while `body` is posted to `path` `rounds` times, one
    after another, and the `header` of those answers (each must be a 200)."""

    async def scenario() -> tuple[float, list[str]]:
        async with httpx.AsyncClient(timeout=60) as client:
            done = asyncio.Event()
            worst = 0.0

            async def probe() -> None:
                nonlocal worst
                while not done.is_set():
                    started = time.monotonic()
                    assert (await client.get(f"{url}/healthz")).status_code == 200
                    worst = max(worst, time.monotonic() - started)
                    await asyncio.sleep(0.02)

            prober = asyncio.ensure_future(probe())
            seen = []
            try:
                for _ in range(rounds):
                    reply = await client.post(f"{url}{path}", content=body, headers={
                        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
                    assert reply.status_code == 200, reply.text[:200]
                    seen.append(reply.headers.get(header, ""))
            finally:
                done.set()
                await prober
            return worst, seen

    return asyncio.run(scenario())
