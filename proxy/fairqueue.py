"""The waiting room of one model: two lanes, and weighted fair queuing by token cost inside each.

Order of dispatch:
- lanes: interactive strictly ahead of bulk, except that when both wait, every `1/bulk_share`-th dispatch
  goes to bulk, so bulk is slowed, never starved;
- tenants within a lane: the backlogged tenant with the smallest virtual token counter (VTC, "Fairness in
  Serving LLMs", OSDI'24). A dispatch charges the tenant `cost / weight` (prompt tokens plus expected
  output); `reconcile` corrects the charge with the real counts once known. A tenant that becomes
  backlogged is lifted to the smallest counter of those already waiting or, when nobody waits, to the
  counter of the tenant served last (VTC's rule), so idle time cannot be banked; the counters it is
  lifted to leave out the estimates of requests still running, which `reconcile` may yet take back;
- requests of one tenant: first come, first served.
With `fair=False` the queue is a plain FIFO (the T2 baseline of the benchmarks).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import attrs

if TYPE_CHECKING:  # the queue only carries it
    from .placement import Placing

__all__ = ["FairQueue", "Waiter", "push_out"]

LANES = ("interactive", "bulk")
_UNSETTLED_HORIZON_S = 300.0
"""A charge that `reconcile` has not settled after this long counts as served: its settlement was lost (a
stream cut after its first byte is never settled), or the request runs that long."""


@attrs.define(eq=False)
class Waiter:
    """One queued request."""

    tenant: str
    weight: float
    lane: str
    cost: float
    future: asyncio.Future[Any]
    seq: int = 0
    placing: Placing | None = None
    """What the replica choice may look at (proxy/placement.py); the queue never reads it."""


class _Place(Protocol):
    tenant: str
    weight: float


P = TypeVar("P", bound=_Place)


def push_out(waiting: Iterable[P], tenant: str, weight: float) -> P | None:
    """A full waiting room, and `tenant` (`weight`) wants a place: of `waiting` (oldest first), the
    newest of the tenant holding the most places for its weight, when it holds more than `tenant` would
    with the place; else None (the newcomer is the one refused). So a tenant flooding the room cannot
    keep the others out: it is shared as the slots are. The one rule for the in-process queue and for
    each process's share of the Redis one (proxy/shared_admission.py)."""
    held: dict[str, list[P]] = {}
    for place in waiting:
        held.setdefault(place.tenant, []).append(place)
    if not held:
        return None
    top = max(held, key=lambda name: len(held[name]) / held[name][0].weight)
    mine = len(held.get(tenant, ()))
    if top == tenant or len(held[top]) / held[top][0].weight <= (mine + 1) / weight:
        return None
    return held[top][-1]


class FairQueue:
    """Bounded by the caller (see `len`); not thread-safe, used from the event loop only."""

    def __init__(self, fair: bool = True, bulk_share: float = 0.1) -> None:
        self.fair = fair
        self._wanted_fair = fair
        self.bulk_every = max(1, round(1 / bulk_share)) if bulk_share > 0 else 0
        self._lanes: dict[str, dict[str, deque[Waiter]]] = {lane: {} for lane in LANES}
        self._fifo: deque[Waiter] = deque()
        self.counters: dict[str, float] = {}
        # The tenant dispatched last (from the queue or at once): the floor when nobody waits.
        self._last: str | None = None
        # Per tenant, (time, share) of the charges not settled yet: its requests still running.
        self._unsettled: dict[str, deque[tuple[float, float]]] = {}
        self._seq = itertools.count()
        self._dispatches = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def configure(self, fair: bool, bulk_share: float) -> None:
        """New settings from a reload. The bulk share applies at once; the discipline (fair or FIFO)
        changes only while nobody waits, since the waiters are held in the old one's structures: a busy
        queue switches when a request arrives to find it empty."""
        self.bulk_every = max(1, round(1 / bulk_share)) if bulk_share > 0 else 0
        self._wanted_fair = fair
        self._switch()

    def _switch(self) -> None:
        if self._wanted_fair != self.fair and not self._size:
            self.fair = self._wanted_fair

    def push(self, waiter: Waiter) -> int:
        """Queue `waiter`; returns about how many will be dispatched ahead of it: in fair order, its own
        tenant's earlier waiters and, of every other tenant of its lane, as many as fair shares give
        them meanwhile (weights counted), plus all interactive waiters when it is bulk. (The lane's
        length would make a tenant flooding the queue look like a wait for everyone, and refuse a light
        tenant's request on an estimate although it goes next.)"""
        self._switch()
        waiter.seq = next(self._seq)
        self._size += 1
        if not self.fair:
            self._fifo.append(waiter)
            return len(self._fifo) - 1
        lane = self._lanes[waiter.lane]
        queue = lane.get(waiter.tenant)
        if not queue:
            self._lift(waiter.tenant)
            queue = lane.setdefault(waiter.tenant, deque())
        queue.append(waiter)
        own = len(queue)
        ahead = own - 1
        for tenant, others in lane.items():
            if tenant != waiter.tenant and others:
                ahead += min(len(others), math.ceil(own * others[0].weight / waiter.weight))
        if waiter.lane == "bulk":
            ahead += sum(len(q) for q in self._lanes["interactive"].values())
        return ahead

    def displaceable(self, tenant: str, weight: float) -> Waiter | None:
        """The queue is full and `tenant` (`weight`) wants a place: the waiter `push_out` names, left
        in the queue (the caller takes it out only once the newcomer is sure to keep the place: one
        refused on its own deadline must evict nobody). FIFO: None."""
        if not self.fair:
            return None
        waiting = [w for lane in self._lanes.values() for queue in lane.values() for w in queue]
        return push_out(sorted(waiting, key=lambda w: w.seq), tenant, weight)

    def _lift(self, tenant: str) -> None:
        """`tenant` becomes backlogged: raise its counter to the smallest of those waiting or, when
        nobody waits, to the counter of the tenant served last (VTC's rule). With nobody waiting the
        minimum is over no one; the last one served stands for the tenants that were using the slots,
        or a returning tenant would keep the low counter of its idle time and take every slot until it
        caught up. The floor is what those tenants were served for certain (`_settled`): a running
        request's estimate may be refunded to its tenant, and a counter lifted to it would keep it."""
        waiting = {t for ln in self._lanes.values() for t, q in ln.items() if q}
        if waiting:
            floor = min(self._settled(t) for t in waiting)
        else:
            floor = self._settled(self._last) if self._last is not None else 0.0
        self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)

    def _settled(self, tenant: str) -> float:
        """`tenant`'s counter without the estimates of its requests still running."""
        counter = self.counters.get(tenant, 0.0)
        charges = self._unsettled.get(tenant)
        if not charges:
            return counter
        horizon = time.monotonic() - _UNSETTLED_HORIZON_S
        while charges and charges[0][0] < horizon:
            charges.popleft()
        return counter - sum(share for _, share in charges)

    def _charged(self, tenant: str, share: float) -> None:
        """A dispatch of `tenant` charged `share` (cost / weight), unsettled until `reconcile`."""
        self.counters[tenant] = self.counters.get(tenant, 0.0) + share
        self._unsettled.setdefault(tenant, deque()).append((time.monotonic(), share))
        self._last = tenant

    def remove(self, waiter: Waiter) -> bool:
        """Take a waiter out (its client left or it timed out); False if it was not queued."""
        if not self.fair:
            try:
                self._fifo.remove(waiter)
            except ValueError:
                return False
            self._size -= 1
            return True
        queue = self._lanes[waiter.lane].get(waiter.tenant)
        if not queue or waiter not in queue:
            return False
        queue.remove(waiter)
        if not queue:
            del self._lanes[waiter.lane][waiter.tenant]
        self._size -= 1
        return True

    def _pick_lane(self, dispatches: int) -> str | None:
        interactive = any(self._lanes["interactive"].values())
        bulk = any(self._lanes["bulk"].values())
        if interactive and bulk and self.bulk_every and dispatches % self.bulk_every == \
                self.bulk_every - 1:
            return "bulk"
        if interactive:
            return "interactive"
        return "bulk" if bulk else None

    def _next(self) -> tuple[str, str] | None:
        """(lane, tenant) of the waiter `pop` would return next."""
        lane_name = self._pick_lane(self._dispatches + 1)
        if lane_name is None:
            return None
        lane = self._lanes[lane_name]
        tenant = min((t for t, q in lane.items() if q),
                     key=lambda t: (self.counters.get(t, 0.0), lane[t][0].seq))
        return lane_name, tenant

    def peek(self) -> Waiter | None:
        """The waiter `pop` would return next, left in the queue."""
        if self._size == 0:
            return None
        if not self.fair:
            return self._fifo[0]
        following = self._next()
        assert following is not None
        return self._lanes[following[0]][following[1]][0]

    def pop(self) -> Waiter | None:
        """The next waiter to dispatch, charged to its tenant; None when empty."""
        if self._size == 0:
            return None
        if not self.fair:
            self._dispatches += 1
            self._size -= 1
            return self._fifo.popleft()
        following = self._next()
        assert following is not None
        self._dispatches += 1
        self._size -= 1
        lane = self._lanes[following[0]]
        tenant = following[1]
        queue = lane[tenant]
        waiter = queue.popleft()
        if not queue:
            del lane[tenant]
        self._charged(tenant, waiter.cost / waiter.weight)
        return waiter

    def charge(self, tenant: str, weight: float, cost: float) -> None:
        """Charge service that did not go through the queue (a free slot taken at once): every served
        request counts, or `reconcile` would refund what was never charged. Such a request arrives and
        is dispatched in one go, so a tenant with nothing queued is lifted first, as by `push`."""
        if self.fair:
            if not any(self._lanes[lane].get(tenant) for lane in LANES):
                self._lift(tenant)
            self._charged(tenant, cost / weight)

    def reconcile(self, tenant: str, weight: float, delta_cost: float) -> None:
        """Correct a tenant's counter once its request's real cost is known (delta = real - charged)."""
        if self.fair:
            self.counters[tenant] = self.counters.get(tenant, 0.0) + delta_cost / weight
            charges = self._unsettled.get(tenant)
            if charges:
                # The requests are not told apart: settle the newest charge, so that one whose
                # settlement was lost sinks to the front and ages out (_UNSETTLED_HORIZON_S).
                charges.pop()
                if not charges:
                    del self._unsettled[tenant]

    def depth(self) -> dict[str, dict[str, int]]:
        """Waiting requests per lane and tenant."""
        if not self.fair:
            out: dict[str, dict[str, int]] = {lane: {} for lane in LANES}
            for waiter in self._fifo:
                out[waiter.lane][waiter.tenant] = out[waiter.lane].get(waiter.tenant, 0) + 1
            return out
        return {lane: {t: len(q) for t, q in tenants.items() if q}
                for lane, tenants in self._lanes.items()}
