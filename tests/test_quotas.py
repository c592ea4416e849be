"""The `quotas` step: requests per minute, tokens per minute (reserve, settle, refund) and concurrency per
tenant, with Retry-After and X-RateLimit headers, in memory and shared by two proxy processes via Redis,
including a dead proxy's leases coming back; a request larger than the whole budget is a final 400,
listing routes spend nothing, and every decision names its limits."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import pytest

from proxy.state.base import BucketAsk, LeaseAsk, StateBackend
from proxy.state.failover import FailoverState
from proxy.state.memory import MemoryState
from proxy.state.redis import RedisState
from tests.support.metrics import metric
from tests.support.polling import until, wait_for
from tests.support.redis_server import RedisServer
from tests.support.servers import Server, free_port, start_emulator, start_proxy

ADMIN, RPM, TPM, CONC, ALL = "sk-admin", "sk-rpm", "sk-tpm", "sk-conc", "sk-all"
TENANTS = [
    {"name": "rpm", "keys": [RPM], "requests_per_minute": 3},
    {"name": "tpm", "keys": [TPM], "tokens_per_minute": 600},
    {"name": "conc", "keys": [CONC], "max_concurrent": 1},
    {"name": "all", "keys": [ALL], "requests_per_minute": 120, "tokens_per_minute": 6000,
     "max_concurrent": 2},
]


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quotas")


@pytest.fixture(scope="module")
def emulator(tmp: Path) -> Iterator[Server]:
    server = start_emulator(tmp, fixed_clock=False, decode_tokens_per_s=40, output_tokens="20,20",
                            name="quota-emu")
    yield server
    server.stop()


def _proxy(tmp: Path, emulator: Server, name: str, **extra: Any) -> Server:
    return start_proxy(tmp, [emulator.url], {"admin": {"keys": [ADMIN]}, "tenants": TENANTS,
                                             **extra}, name=name)


def _quotas(proxy: Server) -> dict[str, Any]:
    return dict(httpx.get(f"{proxy.url}/system/quotas", headers=_auth(ADMIN)).json()["tenants"])


def _chat(proxy: Server, key: str, **options: Any) -> httpx.Response:
    return httpx.post(f"{proxy.url}/api/chat", headers=_auth(key), timeout=30, json={
        "model": "llama3.2", "stream": False, "options": options,
        "messages": [{"role": "user", "content": "hello there"}]})


def test_requests_per_minute(tmp: Path, emulator: Server) -> None:
    proxy = _proxy(tmp, emulator, "rpm")
    try:
        answers = [_chat(proxy, RPM) for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        assert answers[0].headers["x-ratelimit-limit"] == "3"
        assert answers[0].headers["x-ratelimit-remaining"] == "2"
        refused = answers[3]
        assert refused.json()["code"] == "rate_limited" and "3 requests per minute" in refused.json()[
            "error"]
        assert 1 <= int(refused.headers["retry-after"]) <= 20  # one request refills in 20 s
        assert refused.json()["retry_after_s"] == int(refused.headers["retry-after"])
        assert "requests_per_minute=3" in refused.headers["x-service-limits"]
        assert _chat(proxy, TPM).status_code == 200  # other tenants are not affected
    finally:
        proxy.stop()


def test_tokens_reserved_then_settled(tmp: Path, emulator: Server) -> None:
    proxy = _proxy(tmp, emulator, "tpm")
    try:
        first = _chat(proxy, TPM, num_predict=20)
        assert first.status_code == 200
        used = first.json()["prompt_eval_count"] + first.json()["eval_count"]
        remaining = _quotas(proxy)["tpm"]["tokens_per_minute"]["remaining"]
        assert 600 - used - 1 <= remaining <= 600 - used + 15  # settled to the real count (+ refill)
        before = _quotas(proxy)["tpm"]["tokens_per_minute"]["remaining"]
        too_big = _chat(proxy, TPM, num_predict=5000)
        # It can never fit the bucket: final (400, x-should-retry: false, no Retry-After), not a 429.
        assert too_big.status_code == 400 and too_big.json()["code"] == "request_exceeds_quota"
        assert too_big.headers["x-should-retry"] == "false"
        assert "retry-after" not in too_big.headers and "retry_after_s" not in too_big.json()
        message = too_big.json()["error"]
        assert "more than tenant tpm's whole budget of 600 tokens per minute" in message
        assert f"reserves {5000 + first.json()['prompt_eval_count']} tokens" in message
        assert too_big.headers["x-ratelimit-limit-tokens"] == "600"
        assert _quotas(proxy)["tpm"]["tokens_per_minute"]["remaining"] >= before  # nothing taken
        # Reservations stack while requests run: ten at once reserve ~10 x 110 tokens of a 600 bucket,
        # so some are refused whatever the machine's speed (a sequential loop may refill as it goes).
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(lambda _: _chat(proxy, TPM, num_predict=100), range(10)))
        refused = [a for a in answers if a.status_code == 429]
        assert refused and all(a.status_code in (200, 429) for a in answers)
        response = refused[0]
        assert response.json()["code"] == "quota_exceeded"
        assert 1 <= int(response.headers["retry-after"]) <= 60
    finally:
        proxy.stop()


def test_a_num_predict_sent_as_a_float_is_reserved_as_ollama_reads_it(tmp: Path,
                                                                       emulator: Server) -> None:
    """Ollama reads options.num_predict 5000.0 as 5000 (a float into its int option): the reservation
    is 5000 too. It was the default output (256), so a tenant of 600 tokens a minute had a request that
    may produce 5000 admitted."""
    proxy = _proxy(tmp, emulator, "tpm-float")
    try:
        as_int = _chat(proxy, TPM, num_predict=5000).json()["error"]
        assert "reserves 50" in as_int
        for value in (5000.0, 5000.7):
            too_big = _chat(proxy, TPM, num_predict=value)
            assert too_big.status_code == 400, (value, too_big.status_code)
            assert too_big.json()["code"] == "request_exceeds_quota"
            assert too_big.json()["error"] == as_int
        fits = _chat(proxy, TPM, num_predict=20.0)
        assert fits.status_code == 200
        assert fits.json()["eval_count"] <= 20
    finally:
        proxy.stop()


async def test_concurrency_and_release_on_disconnect(tmp: Path, emulator: Server) -> None:
    proxy = await asyncio.to_thread(_proxy, tmp, emulator, "conc")
    try:
        body = {"model": "llama3.2", "prompt": "a long story", "options": {"num_predict": 20}}
        async with aiohttp.ClientSession(headers=_auth(CONC)) as session:
            response = await session.post(f"{proxy.url}/api/generate", json=body)
            await response.content.readline()  # streaming: the lease is held
            second = await session.post(f"{proxy.url}/api/generate", json=body)
            assert second.status == 429 and (await second.json())["code"] == "rate_limited"
            assert int(second.headers["Retry-After"]) >= 1
            response.close()  # the client leaves mid-stream: the lease must come back at once
            await until(lambda: _quotas(proxy)["conc"]["in_flight"] == 0, 5, "the lease back")
            third = await session.post(f"{proxy.url}/api/generate", json={**body, "stream": False})
            assert third.status == 200
        in_flight = (await asyncio.to_thread(_quotas, proxy))["conc"]["in_flight"]
        assert in_flight == 0
    finally:
        await asyncio.to_thread(proxy.stop)


PROMPT_KEY = "sk-prompt"
PROMPT_TENANT = {"name": "prompt", "keys": [PROMPT_KEY], "tokens_per_minute": 400}
"""400 tokens a minute: refills ~7 a second, slowly enough to tell a refund from a refill."""
LONG_PROMPT = " ".join(["hello"] * 50)


async def test_client_gone_after_its_request_reached_a_replica_pays_its_prompt(
        tmp: Path, emulator: Server) -> None:
    """The replica worked for a client that left before the first byte: the output it reserved comes
    back, its prompt does not (leaving just before the answer again and again is not free)."""
    slow = await asyncio.to_thread(start_emulator, tmp, fixed_clock=False, load_s=2.0, name="cold")
    proxy = await asyncio.to_thread(start_proxy, tmp, [slow.url], {
        "admin": {"keys": [ADMIN]}, "tenants": [*TENANTS, PROMPT_TENANT]}, name="abandoned")
    try:
        async with aiohttp.ClientSession(headers=_auth(PROMPT_KEY)) as session:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):  # gone while the replica loads the model
                    await session.post(f"{proxy.url}/api/generate", json={
                        "model": "llama3.2", "prompt": LONG_PROMPT, "options": {"num_predict": 200}})

        def remaining() -> float:
            return float(_quotas(proxy)["prompt"]["tokens_per_minute"]["remaining"])

        # Held while it runs: 400 - (prompt + 200), about 50. Settled (polled: the proxy sees the
        # client leave a moment later): the 200 output tokens back, the prompt's ~150 kept. A refill
        # alone would take 20 s to get there; a full refund would show 400.
        await until(lambda: remaining() >= 200, 5, "the unused output refunded")
        charged = 400 - remaining()
        assert 60 <= charged <= 200, charged  # the prompt (less what refilled since, ~7 a second)
    finally:
        await asyncio.to_thread(proxy.stop)
        await asyncio.to_thread(slow.stop)


async def test_a_deadline_passed_after_the_request_reached_a_replica_pays_its_prompt(
        tmp: Path, emulator: Server) -> None:
    """The same for a request whose deadline passed before the first byte (504): lowering it with
    X-Deadline-S is no way around the charge either."""
    slow = await asyncio.to_thread(start_emulator, tmp, fixed_clock=False, load_s=2.0, name="cold")
    proxy = await asyncio.to_thread(start_proxy, tmp, [slow.url], {
        "admin": {"keys": [ADMIN]}, "tenants": [*TENANTS, PROMPT_TENANT]}, name="deadline")
    try:
        body = {"model": "llama3.2", "prompt": LONG_PROMPT, "options": {"num_predict": 200}}
        async with aiohttp.ClientSession(headers=_auth(PROMPT_KEY)) as session, session.post(
                f"{proxy.url}/api/generate", json=body, headers={"X-Deadline-S": "0.5"}) as response:
            assert response.status == 504
            assert response.headers["x-should-retry"] == "false"  # the same deadline would cut it again
        remaining = float(_quotas(proxy)["prompt"]["tokens_per_minute"]["remaining"])
        assert 60 <= 400 - remaining <= 200, remaining  # the prompt (~150), not the 200 reserved
    finally:
        await asyncio.to_thread(proxy.stop)
        await asyncio.to_thread(slow.stop)


async def test_client_gone_before_its_request_reached_a_replica_gets_everything_back(
        tmp: Path, emulator: Server) -> None:
    """Left while queued for the replica's one slot: nothing was asked of the replica, nothing is
    charged."""
    slow = await asyncio.to_thread(start_emulator, tmp, fixed_clock=False, load_s=2.0, name="cold")
    proxy = await asyncio.to_thread(start_proxy, tmp, [{"url": slow.url, "num_parallel": 1}], {
        "admin": {"keys": [ADMIN]}, "tenants": [*TENANTS, PROMPT_TENANT]}, name="queued")
    try:
        async with aiohttp.ClientSession() as session:
            # Another tenant's request holds the only slot while the model loads.
            first = asyncio.create_task(session.post(
                f"{proxy.url}/api/generate", headers=_auth(ALL),
                json={"model": "llama3.2", "prompt": "hi", "stream": False,
                      "options": {"num_predict": 2}}))
            await until(lambda: _quotas(proxy)["all"]["in_flight"] == 1, 5, "the slot taken")
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    await session.post(f"{proxy.url}/api/generate", headers=_auth(PROMPT_KEY),
                                       json={"model": "llama3.2", "prompt": LONG_PROMPT,
                                             "options": {"num_predict": 100}})
            # The whole reservation back at once (a refill would take ~40 s).
            await until(lambda: _quotas(proxy)["prompt"]["tokens_per_minute"]["remaining"] >= 399,
                        5, "the reservation refunded")
            async with await first as response:
                assert response.status == 200
    finally:
        await asyncio.to_thread(proxy.stop)
        await asyncio.to_thread(slow.stop)


@pytest.mark.parametrize("fault", [
    {"status": 503},  # Ollama's "server busy": its queue was full, nothing was done
    {"status": 500, "message": "llama runner process has terminated: exit status 2"},
], ids=["busy", "runner_error"])
def test_a_replica_that_refuses_or_fails_charges_nothing(tmp: Path, fault: dict[str, Any]) -> None:
    """A replica's own error answer (relayed whole, with no counts) produced nothing: the whole
    reservation comes back, as for a replica that could not be reached (before: the prompt was charged,
    as if the client had left a replica working for it)."""
    failing = start_emulator(tmp, fixed_clock=False, name="refusing")
    proxy = start_proxy(tmp, [failing.url], {
        "admin": {"keys": [ADMIN]}, "tenants": [*TENANTS, PROMPT_TENANT]}, name="refused")
    try:
        httpx.post(f"{failing.url}/_emulator/faults", json=fault).raise_for_status()
        answer = httpx.post(f"{proxy.url}/api/generate", headers=_auth(PROMPT_KEY), timeout=10,
                            json={"model": "llama3.2", "prompt": LONG_PROMPT, "stream": False,
                                  "options": {"num_predict": 200}})
        assert answer.status_code == fault["status"], answer.text
        # Settled right after the answer went out; ~150 of prompt were kept before (a refill of that
        # takes ~20 s).
        wait_for(lambda: _quotas(proxy)["prompt"]["tokens_per_minute"]["remaining"] >= 399, 3,
                 "the whole reservation back")
    finally:
        proxy.stop()
        failing.stop()


def test_shadow_mode(tmp: Path, emulator: Server) -> None:
    proxy = _proxy(tmp, emulator, "quota-shadow", chain={"quotas": {"mode": "shadow"}})
    try:
        answers = [_chat(proxy, RPM) for _ in range(4)]
        assert [a.status_code for a in answers] == [200, 200, 200, 200]
        assert answers[3].headers["x-shadow-decision"] == "quotas=rate_limited"
        assert "x-shadow-decision" not in answers[0].headers
    finally:
        proxy.stop()


def test_quota_holds_across_two_proxies_sharing_redis(tmp: Path, emulator: Server,
                                                       redis_server: RedisServer) -> None:
    state = {"backend": "redis", "url": redis_server.url, "key_prefix": "sop-shared:"}
    first = _proxy(tmp, emulator, "redis-a", state=state)
    second = _proxy(tmp, emulator, "redis-b", state=state)
    try:
        statuses = [_chat(proxy, RPM).status_code for proxy in (first, second, first, second, first)]
        assert statuses == [200, 200, 200, 429, 429]
        assert _quotas(second)["rpm"]["requests_per_minute"]["remaining"] < 1
    finally:
        first.stop()
        second.stop()


async def test_dead_proxys_lease_expires(tmp: Path, emulator: Server,
                                         redis_server: RedisServer) -> None:
    state = {"backend": "redis", "url": redis_server.url, "key_prefix": "sop-lease:"}
    chain = {"quotas": {"lease_ttl_s": 1.5}}
    doomed = await asyncio.to_thread(_proxy, tmp, emulator, "doomed", state=state, chain=chain)
    survivor = await asyncio.to_thread(_proxy, tmp, emulator, "survivor", state=state, chain=chain)
    try:
        body = {"model": "llama3.2", "prompt": "long", "options": {"num_predict": 20}}
        async with aiohttp.ClientSession(headers=_auth(CONC)) as session:
            held = await session.post(f"{doomed.url}/api/generate", json=body)
            await held.content.readline()
            await asyncio.to_thread(doomed.kill)  # dies holding the tenant's only lease
            refused = await session.post(f"{survivor.url}/api/generate", json={**body, "stream": False})
            assert refused.status == 429
            deadline = time.monotonic() + 5
            while True:
                retry = await session.post(f"{survivor.url}/api/generate",
                                           json={**body, "stream": False})
                if retry.status == 200:
                    break
                assert time.monotonic() < deadline, "the dead proxy's lease never expired"
                await asyncio.sleep(0.25)
    finally:
        await asyncio.to_thread(survivor.stop)


@pytest.mark.parametrize("backend", ["memory", "redis", "failover"])
async def test_state_backends_agree(backend: str, redis_server: RedisServer) -> None:
    state: StateBackend = MemoryState()
    if backend == "redis":
        state = RedisState(redis_server.url, f"sop-{backend}:")
    elif backend == "failover":  # what the proxy builds for Redis: the same answers while Redis is up
        state = FailoverState(RedisState(redis_server.url, f"sop-{backend}:"), failure_mode="closed")
    await state.start()
    try:
        taken = [await state.take("b", 3, 0.001, 1) for _ in range(4)]
        assert [t.ok for t in taken] == [True, True, True, False]
        assert taken[3].retry_after_s == pytest.approx(1000, rel=0.05)
        assert await state.adjust("b", 3, 0.001, 2) == pytest.approx(2, abs=0.01)
        assert await state.adjust("b", 3, 0.001, 10) == pytest.approx(3, abs=0.01)  # capped
        assert await state.adjust("b", 3, 0.001, -5) == pytest.approx(-2, abs=0.01)  # debt
        assert (await state.lease("l", 2, "a", 5))[0] and (await state.lease("l", 2, "b", 5))[0]
        assert await state.lease("l", 2, "c", 5) == (False, 2)
        await state.release("l", "a")
        assert await state.holders("l") == 1
        assert (await state.lease("l", 2, "short", 0.2))[0]
        await asyncio.sleep(0.35)  # time passing: the 0.2 s lease outlives nothing
        assert await state.holders("l") == 1  # the short lease expired by itself
    finally:
        await state.close()


@pytest.mark.parametrize("backend", ["memory", "redis", "failover"])
async def test_admit_is_all_or_nothing_and_settle_trues_up(backend: str,
                                                            redis_server: RedisServer) -> None:
    """state.admit takes the lease and every bucket or nothing (Redis: one script, one round trip);
    state.settle gives the lease back and adjusts the buckets in one call."""
    state: StateBackend = MemoryState()
    if backend == "redis":
        state = RedisState(redis_server.url, f"sop-admit-{backend}:")
    elif backend == "failover":
        state = FailoverState(RedisState(redis_server.url, f"sop-admit-{backend}:"),
                              failure_mode="closed")
    await state.start()
    rpm, tpm = BucketAsk("rpm", 2, 0.001, 1), BucketAsk("tpm", 100, 0.001, 60)
    try:
        first = await state.admit(LeaseAsk("in", 2, "h1", 5), [rpm, tpm])
        assert first.ok and first.lease == (True, 1)
        assert [round(b.remaining) for b in first.buckets] == [1, 40]
        # The token bucket refuses: the lease and the request bucket stay as they were.
        refused = await state.admit(LeaseAsk("in", 2, "h2", 5), [rpm, tpm])
        assert not refused.ok and refused.lease == (True, 1)  # grantable, not held: 1 holder
        assert [b.ok for b in refused.buckets] == [True, False]
        assert refused.buckets[1].retry_after_s == pytest.approx(20_000, rel=0.05)
        assert await state.holders("in") == 1
        assert await state.level("rpm", 2, 0.001) == pytest.approx(1, abs=0.01)
        assert await state.level("tpm", 100, 0.001) == pytest.approx(40, abs=0.01)
        # The lease refuses: every bucket is reported as it stands (the caller's Retry-After is the
        # longest wait of all the limits that refuse), and nothing is taken.
        full = await state.admit(LeaseAsk("in", 1, "h3", 5), [rpm, tpm])
        assert full.lease == (False, 1) and not full.ok
        assert [(b.ok, round(b.remaining)) for b in full.buckets] == [(True, 1), (False, 40)]
        assert full.buckets[1].retry_after_s == pytest.approx(20_000, rel=0.05)
        assert await state.level("rpm", 2, 0.001) == pytest.approx(1, abs=0.01)
        assert await state.level("tpm", 100, 0.001) == pytest.approx(40, abs=0.01)
        # The request bucket refuses first: the token bucket after it is reported too.
        both = await state.admit(None, [BucketAsk("rpm", 2, 0.001, 2), tpm])
        assert [(b.ok, round(b.remaining)) for b in both.buckets] == [(False, 1), (False, 40)]
        assert both.buckets[0].retry_after_s == pytest.approx(1_000, rel=0.05)
        assert both.buckets[1].retry_after_s == pytest.approx(20_000, rel=0.05)
        # Settle: the lease back, the request refunded, 30 of the 60 tokens reserved came back unused.
        await state.settle(("in", "h1"), [BucketAsk("rpm", 2, 0.001, 1),
                                          BucketAsk("tpm", 100, 0.001, 30)])
        assert await state.holders("in") == 0
        assert await state.level("rpm", 2, 0.001) == pytest.approx(2, abs=0.01)
        assert await state.level("tpm", 100, 0.001) == pytest.approx(70, abs=0.01)
        no_lease = await state.admit(None, [BucketAsk("rpm", 2, 0.001, 1)])
        assert no_lease.ok and no_lease.lease is None
        # renew_many (one pipeline on Redis) keeps short leases alive past their first expiry.
        assert (await state.lease("r", 3, "x", 0.3))[0] and (await state.lease("r", 3, "y", 0.3))[0]
        await state.renew_many([("r", "x"), ("r", "y")], 5)
        await asyncio.sleep(0.5)
        assert await state.holders("r") == 2
    finally:
        await state.close()


def test_request_over_the_whole_budget_is_not_retried_by_the_openai_sdk(tmp: Path,
                                                                         emulator: Server) -> None:
    proxy = _proxy(tmp, emulator, "tpm-openai")
    try:
        client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=TPM, max_retries=2)
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(model="llama3.2", max_tokens=5000,
                                           messages=[{"role": "user", "content": "hi"}])
        assert raised.value.code == "request_exceeds_quota"
        # One request reached the proxy: the SDK did not retry.
        assert metric(proxy.url, "sop_quotas_decisions_total", decision="rejected") == 1
    finally:
        proxy.stop()


def test_listing_and_metadata_routes_spend_no_quota(tmp: Path, emulator: Server) -> None:
    proxy = _proxy(tmp, emulator, "exempt")
    try:
        with httpx.Client(base_url=proxy.url, headers=_auth(RPM), timeout=30) as client:
            for _ in range(2):  # more than the tenant's 3 requests per minute in all
                answers = [client.get("/"), client.head("/"), client.get("/api/tags"),
                           client.get("/api/ps"), client.get("/api/version"), client.get("/v1/models"),
                           client.get("/v1/models/llama3.2"),
                           client.post("/api/show", json={"model": "llama3.2"})]
                assert [a.status_code for a in answers] == [200] * len(answers)
                assert not any("x-ratelimit-limit" in a.headers for a in answers)
        assert _quotas(proxy)["rpm"]["requests_per_minute"]["remaining"] >= 2.99
        assert [_chat(proxy, RPM).status_code for _ in range(4)] == [200, 200, 200, 429]
        assert metric(proxy.url, "sop_quotas_decisions_total", decision="exempt") == 16
        # Inference is never exempt, whatever the method looks like to a listing check.
        assert httpx.post(f"{proxy.url}/api/tags", headers=_auth(RPM)).status_code == 429
    finally:
        proxy.stop()


async def test_every_decision_names_its_limits(tmp: Path) -> None:
    # Streams of 100 tokens at 20 per second stay open for seconds while the next requests are checked.
    slow = await asyncio.to_thread(start_emulator, tmp, fixed_clock=False, decode_tokens_per_s=20,
                                   output_tokens="200,200", name="slow-emu",
                                   extra=["--num-parallel", "4"])
    proxy = await asyncio.to_thread(start_proxy, tmp, [{"url": slow.url, "num_parallel": 4}], {
        "admin": {"keys": [ADMIN]}, "tenants": TENANTS}, "headers")
    try:
        body = {"model": "llama3.2", "prompt": "a long story", "options": {"num_predict": 100}}
        async with aiohttp.ClientSession(base_url=proxy.url, headers=_auth(ALL)) as session:
            first = await session.post("/api/generate", json=body)
            await first.content.readline()
            headers = first.headers
            assert headers["X-RateLimit-Limit"] == headers["x-ratelimit-limit-requests"] == "120"
            assert headers["X-RateLimit-Remaining"] == headers["x-ratelimit-remaining-requests"] == "119"
            assert headers["X-RateLimit-Reset"] == "1" and headers["x-ratelimit-reset-requests"] == "1s"
            assert headers["x-ratelimit-limit-tokens"] == "6000"
            reserved = 6000 - int(headers["x-ratelimit-remaining-tokens"])
            assert 100 < reserved < 140  # prompt + num_predict
            # Time until full again, at 100 tokens per second (remaining was rounded down).
            assert headers["x-ratelimit-reset-tokens"] in {
                f"{math.ceil((reserved - 1) / 100)}s", f"{math.ceil(reserved / 100)}s"}
            assert headers["x-ratelimit-limit-concurrent"] == "2"
            assert headers["x-ratelimit-remaining-concurrent"] == "1"
            limits = headers["X-Service-Limits"]
            for named in ("requests_per_minute=120", "tokens_per_minute=6000", "max_concurrent=2"):
                assert named in limits
            second = await session.post("/api/generate", json=body)
            await second.content.readline()
            assert second.headers["x-ratelimit-remaining-concurrent"] == "0"
            refused = await session.post("/api/generate", json={**body, "stream": False})
            assert refused.status == 429 and (await refused.json())["code"] == "rate_limited"
            assert refused.headers["x-ratelimit-limit-concurrent"] == "2"
            assert refused.headers["x-ratelimit-remaining-concurrent"] == "0"
            assert "max_concurrent=2" in refused.headers["X-Service-Limits"]
            first.close()
            second.close()
            deadline = time.monotonic() + 10
            while (await asyncio.to_thread(_quotas, proxy))["all"]["in_flight"]:
                assert time.monotonic() < deadline, "leases of closed streams never came back"
                await asyncio.sleep(0.1)
            big = {**body, "options": {"num_predict": 3500}}
            hold = await session.post("/api/generate", json=big)  # reserves more than half
            await hold.content.readline()
            over = await session.post("/api/generate", json={**big, "stream": False})
            assert over.status == 429 and (await over.json())["code"] == "quota_exceeded"
            assert int(over.headers["x-ratelimit-remaining-tokens"]) < 3500
            assert over.headers["x-ratelimit-limit-tokens"] == "6000"
            assert over.headers["x-ratelimit-reset-tokens"].endswith("s")
            assert int(over.headers["x-ratelimit-remaining-requests"]) >= 100
            # Refused for tokens, it holds no lease: one of the two is still free (admission is all or
            # nothing, state.admit).
            assert over.headers["x-ratelimit-remaining-concurrent"] == "1"
            hold.close()
    finally:
        await asyncio.to_thread(proxy.stop)
        await asyncio.to_thread(slow.stop)


def test_a_capacity_refusal_downstream_gives_the_request_back(tmp: Path) -> None:
    """A 503 from backpressure or health says "come back in N s": the retry must not then meet a 429
    for the attempt the proxy itself turned away."""
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = start_proxy(tmp, [dead], {"admin": {"keys": [ADMIN]}, "tenants": TENANTS, "chain": {
        "health": {"probe_interval_s": 0.3, "probe_timeout_s": 0.5}}}, name="refund")
    try:
        deadline = time.monotonic() + 30
        while httpx.get(f"{proxy.url}/readyz").status_code != 503:
            assert time.monotonic() < deadline, "the dead replica was never marked down"
            time.sleep(0.1)
        answers = [_chat(proxy, RPM) for _ in range(5)]  # more than its 3 requests per minute
        assert [a.status_code for a in answers] == [503] * 5, [a.text for a in answers]
        assert all(a.json()["code"] == "no_healthy_upstream" for a in answers)
        assert _quotas(proxy)["rpm"]["requests_per_minute"]["remaining"] >= 2.9
    finally:
        proxy.stop()


@pytest.mark.parametrize("route", ["/api/generate", "/v1/chat/completions", "/v1/messages"])
async def test_leaving_just_before_the_final_line_still_pays_for_the_output(tmp: Path,
                                                                          route: str) -> None:
    """A client reads 290 streamed records of ~400 and leaves before the line with Ollama's counts:
    it is charged its prompt and one token per line (or SSE data line) relayed: neither its prompt
    alone (which let a tenant take any output for free) nor its whole reservation (1,000 output
    tokens by default here)."""
    emulator = start_emulator(tmp, fixed_clock=False, decode_tokens_per_s=1000,
                              output_tokens="400,400", name=f"leave-emu-{route.count('/')}{len(route)}")
    tpm = 5000
    proxy = start_proxy(tmp, [emulator.url], {
        "admin": {"keys": [ADMIN]}, "chain": {"quotas": {"default_output_tokens": 1000}},
        "tenants": [{"name": "leaver", "keys": ["sk-leaver"], "tokens_per_minute": tpm,
                     "max_concurrent": 4}]},
        name=f"leave-{route.count('/')}{len(route)}")
    body: dict[str, Any] = {"model": "llama3.2", "stream": True}
    if route == "/api/generate":
        body["prompt"] = "hi"
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
    if route == "/v1/messages":
        body["max_tokens"] = 1000  # required there
    try:
        before = _quotas(proxy)["leaver"]["tokens_per_minute"]["remaining"]
        started = time.monotonic()
        read = 0
        async with aiohttp.ClientSession() as session, session.post(
                f"{proxy.url}{route}", json=body, headers=_auth("sk-leaver")) as response:
            assert response.status == 200
            async for line in response.content:
                if line.startswith((b"{", b"data:")):
                    read += 1
                if read >= 290:
                    break  # gone before the final counts
        # Settled once the request let go of its concurrency lease.
        await until(lambda: _quotas(proxy)["leaver"]["in_flight"] == 0, 10, "settled")
        after = _quotas(proxy)["leaver"]["tokens_per_minute"]["remaining"]
        refilled = (time.monotonic() - started) * tpm / 60  # the bucket was below capacity meanwhile
        charged = before - after + refilled
        assert 285 <= charged <= 420, (before, after, refilled)  # not ~5, and not ~1,005
    finally:
        proxy.stop()
        emulator.stop()


def test_a_pull_spends_no_tokens_for_its_progress_lines(tmp: Path, emulator: Server) -> None:
    """Only routes that generate are charged per record: a pull's progress lines are not tokens."""
    proxy = start_proxy(tmp, [emulator.url], {"admin": {"keys": [ADMIN]}, "tenants": [
        {"name": "ops", "keys": ["sk-ops"], "tokens_per_minute": 6000, "allow_management": True}]},
        name="pull-tokens")
    try:
        before = _quotas(proxy)["ops"]["tokens_per_minute"]["remaining"]
        pulled = httpx.post(f"{proxy.url}/api/pull", headers=_auth("sk-ops"), timeout=30,
                            json={"model": "llama3.2"})
        assert pulled.status_code == 200 and pulled.text.count("\n") > 2  # progress lines
        after = _quotas(proxy)["ops"]["tokens_per_minute"]["remaining"]
        assert after >= before - 0.5  # nothing spent (refill only adds)
    finally:
        proxy.stop()


async def test_a_refusal_waits_for_every_limit_it_does_not_fit(tmp: Path, emulator: Server) -> None:
    """A tenant at max_concurrent 1 whose token bucket is also short: the 429 names the concurrency
    limit (checked first) but its Retry-After covers the token wait too, so a client that waits as told
    is not refused again for the other limit."""
    key = "sk-two-limits"
    proxy = await asyncio.to_thread(start_proxy, tmp, [emulator.url], {"tenants": [
        {"name": "two-limits", "keys": [key], "max_concurrent": 1, "tokens_per_minute": 60}]},
        "two-limits")
    body = {"model": "llama3.2", "stream": True, "options": {"num_predict": 40},
            "messages": [{"role": "user", "content": "hello there"}]}
    try:
        async with aiohttp.ClientSession(headers=_auth(key)) as session, \
                session.post(f"{proxy.url}/api/chat", json=body) as held:
            assert held.status == 200
            reserved = 60 - float(held.headers["x-ratelimit-remaining-tokens"])
            async with session.post(f"{proxy.url}/api/chat", json=body) as refused:
                assert refused.status == 429
                assert (await refused.json())["code"] == "rate_limited"  # the first limit
                told_s = int(refused.headers["retry-after-ms"]) / 1000
            level = float(refused.headers["x-ratelimit-remaining-tokens"])
            token_wait_s = (reserved - level) / 1.0  # 60 per minute: 1 token a second
            assert reserved > level and told_s >= min(60.0, token_wait_s) * 0.9, (told_s, token_wait_s)
            await held.read()
    finally:
        await asyncio.to_thread(proxy.stop)
