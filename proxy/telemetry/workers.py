"""`/metrics` under `serve --workers N`: every worker's series in one scrape, each labelled `worker`.

The kernel hands a scrape's connection to any worker (SO_REUSEPORT), and each worker counts only what it
served: scraped one at a time, a target's counters jumped between workers' values (they looked like
resets to Prometheus) and the fleet-wide sums were wrong. So each worker also serves its own metrics, and
only those, on a Unix socket in the supervisor's private directory (`worker-<i>.metrics.sock`, mode 0700
directory: no port, nothing reachable from the network), and the worker that receives a scrape reads its
siblings' over those sockets and answers with every family once, each sample labelled
`worker="<i>"`. Series are never summed here: gauges (in flight, queue depth, replica state) stay each
worker's own, and `sum without (worker)` gives the fleet. `sop_metrics_workers` says how many workers
the scrape holds: a worker restarting (no socket, or one that refuses) is left out of that scrape, which
Prometheus sees as that worker's series going stale, not as a reset of the others.

One process (no `--workers`): nothing changes, no label, no socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Iterable
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

__all__ = ["WORKER_LABEL", "WORKER_METRICS", "WorkerMetrics", "merge_worker_metrics"]

log = logging.getLogger("proxy.telemetry")

WORKER_LABEL = "worker"
_SOCKET = re.compile(r"worker-(\d{1,4})\.metrics\.sock")
_PEER_TIMEOUT_S = 2.0
"""A sibling busy past this is left out of the scrape (Prometheus' own timeout is 10 s by default)."""
_MAX_PEER_BYTES = 64 * 2**20
"""A sibling's exposition larger than this is left out (a bound on what one scrape may buffer)."""


def _socket_name(index: int) -> str:
    return f"worker-{index}.metrics.sock"


class _Families:
    """A prometheus_client collector yielding already-built families (for `generate_latest`)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge_worker_metrics(expositions: dict[int, str], prefix: str = "sop") -> bytes:
    """One Prometheus text exposition from each worker's (worker index -> its text): each family once, in
    first-seen order, with every worker's samples labelled `worker`, plus `<prefix>_metrics_workers`
    (`sop_metrics_workers` by default; `prefix` is `telemetry.metric_prefix`, like every name of ours)."""
    merged: dict[str, Metric] = {}
    included = 0
    for index in sorted(expositions):
        label = str(index)
        try:
            families = list(text_string_to_metric_families(expositions[index]))
        except ValueError as exc:  # not from this proxy's renderer: that worker is left out
            log.warning("worker %d's metrics left out: unparseable (%s)", index, type(exc).__name__)
            continue
        included += 1
        for family in families:
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type,
                                                    family.unit)
            into.samples.extend(Sample(s.name, {WORKER_LABEL: label, **s.labels}, s.value, s.timestamp,
                                       s.exemplar) for s in family.samples)
    name = f"{prefix}_metrics_workers"
    count = Metric(name, "Workers whose metrics this scrape holds (serve --workers).", "gauge")
    count.add_sample(name, {}, float(included))
    merged[count.name] = count
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(merged.values()))
    return generate_latest(registry)


class WorkerMetrics:
    """One worker's side: its own metrics on its socket in `directory`, and the fleet-wide scrape.

    `local()` renders this worker's registry. `start()` serves it on the socket (replacing a stale one a
    killed predecessor left; a socket that cannot be made is logged, and the worker serves without
    it); `close()` stops serving and removes the socket."""

    def __init__(self, directory: Path, index: int, registry: CollectorRegistry,
                 prefix: str = "sop") -> None:
        self.directory = directory
        self.prefix = prefix
        """`telemetry.metric_prefix`: the merged scrape's `<prefix>_metrics_workers`."""
        self.index = index
        self.registry = registry
        self._runner: web.AppRunner | None = None

    def local(self) -> bytes:
        return generate_latest(self.registry)

    async def start(self) -> None:
        app = web.Application()

        async def own(request: web.Request) -> web.Response:
            del request
            return web.Response(body=self.local(), content_type="text/plain")

        app.router.add_get("/metrics", own)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        path = self.directory / _socket_name(self.index)
        self._runner = runner
        try:
            path.unlink(missing_ok=True)  # a worker killed before its cleanup left it
            await web.UnixSite(runner, str(path)).start()
        except OSError as exc:  # e.g. a TMPDIR too long for a socket path (108 bytes): serve anyway
            log.warning("worker %d's metrics are not shared with its siblings (%s: %s): their scrapes "
                        "miss this worker", self.index, type(exc).__name__, exc)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        (self.directory / _socket_name(self.index)).unlink(missing_ok=True)

    async def scrape(self) -> bytes:
        """Every reachable worker's metrics merged (see the module docstring)."""
        peers: dict[int, Path] = {}
        with contextlib.suppress(OSError):
            for path in self.directory.iterdir():
                match = _SOCKET.fullmatch(path.name)
                if match and int(match.group(1)) != self.index:
                    peers[int(match.group(1))] = path
        expositions = {self.index: self.local().decode()}
        answers = await asyncio.gather(*(self._peer(path) for path in peers.values()))
        for index, text in zip(peers, answers, strict=True):
            if text is not None:
                expositions[index] = text
        # Parsing a few hundred KiB of text takes milliseconds: off the event loop's turn.
        return await asyncio.to_thread(merge_worker_metrics, expositions, self.prefix)

    @staticmethod
    async def _peer(path: Path) -> str | None:
        """A sibling's own metrics, or None when it does not answer in time (restarting, stopping).

        One HTTP/1.0 GET on a fresh Unix connection, read to its close: the sibling is this same code
        (an aiohttp app answering with Content-Length), so no client library is needed, and the fleet
        client (proxy/fleet/client.py) stays the only place that makes client sessions."""
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(_PEER_TIMEOUT_S):
                reader, writer = await asyncio.open_unix_connection(str(path), limit=2**16)
                writer.write(b"GET /metrics HTTP/1.0\r\nHost: worker\r\n\r\n")
                answer = bytearray()
                while chunk := await reader.read(2**16):
                    answer += chunk
                    if len(answer) > _MAX_PEER_BYTES:
                        return None
        except (OSError, TimeoutError) as exc:
            log.debug("worker metrics from %s left out: %s", path.name, type(exc).__name__)
            return None
        finally:
            if writer is not None:
                writer.close()
        head, _, body = bytes(answer).partition(b"\r\n\r\n")
        if not head.startswith((b"HTTP/1.0 200 ", b"HTTP/1.1 200 ")):
            return None
        return body.decode("utf-8", errors="replace")


WORKER_METRICS: web.AppKey[WorkerMetrics] = web.AppKey("sop_worker_metrics", WorkerMetrics)
"""Set on a worker's application: its `/metrics` answers with `WorkerMetrics.scrape()`."""
