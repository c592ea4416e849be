"""Load-generator clients that use the retry helper (`shared_ollama_client` in clients/python).

Each request goes through an `httpx.AsyncClient` whose transport is the helper's `AsyncRetryTransport`,
as the helper's README plugs it into a client, so the helper's own logic decides whether and when to send
again (429/503 and the rest of its policy, Retry-After / retry-after-ms / x-should-retry, its budget).
A request is one Record however many attempts it took: its outcome is the final answer's (a refusal
followed by an answer is `ok`; a refusal the helper gives up on is `rejected`), its TTFT and completion
run from the first attempt to the final answer, and its client timeout counts from the first attempt.

Needs httpx and the helper package: the runner imports this module only for runs that name tenants.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType

import attrs
import httpx
from shared_ollama_client import AsyncRetryTransport, RetryPolicy

from .runner import REFUSALS, Record, classify, read_body, read_counts
from .workload import Planned

__all__ = ["HelperClients", "Retrying"]


@attrs.frozen
class Retrying:
    """A tenant whose clients use the retry helper with `policy` (None: the helper's default
    RetryPolicy, 5 attempts and 120 s), each client giving up `timeout_s` after its first attempt
    (None: the run's client timeout)."""

    policy: RetryPolicy | None = None
    timeout_s: float | None = None


class _Attempts(httpx.AsyncBaseTransport):
    """Below the helper's transport: counts the attempts of one request and the refusals among them,
    sending each on the run's shared connection pool (which closing this one leaves open)."""

    def __init__(self, pool: httpx.AsyncBaseTransport) -> None:
        self.pool = pool
        self.attempts = 0
        self.refusals = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.attempts += 1
        response = await self.pool.handle_async_request(request)
        self.refusals += response.status_code in REFUSALS
        return response

    async def aclose(self) -> None:
        """The pool is the run's, closed when the run ends."""


class HelperClients:
    """The clients of one run that use the helper: one connection pool, one client per request (the
    helper's transport is per client, so each request's attempts are its own)."""

    def __init__(self, target: str, timeout_s: float) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.pool = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=None,
                                                                 max_keepalive_connections=64))

    async def __aenter__(self) -> HelperClients:
        await self.pool.__aenter__()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.pool.__aexit__(kind, value, traceback)

    async def send(self, item: Planned, start: float, retrying: Retrying) -> Record:
        """`item` through the helper: one Record from the first attempt to the final answer."""
        record = Record(item.index, item.tenant, item.kind, time.monotonic() - start)
        counted = _Attempts(self.pool)
        # Seeded per request: the helper's jitter is the same on every run of a plan.
        transport = AsyncRetryTransport(counted, policy=retrying.policy, seed=item.index)
        sent = time.monotonic()
        tail = bytearray()
        try:
            async with asyncio.timeout(retrying.timeout_s or self.timeout_s), httpx.AsyncClient(
                    transport=transport, timeout=None, trust_env=False) as client, client.stream(
                    "POST", self.target + item.path, json=item.body,
                    headers={"Authorization": f"Bearer {item.key}"}) as response:
                record.status = response.status_code
                record.retry_after = response.headers.get("Retry-After")
                await read_body(record, response.aiter_raw(), sent, tail)
            record.completion_s = time.monotonic() - sent
            classify(record, bytes(tail))
        except TimeoutError:
            record.outcome = "timeout"
            record.completion_s = None
        except (httpx.HTTPError, ConnectionError) as exc:
            record.outcome = "error"
            record.error = type(exc).__name__
        record.attempts = max(1, counted.attempts)
        record.refusals = counted.refusals
        read_counts(record, bytes(tail))
        return record
