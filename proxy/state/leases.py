"""Slot admission shared by proxy processes through Redis: per (replica, model) slot leases with expiry,
and one fair queue per model whose tenant counters (VTC) all processes share.

Used by the backpressure step when `state.backend: redis` (proxy/shared_admission.py decides what
the outcomes mean for a request; this module only keeps the shared books). Invariants:
- Slots: a lease is a member of the sorted set `<base>:lease:<replica>` scored by its expiry (Redis'
  own clock, ms). A lease is only ever added by a Lua script that first drops the expired members and
  sees fewer than the replica's limit, so all processes together never hold more than the limit (a
  balancer retry moves a lease without that check, as in one process; leases granted in a process's
  memory while Redis was down are re-added by its first tick after it, before it admits through Redis
  again, and may exceed it then).
- Expiry: held leases and queued tickets are renewed every `ttl / 3` by one loop per process; a dead
  process's leases and tickets expire `ttl` after their last renewal, and its slots return by
  themselves. Its tickets get no slot meanwhile: every process marks itself alive (`<base>:alive`) at
  each tick, and the dispatch drops a ticket whose process has not for `_ALIVE_MS`.
- Lost books: Redis may lose them while requests run (restarted without persistence, flushed, failed
  over to an empty replica). `<base>:epoch` says when they were created; each process looks at it every
  tick while it holds or waits on the model, and renews at once when it changed (adding its running
  requests' leases back). A script that finds it missing, called by a process that knew it, creates it
  with a pause (`_HOLD_MS`) in which nothing is granted, so those leases are back first.
- Order: a request that does not get a slot at once queues a ticket in Redis. Whenever a slot may have
  freed (a release, a ticket leaving, a move, a periodic tick for expiries), the script that freed it
  hands free slots to the head tickets in the same atomic step: the lane (interactive ahead of bulk,
  except every `1/bulk_share`-th dispatch), then the backlogged tenant with the smallest shared counter,
  then first come first served within the tenant. A grant charges the tenant `cost / weight`; the real
  cost is settled at release. A tenant that becomes backlogged is lifted to the smallest counter of
  those waiting, or to the counter of the tenant served last when nobody waits (VTC's rule), each
  without the charges of its grants not released yet (`<base>:pend`; a running request's estimate is
  mostly refunded at its release, as in fairqueue.FairQueue._lift). So when
  both of two tenants are backlogged, on any processes, each gets an equal share of the dispatches.
- Delivery: a grant for a ticket of the calling process is in the script's answer; one for another
  process is published on that process's channel. Both are kept under `<base>:grant:<ticket>` (until
  the lease is released, or for a TTL), which the owner's tick reads in case the answer or the message
  was lost (a call that timed out while Redis answered others). A grant whose ticket its owner no longer
  waits for (the client left, the wait timed out) is released and refunded by the owner. A grant to the
  calling process is only in the script's answer, so the answer of `enter` and `leave` is read in a task
  of its own whatever becomes of the caller: a client leaving mid-call cannot lose a slot until expiry.
- Release: every lease is released on every path (`Ticket.release`, idempotent); a release that fails
  (Redis down) is retried by the loop when Redis answers again, and meanwhile the lease expires. A
  ticket's calls name it as their `order` (state/resp.py): a leave or release runs in Redis after an
  enter or move of the ticket that is still unanswered (on its way, or timed out while Redis may still
  run it and grant or add the slot), not before it on another connection.

The head ticket blocks the queue while none of its replicas has a free slot (processes that disagree
about which replicas may serve a model wait on the head's view): head-of-line, as in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import orjson
import redis.asyncio as aioredis

from proxy.fairqueue import _UNSETTLED_HORIZON_S

from .failover import FailoverState

__all__ = ["Grant", "SharedSlots", "StateDown", "Ticket"]

log = logging.getLogger("proxy.state")

_TICK_S = 0.5
"""How often a process with tickets queued or slots held runs its maintenance: the dispatch (slots freed by
an expiry, a dead process, have no release to hand them over, and a grant message may be lost), and a
look at the books' epoch (`SharedSlots._books_lost`)."""
_HOLD_MS = int(_TICK_S * 2000)
"""After Redis lost a model's books, no grant for this long: every process's next tick adds back the
leases of its running requests first."""
_ALIVE_MS = 3000
"""A process whose ticks have not reached Redis for this long (and not more than the lease TTL) is
taken for dead: its queued tickets are dropped rather than granted a slot nobody would use."""

_PREAMBLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local base = KEYS[1]
local owner = ARGV[1]
local ttl = tonumber(ARGV[2])
local bulk_every = tonumber(ARGV[3])
local channel = ARGV[4]
-- The books' epoch as the calling process last saw it ('' if never), taken out of ARGV so that every
-- script reads its own arguments from ARGV[5] on.
local known = table.remove(ARGV, 5)
local VTC = base .. ':vtc'
local META = base .. ':meta'
local TK = base .. ':tk'
local EXP = base .. ':exp'
local LIMIT = base .. ':limit'
local LANES = {'interactive', 'bulk'}
local IDLE = 3600000
local mine = {}
local function lease_key(r) return base .. ':lease:' .. r end
local function lane_key(l) return base .. ':wait:' .. l end
local function queue_key(l, tn) return base .. ':q:' .. l .. ':' .. tn end
local function grant_key(tk) return base .. ':grant:' .. tk end
local function counter(tn) return tonumber(redis.call('HGET', VTC, tn) or '0') end
local function charge(tn, share)
  local c = tonumber(redis.call('HINCRBYFLOAT', VTC, tn, share))
  for _, l in ipairs(LANES) do
    if redis.call('ZSCORE', lane_key(l), tn) then redis.call('ZADD', lane_key(l), c, tn) end
  end
  redis.call('PEXPIRE', VTC, IDLE)
end
local function unqueue(tk, d)
  local q = queue_key(d.l, d.t)
  redis.call('ZREM', q, tk)
  redis.call('ZREM', EXP, tk)
  redis.call('HDEL', TK, tk)
  if redis.call('ZCARD', q) == 0 then redis.call('ZREM', lane_key(d.l), d.t) end
end
local function prune()
  for _, tk in ipairs(redis.call('ZRANGEBYSCORE', EXP, '-inf', now)) do
    local raw = redis.call('HGET', TK, tk)
    if raw then unqueue(tk, cjson.decode(raw)) else redis.call('ZREM', EXP, tk) end
  end
end
local PEND = base .. ':pend'
local PEND_AT = base .. ':pend:at'
local PEND_SUM = base .. ':pend:sum'
local function pending(tk, tn, share)
  -- A grant's charge, unsettled until its release (or leave) trues it up: `lift` leaves it out.
  -- Summed per tenant as it goes, so that a lift costs the same with 10,000 requests running.
  redis.call('HSET', PEND, tk, cjson.encode({tn, share}))
  redis.call('ZADD', PEND_AT, now, tk)
  redis.call('HINCRBYFLOAT', PEND_SUM, tn, share)
  for _, k in ipairs({PEND, PEND_AT, PEND_SUM}) do redis.call('PEXPIRE', k, IDLE) end
end
local function settle_pending(tk)
  local raw = redis.call('HGET', PEND, tk)
  if raw then
    local p = cjson.decode(raw)
    redis.call('HDEL', PEND, tk)
    redis.call('ZREM', PEND_AT, tk)
    redis.call('HINCRBYFLOAT', PEND_SUM, p[1], -p[2])
  end
end
local function unsettled(tn)
  -- `tn`'s charges of grants not settled yet (its requests still running); `lift` first settles
  -- the stale ones.
  return math.max(0, tonumber(redis.call('HGET', PEND_SUM, tn) or '0'))
end
local function lift(tn)
  -- The floor is what the waiting tenants (or the one served last) were served for certain: a running
  -- request's estimate is mostly refunded at its release, and a counter lifted to it would put the
  -- newcomer behind every request the flood gets served meanwhile (fairqueue.FairQueue._lift).
  -- A charge past the horizon (fairqueue's, in ms) counts as served: its release was lost (the lease
  -- expired). Settled once here, not again for each tenant read below.
  for _, tk in ipairs(redis.call('ZRANGEBYSCORE', PEND_AT, '-inf', now - UNSETTLED_MS)) do
    settle_pending(tk)
  end
  local floor = nil
  for _, l in ipairs(LANES) do
    for _, w in ipairs(redis.call('ZRANGE', lane_key(l), 0, -1)) do
      local s = counter(w) - unsettled(w)
      if floor == nil or s < floor then floor = s end
    end
  end
  if floor == nil then
    local last = redis.call('HGET', META, 'last')
    floor = last and (counter(last) - unsettled(last)) or 0
  end
  if counter(tn) < floor then redis.call('HSET', VTC, tn, tostring(floor)) end
end
local ALIVE = base .. ':alive'
local function beat()
  -- This process runs: its queued tickets may be granted (see `dispatch`).
  redis.call('HSET', ALIVE, owner, now + math.min(ALIVE_MS, ttl))
  redis.call('PEXPIRE', ALIVE, IDLE)
end
local function gone(o)
  -- Another process that has not beaten for ALIVE_MS (killed: its tickets stay queued until their
  -- TTL). A process never seen beating (an older version) counts as alive.
  local stamp = redis.call('HGET', ALIVE, o)
  return stamp ~= false and tonumber(stamp) < now
end
local EPOCH = base .. ':epoch'
local quiet_until = nil
local function settled()
  -- The books' epoch ('<created ms>:<no grant before ms>'), created when missing: first use, or Redis
  -- lost the books (restarted without persistence, flushed, failed over to an empty replica). After a
  -- loss (a caller that knew the books), the leases of running requests are missing until their
  -- processes see the new epoch at their next tick and add them back: no grant before that.
  if quiet_until == nil then
    local e = redis.call('GET', EPOCH)
    if not e then
      local hold = 0
      if known ~= '' then hold = HOLD_MS end
      e = tostring(now) .. ':' .. tostring(now + hold)
      redis.call('SET', EPOCH, e)
    end
    quiet_until = tonumber(string.match(e, ':(%d+)$')) or 0
  end
  return now >= quiet_until
end
local function free_replica(cands, learning)
  if not settled() then return nil, 0 end
  local best, best_load, best_h = nil, 2, 0
  for _, c in ipairs(cands) do
    local lk = lease_key(c[1])
    redis.call('ZREMRANGEBYSCORE', lk, '-inf', now)
    local limit = c[2]
    if learning == 1 then
      local stored = redis.call('HGET', LIMIT, c[1])
      if stored then limit = tonumber(stored) end
    end
    local h = redis.call('ZCARD', lk)
    if h < limit and h / limit < best_load then best, best_load, best_h = c[1], h / limit, h end
  end
  return best, best_h
end
local function hold(tk, r)
  redis.call('ZADD', lease_key(r), now + ttl, tk)
  redis.call('PEXPIRE', lease_key(r), ttl * 2)
end
local function head()
  local n = tonumber(redis.call('HGET', META, 'n') or '0')
  local wi = redis.call('ZCARD', lane_key('interactive')) > 0
  local wb = redis.call('ZCARD', lane_key('bulk')) > 0
  local lane
  if wi and wb and bulk_every > 0 and (n + 1) % bulk_every == bulk_every - 1 then lane = 'bulk'
  elseif wi then lane = 'interactive'
  elseif wb then lane = 'bulk'
  else return nil end
  local tn = redis.call('ZRANGE', lane_key(lane), 0, 0)[1]
  local tk = redis.call('ZRANGE', queue_key(lane, tn), 0, 0)[1]
  if not tk then redis.call('ZREM', lane_key(lane), tn); return false end
  return tk
end
local function dispatch()
  for _ = 1, 10000 do
    local tk = head()
    if tk == nil then return end
    if tk then
      local raw = redis.call('HGET', TK, tk)
      if not raw then
        for _, l in ipairs(LANES) do
          for _, tn in ipairs(redis.call('ZRANGE', lane_key(l), 0, -1)) do
            redis.call('ZREM', queue_key(l, tn), tk)
            if redis.call('ZCARD', queue_key(l, tn)) == 0 then redis.call('ZREM', lane_key(l), tn) end
          end
        end
      else
        local d = cjson.decode(raw)
        if d.o ~= owner and gone(d.o) then
          -- Its process is dead: granted, the slot would stay taken until the lease's TTL for a
          -- request nobody serves.
          unqueue(tk, d)
        else
          local r, h = free_replica(d.c, d.L)
          if r == nil then return end
          unqueue(tk, d)
          hold(tk, r)
          charge(d.t, d.s)
          pending(tk, d.t, d.s)
          redis.call('HSET', META, 'last', d.t)
          redis.call('HINCRBY', META, 'n', 1)
          local grant = {tk, r, h + 1, now, d.t, tostring(d.s)}
          -- Kept until the lease is released (or for a TTL): the owner's tick claims it if the
          -- answer or the message carrying it is lost.
          local message = cjson.encode({base, tk, r, h + 1, now, d.t, tostring(d.s)})
          redis.call('SET', grant_key(tk), message, 'PX', ttl)
          if d.o == owner then
            table.insert(mine, grant)
          else
            redis.call('PUBLISH', channel .. d.o, message)
          end
        end
      end
    end
  end
end
local function touch()
  for _, k in ipairs({TK, EXP, META, base .. ':seq'}) do redis.call('PEXPIRE', k, IDLE) end
end
""".replace("HOLD_MS", str(_HOLD_MS)).replace("ALIVE_MS", str(_ALIVE_MS)).replace(
    "UNSETTLED_MS", str(int(_UNSETTLED_HORIZON_S * 1000)))

_ENTER = _PREAMBLE + """
prune()
beat()
local tk = ARGV[5]
if tk ~= '' then
  local d = cjson.decode(ARGV[6])
  if redis.call('ZCARD', lane_key('interactive')) == 0 and redis.call('ZCARD', lane_key('bulk')) == 0 then
    -- Nobody waits: a free slot is taken at once, without queueing the ticket (the common case).
    local r, h = free_replica(d.c, d.L)
    if r ~= nil then
      lift(d.t)
      hold(tk, r)
      charge(d.t, d.s)
      pending(tk, d.t, d.s)
      redis.call('HSET', META, 'last', d.t)
      redis.call('HINCRBY', META, 'n', 1)
      redis.call('PEXPIRE', META, IDLE)
      return {{tk, r, h + 1, now, d.t, tostring(d.s)}}
    end
  end
  local q = queue_key(d.l, d.t)
  if redis.call('ZCARD', q) == 0 then lift(d.t) end
  redis.call('ZADD', q, redis.call('INCR', base .. ':seq'), tk)
  redis.call('ZADD', lane_key(d.l), counter(d.t), d.t)
  redis.call('HSET', TK, tk, ARGV[6])
  redis.call('ZADD', EXP, now + ttl, tk)
end
dispatch()
for i = 7, #ARGV do
  local message = redis.call('GET', grant_key(ARGV[i]))
  if message then
    redis.call('DEL', grant_key(ARGV[i]))
    local m = cjson.decode(message)
    table.insert(mine, {m[2], m[3], m[4], m[5], m[6], m[7]})
  end
end
touch()
return mine
"""

_RELEASE = _PREAMBLE + """
prune()
redis.call('DEL', grant_key(ARGV[5]))
settle_pending(ARGV[5])
local removed = redis.call('ZREM', lease_key(ARGV[6]), ARGV[5])
local delta = tonumber(ARGV[8])
if removed == 1 and delta ~= 0 then charge(ARGV[7], delta) end
dispatch()
return mine
"""

_LEAVE = _PREAMBLE + """
prune()
local tk = ARGV[5]
settle_pending(tk)
local raw = redis.call('HGET', TK, tk)
if raw then
  unqueue(tk, cjson.decode(raw))
else
  local message = redis.call('GET', grant_key(tk))
  if message then
    redis.call('DEL', grant_key(tk))
    local m = cjson.decode(message)
    if redis.call('ZREM', lease_key(m[3]), tk) == 1 then charge(m[6], -tonumber(m[7])) end
  else
    -- Neither queued nor granted by message: a slot `enter` granted at once, in an answer that was
    -- lost (a call that timed out), is known only to the lease sets of its candidates (ARGV[8..]).
    for i = 8, #ARGV do
      if redis.call('ZREM', lease_key(ARGV[i]), tk) == 1 then charge(ARGV[6], -tonumber(ARGV[7])) end
    end
  end
end
dispatch()
return mine
"""

_MOVE = _PREAMBLE + """
-- Every script that dispatches prunes first: an expired ticket whose owner the epoch script has
-- forgotten would read as alive to `gone` and be granted a slot nobody takes.
prune()
redis.call('ZREM', lease_key(ARGV[6]), ARGV[5])
hold(ARGV[5], ARGV[7])
dispatch()
return mine
"""

_RENEW = _PREAMBLE + """
local missing = {}
for i = 5, #ARGV, 2 do
  local tk, r = ARGV[i], ARGV[i + 1]
  if r ~= '' then
    if redis.call('ZADD', lease_key(r), 'XX', 'CH', now + ttl, tk) == 0 then
      table.insert(missing, tk)
    end
    redis.call('PEXPIRE', lease_key(r), ttl * 2)
  elseif redis.call('ZSCORE', EXP, tk) then
    redis.call('ZADD', EXP, now + ttl, tk)
  elseif redis.call('EXISTS', grant_key(tk)) == 0 then
    -- Out of the queue and no grant on its way by message (which the owner's tick also claims).
    table.insert(missing, tk)
  end
end
return missing
"""

_RESTAMP = _PREAMBLE + """
prune()
for i = 5, #ARGV, 2 do
  if redis.call('HEXISTS', TK, ARGV[i]) == 1 then redis.call('HSET', TK, ARGV[i], ARGV[i + 1]) end
end
dispatch()
return mine
"""

_RESTORE = _PREAMBLE + """
for i = 5, #ARGV, 2 do hold(ARGV[i], ARGV[i + 1]) end
return 1
"""

_EPOCH = _PREAMBLE + """
beat()
settled()
-- Forget processes that have not beaten for a TTL: their tickets have expired, so `gone` has nothing
-- left to tell about them, and every process that ever ran (each restart is a new owner) would
-- otherwise stay in the hash for as long as the model is in use. Here, at each process's tick, not
-- at every `enter`.
if redis.call('HLEN', ALIVE) > 16 then
  local stamps = redis.call('HGETALL', ALIVE)
  for i = 1, #stamps, 2 do
    if (tonumber(stamps[i + 1]) or 0) < now - ttl then redis.call('HDEL', ALIVE, stamps[i]) end
  end
end
return redis.call('GET', EPOCH)
"""

_LEARNED = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""

_LEARNED_TTL_MS = 600_000
"""A learned limit stored in Redis is forgotten after this long without a write."""
_HANDOFF_SAMPLES = 1024


class StateDown(Exception):
    """Redis cannot answer (the breaker is open or the call failed): the failure mode applies."""


class Grant:
    """A slot granted to a ticket: the replica, how many held it then (this one included), the tenant
    and the share it was charged."""

    __slots__ = ("base", "holders", "replica", "share", "tenant", "ticket")

    def __init__(self, base: str, ticket: str, replica: str, holders: int, tenant: str,
                 share: float) -> None:
        self.base = base
        self.ticket = ticket
        self.replica = replica
        self.holders = holders
        self.tenant = tenant
        self.share = share


class Ticket:
    """One request's place in the shared books: queued, then holding a lease on `replica`."""

    def __init__(self, slots: SharedSlots, base: str, tenant: str, weight: float, lane: str,
                 cost: float, *, local: bool = False) -> None:
        self.slots = slots
        self.base = base
        self.id = secrets.token_hex(8)
        self.tenant = tenant
        self.weight = weight
        self.lane = lane
        self.cost = cost
        self.local = local
        """Admitted by this process alone (Redis was down): renewals add it to Redis once it answers."""
        self.replica: str | None = None
        self.holders = 0
        self.future: asyncio.Future[Grant] | None = None
        self.data = ""
        """The queued ticket as the scripts read it (JSON)."""
        self.entered = False
        """Its `enter` script has answered: only from then on may a renewal find it missing."""
        self.candidates: list[tuple[str, int]] = []
        """(replica, limit) pairs as the queued ticket holds them in Redis."""
        self.learning = False

    @property
    def share(self) -> float:
        return self.cost / self.weight

    def move(self, replica: str) -> None:
        """The balancer retried on another replica: the lease moves with the request."""
        if self.replica is not None and replica != self.replica:
            old, self.replica = self.replica, replica
            self.slots.spawn(self.slots.move(self, old))

    def release(self, delta_cost: float = 0.0) -> None:
        """Give the slot back (idempotent; never raises, never waits): `delta_cost` is the real cost
        minus the charged one, settled in the tenant's shared counter."""
        if self.replica is not None and self.slots.held.pop(self.id, None) is not None:
            self.slots.spawn(self.slots.release(self, delta_cost / self.weight))


class SharedSlots:
    """This process's side of the shared books (see the module docstring).

    Every Redis call goes through the failover breaker (`state.failure_mode`): a failed call raises
    StateDown to the admission path, which applies the failure mode; bookkeeping (release, move,
    renew) never raises and never waits for Redis beyond the breaker's timeout."""

    def __init__(self, failover: FailoverState, url: str, key_prefix: str, lease_ttl_s: float,
                 connect_timeout_s: float = 0.5) -> None:
        self.failover = failover
        self.url = url
        self.prefix = f"{key_prefix}slots:"
        self.channel = f"{key_prefix}grant:"
        self.ttl_ms = max(1000, int(lease_ttl_s * 1000))
        self.connect_timeout_s = connect_timeout_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.bulk_every = 10
        client: Any = failover.remote.client
        self._enter = client.register_script(_ENTER)
        self._release = client.register_script(_RELEASE)
        self._leave = client.register_script(_LEAVE)
        self._move = client.register_script(_MOVE)
        self._renew = client.register_script(_RENEW)
        self._restore = client.register_script(_RESTORE)
        self._restamp = client.register_script(_RESTAMP)
        self._learned = client.register_script(_LEARNED)
        self._epoch = client.register_script(_EPOCH)
        self._epochs: dict[str, str] = {}
        """Per key base this process holds or waits on: its `:epoch` as last seen (`_books_lost`)."""
        self._restored = True
        """False from an outage until the first renewal after it (`degraded`)."""
        self._local_count = 0
        """Slots taken from this process's own gate while `degraded` so far (`hold_local`)."""
        self.waiting: dict[str, Ticket] = {}
        """Tickets of this process queued in Redis, by id."""
        self.candidates: dict[str, Callable[[], list[tuple[str, int]]]] = {}
        """Per key base: the (replica, limit) pairs a ticket queued now would carry, as this process's
        settings and health say now (empty: no replica may serve the model now). Queued tickets are
        stamped with them again when they changed (a reload, a replica ejected or back)."""
        self.held: dict[str, Ticket] = {}
        """Tickets of this process holding a lease, by id."""
        self._pending: dict[str, tuple[Ticket, float]] = {}
        """Releases that failed (Redis down), retried when it answers: ticket id -> (ticket, share)."""
        self._leaves: dict[str, Ticket] = {}
        """Queued tickets whose leaving failed (Redis down), retried when it answers."""
        self.handoffs: deque[float] = deque(maxlen=_HANDOFF_SAMPLES)
        """Milliseconds from a grant in Redis to its owner learning of it by message (another process
        freed the slot)."""
        self.counts = {"granted_at_once": 0, "granted_queued": 0, "released_late": 0, "orphans": 0,
                       "reentered": 0}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the grant listener and the renewal loop (never fails: both retry while Redis is down)."""
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(self._listen()), loop.create_task(self._maintain())]

    async def close(self) -> None:
        """Stop the loops; bookkeeping still under way (releases, a given-up enter's answer) gets one
        Redis timeout to finish first, so a slot it would give back is not left until its lease expires."""
        for task in self._loops:
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.failover.timeout_s * 2)
        for task in [*self._loops, *self._tasks]:
            task.cancel()
        for task in [*self._loops, *self._tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- keys and calls ------------------------------------------------------------------------------

    def base(self, model: str) -> str:
        """The key base of `model`'s books (a hash tag keeps them in one Redis Cluster slot)."""
        return f"{self.prefix}{{{model}}}"

    @property
    def degraded(self) -> bool:
        """Redis cannot answer, or has just come back and this process has not yet added to it the
        slots it holds (taken meanwhile, or expired there during a long outage): admission keeps to
        this process's own gate until then."""
        return self.failover.degraded or (not self._restored and bool(self.held))

    def _args(self, base: str, *extra: Any) -> list[Any]:
        """A script's arguments: the header every script reads (`_PREAMBLE`), then `extra`."""
        return [self.owner, self.ttl_ms, self.bulk_every, self.channel, self._epochs.get(base, ""),
                *extra]

    async def _call(self, operation: str, call: Callable[[], Awaitable[Any]]) -> Any:
        result = await self.failover.call_remote(operation, call)
        if result is None:
            raise StateDown(operation)
        return result

    def _grants(self, base: str, rows: Sequence[Any]) -> None:
        """Hand the grants for this process's tickets to their waiters (a grant nobody waits for any
        more is released and refunded)."""
        for row in rows:
            self._deliver(Grant(base, str(row[0]), str(row[1]), int(row[2]), str(row[4]),
                                float(row[5])))

    def _deliver(self, grant: Grant) -> None:
        ticket = self.waiting.pop(grant.ticket, None)
        if ticket is not None and ticket.future is not None and not ticket.future.done():
            # Held from now on, before its waiter resumes: a second delivery of the same grant (the
            # message and the tick's claim) must find it held, not release it as an orphan.
            self.granted(ticket, grant)
            ticket.future.set_result(grant)
            return
        if grant.ticket in self.held:
            return  # delivered twice (message and tick): already running
        # Nobody waits for it any more (the client left, the wait timed out or failed over): give it
        # back with the tenant's charge. A second release of the same lease changes nothing.
        self.counts["orphans"] += 1
        orphan = Ticket(self, grant.base, grant.tenant, 1.0, "interactive", grant.share)
        orphan.id = grant.ticket
        orphan.replica = grant.replica
        self.spawn(self.release(orphan, -grant.share))

    # -- admission -----------------------------------------------------------------------------------

    async def enter(self, ticket: Ticket, candidates: Sequence[tuple[str, int]], learning: bool
                    ) -> Grant | None:
        """Queue `ticket` for a slot on one of `candidates` ((replica, limit) pairs): the grant if one
        was free for it at once, else None and `ticket.future` resolves with the grant later.
        Raises StateDown when Redis cannot answer (nothing was queued, or the queued ticket expires)."""
        ticket.candidates = list(candidates)
        ticket.learning = learning
        ticket.data = self._data(ticket, ticket.candidates)
        ticket.future = asyncio.get_running_loop().create_future()
        self.waiting[ticket.id] = ticket
        # The script's answer is read, and its grants handed out, whatever becomes of the caller: Redis
        # runs the script even when the client leaves while it does, and the answer is the only place
        # a grant to this process is written (otherwise that slot stays taken, for every process, until
        # its lease expires, and the queue behind it waits as long).
        call = asyncio.ensure_future(self._delivered("slots_enter", ticket.base, lambda: self._enter(
            keys=[ticket.base], args=self._args(ticket.base, ticket.id, ticket.data), order=ticket.id,
            takes=True)))
        try:
            await asyncio.shield(call)
        except asyncio.CancelledError:
            self.waiting.pop(ticket.id, None)  # a grant delivered from now on is an orphan: released
            self.spawn(self._abandoned(ticket, call))
            raise
        except BaseException as exc:
            self.waiting.pop(ticket.id, None)
            future = ticket.future
            if isinstance(exc, Exception) and future.done() and not future.cancelled() \
                    and future.exception() is None:
                # The call failed (its answer late: a timeout while Redis answers others), but the
                # script had queued the ticket and a grant for it came meanwhile, by message or a
                # tick: the slot is this request's. Raising would leave the ticket among the held
                # ones with nobody to release it, and every renewal would add its lease back.
                ticket.entered = True
                return future.result()
            raise
        ticket.entered = True
        if ticket.future.done():
            self.counts["granted_at_once"] += 1
            return ticket.future.result()
        return None

    def _data(self, ticket: Ticket, candidates: Sequence[tuple[str, int]]) -> str:
        """The queued ticket as the scripts read it."""
        return orjson.dumps({"t": ticket.tenant, "l": ticket.lane, "s": ticket.share,
                             "o": self.owner, "c": [list(c) for c in candidates],
                             "L": 1 if ticket.learning else 0}).decode()

    async def _delivered(self, operation: str, base: str, call: Callable[[], Awaitable[Any]]) -> None:
        """Run a script and hand its grants to this process's waiters (see `enter`)."""
        self._grants(base, await self._call(operation, call))

    async def _abandoned(self, ticket: Ticket, call: asyncio.Future[None]) -> None:
        """`ticket`'s enter was given up by its caller while the script ran: whatever it got goes back
        once the answer is in (a slot granted before the caller's leaving was seen, with its charge; a
        place in the queue). When Redis does not answer, leaving is retried once it does, and a grant
        the lost answer held expires with its lease."""
        try:
            await call
        except Exception:
            if ticket.id in self.held:
                # Granted by message or a tick before its caller left: held, so released (a leave
                # would free the lease in Redis but keep the ticket held, renewed back for ever).
                ticket.release(-ticket.cost)
            else:
                self._leaves[ticket.id] = ticket
            return
        if ticket.id in self.held:
            ticket.release(-ticket.cost)
        elif ticket.future is None or not ticket.future.done():
            await self.leave(ticket)

    def granted(self, ticket: Ticket, grant: Grant) -> None:
        """`ticket` holds the slot `grant` gave it (its renewals start)."""
        ticket.replica = grant.replica
        ticket.holders = grant.holders
        self.held[ticket.id] = ticket

    def hold_local(self, ticket: Ticket, replica: str) -> None:
        """`ticket` got a slot from this process's own gate (Redis down, fail-open; or a request the
        backpressure step takes in shadow): kept here, and added to Redis by a renewal. Taken while
        `degraded` (the outage, or its slots not yet back in Redis), it keeps `degraded` true until a
        tick has added it."""
        outage = self.degraded  # read before this slot joins `held`
        ticket.local = True
        ticket.replica = replica
        self.held[ticket.id] = ticket
        if outage:
            # Redis lacks it until a tick adds it: `degraded` until then, also when the outage began
            # and ended between two ticks (a `retry_interval_s` shorter than a tick), which no tick
            # saw. Not for a shadow request's slot while Redis answers and the books are whole:
            # `degraded` would send every enforced request to this process's gate (closed mode: 503
            # state_unavailable, /readyz 503) for as long as shadow requests keep coming.
            self._local_count += 1
            self._restored = False

    async def leave(self, ticket: Ticket) -> None:
        """`ticket` stops waiting (timeout, client gone): out of the queue, and a grant it got meanwhile
        is released with its charge. Never raises; finishes (its answer handed out) also when the
        caller is cancelled meanwhile, as `enter` does."""
        self.waiting.pop(ticket.id, None)
        await asyncio.shield(asyncio.ensure_future(self._left(ticket)))

    async def _left(self, ticket: Ticket) -> None:
        try:
            await self._delivered("slots_leave", ticket.base, lambda: self._leave(
                keys=[ticket.base], args=self._args(ticket.base, ticket.id, ticket.tenant, ticket.share,
                                                    *(replica for replica, _ in ticket.candidates)),
                order=ticket.id))
        except StateDown:
            self._leaves[ticket.id] = ticket  # left when Redis answers again (else it expires)

    async def release(self, ticket: Ticket, share_delta: float) -> None:
        """Free `ticket`'s lease and settle its charge; kept for later if Redis cannot answer."""
        assert ticket.replica is not None
        self.held.pop(ticket.id, None)  # (Ticket.release did; a renewal must not add it back)
        replica = ticket.replica
        try:
            rows = await self._call("slots_release", lambda: self._release(
                keys=[ticket.base],
                args=self._args(ticket.base, ticket.id, replica, ticket.tenant, share_delta),
                order=ticket.id))
        except StateDown:
            self._pending[ticket.id] = (ticket, share_delta)
            return
        self._grants(ticket.base, rows)

    async def move(self, ticket: Ticket, old: str) -> None:
        assert ticket.replica is not None
        new = ticket.replica
        with contextlib.suppress(StateDown):  # the renewal adds it on `new` anyway
            rows = await self._call("slots_move", lambda: self._move(
                keys=[ticket.base], args=self._args(ticket.base, ticket.id, old, new), order=ticket.id,
                takes=True))
            self._grants(ticket.base, rows)

    def learned(self, model: str, replica: str, limit: int) -> None:
        """This process learned `replica`'s slots for `model`: the fleet's limit from now on (the last
        process to learn something wins; each keeps learning from its own requests)."""
        base = self.base(model)

        async def store() -> None:
            with contextlib.suppress(StateDown):
                await self._call("slots_learned", lambda: self._learned(
                    keys=[f"{base}:limit"], args=[replica, limit, _LEARNED_TTL_MS]))

        self.spawn(store())

    # -- background: grants by message, renewals, ticks ----------------------------------------------

    async def _listen(self) -> None:
        """Receive this process's grants; reconnect with backoff (the tick covers the gap)."""
        backoff = 0.1
        while True:
            client: Any = aioredis.Redis.from_url(
                self.url, socket_connect_timeout=self.connect_timeout_s, decode_responses=True,
                driver_info=None)
            try:
                async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(f"{self.channel}{self.owner}")
                    backoff = 0.1
                    while True:
                        message = await pubsub.get_message(timeout=5.0)
                        if message is not None and message.get("type") == "message":
                            self._on_message(str(message["data"]))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis gone: retry; the tick covers the gap
                log.debug("slot grant listener: %s", type(exc).__name__)
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(backoff)
            backoff = min(5.0, backoff * 2)

    def _on_message(self, data: str) -> None:
        try:
            base, ticket, replica, holders, granted_ms, tenant, share = orjson.loads(data)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            return
        self.handoffs.append(max(0.0, time.time() * 1000 - float(granted_ms)))
        self._deliver(Grant(str(base), str(ticket), str(replica), int(holders), str(tenant), float(share)))

    async def _maintain(self) -> None:
        """Every `_TICK_S`: retry failed releases, renew what this process holds (every `ttl / 3`, and
        at once after an outage or when Redis lost the books), then run the dispatch for models with
        tickets queued here (claiming grants whose message or answer was lost); while Redis is down,
        tell waiters (they apply the failure mode)."""
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(_TICK_S)
            try:
                if self.failover.degraded:
                    self._restored = False
                    self._fail_waiters()
                    continue
                await self._flush_pending()
                lost = await self._books_lost()
                if lost or not self._restored or time.monotonic() - renewed >= self.ttl_ms / 3000:
                    renewed = time.monotonic()
                    local = self._local_count
                    await self._renew_all()  # adds back what Redis lacks of what runs here
                    # Restored unless a slot was taken locally meanwhile (the next round adds it).
                    self._restored = self._local_count == local
                await self._tick()
            except StateDown:
                # Only when the breaker opened: a call that timed out while Redis answers others (a
                # slow link, a busy process) leaves the waiters' tickets where they are in Redis, and
                # a grant its lost answer carried is claimed by the next tick.
                if self.failover.degraded:
                    self._restored = False
                    self._fail_waiters()
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must survive anything
                log.exception("slot lease maintenance failed")

    async def _books_lost(self) -> bool:
        """Did Redis lose the books of a model this process holds or waits on since its last look
        (restarted without persistence, flushed, failed over to an empty replica: `<base>:epoch`,
        created by the first look after, changed)? Without a call failing, the breaker never opens,
        and the leases of requests running here would be missing until the next renewal."""
        bases = {t.base for t in list(self.held.values())} | {t.base for t in list(self.waiting.values())}
        lost = False
        for base in bases:
            epoch = str(await self._call("slots_epoch", partial(
                self._epoch, keys=[base], args=self._args(base))))
            if self._epochs.get(base) != epoch:
                # New to this process too: its first look may come after the loss.
                lost = True
            self._epochs[base] = epoch
        return lost

    def _fail_waiters(self) -> None:
        for ticket in list(self.waiting.values()):
            if ticket.future is not None and not ticket.future.done():
                ticket.future.set_exception(StateDown("wait"))

    async def _flush_pending(self) -> None:
        for key, ticket in list(self._leaves.items()):
            self._leaves.pop(key, None)
            await self.leave(ticket)
            if key in self._leaves:
                return  # still down
        for key, (ticket, share) in list(self._pending.items()):
            self._pending.pop(key, None)
            self.counts["released_late"] += 1
            await self.release(ticket, share)
            if key in self._pending:
                return  # still down

    async def _tick(self) -> None:
        by_base: dict[str, list[Ticket]] = {}
        for ticket in list(self.waiting.values()):
            by_base.setdefault(ticket.base, []).append(ticket)
        for base, tickets in by_base.items():
            await self._restamp_all(base, tickets)
            args = self._args(base, "", "", *(ticket.id for ticket in tickets))
            rows = await self._call("slots_tick", partial(self._enter, keys=[base], args=args))
            self._grants(base, rows)

    async def _restamp_all(self, base: str, tickets: Sequence[Ticket]) -> None:
        """Queued tickets whose replicas or limits changed here since they were queued (a reload, a
        replica ejected or back in service) are stamped with those of now: a grant reads the replicas
        and limits from the head ticket, so a lowered max_in_flight would otherwise not hold, and a
        replica back in service would stay idle, until the queue of that time had drained (the head
        blocks the queue while none of its replicas has a free slot). While no replica may serve the
        model, the tickets keep theirs."""
        candidates_of = self.candidates.get(base)
        if candidates_of is None:
            return
        now = candidates_of()
        if not now:
            return
        changed: list[tuple[Ticket, list[tuple[str, int]], str]] = []
        for ticket in tickets:
            if not ticket.entered:
                continue
            if now != ticket.candidates:
                changed.append((ticket, now, self._data(ticket, now)))
        if not changed:
            return
        args = [value for ticket, _, data in changed for value in (ticket.id, data)]
        rows = await self._call("slots_restamp", partial(
            self._restamp, keys=[base], args=self._args(base, *args)))
        for ticket, now, data in changed:
            ticket.candidates, ticket.data = now, data
        self._grants(base, rows)

    async def _renew_all(self) -> None:
        by_base: dict[str, list[str]] = {}
        for ticket in list(self.held.values()):
            if ticket.replica is not None and ticket.id not in self._pending:
                by_base.setdefault(ticket.base, []).extend((ticket.id, ticket.replica))
        for ticket in list(self.waiting.values()):
            # Not before its enter has answered: a renewal on another connection may reach Redis
            # first, and would report a ticket that is about to be queued as lost.
            if ticket.entered:
                by_base.setdefault(ticket.base, []).extend((ticket.id, ""))
        for base, pairs in by_base.items():
            missing = await self._call("slots_renew", partial(
                self._renew, keys=[base], args=self._args(base, *pairs)))
            restore: list[str] = []
            for ticket_id in map(str, missing):
                # Its queue entry expired (Redis restarted empty, or was down past the TTL) and no
                # grant for it waits in Redis: the waiter enters again (SharedAdmission.admit).
                lost = self.waiting.get(ticket_id)
                if lost is not None and lost.future is not None and not lost.future.done():
                    lost.future.set_exception(StateDown("ticket lost"))
                # A lease Redis lost (restarted, or expired while it was down) or never had (admitted
                # here while it was down), still running: added again, since it is in flight. Only
                # those still held now: one released during the renewal must not come back.
                held = self.held.get(ticket_id)
                if held is not None and held.replica is not None:
                    restore += [ticket_id, held.replica]
            if restore:
                await self._call("slots_restore", partial(
                    self._restore, keys=[base], args=self._args(base, *restore)))

    def snapshot(self) -> dict[str, Any]:
        """For /system/queue: tickets waiting and held here, and the grant hand-off latency."""
        samples = sorted(self.handoffs)

        def pct(q: float) -> float | None:
            return round(samples[min(len(samples) - 1, int(q * len(samples)))], 2) if samples \
                else None

        return {"waiting": len(self.waiting), "held": len(self.held),
                "pending_releases": len(self._pending) + len(self._leaves), **self.counts,
                "handoff_ms": {"p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99),
                               "samples": len(samples)}}
