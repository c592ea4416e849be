"""Backpressure's admission when several proxy processes share a fleet (`state.backend: redis`): the
slots and the fair queue's counters live in Redis (proxy/state/leases.py), so that all processes
together never send a replica more than its slots, and the tenant with the least service across all of
them goes next.

What stays per process: the request's deadline and budgets (`queue_timeout_s`, `cold_queue_timeout_s`),
`max_queue_size` (requests this process keeps waiting per model, counted again once a ticket is
queued, so that a burst cannot pass it during the enter's round trip), placement's replica ranking (a
shared grant takes the least loaded replica with a free slot) and learning (each process learns from
its own requests; what it learns is stored beside the leases and is the fleet's limit from then on).

A request whose ticket Redis loses while it still answers (the queue's keys gone, one call that timed
out) queues again with a new ticket, within its budget from the first entry (503 `state_unavailable`
after three): only the breaker's being open lets a request past the shared books.

Redis unreachable (the failover breaker, `state.failure_mode`): `open` admits through this process's own
gate (ModelGate, as with one process): each process then keeps the replica's limit on its own, so the
fleet may send a replica up to (processes x slots) until Redis answers again; leases granted meanwhile
are added to Redis by their first renewal after it, so from then on they count for everyone. `closed`
answers 503 `state_unavailable`. Shadow mode, and models no replica may serve now, also take the local
path (nothing is enforced there, or health answers). Once Redis answers again, this process keeps to its
own gate until its next tick has added its slots to Redis; a request its gate admits after that goes to
the shared books instead (the gate counts this process only).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from aiohttp import web

from proxy.context import RequestContext
from proxy.errors import Overload, QueueTimeout, StateUnavailable
from proxy.fairqueue import push_out
from proxy.state.leases import Grant, SharedSlots, StateDown, Ticket
from proxy.upstreams import Upstream

if TYPE_CHECKING:
    from middlewares.backpressure import BackpressureStep, ModelGate

__all__ = ["SharedAdmission"]

_ENTRIES = 3
"""Tickets one request may queue while Redis answers but loses them (see `SharedAdmission._entries`)."""


class SharedAdmission:
    """The backpressure step's admission through Redis; see the module docstring."""

    def __init__(self, slots: SharedSlots) -> None:
        self.slots = slots
        self.waiters: dict[str, list[Ticket]] = {}
        """The tickets of this process's requests waiting on the shared queue, per model, oldest first:
        their number is held to max_queue_size, and a full room is shared by push-out, as in one
        process (fairqueue.push_out)."""
        self._published: dict[tuple[str, str], int] = {}
        """The learned limits this process stored in Redis, per (model, replica)."""

    async def admit(self, step: BackpressureStep, request: web.Request, ctx: RequestContext,
                    gate: ModelGate, span: Any, lane: str, cost: float
                    ) -> tuple[Upstream | None, Ticket | None]:
        """A replica slot for this request and the ticket holding it (release it on every path), or
        (None, None) when no replica may serve the model (health answers). Raises as `_admit`."""
        tenant = ctx.tenant
        config = step.config
        slots = self.slots
        slots.bulk_every = max(1, round(1 / config.bulk_share)) if config.bulk_share > 0 else 0
        ticket = Ticket(slots, slots.base(gate.model), tenant.name, tenant.weight, lane, cost)
        eligible = step.fleet.eligible(gate.model)
        if step.mode_of(ctx) != "shadow" and eligible and not slots.degraded:
            candidates = self._pairs(gate, eligible)
            if ticket.base not in slots.candidates:  # once per model: the step and its gates stay put
                slots.candidates[ticket.base] = partial(self._candidates_now, step, gate.model)
            granted = await self._entries(step, ctx, gate, span, ticket, candidates)
            if granted is not None:
                ticket = granted[0]
                replica = step.fleet.by_name.get(granted[1].replica)
                if replica is None or replica not in step.fleet.eligible(gate.model):
                    # Left the set (a reload), or out of service (health ejected it, it fails the
                    # model) since the ticket was queued with the replicas of then: the slot goes
                    # back and the request enters again with those of now. Sent there, it would
                    # be moved by the balancer to another replica without the shared check, and
                    # every ticket queued before would get the same free slot in turn.
                    slots.granted(ticket, granted[1])
                    ticket.release(-cost)
                    return await self.admit(step, request, ctx, gate, span, lane, cost)
                slots.granted(ticket, granted[1])
                gate.in_flight[replica.name] += 1  # this process's share, for metrics and learning
                return replica, ticket
        if slots.degraded and slots.failover.failure_mode == "closed" and step.mode_of(ctx) != "shadow":
            step.decide(ctx, span, "state_unavailable", StateUnavailable(
                "shared state (Redis) is unavailable: the replicas' slots cannot be shared",
                retry_after_s=slots.failover.retry_interval_s))
        replica = await step._admit(request, ctx, gate, span, tenant.name, tenant.weight, lane, cost)
        if replica is None:
            return None, None
        if not slots.degraded and step.mode_of(ctx) != "shadow" and step.fleet.eligible(gate.model):
            # Redis came back (and holds this process's slots again) while this request waited in the
            # process's own gate: that gate counts this process only, so the shared books decide.
            gate.queue.reconcile(tenant.name, tenant.weight, -cost)
            gate.give_back(replica)
            return await self.admit(step, request, ctx, gate, span, lane, cost)
        slots.hold_local(ticket, replica.name)
        return replica, ticket

    @staticmethod
    def _pairs(gate: ModelGate, upstreams: Sequence[Upstream]) -> list[tuple[str, int]]:
        """What a ticket carries into the shared queue: (replica, limit) for each of `upstreams`."""
        return [(u.name, max(1, math.floor(gate.limit(u)))) for u in upstreams]

    @classmethod
    def _candidates_now(cls, step: BackpressureStep, model: str) -> list[tuple[str, int]]:
        """The (replica, limit) pairs that may serve `model` now, as the settings (a reload changes
        them) and health (ejections, returns) say."""
        gate = step.gates.get(model)
        return [] if gate is None else cls._pairs(gate, step.fleet.eligible(model))

    async def _entries(self, step: BackpressureStep, ctx: RequestContext, gate: ModelGate, span: Any,
                       ticket: Ticket, candidates: list[tuple[str, int]]
                       ) -> tuple[Ticket, Grant] | None:
        """The ticket that got a shared slot and its grant, or None when the breaker opened (the
        failure mode applies). A ticket lost while Redis answers (its queue entry gone, one call timed
        out) is replaced by a new one, within the request's budget from its first entry: another
        process may hold the slot it waited for, so this process's own gate could overfill the
        replica. Raises as `_shared`, or 503 state_unavailable after `_ENTRIES` lost tickets."""
        slots = self.slots
        started = time.monotonic()
        for entry in range(_ENTRIES):
            try:
                return ticket, await self._shared(step, ctx, gate, span, ticket, candidates, started)
            except StateDown:
                if slots.degraded:
                    return None
            if entry + 1 < _ENTRIES:
                slots.counts["reentered"] += 1
                ticket = Ticket(slots, ticket.base, ticket.tenant, ticket.weight, ticket.lane,
                                ticket.cost)
        step.decide(ctx, span, "state_unavailable", StateUnavailable(
            "shared state (Redis) kept losing this request's place in the queue",
            retry_after_s=slots.failover.retry_interval_s), mode="enforce")
        raise AssertionError("unreachable")  # decide raised in enforce mode

    async def _shared(self, step: BackpressureStep, ctx: RequestContext, gate: ModelGate, span: Any,
                      ticket: Ticket, candidates: list[tuple[str, int]], started: float) -> Grant:
        slots = self.slots
        model = gate.model
        waiting = self._waiting(model)
        if waiting >= step.config.max_queue_size:
            # Refused at once when nobody would give a place up, before a round trip to Redis. The
            # place itself is taken after the enter (others come and go meanwhile).
            self._room(step, ctx, gate, span, ticket)
        eligible = step.fleet.eligible(gate.model)
        cold = not waiting and any(u.by_model.get(gate.model) and gate.model not in u.loaded
                                   for u in eligible)
        try:
            # Within the request's deadline, too: a Redis that hangs holds the call up to
            # `state.socket_timeout_s`, which may be longer than what the client asked for (a
            # cancelled enter gives back what the script grants once its answer is in).
            async with asyncio.timeout(None if ctx.deadline_at is None
                                       else max(0.0, ctx.deadline_at - time.monotonic())):
                granted = await slots.enter(ticket, candidates, gate.learning)
        except StateDown:
            # The script may have run (a call that timed out): its queued ticket leaves, rather
            # than wait for a grant nobody takes.
            slots.spawn(slots.leave(ticket))
            raise
        except TimeoutError:
            gate.rejections["queue_timeout"] += 1
            step.decide(ctx, span, "queue_timeout", QueueTimeout(
                f"no slot for {gate.model} within the request's deadline (the shared state did not "
                "answer)", retry_after_s=gate.retry_after_s()), mode="enforce")
            raise AssertionError("unreachable") from None  # decide raised in enforce mode
        if granted is not None:
            span.set_attribute(step.telemetry.names.queue_position, 0)
            step.decide(ctx, span, "admitted")
            return granted
        assert ticket.future is not None
        # Queued. Counted again now, with no await until the ticket joins the waiters: every request
        # of a burst passed the first check during the enter's round trip (all of them queued past
        # max_queue_size), and counting those still entering would refuse requests about to be
        # granted a free slot. Past the bound, a place is taken by push-out or this ticket leaves.
        displaced: Ticket | None = None
        if self._waiting(model) >= step.config.max_queue_size:
            try:
                displaced = self._room(step, ctx, gate, span, ticket)
            except Overload:
                # Out of `waiting` before the leave task runs: a grant delivered meanwhile is then an
                # orphan, released with its charge; found waiting, it would be held by nobody.
                slots.waiting.pop(ticket.id, None)
                slots.spawn(slots.leave(ticket))
                raise
        remaining = (ctx.deadline_at - time.monotonic()) if ctx.deadline_at else math.inf
        # From the request's first entry: a ticket entered again (`_entries`) keeps its budget.
        budget = min((step.config.cold_queue_timeout_s if cold else step.config.queue_timeout_s)
                     - (time.monotonic() - started), remaining)
        span.set_attribute(step.telemetry.names.queue_cold, cold)
        if displaced is not None and displaced.future is not None and not displaced.future.done():
            # This request waits, in a place taken from this process's tenant holding the most: that
            # tenant's newest request gives it up (503, as if it had found the queue full).
            displaced.future.set_exception(Overload(
                f"the queue for {gate.model} is full ({step.config.max_queue_size} waiting) and "
                "this tenant held the most places", retry_after_s=gate.retry_after_s()))
            displaced.future.exception()  # retrieved: its waiter may have just left
        # Added now, not counted from `waiting`: others came and went during `enter`'s round trip.
        waiters = self.waiters.setdefault(gate.model, [])
        waiters.append(ticket)
        try:
            async with asyncio.timeout(budget):
                granted = await ticket.future
        except Overload as refusal:  # its place went to a tenant holding fewer
            if not self._give_back(ticket):
                slots.spawn(slots.leave(ticket))
            gate.rejections["overload"] += 1
            step.decide(ctx, span, "overload", refusal, mode="enforce")
            raise AssertionError("unreachable") from None  # decide raised in enforce mode
        except TimeoutError:
            if not self._give_back(ticket):
                # Not awaited: with Redis hanging, the leave's call takes up to socket_timeout_s, and
                # the answer is due now (the budget may be the request's deadline). Out of `waiting`
                # at once: a grant delivered meanwhile is an orphan, released with its charge.
                slots.waiting.pop(ticket.id, None)
                slots.spawn(slots.leave(ticket))
            gate.rejections["queue_timeout"] += 1
            step.decide(ctx, span, "queue_timeout", QueueTimeout(
                f"no slot for {gate.model} within {budget:.0f}s (waiting for "
                f"{'a model load' if cold else 'a slot'})", retry_after_s=gate.retry_after_s()),
                mode="enforce")
            raise AssertionError("unreachable") from None  # decide raised in enforce mode
        except asyncio.CancelledError:
            if not self._give_back(ticket):
                slots.spawn(slots.leave(ticket))
            step.decide(ctx, span, "cancelled")  # as in the process's own queue
            raise
        except StateDown:
            await slots.leave(ticket)
            raise
        finally:
            waiters.remove(ticket)
        slots.counts["granted_queued"] += 1
        step.decide(ctx, span, "queued")
        return granted

    def _waiting(self, model: str) -> int:
        """This process's requests still waiting for `model` (granted or pushed-out ones whose task
        has not resumed yet are in the list, not waiting)."""
        return sum(1 for t in self.waiters.get(model, ()) if t.future is not None and not t.future.done())

    def _room(self, step: BackpressureStep, ctx: RequestContext, gate: ModelGate, span: Any,
              ticket: Ticket) -> Ticket:
        """The queue of `gate` is full here: the waiting ticket that gives its place up to `ticket`
        (push-out, the tenant holding the most), or 503 overload when none does."""
        displaced = push_out((t for t in self.waiters.get(gate.model, ())
                              if t.future is not None and not t.future.done()),
                             ticket.tenant, ticket.weight)
        if displaced is None:
            gate.rejections["overload"] += 1
            step.decide(ctx, span, "overload", Overload(
                f"the queue for {gate.model} is full ({step.config.max_queue_size} waiting)",
                retry_after_s=gate.retry_after_s()), mode="enforce")
            raise AssertionError("unreachable")  # decide raised in enforce mode
        return displaced

    @staticmethod
    def _give_back(ticket: Ticket) -> bool:
        """The wait ended without the request taking its slot: if the grant came just then (its
        waiter had not resumed yet), release it with the tenant's charge; whether it had come."""
        future = ticket.future
        if future is None or not future.done() or future.cancelled() or future.exception() is not None:
            return False
        ticket.release(-ticket.cost)
        return True

    def finish(self, gate: ModelGate, replica: Upstream, ticket: Ticket, delta_cost: float) -> None:
        """The request ended (any way, after `gate.release`): release its lease, settle the tenant's
        shared counter with the real cost (`delta_cost`, real minus charged; a ticket admitted locally
        was charged locally), and store a limit this process just learned for the whole fleet."""
        ticket.release(0.0 if ticket.local else delta_cost)
        if gate.learning and not ticket.local:
            limit = gate.limits.get(replica.name)
            if limit is not None:
                key = (gate.model, replica.name)
                top = max(1, math.floor(limit))
                if self._published.get(key, replica.num_parallel) != top:
                    self._published[key] = top
                    self.slots.learned(gate.model, replica.name, top)
