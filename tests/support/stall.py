"""How long a proxy leaves /healthz waiting while it works on large requests: a measure of work done
on its event loop (a request handled there holds every other request of the process)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import httpx


@contextlib.contextmanager
def healthz_waits(url: str) -> Iterator[list[float]]:
    """While the block runs, /healthz of the proxy at `url` is asked again and again from a thread of
    its own (its own client: what it measures is the proxy's wait, not this process's upload); yields
    the list of its waits in seconds, complete once the block is left. Every answer must be a 200."""
    done = threading.Event()
    waits: list[float] = []
    failures: list[str] = []

    def probe() -> None:
        with httpx.Client(timeout=60) as client:
            while not done.is_set():
                started = time.monotonic()
                status = client.get(f"{url}/healthz").status_code
                if status != 200:
                    failures.append(f"/healthz answered {status}")
                waits.append(time.monotonic() - started)
                time.sleep(0.02)

    prober = threading.Thread(target=probe, name="healthz-probe", daemon=True)
    prober.start()
    try:
        yield waits
    finally:
        done.set()
        prober.join(60)
    assert not failures, failures


def healthz_stall_during(url: str, path: str, body: bytes, key: str, header: str,
                         rounds: int) -> tuple[float, list[str]]:
    """The longest /healthz answer (seconds) while `body` is posted to `path` `rounds` times, one
    after another, and the `header` of those answers (each must be a 200). The probe runs in a thread
    of its own with its own client: what it measures is the proxy's wait, not this process's upload."""
    seen = []
    with healthz_waits(url) as waits, httpx.Client(timeout=60) as client:
        for _ in range(rounds):
            reply = client.post(f"{url}{path}", content=body, headers={
                "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
            assert reply.status_code == 200, reply.text[:200]
            seen.append(reply.headers.get(header, ""))
    return max(waits, default=0.0), seen
