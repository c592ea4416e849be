"""Retrying httpx transports for the official clients in front of a shared Ollama service.

They sit below the client, so the client itself is unchanged: `ollama.Client(host=...,
transport=RetryTransport())`, `ollama.AsyncClient(..., transport=AsyncRetryTransport())`, or
`openai.OpenAI(..., max_retries=0, http_client=httpx.Client(transport=RetryTransport()))`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx

from shared_ollama_client.limits import ServiceLimits, decimal, limits

__all__ = ["AsyncRetryTransport", "RetryPolicy", "RetryTransport", "http_date", "retry_delay",
           "server_delay_s"]

log = logging.getLogger("shared_ollama_client")

_MAX_LOGGED_PATH = 200


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before sending a request again.

    Retried: statuses in `statuses` (429, 502, 503, 504: the proxy answers 502/504 only before the first
    body byte, so nothing had started) and connection failures (`httpx.ConnectError`: refused, reset
    while connecting). Never retried: read timeouts and every other exception, any response once it has
    been returned to the caller (a stream that started), an answer carrying `x-should-retry: false`, and
    a request whose body cannot be sent twice. `x-should-retry: true` makes any error status (>= 400)
    retryable (the header the OpenAI SDKs obey). A policy whose `max_retry_after_s` exceeds 60 s retries
    a 429/503 refusal carrying `x-should-retry: false` and a wait (the proxy's "longer than 60 s"), a
    wait no longer than `max_retry_after_s` like any other.
    A 504 is retried at most `max_timeout_retries` times (once by default).

    The wait is the server's (`retry-after-ms`, else `Retry-After` in seconds or as an HTTP date) plus up
    to `retry_after_jitter` of it, so clients told the same second do not return in the same instant;
    without one it is exponential backoff with full jitter: uniform(0, min(backoff_max_s,
    backoff_base_s * 2**(n - 1))) after the n-th failed attempt. A server wait longer than
    `max_retry_after_s` (the proxy caps its own at 60 s) or one that would end after `max_total_s` from the
    first attempt is not slept through: the answer is returned at once, so the caller sees the refusal.
    """

    max_attempts: int = 5
    """Attempts in all, the first included (1 disables retries)."""
    max_total_s: float = 120.0
    """Budget from the start of the first attempt: no wait is started that would end after it."""
    max_retry_after_s: float = 60.0
    """A server-told wait longer than this is a refusal to surface, not a wait to sleep through. Above
    60 s (a bulk job's policy) the client also comes back after the proxy's `x-should-retry: false`
    refusals that carry a wait: the proxy says that when the real wait exceeds the 60 s its Retry-After
    may show, and the client then polls every 60 s within `max_total_s`."""
    backoff_base_s: float = 0.5
    """First backoff ceiling when the server gave no wait."""
    backoff_max_s: float = 8.0
    """Largest backoff ceiling when the server gave no wait."""
    retry_after_jitter: float = 0.1
    """Extra wait of up to this share of a server-told wait."""
    statuses: frozenset[int] = field(default=frozenset({429, 502, 503, 504}))
    """Statuses retried without `x-should-retry: true`."""
    max_timeout_retries: int = 1
    """504 answers retried per request, whatever `max_attempts` allows: a request that timed out may
    have kept a replica busy for the whole timeout, and retrying it again and again multiplies the load
    the timeout was there to shed."""

    def __post_init__(self) -> None:
        # Counts are whole numbers, as the TypeScript helper requires (Number.isInteger: 3.0 is one,
        # 2.5 is not, where 2.5 attempts would silently mean 3); an integral float is kept as an int.
        for name in ("max_attempts", "max_timeout_retries"):
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():
                object.__setattr__(self, name, int(value))  # frozen: the one place it is set
            elif isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be a whole number")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.max_timeout_retries < 0:
            raise ValueError("max_timeout_retries must be >= 0")
        for name in ("max_total_s", "max_retry_after_s", "backoff_base_s", "backoff_max_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds")
        if not (0 <= self.retry_after_jitter <= 1):
            raise ValueError("retry_after_jitter must be between 0 and 1")


_PROXY_RETRY_AFTER_CAP_S = 60.0
"""The longest Retry-After the proxy sends; a longer wait is `x-should-retry: false` with that header."""


def server_delay_s(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """The wait the server asked for, in seconds: `retry-after-ms` first, else `Retry-After` (seconds or
    an HTTP date, a date in the past meaning 0). None when neither is present or parseable. Numbers are
    read with `decimal`'s grammar and dates with `http_date`'s, the TypeScript helper's too, so both wait
    alike (`0x10` or `1_000` is no number to either, `Thu, 01 Jan 2026 00:00:30 +0000` no date)."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        value = decimal(milliseconds)
        if value is not None and value >= 0:
            return value / 1000
    seconds = headers.get("retry-after")
    if seconds is None:
        return None
    value = decimal(seconds)
    if value is not None:
        return value if value >= 0 else None
    now = now or datetime.now(UTC)
    when = http_date(seconds, now)
    return None if when is None else max(0.0, (when - now).total_seconds())


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH = "(" + "|".join(_MONTHS) + ")"
_TIME = "([0-9]{2}):([0-9]{2}):([0-9]{2})"
_DAY = "(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_IMF_FIXDATE = re.compile(rf"{_DAY}, ([0-9]{{2}}) {_MONTH} ([0-9]{{4}}) {_TIME} GMT")
_RFC850_DATE = re.compile(
    rf"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), ([0-9]{{2}})-{_MONTH}-([0-9]{{2}}) "
    rf"{_TIME} GMT")
_ASCTIME_DATE = re.compile(rf"{_DAY} {_MONTH} ([0-9]{{2}}| [0-9]) {_TIME} ([0-9]{{4}})")


def http_date(text: str, now: datetime) -> datetime | None:
    """`text` (padded with spaces or tabs at most) as an HTTP date, else None: exactly RFC 9110's three
    forms (IMF-fixdate `Sun, 06 Nov 1994 08:49:37 GMT`, the obsolete `Sunday, 06-Nov-94 08:49:37 GMT` and
    asctime `Sun Nov  6 08:49:37 1994`), case-sensitive, always UTC, a real calendar day and time (no
    31 Feb, no second 60; the weekday is not checked). A two-digit year is the one in this century, or
    the last, if that would be more than 50 years after `now`'s year. The TypeScript helper's grammar
    too: `email.utils` also reads `+0100`, `EST`, no zone at all, a lowercase month and a single-digit
    day, which V8's parser reads otherwise or not at all, so the two helpers waited differently."""
    text = text.strip(" \t")
    if match := _IMF_FIXDATE.fullmatch(text):
        day, month, year, hour, minute, second = match.groups()
    elif match := _RFC850_DATE.fullmatch(text):
        day, month, short, hour, minute, second = match.groups()
        century = now.year // 100 * 100
        year = str(century + int(short) - (100 if century + int(short) > now.year + 50 else 0))
    elif match := _ASCTIME_DATE.fullmatch(text):
        month, day, hour, minute, second, year = match.groups()
    else:
        return None
    try:
        return datetime(int(year), _MONTHS.index(month) + 1, int(day), int(hour), int(minute), int(second),
                        tzinfo=UTC)
    except ValueError:  # 31 Feb, 24:00:00, second 60, year 0
        return None


def retry_delay(policy: RetryPolicy, attempt: int, status: int | None,
                headers: Mapping[str, str] | None, rng: random.Random) -> float | None:
    """Seconds to wait before attempt `attempt + 1`, or None if the answer must not be retried.

    `status` None means the connection failed (no answer). Attempt count and time budget are the
    transport's to check; this decides from the answer alone.
    """
    server: float | None = None
    if status is not None:
        assert headers is not None
        # Only HTTP's spaces and tabs are padding: strip() would also take NEL and \x1c-\x1f, which
        # JavaScript's trim() keeps, so `false\x85` would stop one helper and not the other.
        should = headers.get("x-should-retry", "").strip(" \t").lower()
        forced = should == "true" and status >= 400  # the OpenAI SDKs' rule, for errors only
        if status not in policy.statuses and not forced:
            return None
        server = server_delay_s(headers)
        if should == "false" and (server is None or policy.max_retry_after_s <= _PROXY_RETRY_AFTER_CAP_S):
            # With a wait, `false` is the proxy's "longer than it may say in Retry-After (60 s)": a
            # policy that accepts longer waits (a bulk job) comes back after the wait it was told,
            # within its `max_retry_after_s` like any other wait (below).
            return None
    if server is not None:
        if server > policy.max_retry_after_s:
            return None
        return server + rng.uniform(0, server * policy.retry_after_jitter)
    ceiling = min(policy.backoff_max_s, policy.backoff_base_s * 2 ** min(attempt - 1, 62))
    return rng.uniform(0, ceiling)


def _replayable(request: httpx.Request) -> bool:
    """Whether the body can be sent again: bytes (json=, content=bytes, no body) are, iterators not."""
    return isinstance(request.stream, httpx.ByteStream)


def _path(request: httpx.Request) -> str:
    """The request's path for a log line: percent-encoded ASCII, no query string, bounded."""
    raw = request.url.raw_path.split(b"?", 1)[0].decode("ascii", "replace")
    return raw[:_MAX_LOGGED_PATH]


class _Retrying:
    """What the sync and async transports share: the policy, the budget check and the log line."""

    def __init__(self, policy: RetryPolicy | None, seed: int | None) -> None:
        self.policy = policy or RetryPolicy()
        self.last_limits: ServiceLimits | None = None
        """The `X-Service-Limits` of the latest answer that carried one (see `limits`)."""
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()

    def _plan(self, request: httpx.Request, attempt: int, started: float,
              response: httpx.Response | None, timeouts: int) -> float | None:
        """Seconds to wait before trying again, or None to give the answer (or error) to the caller.
        `timeouts`: the 504 answers this request has had, this one included."""
        if response is not None:
            seen = limits(response)
            if seen is not None:
                self.last_limits = seen
        if attempt >= self.policy.max_attempts or not _replayable(request):
            return None
        if timeouts > self.policy.max_timeout_retries:
            return None
        with self._rng_lock:
            delay = retry_delay(self.policy, attempt, None if response is None else response.status_code,
                                None if response is None else response.headers, self._rng)
        if delay is None or time.monotonic() - started + delay > self.policy.max_total_s:
            return None
        log.info("retrying %s %s in %.2f s after %s (attempt %d of %d)", request.method, _path(request),
                 delay, "a connection failure" if response is None else f"status {response.status_code}",
                 attempt + 1, self.policy.max_attempts)
        return delay


class RetryTransport(_Retrying, httpx.BaseTransport):
    """An httpx transport that retries what a shared service asks to be retried (see `RetryPolicy`).

    The answer is returned as soon as its headers arrive: a streaming body is never buffered, and once
    returned it is never retried. Give transport options (TLS, limits, proxies) to the inner transport:
    httpx ignores a client's own when a transport is given.
    """

    def __init__(self, transport: httpx.BaseTransport | None = None, *,
                 policy: RetryPolicy | None = None, seed: int | None = None) -> None:
        _Retrying.__init__(self, policy, seed)
        self.inner = transport or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        started = time.monotonic()
        attempt = 1
        timeouts = 0
        while True:
            try:
                response = self.inner.handle_request(request)
            except httpx.ConnectError:
                delay = self._plan(request, attempt, started, None, timeouts)
                if delay is None:
                    raise
            else:
                timeouts += response.status_code == 504
                delay = self._plan(request, attempt, started, response, timeouts)
                if delay is None:
                    return response
                response.close()
            time.sleep(delay)
            attempt += 1

    def close(self) -> None:
        self.inner.close()


class AsyncRetryTransport(_Retrying, httpx.AsyncBaseTransport):
    """The async twin of `RetryTransport` (same policy), for `ollama.AsyncClient` and `httpx.AsyncClient`.
    Cancelling the caller during a wait cancels the wait; nothing is held meanwhile."""

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None, *,
                 policy: RetryPolicy | None = None, seed: int | None = None) -> None:
        _Retrying.__init__(self, policy, seed)
        self.inner = transport or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        started = time.monotonic()
        attempt = 1
        timeouts = 0
        while True:
            try:
                response = await self.inner.handle_async_request(request)
            except httpx.ConnectError:
                delay = self._plan(request, attempt, started, None, timeouts)
                if delay is None:
                    raise
            else:
                timeouts += response.status_code == 504
                delay = self._plan(request, attempt, started, response, timeouts)
                if delay is None:
                    return response
                await response.aclose()
            await asyncio.sleep(delay)
            attempt += 1

    async def aclose(self) -> None:
        await self.inner.aclose()
