"""Fairness between tenants measured on real traffic: the proxy in front of a one-slot emulator, closed-loop
aiohttp clients per tenant (more of them than the slot serves, so every tenant stays backlogged), shares
counted in tokens served (prompt_eval_count + eval_count of each response) over the window in which both
tenants are backlogged: equal weights give a Jain index >= 0.95 where FIFO, in the same test, does not;
weights 1:2 give token shares within 10 % of 1:2; a tenant returning from idle gets no burst of credit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest

from proxy.fairqueue import FairQueue, Waiter
from tests.support.servers import Server, start_emulator, start_proxy

MODEL = "llama3.2"
BUDGET_S = 40.0
"""Longest a traffic phase may run before it is stopped (and the test fails for lack of samples)."""
WARMUP = 16
"""Completions left out at the start: the first wave, ordered by arrival before anyone is backlogged."""
WINDOW = 100
"""Completions watched after an idle tenant returns."""
EQUAL = [{"name": "a", "keys": ["sk-a"]}, {"name": "b", "keys": ["sk-b"]}]
WEIGHTED = [{"name": "a", "keys": ["sk-a"], "weight": 1}, {"name": "b", "keys": ["sk-b"], "weight": 2}]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fairness")


@pytest.fixture(scope="module")
def fast(tmp: Path) -> Iterator[Server]:
    """One slot and 2000 output tokens/s (under uvloop a gap under half a millisecond does not sleep at
    all): a request costs a few ms of overhead, so hundreds are served in a couple of seconds."""
    server = start_emulator(tmp, fixed_clock=False, decode_tokens_per_s=2000, output_tokens="40,40",
                            name="fair-emu", extra=["--num-parallel", "1"])
    yield server
    server.stop()


def _proxy(tmp: Path, upstream: Server, name: str, tenants: list[dict[str, Any]], fair: bool = True
           ) -> Server:
    """A proxy that knows the replica has one slot and lets one request at a time through to it."""
    return start_proxy(tmp, [{"url": upstream.url, "num_parallel": 1}], {
        "tenants": tenants,
        "chain": {"backpressure": {"max_in_flight": 1, "fair": fair, "max_queue_size": 256,
                                   "queue_timeout_s": 60}}}, name=name)


@attrs.frozen
class Served:
    """One completed request: whose it was and the tokens it took (prompt plus output)."""

    tenant: str
    tokens: int


@attrs.frozen
class Clients:
    """A tenant's closed-loop clients: `count` of them, each sending its next request when the last ends."""

    tenant: str
    key: str
    count: int
    num_predict: int


class Traffic:
    """Completions in the order they arrived, as seen by the clients (one slot: the order of service)."""

    def __init__(self, proxy: Server) -> None:
        self.proxy = proxy
        self.served: list[Served] = []
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, session: aiohttp.ClientSession, clients: Clients) -> None:
        self.tasks += [asyncio.ensure_future(self._client(session, clients)) for _ in range(clients.count)]

    async def _client(self, session: aiohttp.ClientSession, clients: Clients) -> None:
        deadline = time.monotonic() + BUDGET_S
        body = {"model": MODEL, "prompt": "hello", "stream": False,
                "options": {"num_predict": clients.num_predict}}
        headers = {"Authorization": f"Bearer {clients.key}"}
        while not self.stop.is_set() and time.monotonic() < deadline:
            async with session.post(f"{self.proxy.url}/api/generate", json=body,
                                    headers=headers) as response:
                payload = await response.json()
            assert response.status == 200, payload
            if not self.stop.is_set():  # after the stop, the tail drains: not both backlogged any more
                self.served.append(Served(clients.tenant,
                                          payload["prompt_eval_count"] + payload["eval_count"]))

    async def until(self, predicate: Callable[[list[Served]], bool], what: str) -> None:
        """Poll the completions until `predicate` holds (fails after the traffic's budget)."""
        deadline = time.monotonic() + BUDGET_S
        while not predicate(self.served):
            for task in self.tasks:
                if task.done() and task.exception() is not None:
                    raise AssertionError(f"{what}: a client failed") from task.exception()
            assert time.monotonic() < deadline, f"{what}: not reached in {BUDGET_S}s " \
                f"({_count(self.served)})"
            await asyncio.sleep(0.02)

    async def finish(self) -> list[Served]:
        """Stop every client; the completions up to now (the tail that drains after is left out)."""
        self.stop.set()
        await asyncio.gather(*self.tasks)
        return self.served


def _count(served: list[Served]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for one in served:
        counts[one.tenant] = counts.get(one.tenant, 0) + 1
    return counts


def _tokens(served: list[Served]) -> dict[str, int]:
    tokens: dict[str, int] = {}
    for one in served:
        tokens[one.tenant] = tokens.get(one.tenant, 0) + one.tokens
    return tokens


def _jain(values: list[float]) -> float:
    """Jain's fairness index: 1 when all are equal, 1/n when one takes everything."""
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def _each_served(least: int) -> Callable[[list[Served]], bool]:
    return lambda served: min(_count(served).get(t, 0) for t in ("a", "b")) >= least


async def _run(proxy: Server, clients: list[Clients], enough: Callable[[list[Served]], bool]
               ) -> list[Served]:
    """Run `clients` against `proxy` until `enough` holds for the completions after the first WARMUP,
    and return those: the window in which every tenant is backlogged."""
    traffic = Traffic(proxy)
    async with aiohttp.ClientSession() as session:
        for one in clients:
            traffic.start(session, one)
        try:
            await traffic.until(lambda s: enough(s[WARMUP:]), "enough traffic")
        finally:
            served = await traffic.finish()
    return served[WARMUP:]


async def test_equal_weights_share_tokens_equally_where_fifo_does_not(tmp: Path, fast: Server) -> None:
    """Equal weights, unequal demand: tenant a runs 12 clients asking 40 output tokens each, b 4 clients
    asking 20. Fair: >= 200 served each, Jain index over tokens >= 0.95; b, whose requests are smaller,
    is served more of them (the share is in tokens, not requests: 47/27 as many when exact; b's few
    clients are sometimes all in transit, and a tenant with nothing queued is owed nothing). FIFO on
    the same traffic: a takes most of the slot (Jain ~0.7), which shows the measure can fail."""
    clients = [Clients("a", "sk-a", 12, 40), Clients("b", "sk-b", 4, 20)]
    figures: dict[bool, dict[str, Any]] = {}
    for fair in (True, False):
        proxy = await asyncio.to_thread(_proxy, tmp, fast, f"fair-equal-{fair}", EQUAL, fair)
        try:
            served = await _run(proxy, clients, _each_served(200))
        finally:
            await asyncio.to_thread(proxy.stop)
        counts, tokens = _count(served), _tokens(served)
        figures[fair] = {"requests": counts, "tokens": tokens, "jain": _jain([tokens["a"], tokens["b"]]),
                         "a_share": tokens["a"] / (tokens["a"] + tokens["b"]),
                         "b_per_a_request": counts["b"] / counts["a"]}
    print(figures)
    fair_run, fifo = figures[True], figures[False]
    assert min(fair_run["requests"].values()) >= 200 and fair_run["jain"] >= 0.95, figures
    # Token-fair, not request-fair: request-fair would serve b as many requests as a (1.0, and a Jain
    # over tokens of 0.9, which the bound above already refuses); exact token fairness gives 47/27.
    # Not nearer to that: on a loaded machine b's four clients are more often all in transit, owed
    # nothing, and CI saw 1.29 with a Jain of 0.98 (the bound was 1.4).
    assert fair_run["b_per_a_request"] > 1.15, figures
    assert fifo["jain"] < 0.9 and fifo["a_share"] > 0.65, figures


async def test_weights_one_to_two_give_token_shares_one_to_two(tmp: Path, fast: Server) -> None:
    """Weights 1:2, both backlogged (8 clients each), a asking 10 output tokens per request and b 40:
    b is served twice a's tokens, within 10 % (a queue weighing requests, not tokens, would give b
    about 5.5x a's tokens; FIFO about 2.8x)."""
    clients = [Clients("a", "sk-a", 8, 10), Clients("b", "sk-b", 8, 40)]
    proxy = await asyncio.to_thread(_proxy, tmp, fast, "fair-weighted", WEIGHTED)
    try:
        served = await _run(proxy, clients, _each_served(200))
    finally:
        await asyncio.to_thread(proxy.stop)
    tokens = _tokens(served)
    ratio = tokens["b"] / tokens["a"]
    print({"requests": _count(served), "tokens": tokens, "ratio": ratio,
           "b_share": tokens["b"] / (tokens["a"] + tokens["b"])})
    assert min(_count(served).values()) >= 200, _count(served)
    assert 0.9 * 2 <= ratio <= 1.1 * 2, (tokens, ratio)


@pytest.mark.parametrize("alone", [8, 1], ids=["a-backlogged", "a-never-queued"])
async def test_a_tenant_back_from_idle_gets_no_burst(tmp: Path, fast: Server, alone: int) -> None:
    """The rule (VTC's lift, proxy/fairqueue.py): a tenant that becomes backlogged starts at the smallest
    virtual counter of the tenants waiting, or, when nobody waits, at the counter of the tenant served
    last; it never keeps a lower counter of its own. So time idle is not banked as credit: b, idle while
    a was served 150 requests alone, shares the slot with a as soon as it returns. `alone` is a's clients
    before b returns: 8 keep a queue, 1 is served at once each time (the queue is empty when b comes).
    Over the WINDOW (100) completions after b's return, b's share of tokens stays <= 60 % (fair: 50 %;
    credit banked over a's 150 requests would give b all of them)."""
    proxy = await asyncio.to_thread(_proxy, tmp, fast, f"fair-idle-{alone}", EQUAL)
    traffic = Traffic(proxy)
    try:
        async with aiohttp.ClientSession() as session:
            try:
                traffic.start(session, Clients("a", "sk-a", alone, 20))
                await traffic.until(lambda s: len(s) >= 150, "a served alone")
                start = len(traffic.served)
                traffic.start(session, Clients("b", "sk-b", 8, 20))
                await traffic.until(lambda s: any(one.tenant == "b" for one in s[start:]), "b served")
                traffic.start(session, Clients("a", "sk-a", 8 - alone, 20))  # both backlogged now
                await traffic.until(lambda s: len(s) >= start + WINDOW, "the completions after b returned")
            finally:
                served = await traffic.finish()
    finally:
        await asyncio.to_thread(proxy.stop)
    window = served[start:start + WINDOW]
    tokens = _tokens(window)
    b_share = tokens.get("b", 0) / sum(tokens.values())
    print({"alone": alone, "requests": _count(window), "b_share": b_share})
    assert b_share <= 0.6, (_count(window), b_share)


def test_lift_rule_in_the_queue() -> None:
    """The rule on the queue alone: nobody waiting, a returning tenant starts at the counter of the one
    served last, whether it waits or takes a free slot at once; someone waiting, at the smallest
    waiting counter; a counter above the floor is kept. The floor leaves out the estimates of requests
    still running: an estimate refunded later must not stay in the counter of the tenant lifted to it."""
    loop = asyncio.new_event_loop()
    try:
        queue = FairQueue(fair=True)

        def waiter(tenant: str) -> Waiter:
            return Waiter(tenant, 1.0, "interactive", 100.0, loop.create_future())

        for _ in range(5):  # a alone, each request served at once (nobody waits) and settled
            queue.charge("a", 1.0, 100.0)
            queue.reconcile("a", 1.0, 0.0)
        queue.charge("b", 1.0, 100.0)  # b returns to a free slot: lifted to a's 500 before its charge
        assert queue.counters == {"a": 500.0, "b": 600.0}
        queue.push(waiter("c"))  # nobody waits: lifted to the last served (b), its running request aside
        assert queue.counters["c"] == 500.0
        queue.push(waiter("a"))  # c waits: a is level with it
        queue.counters["d"] = 900.0
        queue.push(waiter("d"))  # above the floor: kept
        assert queue.counters == {"a": 500.0, "b": 600.0, "c": 500.0, "d": 900.0}
        assert [w.tenant for w in (queue.pop(), queue.pop(), queue.pop()) if w] == ["c", "a", "d"]

        queue = FairQueue(fair=True)
        queue.charge("e", 1.0, 300.0)  # estimated 300 (no num_predict), running
        queue.push(waiter("f"))  # lifted to what e was served for certain: 0, not 300
        queue.reconcile("e", 1.0, -290.0)  # e's request cost 10
        queue.push(waiter("e"))
        assert [w.tenant for w in (queue.pop(), queue.pop()) if w] == ["f", "e"]
    finally:
        loop.close()


def test_a_full_queue_is_shared_and_positions_are_counted_in_fair_order() -> None:
    """The waiting room is bounded by the caller; when it is full, a tenant holding fewer places than
    another (for its weight) takes the newest place of the one holding the most, and the position a
    waiter is told counts what fair order dispatches before it, not the lane's length."""
    loop = asyncio.new_event_loop()
    try:
        queue = FairQueue(fair=True)

        def waiter(tenant: str, weight: float = 1.0) -> Waiter:
            return Waiter(tenant, weight, "interactive", 100.0, loop.create_future())

        def displace(queue: FairQueue, tenant: str, weight: float) -> Waiter | None:
            """What backpressure does once the newcomer keeps its place: the waiter out."""
            victim = queue.displaceable(tenant, weight)
            if victim is not None:
                queue.remove(victim)
            return victim

        flood = [waiter("flood") for _ in range(6)]
        assert [queue.push(w) for w in flood] == [0, 1, 2, 3, 4, 5]
        assert queue.push(waiter("light")) == 1  # one of flood's goes first, not all six
        assert displace(queue, "flood", 1.0) is None  # the one holding the most is refused itself
        taken = displace(queue, "light", 1.0)  # light holds 1 (2 with the place), flood 6
        assert taken is flood[-1] and len(queue) == 6
        three = [waiter("third") for _ in range(3)]
        for w in three:
            queue.push(w)
        # flood 5, light 1, third 3: a second light waiter may still take flood's newest...
        assert displace(queue, "light", 1.0) is flood[-2]
        queue.push(waiter("light"))
        # ...but no tenant gains a place from one that holds no more than it would: flood 4, third 4
        assert displace(queue, "third", 1.0) is None
        heavy = FairQueue(fair=True)
        for _ in range(4):
            heavy.push(waiter("big", 4.0))  # weight 4: four places are its share of one
        heavy.push(waiter("small"))
        assert displace(heavy, "small", 1.0) is None
    finally:
        loop.close()


@pytest.mark.parametrize("state", ["memory", "redis"])
async def test_a_tenant_flooding_the_queue_cannot_keep_another_out(
        tmp: Path, state: str, request: pytest.FixtureRequest) -> None:
    """A small waiting room (max_queue_size 6), kept full by one tenant's 10 looping clients: another
    tenant's requests are still queued and served (its place taken from the flooding tenant's newest),
    not refused as 'queue full' nor on an estimate that counts the flood ahead of it. The same with
    the queue in Redis (`state.backend: redis`, the shared admission of several processes)."""
    shared = ({"state": {"backend": "redis", "url": request.getfixturevalue("redis_server").url,
                         "key_prefix": "flood:"}} if state == "redis" else {})
    upstream = await asyncio.to_thread(
        start_emulator, tmp, fixed_clock=False, decode_tokens_per_s=20, output_tokens="5,5",
        name="flood-emu", extra=["--num-parallel", "1"])
    proxy = await asyncio.to_thread(start_proxy, tmp, [{"url": upstream.url, "num_parallel": 1}], {
        "tenants": [{"name": "flood", "keys": ["sk-flood"]}, {"name": "light", "keys": ["sk-light"]}],
        "chain": {"backpressure": {"max_in_flight": 1, "max_queue_size": 6, "queue_timeout_s": 60}},
        **shared}, name=f"flooded-{state}")
    body = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 5}}
    stop = asyncio.Event()
    flood_statuses: list[int] = []
    try:
        async with aiohttp.ClientSession() as session:
            async def send(key: str) -> int:
                async with session.post(f"{proxy.url}/api/generate", json=body,
                                        headers={"Authorization": f"Bearer {key}"}) as response:
                    await response.read()
                    return response.status

            async def flood() -> None:
                deadline = time.monotonic() + BUDGET_S
                while not stop.is_set() and time.monotonic() < deadline:
                    flood_statuses.append(await send("sk-flood"))
                    if flood_statuses[-1] != 200:
                        await asyncio.sleep(0.05)

            flooders = [asyncio.ensure_future(flood()) for _ in range(10)]
            deadline = time.monotonic() + BUDGET_S
            while flood_statuses.count(503) < 5:  # the room is full: the flood is refused in part
                assert time.monotonic() < deadline, flood_statuses
                await asyncio.sleep(0.05)
            light = [await send("sk-light") for _ in range(5)]
            stop.set()
            await asyncio.gather(*flooders)
        assert light == [200] * 5
    finally:
        await asyncio.to_thread(proxy.stop)
        await asyncio.to_thread(upstream.stop)


async def test_a_request_refused_on_its_own_deadline_evicts_nobody(tmp: Path) -> None:
    """The queue is full of one tenant's requests; another tenant's requests, each with a deadline
    shorter than its wait, are refused on the estimate: the places they would have taken stay with the
    requests holding them (a request refused anyway must not push one out: a cheap lever otherwise)."""
    upstream = await asyncio.to_thread(
        start_emulator, tmp, fixed_clock=False, decode_tokens_per_s=20, output_tokens="20,20",
        name="evict-emu", extra=["--num-parallel", "1"])
    proxy = await asyncio.to_thread(start_proxy, tmp, [{"url": upstream.url, "num_parallel": 1}], {
        "tenants": [{"name": "flood", "keys": ["sk-flood"]}, {"name": "light", "keys": ["sk-light"]}],
        "chain": {"backpressure": {"max_in_flight": 1, "max_queue_size": 6, "queue_timeout_s": 60}}},
        name="evict")
    body = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 20}}
    try:
        async with aiohttp.ClientSession() as session:
            async def send(key: str, headers: dict[str, str] | None = None) -> int:
                async with session.post(f"{proxy.url}/api/generate", json=body,
                                        headers={"Authorization": f"Bearer {key}",
                                                 **(headers or {})}) as response:
                    await response.read()
                    return response.status

            for _ in range(2):  # a service time to estimate with (~1 s a request)
                assert await send("sk-light") == 200
            flood = []
            for _ in range(7):  # one running, six waiting: the queue is full
                flood.append(asyncio.ensure_future(send("sk-flood")))
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            light = [await send("sk-light", {"X-Deadline-S": "0.5"}) for _ in range(3)]
            assert light == [503] * 3
            assert await asyncio.gather(*flood) == [200] * 7  # none of them gave its place up
    finally:
        await asyncio.to_thread(proxy.stop)
        await asyncio.to_thread(upstream.stop)
