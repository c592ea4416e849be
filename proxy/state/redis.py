"""The Redis backend: buckets and leases shared by every proxy replica pointing at the same Redis.

Each operation is one Lua script, so it is atomic across replicas, and uses Redis' own clock (TIME), so
replicas' clocks need not agree. Buckets are hashes {level, ms}; leases are sorted sets of holder ->
expiry (ms), pruned on every access. Keys expire when idle.

Calls go through RespClient (resp.py): pipelined connections, a call is one frame and a future, no
client-side retries (redis-py retries three times by default, which turns one frozen Redis into four
timeouts). Every call is bounded by its caller (`failover.FailoverState`'s timeout) and a connect by
`socket_timeout_s`. Errors are raised as they are; `failover.FailoverState` decides what a failed call
means. Every call about a lease names its holder as its `order` (resp.py), so one that gives the lease
back runs in Redis after a call that takes it (admit, lease, renew) and is still unanswered: on its
way, or given up by a timeout while Redis may still run it.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from .base import Admission, BucketAsk, BucketResult, LeaseAsk, StateBackend
from .resp import RespClient

__all__ = ["RedisState"]

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_BUCKET = _NOW + """
local capacity = tonumber(ARGV[1])
local per_ms = tonumber(ARGV[2]) / 1000
local amount = tonumber(ARGV[3])
local force = ARGV[4] == '1'
local state = redis.call('HMGET', KEYS[1], 'level', 'ms')
local level = tonumber(state[1])
local stamp = tonumber(state[2])
if level == nil then level = capacity; stamp = now end
level = math.min(capacity, level + math.max(0, now - stamp) * per_ms)
local ok = 0
if force then
  level = math.min(capacity, level - amount)
  ok = 1
elseif amount == 0 or level >= amount then
  level = level - amount
  ok = 1
end
if amount ~= 0 or force then
  redis.call('HSET', KEYS[1], 'level', tostring(level), 'ms', now)
  local idle_ms = 60000
  if per_ms > 0 then idle_ms = math.ceil(capacity / per_ms) + 60000 end
  redis.call('PEXPIRE', KEYS[1], idle_ms)
end
return {ok, tostring(level)}
"""

_LEASE = _NOW + """
local limit = tonumber(ARGV[1])
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local holders = redis.call('ZCARD', KEYS[1])
if holders < limit or redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ttl * 2)
  return {1, redis.call('ZCARD', KEYS[1])}
end
return {0, holders}
"""

_RENEW = _NOW + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return 1
"""

# admit: KEYS = [lease set]? + bucket keys; ARGV = has_lease, limit, holder, ttl_ms, then per bucket
# capacity, refill_per_s, amount. Checks everything first and writes only when everything fits.
# Returns {ok, holders, refused bucket (1-based, 0: none; -1: the lease), levels...}.
_ADMIT = _NOW + """
local has_lease = ARGV[1] == '1'
local first = 1
local holders = 0
local refused = 0
if has_lease then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  holders = redis.call('ZCARD', KEYS[1])
  if holders >= tonumber(ARGV[2]) and not redis.call('ZSCORE', KEYS[1], ARGV[3]) then
    refused = -1
  end
  first = 2
end
-- Every bucket's level, before anything is taken: on a refusal each one is reported, so the caller
-- knows when all of them fit (the longest wait), not only the first that did not.
local levels = {}
local n = #KEYS - first + 1
for i = 1, n do
  local base = 4 + (i - 1) * 3
  local capacity = tonumber(ARGV[base + 1])
  local per_ms = tonumber(ARGV[base + 2]) / 1000
  local amount = tonumber(ARGV[base + 3])
  local state = redis.call('HMGET', KEYS[first + i - 1], 'level', 'ms')
  local level = tonumber(state[1])
  local stamp = tonumber(state[2])
  if level == nil then level = capacity; stamp = now end
  level = math.min(capacity, level + math.max(0, now - stamp) * per_ms)
  levels[i] = level
  if refused == 0 and not (amount == 0 or level >= amount) then refused = i end
end
if refused ~= 0 then
  local out = {0, holders, refused}
  for j = 1, n do out[#out + 1] = tostring(levels[j]) end
  return out
end
if has_lease then
  local ttl = tonumber(ARGV[4])
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ttl * 2)
  holders = redis.call('ZCARD', KEYS[1])
end
local out = {1, holders, 0}
for i = 1, n do
  local base = 4 + (i - 1) * 3
  local capacity = tonumber(ARGV[base + 1])
  local per_ms = tonumber(ARGV[base + 2]) / 1000
  local amount = tonumber(ARGV[base + 3])
  local level = levels[i] - amount
  if amount ~= 0 then
    redis.call('HSET', KEYS[first + i - 1], 'level', tostring(level), 'ms', now)
    local idle_ms = 60000
    if per_ms > 0 then idle_ms = math.ceil(capacity / per_ms) + 60000 end
    redis.call('PEXPIRE', KEYS[first + i - 1], idle_ms)
  end
  out[#out + 1] = tostring(level)
end
return out
"""

# settle: KEYS = [lease set]? + bucket keys; ARGV = has_lease, holder, then per bucket capacity,
# refill_per_s, delta (added without condition, capped at capacity).
_SETTLE = _NOW + """
local first = 1
if ARGV[1] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[2])
  first = 2
end
for i = first, #KEYS do
  local base = 2 + (i - first) * 3
  local capacity = tonumber(ARGV[base + 1])
  local per_ms = tonumber(ARGV[base + 2]) / 1000
  local delta = tonumber(ARGV[base + 3])
  local state = redis.call('HMGET', KEYS[i], 'level', 'ms')
  local level = tonumber(state[1])
  local stamp = tonumber(state[2])
  if level == nil then level = capacity; stamp = now end
  level = math.min(capacity, level + math.max(0, now - stamp) * per_ms + delta)
  redis.call('HSET', KEYS[i], 'level', tostring(level), 'ms', now)
  local idle_ms = 60000
  if per_ms > 0 then idle_ms = math.ceil(capacity / per_ms) + 60000 end
  redis.call('PEXPIRE', KEYS[i], idle_ms)
end
return 1
"""

_EPOCH = """
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[1], epoch)
end
return epoch
"""

_HOLDERS = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""


class RedisState(StateBackend):
    """State in Redis, for several proxy replicas.

    `socket_timeout_s` bounds a connect, and says when a connection that answers nothing is given up;
    at most `max_connections` (and 4) pipelined connections carry the calls. `renew` re-adds a holder
    that is missing (Redis restarted and lost it, or its lease expired while Redis was unreachable): a
    request still running is still in flight and must count.
    """

    def __init__(self, url: str, key_prefix: str = "sop:", *, socket_timeout_s: float = 0.5,
                 max_connections: int = 512) -> None:
        self._redis = RespClient(url, timeout_s=socket_timeout_s,
                                 connections=min(4, max_connections))
        self._prefix = key_prefix
        self._bucket = self._redis.register_script(_BUCKET)
        self._lease = self._redis.register_script(_LEASE)
        self._renew = self._redis.register_script(_RENEW)
        self._holders = self._redis.register_script(_HOLDERS)
        self._admit = self._redis.register_script(_ADMIT)
        self._settle = self._redis.register_script(_SETTLE)
        self._epoch = self._redis.register_script(_EPOCH)

    @property
    def client(self) -> RespClient:
        """The pipelined client, for scripts of other modules (leases.py)."""
        return self._redis

    def _key(self, kind: str, key: str) -> str:
        return f"{self._prefix}{kind}:{key}"

    async def ping(self) -> None:
        """One round trip; raises when Redis cannot be reached."""
        await self._redis.execute("PING")

    async def probe(self) -> None:
        """Raise unless Redis can run the scripts and take writes: one lease script on a key of its
        own (reads TIME, writes), so a server that answers PING but cannot serve (loading, read-only)
        fails it, then a SET with a short expiry, since Redis runs that script while out of memory
        (noeviction) but refuses the commands that may grow it."""
        await self._lease(keys=[self._key("probe", "lease")], args=[1, "probe", 1])
        await self._redis.execute("SET", self._key("probe", "write"), "1", "PX", "1000")

    async def _run_bucket(self, key: str, capacity: float, refill_per_s: float, amount: float,
                          force: bool) -> tuple[bool, float]:
        ok, level = await self._bucket(keys=[self._key("bucket", key)],
                                       args=[capacity, refill_per_s, amount, "1" if force else "0"])
        return bool(int(ok)), float(level)

    async def take(self, key: str, capacity: float, refill_per_s: float, amount: float) -> BucketResult:
        ok, level = await self._run_bucket(key, capacity, refill_per_s, amount, False)
        return BucketResult(ok, level, 0.0 if ok else self.wait_s(level, amount, refill_per_s))

    async def adjust(self, key: str, capacity: float, refill_per_s: float, delta: float) -> float:
        return (await self._run_bucket(key, capacity, refill_per_s, -delta, True))[1]

    async def level(self, key: str, capacity: float, refill_per_s: float) -> float:
        return (await self._run_bucket(key, capacity, refill_per_s, 0, False))[1]

    async def lease(self, key: str, limit: int, holder: str, ttl_s: float) -> tuple[bool, int]:
        granted, holders = await self._lease(keys=[self._key("lease", key)],
                                             args=[limit, holder, int(ttl_s * 1000)], order=holder,
                                             takes=True)
        return bool(int(granted)), int(holders)

    async def renew(self, key: str, holder: str, ttl_s: float) -> None:
        await self._renew(keys=[self._key("lease", key)], args=[holder, int(ttl_s * 1000)],
                          order=holder, takes=True)

    async def renew_many(self, leases: Sequence[tuple[str, str]], ttl_s: float,
                         held: Callable[[str, str], bool] | None = None) -> None:
        if held is not None:
            leases = [(key, holder) for key, holder in leases if held(key, holder)]
        if not leases:
            return
        await _all([self._renew(keys=[self._key("lease", key)], args=[holder, int(ttl_s * 1000)],
                                order=holder, takes=True) for key, holder in leases])

    async def release(self, key: str, holder: str) -> None:
        await self._redis.execute("ZREM", self._key("lease", key), holder, order=holder)

    async def admit(self, lease: LeaseAsk | None, buckets: Sequence[BucketAsk]) -> Admission:
        keys = [self._key("lease", lease.key)] if lease is not None else []
        args: list[Any] = (["1", lease.limit, lease.holder, int(lease.ttl_s * 1000)]
                           if lease is not None else ["0", 0, "", 0])
        for ask in buckets:
            keys.append(self._key("bucket", ask.key))
            args += [ask.capacity, ask.refill_per_s, ask.amount]
        reply = await self._admit(keys=keys, args=args,
                                  order=lease.holder if lease is not None else None, takes=True)
        ok, holders, refused = int(reply[0]), int(reply[1]), int(reply[2])
        # Admitted: levels after the take. Refused: every level before it, nothing taken.
        results = [BucketResult(True, level, 0.0) if ok == 1 else self.standing(ask, level)
                   for ask, level in zip(buckets, (float(value) for value in reply[3:]), strict=True)]
        if refused == -1:
            return Admission((False, holders), tuple(results))
        return Admission((True, holders) if lease is not None else None, tuple(results))

    async def settle(self, lease: tuple[str, str] | None, adjustments: Sequence[BucketAsk]) -> None:
        if lease is None and not adjustments:
            return
        keys = [self._key("lease", lease[0])] if lease is not None else []
        args: list[Any] = ["1", lease[1]] if lease is not None else ["0", ""]
        for ask in adjustments:
            keys.append(self._key("bucket", ask.key))
            args += [ask.capacity, ask.refill_per_s, ask.amount]
        await self._settle(keys=keys, args=args, order=lease[1] if lease is not None else None)

    async def release_many(self, leases: list[tuple[str, str]]) -> None:
        """Give back many (key, holder) leases in one round trip (after an outage)."""
        await _all([self._redis.execute("ZREM", self._key("lease", key), holder, order=holder)
                    for key, holder in leases])

    async def holders(self, key: str) -> int:
        return int(await self._holders(keys=[self._key("lease", key)]))

    async def epoch(self) -> str | None:
        """The value of `<prefix>epoch:state`, created (a random token, no expiry) when missing: it
        changes when Redis lost its data."""
        return str(await self._epoch(keys=[self._key("epoch", "state")], args=[secrets.token_hex(8)]))

    async def close(self) -> None:
        await self._redis.close()


async def _all(calls: list[Any]) -> None:
    """Every call sent at once (pipelined on the connections), all awaited; the first failure raised."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, asyncio.CancelledError):
            # A call cancelled from inside (not this task: gather would have raised): a failure.
            raise ConnectionError("a pipelined Redis call was cancelled") from result
        if isinstance(result, BaseException):
            raise result
