"""The Redis backend: buckets and leases shared by every proxy replica pointing at the same Redis.

Each operation is one Lua script, so it is atomic across replicas, and uses Redis' own clock (TIME), so
replicas' clocks need not agree. Buckets are hashes {level, ms}; leases are sorted sets of holder ->
expiry (ms), pruned on every access. Keys expire when idle.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

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
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return 1
"""

_HOLDERS = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""


class RedisState(StateBackend):
    """State in Redis, for several proxy replicas."""

    def __init__(self, url: str, key_prefix: str = "sop:") -> None:
        self._redis: Any = aioredis.from_url(url, decode_responses=True)
        self._prefix = key_prefix
        self._bucket = self._redis.register_script(_BUCKET)
        self._lease = self._redis.register_script(_LEASE)
        self._renew = self._redis.register_script(_RENEW)
        self._holders = self._redis.register_script(_HOLDERS)

    def _key(self, kind: str, key: str) -> str:
        return f"{self._prefix}{kind}:{key}"

    async def ping(self) -> None:
        """Fail fast at start-up when Redis cannot be reached."""
        await self._redis.ping()

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

    async def holders(self, key: str) -> int:
        return int(await self._holders(keys=[self._key("lease", key)]))

    async def close(self) -> None:
        await self._redis.aclose()
