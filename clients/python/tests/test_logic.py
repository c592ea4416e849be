"""The pure parts of shared-ollama-client (no network): the retry decision, header parsing and chunking.
Run with `python -m pytest clients/python/tests`; the proxy-level tests are tests/test_client_helpers.py."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from shared_ollama_client import (
    RetryPolicy,
    chunk_text,
    estimate_tokens,
    limits,
    parse_limits,
    retry_delay,
    server_delay_s,
)


def test_server_delay_prefers_milliseconds_then_seconds_then_dates() -> None:
    assert server_delay_s({"retry-after-ms": "250", "retry-after": "7"}) == 0.25
    assert server_delay_s({"retry-after-ms": "soon", "retry-after": "7"}) == 7.0
    assert server_delay_s({"retry-after-ms": "-5", "retry-after": "2.5"}) == 2.5
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert server_delay_s({"retry-after": format_datetime(now + timedelta(seconds=30), usegmt=True)},
                          now) == 30.0
    assert server_delay_s({"retry-after": format_datetime(now - timedelta(seconds=30), usegmt=True)},
                          now) == 0.0
    # RFC 9110's three date forms, and only those (the TypeScript helper's grammar: both wait alike)
    for form in ("Thu, 01 Jan 2026 00:00:30 GMT", "Thursday, 01-Jan-26 00:00:30 GMT",
                 "Thu Jan  1 00:00:30 2026"):
        assert server_delay_s({"retry-after": form}, now) == 30.0, form
    in_2076 = (datetime(2076, 1, 1, 0, 0, 30, tzinfo=UTC) - now).total_seconds()
    assert server_delay_s({"retry-after": "Friday, 01-Jan-76 00:00:30 GMT"}, now) == in_2076
    # 2077 is over 50 years on: 1977, a past date
    assert server_delay_s({"retry-after": "Saturday, 01-Jan-77 00:00:30 GMT"}, now) == 0.0
    for bad in ("Thu, 01 Jan 2026 00:00:30 +0000", "Thu, 01 Jan 2026 00:00:30 EST",
                "Thu, 01 Jan 2026 00:00:30", "Thu, 1 Jan 2026 00:00:30 GMT", "thu, 01 jan 2026 00:00:30 gmt",
                "Thu, 31 Feb 2026 00:00:30 GMT", "Thu, 01 Jan 2026 00:00:60 GMT",
                "Sat, 01 Jan 0000 00:00:00 GMT", "Thu, 01 Jan \u0662026 00:00:30 GMT"):
        assert server_delay_s({"retry-after": bad}, now) is None, bad
    for bad in ("", "nan", "inf", "-1", "tomorrow", "0x10", "0b11", "1_000", "\u0663", "3\u00a0"):
        assert server_delay_s({"retry-after": bad}) is None, bad
    assert server_delay_s({"retry-after": " 1e1\t"}) == 10.0 and server_delay_s({"retry-after": ".5"}) == 0.5
    for bad in ("0x10", "1_000", "inf", ""):  # not a number: Retry-After instead
        assert server_delay_s({"retry-after-ms": bad, "retry-after": "7"}) == 7.0, bad
    assert server_delay_s({}) is None


def test_retry_decision() -> None:
    policy = RetryPolicy(retry_after_jitter=0.1)
    rng = random.Random(1)
    assert retry_delay(policy, 1, 200, {}, rng) is None
    assert retry_delay(policy, 1, 500, {}, rng) is None
    assert retry_delay(policy, 1, 500, {"x-should-retry": "true"}, rng) is not None
    assert retry_delay(policy, 1, 200, {"x-should-retry": "true"}, rng) is None
    assert retry_delay(policy, 1, 429, {"x-should-retry": "false", "retry-after": "1"}, rng) is None
    assert retry_delay(policy, 1, 429, {"retry-after": "61"}, rng) is None  # a refusal, not a wait
    # A bulk policy that accepts long waits comes back after the proxy's capped wait; never after a
    # `false` without a wait (a request that cannot succeed), nor for a status it does not retry.
    bulk = RetryPolicy(max_retry_after_s=600, retry_after_jitter=0.0)
    capped = {"x-should-retry": "false", "retry-after": "60", "retry-after-ms": "60000"}
    assert retry_delay(bulk, 1, 503, capped, rng) == 60.0
    assert retry_delay(policy, 1, 503, capped, rng) is None
    assert retry_delay(bulk, 1, 400, {"x-should-retry": "false"}, rng) is None
    assert retry_delay(bulk, 1, 429, {"x-should-retry": "false"}, rng) is None
    assert retry_delay(bulk, 1, 400, capped, rng) is None
    # `false` never loosens the bound: a told wait over the bulk policy's own max_retry_after_s is
    # still a refusal to surface, whatever budget is left (a server other than the proxy may say it).
    for told in ({"retry-after": "601"}, {"retry-after-ms": "99999000"}):
        assert retry_delay(bulk, 1, 429, {**told, "x-should-retry": "false"}, rng) is None
        assert retry_delay(bulk, 1, 429, told, rng) is None
    for _ in range(100):
        told = retry_delay(policy, 1, 429, {"retry-after": "2"}, rng)
        assert told is not None and 2.0 <= told <= 2.2
        backoff = retry_delay(policy, 4, 503, {}, rng)  # no hint: full jitter under 0.5 * 2**3
        assert backoff is not None and 0 <= backoff <= 4.0
        assert (retry_delay(policy, 40, None, None, rng) or 0) <= 8.0  # capped
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    for count in ({"max_attempts": 2.5}, {"max_attempts": True}, {"max_timeout_retries": 0.5}):
        with pytest.raises(ValueError, match="whole number"):
            RetryPolicy(**count)  # type: ignore[arg-type]
    whole = RetryPolicy(max_attempts=3.0)  # type: ignore[arg-type]  # a whole number, as in TypeScript
    assert whole.max_attempts == 3 and isinstance(whole.max_attempts, int)
    with pytest.raises(ValueError):
        RetryPolicy(max_total_s=float("nan"))


def test_limits_parsing_is_versioned_and_bounded() -> None:
    parsed = parse_limits("v=1; max_body_bytes=33554432; max_prompt_tokens=4096; deadline_s=120; "
                          "requests_per_minute=600; future_key=abc")
    assert parsed is not None and parsed.understood and parsed.version == 1
    assert (parsed.max_body_bytes, parsed.max_prompt_tokens, parsed.deadline_s,
            parsed.requests_per_minute) == (33554432, 4096, 120.0, 600.0)
    assert parsed.number("tokens_per_minute") is None and parsed.number("future_key") is None
    assert parsed.raw["future_key"] == "abc"  # unknown keys kept, as strings
    newer = parse_limits("v=2; max_prompt_tokens=4096")
    assert newer is not None and not newer.understood and newer.max_prompt_tokens is None
    assert parse_limits("max_prompt_tokens=4096") is None and parse_limits("v=x") is None
    junk = parse_limits("v=1; " + "; ".join(f"k{i}=1" for i in range(1000)) + "; bad key=1; x=<script>")
    assert junk is not None and len(junk.raw) == 64
    assert limits({"X-Service-Limits": "v=1; deadline_s=5"}).deadline_s == 5.0  # type: ignore[union-attr]
    assert limits({}) is None
    # Values the syntax lets through but that are no number: None, never an exception from a property.
    odd = parse_limits("v=1; max_body_bytes=nan; max_prompt_tokens=inf; deadline_s=1e999; "
                       "requests_per_minute=-Infinity")
    assert odd is not None and len(odd.raw) == 4
    assert (odd.max_body_bytes, odd.max_prompt_tokens, odd.deadline_s, odd.requests_per_minute) == (
        None, None, None, None)
    # One number grammar with the TypeScript helper: no `1_000`, `0x10`; counts only whole.
    other = parse_limits("v=1; max_body_bytes=1_000; max_prompt_tokens=0x10; deadline_s=1.5e1; "
                         "requests_per_minute=+600")
    assert other is not None and (other.max_body_bytes, other.max_prompt_tokens) == (None, None)
    assert (other.deadline_s, other.requests_per_minute) == (15.0, 600.0)
    # over 4096 characters: the part the bound cuts through is dropped, not read as a smaller number
    long = "v=1; " + "junk; " * 679 + "max_body_bytes=33554432"
    assert len(long) == 4102
    cut = parse_limits(long)
    assert cut is not None and cut.max_body_bytes is None
    kept = parse_limits("v=1; max_body_bytes=7; " + "j" * 5000)
    assert kept is not None and kept.max_body_bytes == 7
    assert parse_limits("v=" + "1" * 5000) is None
    fraction = parse_limits("v=1; max_body_bytes=1.9; max_prompt_tokens=4096.0")
    assert fraction is not None and (fraction.max_body_bytes, fraction.max_prompt_tokens) == (None, 4096)
    for version in ("v=+1", "v= 1", "v=-1", "v=1_0", "v=\u0661", "v=1234567890123456"):
        assert parse_limits(version + "; max_body_bytes=1") is None, version


def test_chunking_boundaries() -> None:
    assert chunk_text("", 10) == [] and chunk_text(" \n\n ", 10) == []
    text = "One two three.\n\nFour five six.\n\nSeven eight nine."

    def words(s: str) -> int:
        return len(s.split())

    assert chunk_text(text, 6, count_tokens=words) == [
        "One two three.\n\nFour five six.", "Seven eight nine."]
    # A paragraph over the limit is split at sentences, then at words.
    long = "Alpha beta gamma delta. Epsilon zeta eta. Theta iota kappa lambda mu nu xi omicron."
    assert chunk_text(long, 4, count_tokens=words) == [
        "Alpha beta gamma delta.", "Epsilon zeta eta.", "Theta iota kappa lambda", "mu nu xi omicron."]
    # Overlap repeats the last whole units that fit in it.
    assert chunk_text("A b. C d. E f. G h.", 4, overlap=2, count_tokens=words) == [
        "A b. C d.", "C d. E f.", "E f. G h."]
    assert chunk_text("\u4e00\u4e8c\u3002\u4e09\u56db\u3002", 1, count_tokens=len) != []
    with pytest.raises(ValueError):
        chunk_text(text, 10, overlap=10)
    with pytest.raises(ValueError):
        chunk_text(text, 0)


def test_estimate() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("hello, world") == 2 + 1 + 2  # ceil(5/3) + "," + ceil(5/3)
    assert estimate_tokens("a\n\n    b") == 3
    assert estimate_tokens("x" * 3000) == 1000
