"""The Redis backend: buckets and leases shared by every proxy replica pointing at the same Redis.

Each operation is one Lua script, so it is atomic across replicas, and uses Redis' own clock (TIME), so
replicas' clocks need not agree. Buckets are hashes {level, ms}; leases are sorted sets of holder ->
expiry (ms), pruned on every access. Keys expire when idle.

Every call is bounded: connect and socket timeouts of `socket_timeout_s`, a pool that waits (at most as
long) for a free connection instead of raising at its size, and no client-side retries (redis-py retries
three times by default, which turns one frozen Redis into four timeouts). Errors are raised as they are;
`failover.FailoverState` decides what a failed call means.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .base import BucketResult, StateBackend

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

_HOLDERS = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""


class RedisState(StateBackend):
    """State in Redis, for several proxy replicas.

    `socket_timeout_s` bounds a connect, a command, and the wait for one of `max_connections` pooled
    connections. `renew` re-adds a holder that is missing (Redis restarted and lost it, or its lease
    expired while Redis was unreachable): a request still running is still in flight and must count.
    """

    def __init__(self, url: str, key_prefix: str = "sop:", *, socket_timeout_s: float = 0.5,
                 max_connections: int = 512) -> None:
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=socket_timeout_s,
            socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s,
            retry=Retry(NoBackoff(), 0), decode_responses=True,
            driver_info=None)  # no CLIENT SETINFO: one round trip less per new connection
        self._redis: Any = aioredis.Redis.from_pool(pool)  # the client owns (and closes) the pool
        self._prefix = key_prefix
        self._bucket = self._redis.register_script(_BUCKET)
        self._lease = self._redis.register_script(_LEASE)
        self._renew = self._redis.register_script(_RENEW)
        self._holders = self._redis.register_script(_HOLDERS)

    @property
    def client(self) -> Any:
        """The redis.asyncio client (its bounded pool), for scripts of other modules (leases.py)."""
        return self._redis

    def _key(self, kind: str, key: str) -> str:
        return f"{self._prefix}{kind}:{key}"

    async def ping(self) -> None:
        """One round trip; raises when Redis cannot be reached."""
        await self._redis.ping()

    async def probe(self) -> None:
        """Raise unless Redis can run the scripts: one lease script on a key of its own (reads TIME,
        writes), so a server that answers PING but refuses writes (loading, read-only, out of memory)
        fails it."""
        await self._lease(keys=[self._key("probe", "lease")], args=[1, "probe", 1])

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
                                             args=[limit, holder, int(ttl_s * 1000)])
        return bool(int(granted)), int(holders)

    async def renew(self, key: str, holder: str, ttl_s: float) -> None:
        await self._renew(keys=[self._key("lease", key)], args=[holder, int(ttl_s * 1000)])

    async def release(self, key: str, holder: str) -> None:
        await self._redis.zrem(self._key("lease", key), holder)

    async def release_many(self, leases: list[tuple[str, str]]) -> None:
        """Give back many (key, holder) leases in one round trip (after an outage)."""
        pipe = self._redis.pipeline(transaction=False)
        for key, holder in leases:
            pipe.zrem(self._key("lease", key), holder)
        await pipe.execute()

    async def holders(self, key: str) -> int:
        return int(await self._holders(keys=[self._key("lease", key)]))

    async def close(self) -> None:
        await self._redis.aclose()
