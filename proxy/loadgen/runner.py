"""The open-loop dispatcher: every planned request leaves at its offset whether or not earlier ones have
finished (a closed loop would hide queueing), and one record per request is kept.

Bounded: the plan is finite, each request has the client timeout (120 s by default), and the run stops at
duration + timeout + 10 s whatever happens. Loopback targets only, and redirects are not followed.

A tenant named in `retrying` sends as a client using the retry helper (proxy/loadgen/retrying.py): one
Record per request however many attempts it took, timed from the first attempt to the final answer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import aiohttp
import attrs
from yarl import URL

from .workload import Planned

if TYPE_CHECKING:
    from .retrying import Retrying

__all__ = ["QUEUE_TIMEOUT", "REFUSALS", "Record", "assert_loopback", "classify", "read_body", "read_counts",
           "run_plan"]

REFUSALS = (429, 503)
"""Statuses that are a refusal (the service says: not now)."""

_TAIL_BYTES = 4096
"""The end of a body kept to read its final record (outcome and counts) from."""
_DEADLINE_LINE = re.compile(rb'"code"\s*:\s*"upstream_response_timeout"')
"""The proxy's last line of a stream its deadline cut (README: Deadlines)."""
_QUEUE_TIMEOUT = re.compile(rb'"code"\s*:\s*"queue_timeout"')
"""The proxy's 503 for a request that waited `queue_timeout_s` for a slot (native and /v1 error shapes)."""
QUEUE_TIMEOUT = "queue_timeout"
"""`Record.error` of a refusal that is also a timeout: the proxy's rules count a 503 `queue_timeout` in the
timeouts ratio as well as in the rejections ratio (docs/OPERATIONS.md, Timeouts)."""
_COUNTS = {name: re.compile(rb'"' + name.encode() + rb'":(\d+)') for name in (
    "prompt_eval_count", "eval_count", "load_duration")}


@attrs.define
class Record:
    """What happened to one request. Times are seconds from the start of the run."""

    index: int
    tenant: str
    kind: str
    submitted_s: float
    status: int = 0
    outcome: str = "pending"
    """ok, rejected (429/503), timeout (the client gave up, or the answer says a deadline passed: a 504, or
    a stream ending in an `upstream_response_timeout` line, as the proxy's timeouts SLO counts them),
    error (other status, reset, error line), stopped (the run was interrupted before it finished). A
    503 `queue_timeout` is rejected with `error` QUEUE_TIMEOUT: the timeouts figure counts it too."""
    ttft_s: float | None = None
    """Time to the first body byte of the response (the first token of a stream)."""
    completion_s: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    load_duration_ns: int | None = None
    bytes: int = 0
    retry_after: str | None = None
    error: str | None = None
    attempts: int = 1
    """Attempts sent (more than one only through the retry helper)."""
    refusals: int = 0
    """Answers of 429 or 503 among them (the final answer included)."""


def assert_loopback(target: str) -> None:
    """Refuse any target that is not on this machine (127.0.0.0/8 or ::1)."""
    host = URL(target).host or ""
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve {host!r}: {exc}") from None
    for address in addresses:
        if not ipaddress.ip_address(address.split("%")[0]).is_loopback:
            raise ValueError(f"load generation targets loopback only; {host} is {address}")


def _last_int(name: str, tail: bytes) -> int | None:
    found = _COUNTS[name].findall(tail)
    return int(found[-1]) if found else None


async def _one(session: aiohttp.ClientSession, target: str, item: Planned, start: float,
               timeout_s: float) -> Record:
    record = Record(item.index, item.tenant, item.kind, time.monotonic() - start)
    sent = time.monotonic()
    tail = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            # Never a redirect: it could lead off this machine (the loopback rule is checked on the
            # target only), and its answer would be counted as the target's. A 3xx is an error.
            async with session.post(target + item.path, json=item.body, allow_redirects=False,
                                    headers={"Authorization": f"Bearer {item.key}"}) as response:
                record.status = response.status
                record.retry_after = response.headers.get("Retry-After")
                await read_body(record, response.content.iter_any(), sent, tail)
        record.completion_s = time.monotonic() - sent
        classify(record, bytes(tail))
    except TimeoutError:
        record.outcome = "timeout"
        record.completion_s = None
    except (aiohttp.ClientError, ConnectionError) as exc:
        record.outcome = "error"
        record.error = type(exc).__name__
    record.refusals = int(record.status in REFUSALS)
    read_counts(record, bytes(tail))
    return record


async def read_body(record: Record, chunks: AsyncIterator[bytes], sent: float, tail: bytearray) -> None:
    """Read a response body as it arrives: TTFT at its first chunk (from `sent`), bytes counted, the last
    4 KiB kept in `tail` (in place, so a read cut by the client timeout keeps what it had)."""
    async for chunk in chunks:
        if record.ttft_s is None:
            record.ttft_s = time.monotonic() - sent
        record.bytes += len(chunk)
        tail += chunk
        del tail[:-_TAIL_BYTES]


def classify(record: Record, tail: bytes) -> None:
    """The outcome of an answer that arrived whole (status and the last bytes of its body). A deadline
    that passed on the server's side (504, or a stream cut by the proxy's deadline) is a timeout, as the
    proxy's own timeouts SLO counts it, not an error: else a run the proxy reports 30 % timeouts for
    would say 0 % here."""
    if record.status in REFUSALS:
        record.outcome = "rejected"
        if _QUEUE_TIMEOUT.search(tail):
            record.error = QUEUE_TIMEOUT
    elif record.status == 504:
        record.outcome = "timeout"
        record.error = tail[-200:].decode("utf-8", "replace")
    elif record.status != 200:
        record.outcome = "error"
        record.error = tail[-200:].decode("utf-8", "replace")
    elif b'"error"' in (last := tail.rsplit(b"\n", 2)[-2 if tail.endswith(b"\n") else -1]):
        if _DEADLINE_LINE.search(last):
            record.outcome = "timeout"
            record.error = "deadline passed in stream"
        else:
            record.outcome = "error"
            record.error = "error line in stream"
    else:
        record.outcome = "ok"


def read_counts(record: Record, tail: bytes) -> None:
    """Token counts and load time from the last bytes of an answer."""
    record.prompt_tokens = _last_int("prompt_eval_count", tail)
    record.output_tokens = _last_int("eval_count", tail)
    record.load_duration_ns = _last_int("load_duration", tail)


async def run_plan(target: str, planned: list[Planned], *, timeout_s: float = 120.0,
                   hard_stop_s: float | None = None,
                   retrying: Mapping[str, Retrying] | None = None,
                   stop: asyncio.Event | None = None) -> list[Record]:
    """Send `planned` to `target` open-loop; one Record per request, in plan order. The tenants in
    `retrying` send through the retry helper (see the module docstring). Setting `stop` (the CLI does
    on SIGINT/SIGTERM) ends the run at once: nothing more is sent, the requests in flight are
    cancelled, and every request that had not finished is a Record with outcome `stopped`."""
    assert_loopback(target)
    if not planned:  # nothing to send (asyncio.wait refuses an empty set)
        return []
    target = target.rstrip("/")
    retrying = retrying or {}
    longest = max([timeout_s, *(r.timeout_s or timeout_s for r in retrying.values())])
    horizon = (planned[-1].at_s if planned else 0.0) + longest + 10.0
    hard_stop_s = horizon if hard_stop_s is None else hard_stop_s
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    start = time.monotonic()
    async with AsyncExitStack() as stack:
        session = await stack.enter_async_context(aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None)))
        helped = None
        if retrying:
            # Imported only here: the helper's path needs httpx and clients/python's package, which
            # the proxy's own install does not have.
            from .retrying import HelperClients

            helped = await stack.enter_async_context(HelperClients(target, timeout_s))

        async def launch(item: Planned) -> Record:
            delay = item.at_s - (time.monotonic() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            helper = retrying.get(item.tenant)
            if helped is not None and helper is not None:
                return await helped.send(item, start, helper)
            return await _one(session, target, item, start, timeout_s)

        tasks = [asyncio.ensure_future(launch(item)) for item in planned]
        # Never cancelled itself (its children are): it ends once they all did, whatever each did.
        everything = asyncio.gather(*tasks, return_exceptions=True)
        stopped = asyncio.ensure_future(stop.wait()) if stop is not None else None
        waits: list[asyncio.Future[Any]] = [everything] if stopped is None else [everything, stopped]
        await asyncio.wait(waits, timeout=hard_stop_s, return_when=asyncio.FIRST_COMPLETED)
        interrupted = stop is not None and stop.is_set()
        finished = {task for task in tasks if task.done()}
        if stopped is not None:
            stopped.cancel()
        for task in tasks:
            task.cancel()
        # The cancelled requests leave (their connections closed) before the session does.
        await asyncio.wait([everything], timeout=5.0)
        records: list[Record] = []
        for item, task in zip(planned, tasks, strict=True):
            if task in finished and not task.cancelled() and task.exception() is None:
                records.append(task.result())
            elif task in finished and not task.cancelled():
                records.append(Record(item.index, item.tenant, item.kind, item.at_s, outcome="error",
                                      error=type(task.exception()).__name__))
            elif interrupted:
                records.append(Record(item.index, item.tenant, item.kind, item.at_s,
                                      outcome="stopped", error="run interrupted"))
            else:
                records.append(Record(item.index, item.tenant, item.kind, item.at_s,
                                      outcome="timeout", error="run stopped"))
    return records


def record_dict(record: Record) -> dict[str, Any]:
    """A record as plain JSON-able data (one JSON line per request)."""
    return attrs.asdict(record)
