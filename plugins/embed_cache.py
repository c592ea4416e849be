"""embed_cache: answers /api/embed, /api/embeddings and /v1/embeddings inputs from a cache of vectors.

Slot `before_backpressure`: a request whose inputs are all cached is answered here (no queue slot, no
upstream call); one with some cached sends only its misses upstream as an /api/embed sub-request through
the chain (one queue slot) and merges the answer in order; one with none goes on untouched and its
answer is cached as it is relayed. Vectors are kept as the bytes Ollama wrote, so answers keep Go's
float formatting. Keys: sha256 of (vector kind, model, model digest, options that change the vectors,
input text); an unknown digest is not cached, and a re-pulled model (new digest) misses.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import attrs
from aiohttp import web
from opentelemetry.metrics import CallbackOptions, Observation

from proxy.embeddings import Ask, apportion, parse_ask, read_answer, render, respond, to_base64
from proxy.errors import DeadlinePassed
from proxy.ollama import Usage
from proxy.plugin import Plugin, PluginConfig, PluginServices, shadowing
from proxy.schema import redis_url

if TYPE_CHECKING:
    from proxy.context import RequestContext

__all__ = ["PLUGIN", "EmbedCache", "EmbedCacheConfig", "MemoryStore"]

log = logging.getLogger("plugins.embed_cache")

_ENTRY_OVERHEAD_BYTES = 280
"""What one entry costs besides the lengths of its vector and key: the two bytes objects' headers, the
(vector, tokens) tuple and its int, the OrderedDict's slot, hash-table slack and linked-list node, and
the allocator's rounding. Measured on CPython 3.11 (x86-64) by putting 300,000 entries with 32-byte
keys and 12, 40 and 3,000-byte vectors into a MemoryStore: the process's RSS grew 274-279 bytes per
entry beyond len(vector) + len(key) (tracemalloc, which misses the allocator's rounding: 235). 96, the
rough guess before, let the cache hold about 2.4 times its `max_bytes` with small vectors."""
_REDIS_PREFIX = b"sop:embed:"


def _positive(instance: Any, attribute: Any, value: float) -> None:
    del instance
    if value <= 0:
        raise ValueError(f"{attribute.name}: must be > 0")


@attrs.frozen(kw_only=True)
class EmbedCacheConfig(PluginConfig):
    """plugins[]: {name: embed_cache, ...}."""

    max_bytes: int = attrs.field(default=268_435_456, validator=_positive)
    """Memory the in-process cache may hold (vectors as written, plus a fixed cost per entry); the least
    recently used entries go first."""
    max_response_bytes: int = attrs.field(default=67_108_864, validator=_positive)
    """Upstream answers larger than this are relayed without being cached."""
    redis_url: str | None = attrs.field(default=None, validator=attrs.validators.optional(redis_url))
    """Optional shared cache (`redis://host:port/db`) behind the memory one, for proxy replicas; a Redis
    failure falls back to the memory cache, never fails a request."""
    redis_ttl_s: float = attrs.field(default=86_400.0, validator=_positive)
    """Lifetime of a vector in Redis (the memory cache is bounded by `max_bytes` instead)."""
    redis_timeout_s: float = attrs.field(default=0.25, validator=_positive)
    """Bound on one Redis call; past it the call counts as a failure."""
    redis_retry_s: float = attrs.field(default=5.0, validator=_positive)
    """After a Redis failure, how long the memory cache is used alone before Redis is tried again."""
    tenant: str | None = None
    """The tenant the misses of a partly cached request are sent upstream as (a system tenant without
    quotas: the caller is then charged for its misses' tokens on its own request). None: the caller's
    own tenant (the sub-request is charged, counts against its rate and concurrency, and the caller's
    own reservation is refunded)."""
    timeout_s: float = attrs.field(default=120.0, validator=_positive)
    """Bound on the sub-request for the misses; past it the request goes upstream whole."""
    cache_scope: str = attrs.field(default="tenant",
                                   validator=attrs.validators.in_(("tenant", "shared")))
    """`tenant`: a tenant's vectors serve that tenant alone, so nobody learns from a hit (its header,
    or how fast it came) what another tenant sent. `shared`: every tenant's requests use the same
    entries (a corpus every team embeds is embedded once); a hit then tells a tenant that someone sent that
    text before."""


class MemoryStore:
    """An LRU of vectors bounded in bytes (key -> (vector bytes, tokens))."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[bytes, tuple[bytes, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> tuple[bytes, int] | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, vector: bytes, tokens: int) -> None:
        size = len(vector) + len(key) + _ENTRY_OVERHEAD_BYTES
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= len(old[0]) + len(key) + _ENTRY_OVERHEAD_BYTES
        self._entries[key] = (vector, tokens)
        self.bytes += size
        while self.bytes > self.max_bytes:
            evicted, (evicted_vector, _) = self._entries.popitem(last=False)
            self.bytes -= len(evicted_vector) + len(evicted) + _ENTRY_OVERHEAD_BYTES


class RedisStore:
    """The shared tier: `sop:embed:<hex key>` -> 4-byte token count + vector bytes, with a TTL. Every
    call is bounded; after a failure Redis is left alone for `retry_s` (the memory tier serves)."""

    def __init__(self, url: str, ttl_s: float, timeout_s: float, retry_s: float) -> None:
        import redis.asyncio as aioredis

        self._client = aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.ttl_ms = int(ttl_s * 1000)
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.down_until = 0.0
        self.failures = 0

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self.down_until = time.monotonic() + self.retry_s
        log.warning("embed_cache: Redis failed (%s); memory only for %.0f s", type(exc).__name__,
                    self.retry_s)

    @property
    def up(self) -> bool:
        return time.monotonic() >= self.down_until

    async def get_many(self, keys: list[bytes]) -> list[tuple[bytes, int] | None]:
        if not keys or not self.up:
            return [None] * len(keys)
        try:
            values = await asyncio.wait_for(
                self._client.mget([_REDIS_PREFIX + key.hex().encode() for key in keys]), self.timeout_s)
        except Exception as exc:
            self._failed(exc)
            return [None] * len(keys)
        return [(value[4:], int.from_bytes(value[:4], "big")) if isinstance(value, bytes)
                and len(value) > 4 else None for value in values]

    async def put_many(self, entries: list[tuple[bytes, bytes, int]]) -> None:
        if not entries or not self.up:
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, vector, tokens in entries:
                    pipe.set(_REDIS_PREFIX + key.hex().encode(),
                             min(tokens, 0xFFFFFFFF).to_bytes(4, "big") + vector, px=self.ttl_ms)
                await asyncio.wait_for(pipe.execute(), self.timeout_s)
        except Exception as exc:
            self._failed(exc)

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except Exception as exc:  # closing a broken connection must not fail the shutdown
            log.debug("embed_cache: closing Redis failed (%s)", type(exc).__name__)


class _Capture:
    """Observer of a fully missed request's answer: keeps its bytes (up to a bound) and caches its
    vectors at the end if it was a complete 200."""

    def __init__(self, plugin: EmbedCache, ask: Ask, keys: list[bytes], digest: str) -> None:
        self.plugin = plugin
        self.ask = ask
        self.keys = keys
        self.digest = digest
        self.chunks: list[bytes] = []
        self.size = 0

    def feed(self, chunk: bytes) -> None:
        if self.size <= self.plugin.config.max_response_bytes:
            self.size += len(chunk)
            self.chunks.append(chunk)

    def end(self, ctx: RequestContext) -> None:
        if ctx.status != 200 or ctx.outcome != "ok" or self.size > self.plugin.config.max_response_bytes:
            return
        answer = read_answer(self.ask.route, b"".join(self.chunks))
        self.chunks = []
        if answer is None or len(answer.vectors) != len(self.keys):
            return
        if not self.plugin.same_model(self.ask.model, self.digest):
            return
        usage = ctx.exchange.usage
        tokens = answer.tokens or (usage.input_tokens if usage and usage.input_tokens else 0)
        shares = apportion(tokens, self.ask.inputs)
        self.plugin.store_all(list(zip(self.keys, answer.vectors, shares, strict=True)))


class EmbedCache(Plugin):
    """See the module docstring."""

    name = "embed_cache"
    slot = "before_backpressure"
    config_class = EmbedCacheConfig

    def __init__(self, config: PluginConfig, services: PluginServices) -> None:
        super().__init__(config, services)
        assert isinstance(config, EmbedCacheConfig)
        self.config: EmbedCacheConfig = config
        self.memory = MemoryStore(config.max_bytes)
        self.redis: RedisStore | None = None
        self.hits = 0
        self.misses = 0
        self._pending: dict[int, tuple[Ask, list[bytes], str]] = {}
        """request id -> what `observe` needs for a request that went upstream whole."""
        self._tasks: set[asyncio.Task[None]] = set()
        names = services.telemetry.names
        meter = services.telemetry.meter
        meter.create_observable_counter(
            names.metric_embed_cache_lookups, callbacks=[self._observe_lookups], unit="{input}",
            description="Embedding inputs looked up in the cache, by result (hit, miss).")
        meter.create_observable_gauge(
            names.metric_embed_cache_hit_ratio, callbacks=[self._observe_ratio], unit="1",
            description="Embedding inputs answered from the cache / inputs looked up.")
        meter.create_observable_gauge(
            names.metric_embed_cache_bytes, callbacks=[self._observe_bytes], unit="By",
            description="Bytes held by the in-memory embedding cache.")

    def _observe_lookups(self, options: CallbackOptions) -> Iterable[Observation]:
        del options
        yield Observation(self.hits, {"result": "hit"})
        yield Observation(self.misses, {"result": "miss"})

    def _observe_ratio(self, options: CallbackOptions) -> Iterable[Observation]:
        del options
        total = self.hits + self.misses
        yield Observation(self.hits / total if total else 0.0)

    def _observe_bytes(self, options: CallbackOptions) -> Iterable[Observation]:
        del options
        yield Observation(self.memory.bytes)

    async def start(self) -> None:
        if self.config.redis_url:
            self.redis = RedisStore(self.config.redis_url, self.config.redis_ttl_s,
                                    self.config.redis_timeout_s, self.config.redis_retry_s)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.redis is not None:
            await self.redis.close()

    @staticmethod
    def key(ask: Ask, digest: str, text: str, scope: str = "") -> bytes:
        """What a vector is keyed by: nothing a client sends is kept in clear. `scope`: the tenant
        under `cache_scope: tenant`, empty when shared."""
        material = b"\0".join((scope.encode(), ask.kind.encode(), ask.model.encode(), digest.encode(),
                               ask.variant, text.encode("utf-8", "surrogatepass")))
        return hashlib.sha256(material).digest()

    def same_model(self, model: str, digest: str) -> bool:
        """Do the replicas still hold `model` as `digest` alone, now that vectors keyed by it came back?
        Otherwise (re-pulled meanwhile, on some replicas or all) they may be another model's vectors,
        which must not be cached under this digest."""
        return self.services.model_digest(model) == digest

    async def lookup(self, keys: list[bytes]) -> dict[bytes, tuple[bytes, int]]:
        """The cached entries among `keys`: memory first, then Redis for the rest (copied to memory)."""
        found: dict[bytes, tuple[bytes, int]] = {}
        missing: list[bytes] = []
        for key in keys:
            entry = self.memory.get(key)
            if entry is None:
                missing.append(key)
            else:
                found[key] = entry
        if missing and self.redis is not None:
            for key, entry in zip(missing, await self.redis.get_many(missing), strict=True):
                if entry is not None:
                    found[key] = entry
                    self.memory.put(key, *entry)
        return found

    def store_all(self, entries: list[tuple[bytes, bytes, int]]) -> None:
        """Cache `(key, vector, tokens)` entries: memory now, Redis in the background."""
        for key, vector, tokens in entries:
            self.memory.put(key, vector, tokens)
        if self.redis is not None and entries:
            task = asyncio.get_running_loop().create_task(self.redis.put_many(entries))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def on_request(self, request: web.Request, ctx: RequestContext,
                         decide: Callable[[str], None]) -> web.StreamResponse | None:
        if ctx.route.operation != "embeddings":
            decide("not_applicable")
            return None
        ask = parse_ask(request.path, ctx.json())
        if ask is None or not self.services.knows_model(ask.model):
            decide("not_applicable")
            return None
        digest = self.services.model_digest(ask.model)
        if digest is None:
            decide("no_digest")  # a vector we could not tell from a re-pulled model's: not cached
            return None
        started = time.monotonic()
        scope = ctx.tenant.name if self.config.cache_scope == "tenant" else ""
        keys = [self.key(ask, digest, text, scope) for text in ask.inputs]
        found = await self.lookup(list(dict.fromkeys(keys)))
        hits = sum(1 for key in keys if key in found)
        misses = len(keys) - hits
        if misses == 0:
            self.hits += hits
            ctx.response_headers["X-Embed-Cache"] = f"hits={hits}; misses=0"
            decide("hit")
            # No usage: quotas refund the caller's token reservation (nothing was computed).
            return self._answer(ctx, ask, [found[key][0] for key in keys],
                                sum(found[key][1] for key in keys), started)
        if hits == 0:
            self.misses += misses
            ctx.response_headers["X-Embed-Cache"] = f"hits=0; misses={misses}"
            self._pending[id(ctx)] = (ask, keys, digest)
            decide("miss")
            return None
        if shadowing():
            # The merged answer would be discarded and the whole request served upstream: fetching
            # the misses first would have the replica embed them twice, and charge the caller twice.
            # Say what would have happened, and cache the whole answer as it goes by, as for a miss.
            # The stand-in answer only tells the chain that this one would have been answered here
            # (X-Shadow-Decision); shadow mode discards it unsent.
            self.hits += hits
            self.misses += misses
            self._pending[id(ctx)] = (ask, keys, digest)
            decide("partial")
            return web.Response(status=200)
        answer = await self._fetch_misses(ask, keys, digest, found, ctx)
        if answer is None:
            self.misses += len(keys)
            ctx.response_headers["X-Embed-Cache"] = f"hits=0; misses={len(keys)}"
            self._pending[id(ctx)] = (ask, keys, digest)
            decide("partial_failed")  # the whole request goes upstream: its own answer or error
            return None
        self.hits += hits
        self.misses += misses
        ctx.response_headers["X-Embed-Cache"] = f"hits={hits}; misses={misses}"
        decide("partial")
        return answer

    def _abandoned(self, ctx: RequestContext) -> None:
        """The request was given up (its client left, or its deadline passed) while its misses'
        sub-request was under way: with `tenant` set it is charged its prompt, as a request the
        forwarder had sent is (the sub-request, a system tenant's, is not the caller's); without
        `tenant` the sub-request, the caller's own, is charged when it is abandoned."""
        if self.config.tenant is not None:
            ctx.exchange.abandoned = True

    async def _fetch_misses(self, ask: Ask, keys: list[bytes], digest: str,
                            found: dict[bytes, tuple[bytes, int]],
                            ctx: RequestContext) -> web.StreamResponse | None:
        """Send the missing inputs (once each) upstream through the chain, cache them and answer the
        whole request in order; None when the sub-request did not give a usable answer."""
        started = time.monotonic()
        missing = list(dict.fromkeys(text for text, key in zip(ask.inputs, keys, strict=True)
                                     if key not in found))
        tenant = self.config.tenant or ctx.tenant.name
        call = self.services.subrequests.post_raw(
            "/api/embed", {"model": ask.model, "input": missing, **ask.upstream}, tenant=tenant,
            timeout_s=self.config.timeout_s)
        # The request's deadline holds while its misses are upstream, as it does for the forwarder's
        # call: 504 when it passes (not the sub-request's own bound, and then a queue that finds the
        # deadline gone).
        remaining = None if ctx.deadline_at is None else ctx.deadline_at - time.monotonic()
        try:
            if remaining is None or remaining >= self.config.timeout_s:
                status, raw = await call
            else:
                try:
                    if remaining <= 0:  # gone already: nothing was sent, nothing is charged
                        call.close()
                        raise DeadlinePassed(f"the request's deadline of "
                                             f"{ctx.service_limits.get('deadline_s')}s passed")
                    status, raw = await asyncio.wait_for(call, remaining)
                except TimeoutError:
                    self._abandoned(ctx)
                    raise DeadlinePassed(f"the request's deadline of "
                                         f"{ctx.service_limits.get('deadline_s')}s passed (waiting for "
                                         "the embeddings not cached)") from None
        except asyncio.CancelledError:  # the client left while its misses were upstream
            self._abandoned(ctx)
            raise
        upstream = read_answer("/api/embed", raw) if status == 200 else None
        if upstream is None or len(upstream.vectors) != len(missing):
            return None
        if not self.same_model(ask.model, digest):
            return None  # the model changed meanwhile: its vectors and the cached ones must not mix
        vectors = upstream.vectors if ask.kind != "b64" else [to_base64(v) for v in upstream.vectors]
        shares = apportion(upstream.tokens, missing)
        fresh = {text: (vector, share) for text, vector, share in zip(missing, vectors, shares, strict=True)}
        by_key = dict(zip(keys, ask.inputs, strict=True))
        self.store_all([(key, *fresh[text]) for key, text in by_key.items() if text in fresh])
        merged = [found[key] if key in found else fresh[text] for key, text in zip(keys, ask.inputs,
                                                                                  strict=True)]
        if self.config.tenant is not None:
            # The misses ran under a system tenant: the caller's own request pays for their tokens.
            ctx.exchange.usage = Usage(input_tokens=sum(fresh[text][1] for text in missing),
                              response_model=ask.model)
        return self._answer(ctx, ask, [vector for vector, _ in merged], sum(t for _, t in merged),
                            started)

    @staticmethod
    def _answer(ctx: RequestContext, ask: Ask, vectors: list[bytes], tokens: int,
                started: float) -> web.Response:
        body, content_type = render(ask, vectors, tokens, int((time.monotonic() - started) * 1e9) or 1)
        return respond(ctx, body, content_type)

    def observe(self, ctx: RequestContext) -> _Capture | None:
        pending = self._pending.pop(id(ctx), None)
        if pending is None:
            return None
        return _Capture(self, *pending)


PLUGIN = EmbedCache
