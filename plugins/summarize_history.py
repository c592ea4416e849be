"""summarize_history: a conversation over its budget has its oldest turns replaced by one summary message,
written on the fleet by a small model through the chain (before limits); also what limits calls under
`prompt_policy: summarize`.

Kept verbatim: system prompts, tool calls with their results, the last `keep_last_turns` turns and the
latest user message (only turns before it are summarized). The cache
is keyed by a hash of exactly the turns summarized (memory bounded in bytes, optionally Redis shared by
proxy replicas), so the next turn of the conversation reuses the summary and the prompt's prefix stays
byte-identical (Ollama's prompt cache keeps working). A summary not ready within `time_budget_s` is
finished in the background for the next turn while this one is trimmed. `/api/generate`: the front of
the prompt is summarized and its tail (the question) kept. Fails open: no summary means a trim.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from proxy.context import RequestContext
from proxy.history import (
    Group,
    chain_hashes,
    group_messages,
    last_question,
    message_text,
    message_tokens,
    split_tail,
)
from proxy.offload import large, off_loop, parsed_json
from proxy.plugin import Plugin, PluginConfig, PluginServices
from proxy.prompts import count_prompt
from proxy.schema import positive, redis_url
from proxy.telemetry import semconv
from proxy.tokens import Tokenizer

from ._cache import ByteLRU
from .trim_history import HEADER as TRIMMED_HEADER
from .trim_history import ChatCount, count_chat, trim_messages

__all__ = ["HEADER", "PLUGIN", "SummarizeHistory", "SummarizeHistoryConfig", "SummaryStore"]

log = logging.getLogger("plugins.summarize_history")

HEADER = "X-History-Summarized"
SUMMARY_PREFIX = "Summary of the earlier conversation:\n"
GENERATE_PREFIX = "Summary of the earlier text:\n"
INSTRUCTION = ("Summarize the conversation below for the assistant that will continue it. Keep names, "
               "numbers, decisions, open questions and what the user asked for. Write plain prose, "
               "no preamble.")
_MAX_TRANSCRIPT_CHARS = 400_000
"""What one summary request sends at most (the newest part of the summarized text beyond it is kept)."""
_REDIS_RETRY_S = 30.0
_FRAME_TOKENS = 16
"""The summary request's template framing (two messages), with a margin."""


def _optional_positive(instance: Any, attribute: Any, value: int | None) -> None:
    if value is not None:
        positive(instance, attribute, value)


@attrs.frozen(kw_only=True)
class SummarizeHistoryConfig(PluginConfig):
    """plugins[]: {name: summarize_history, model: ..., ...}."""

    model: str
    """The small model that writes summaries (on the fleet, through the chain: /api/chat)."""
    budget_tokens: int | None = attrs.field(default=4096, validator=_optional_positive)
    """A prompt over this many of its model's tokens is summarized by the plugin itself; null: only
    when limits asks (`prompt_policy: summarize`, with the request's own limit)."""
    keep_last_turns: int = attrs.field(default=4, validator=positive)
    """The newest turns kept verbatim (besides system prompts and tool calls, always kept)."""
    generate_tail_tokens: int = attrs.field(default=512, validator=positive)
    """/api/generate: the end of the prompt kept verbatim (the question); the front is summarized."""
    summary_max_tokens: int = attrs.field(default=256, validator=positive)
    """The summary's length limit (the small model's num_predict)."""
    time_budget_s: float = attrs.field(default=2.0, validator=positive)
    """How long a request waits for a summary not in the cache (never past its deadline); then it is
    trimmed, and the summary is finished in the background for the next turn."""
    summary_timeout_s: float = attrs.field(default=120.0, validator=positive)
    """The longest a summary may take, background included."""
    max_background_jobs: int = attrs.field(default=4, validator=positive)
    """Summaries being written at once; past it, an uncached conversation is trimmed without one."""
    tenant: str | None = None
    """The tenant summaries are charged to (a system tenant); the caller's when absent."""
    cache_max_bytes: int = attrs.field(default=8 * 1024 * 1024, validator=positive)
    """Memory for cached summaries (least recently used go first)."""
    redis_url: str | None = attrs.field(default=None,
                                        validator=attrs.validators.optional(redis_url))
    """A Redis shared by proxy replicas for the summaries; when it fails, memory alone serves."""
    redis_ttl_s: int = attrs.field(default=86400, validator=positive)
    """How long a summary lives in Redis."""
    cache_scope: str = attrs.field(default="tenant",
                                   validator=attrs.validators.in_(("tenant", "shared")))
    """`tenant`: a tenant's summaries serve that tenant alone, so nobody learns from a hit (its header,
    or how fast it came) what another tenant sent. `shared`: every tenant's requests use the same
    entries (the same conversation summarized once for all); a hit then tells a tenant that someone sent that
    text before."""


class SummaryStore:
    """Summaries by key (a hash of the turns summarized): memory, bounded in bytes, in front of an
    optional Redis. A Redis failure is logged once and memory alone serves for a while (fail open)."""

    def __init__(self, max_bytes: int, url: str | None = None, ttl_s: int = 86400,
                 prefix: str = "sop:summary:") -> None:
        self.memory = ByteLRU(max_bytes)
        self.url = url
        self.ttl_s = ttl_s
        self.prefix = prefix
        self._redis: Any = None
        self._down_until = 0.0

    async def start(self) -> None:
        if self.url is not None:
            import redis.asyncio as redis

            self._redis = redis.Redis.from_url(self.url, socket_timeout=1.0,
                                               socket_connect_timeout=1.0)

    async def stop(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    def _redis_usable(self) -> bool:
        return self._redis is not None and time.monotonic() >= self._down_until

    def _failed(self, exc: Exception) -> None:
        if time.monotonic() >= self._down_until:
            log.warning("summary cache: Redis unavailable (%s); memory only for %ss",
                        type(exc).__name__, _REDIS_RETRY_S)
        self._down_until = time.monotonic() + _REDIS_RETRY_S

    async def get_many(self, keys: Sequence[str]) -> list[str | None]:
        """The summaries of `keys` (None where absent): memory first, then one Redis MGET."""
        found: list[str | None] = []
        for key in keys:
            value = self.memory.get(key)
            found.append(value.decode() if value is not None else None)
        missing = [i for i, value in enumerate(found) if value is None]
        if missing and self._redis_usable():
            try:
                values = await self._redis.mget([self.prefix + keys[i] for i in missing])
            except Exception as exc:  # any Redis failure: memory alone serves
                self._failed(exc)
                return found
            for i, raw in zip(missing, values, strict=True):
                if isinstance(raw, bytes):
                    self.memory.put(keys[i], raw)
                    found[i] = raw.decode()
        return found

    async def put(self, key: str, summary: str) -> None:
        data = summary.encode()
        self.memory.put(key, data)
        if self._redis_usable():
            try:
                await self._redis.set(self.prefix + key, data, ex=self.ttl_s)
            except Exception as exc:
                self._failed(exc)


@attrs.define
class _Plan:
    """What one request's summary covers: the hash keys of its summarized prefixes and their text."""

    keys: list[str]
    """keys[k] names a summary of the first k+1 summarizable pieces."""
    pieces: list[str]
    """The text of each summarizable piece, as the summarizer reads it."""
    limit_tokens: int
    """The request's limit: the summary's own request is held to it too (limits applies to it), so
    its transcript keeps only its newest part that fits."""


class SummarizeHistory(Plugin):
    """See the module docstring."""

    name = "summarize_history"
    slot = "before_limits"
    config_class = SummarizeHistoryConfig
    config: SummarizeHistoryConfig

    def __init__(self, config: PluginConfig, services: PluginServices) -> None:
        super().__init__(config, services)
        self.store = SummaryStore(self.config.cache_max_bytes, self.config.redis_url,
                                  self.config.redis_ttl_s)
        # Summaries by another model, length or instruction are other summaries: in the key.
        self.key_prefix = hashlib.sha256(
            f"{self.config.model}\0{self.config.summary_max_tokens}\0{INSTRUCTION}".encode()
        ).hexdigest()[:16] + ":"
        self.jobs: dict[str, asyncio.Task[str | None]] = {}
        """Summaries being written, by key: single flight, and the bound on background work."""
        telemetry = services.telemetry
        names = telemetry.names
        self.names = names
        self.tokens_saved = telemetry.meter.create_counter(
            names.metric_summarize_tokens_saved, unit="{token}",
            description="Prompt tokens removed by summaries of conversation histories.")
        self.cache_hits = telemetry.meter.create_counter(
            names.metric_summarize_cache_hits, unit="{request}",
            description="Requests whose summary came from the cache.")
        self.fallbacks = telemetry.meter.create_counter(
            names.metric_summarize_fallbacks, unit="{request}",
            description="Requests trimmed because no summary was ready, by reason.")

    async def start(self) -> None:
        await self.store.start()

    async def stop(self) -> None:
        for task in list(self.jobs.values()):
            task.cancel()
        await self.store.stop()

    async def on_request(self, request: web.Request, ctx: RequestContext,
                         decide: Callable[[str], None]) -> web.StreamResponse | None:
        del request
        budget = self.config.budget_tokens
        shape = ctx.route.prompt_shape
        # Nothing to do, decided in well under a microsecond (see trim_history for why bytes bound
        # tokens from above).
        if budget is None or shape not in ("chat", "generate") or len(ctx.body or b"") <= budget:
            decide("pass")
            return None
        body = await parsed_json(ctx)
        model = ctx.model
        if not isinstance(body, dict) or model is None:
            decide("pass")
            return None
        tokenizer = await self.services.tokenizer_for(model)
        decide(await self.fit(ctx, body, tokenizer, budget) or "kept")
        return None

    def _prefix(self, ctx: RequestContext) -> str:
        """The key prefix of `ctx`'s summaries: the summarizer's, and the tenant's under
        `cache_scope: tenant` (hashed: the key names no tenant in clear)."""
        if self.config.cache_scope != "tenant":
            return self.key_prefix
        return self.key_prefix + hashlib.sha256(ctx.tenant.name.encode()).hexdigest()[:16] + ":"

    async def fit(self, ctx: RequestContext, body: dict[str, Any], tokenizer: Tokenizer,
                  budget: int) -> str | None:
        """Make `ctx`'s prompt fit `budget` tokens with a summary (else a trim), rewriting the body with
        `ctx.replace_json` and setting the response header; returns the decision (`summarized`,
        `trimmed`) or None when the prompt fits already or cannot be changed. Limits calls this under
        `prompt_policy: summarize`."""
        route = ctx.route
        # Counting (and hashing, and cutting) a large prompt runs in a worker thread, as limits counts
        # it: megabytes take a second, which on the event loop would stall every other request.
        offload = large(ctx)
        if route.prompt_shape == "chat" and route.prompt_field == "messages" \
                and isinstance(body.get("messages"), list):
            counted = await count_chat(ctx, body, tokenizer)
            if counted is None or counted.total <= budget:
                return None
            return await self._fit_chat(ctx, body, tokenizer, budget, counted, offload)
        before = await off_loop(offload, count_prompt, route, body, tokenizer, offload)
        if before is None or before.total <= budget:
            return None
        if route.prompt_shape == "generate" and isinstance(body.get("prompt"), str):
            return await self._fit_generate(ctx, body, tokenizer, budget, before.total, offload)
        return None

    # chat ------------------------------------------------------------------------------------------
    async def _fit_chat(self, ctx: RequestContext, body: dict[str, Any], tokenizer: Tokenizer,
                        budget: int, counted: ChatCount, offload: bool) -> str | None:
        messages: list[Any] = body["messages"]
        before, costs = counted.total, counted.costs
        groups = group_messages(messages)
        older = max(0, len(groups) - self.config.keep_last_turns)
        question = last_question(messages, groups)
        if question is not None:  # in a tool loop the newest groups are tools: the question stays
            older = min(older, question)
        summarized = [g for g in groups[:older] if g.kind == "turn"]
        if summarized:
            texts, hashes = await off_loop(offload, _summarized, messages, summarized)
            prefix = self._prefix(ctx)
            keys = [prefix + h for h in hashes]
            role = "user" if ctx.route.dialect == "anthropic" else "system"

            def render(count: int, summary: str) -> tuple[dict[str, Any], int]:
                # The new prompt's count from the messages' own (counted once): the summary message,
                # the messages kept and what is not a message.
                chosen = {id(g) for g in summarized[:count]}
                out: list[Any] = []
                summary_message = {"role": role, "content": SUMMARY_PREFIX + summary}
                after = counted.fixed + message_tokens(summary_message, tokenizer.count)
                placed = False
                for group in groups:
                    if id(group) in chosen:
                        if not placed:
                            out.append(summary_message)
                            placed = True
                        continue
                    out.extend(messages[group.start:group.end])
                    after += sum(costs[group.start:group.end])
                return {**body, "messages": out}, after

            outcome = await self._summary(ctx, _Plan(keys, texts, budget),
                                          lambda count, summary: render(count, summary)[1] <= budget)
            if outcome is not None:
                count, summary, cached = outcome
                new_body, after_total = render(count, summary)
                if after_total <= budget:
                    self._report(ctx, count, before - after_total, cached)
                    ctx.replace_json(new_body)
                    return "summarized"
                self._fallback(ctx, "too_long")
        kept, dropped, after = trim_messages(messages, tokenizer.count, budget, fixed_tokens=counted.fixed,
                                             keep_last=self.config.keep_last_turns, costs=costs)
        if not dropped:
            return None
        ctx.replace_json({**body, "messages": kept})
        saved = before - after
        ctx.response_headers[TRIMMED_HEADER] = f"turns={dropped}; tokens={saved}"
        return "trimmed"

    # generate --------------------------------------------------------------------------------------
    async def _fit_generate(self, ctx: RequestContext, body: dict[str, Any], tokenizer: Tokenizer,
                            budget: int, before: int, offload: bool) -> str | None:
        prompt: str = body["prompt"]
        tail_tokens = self.config.generate_tail_tokens
        front, tail = await off_loop(offload, split_tail, prompt, tail_tokens,
                                     tokenizer.count_offloadable if offload else tokenizer.count)
        if front:
            hashes = await off_loop(offload, chain_hashes, [{"prompt": front}])
            keys = [self._prefix(ctx) + h for h in hashes]

            def render(summary: str) -> tuple[dict[str, Any], int]:
                new_body = {**body, "prompt": f"{GENERATE_PREFIX}{summary}\n\n{tail}"}
                after = count_prompt(ctx.route, new_body, tokenizer)
                return new_body, after.total if after is not None else before

            outcome = await self._summary(ctx, _Plan(keys, [front], budget),
                                          lambda _count, summary: render(summary)[1] <= budget)
            if outcome is not None:
                _, summary, cached = outcome
                new_body, after_total = render(summary)
                if after_total <= budget:
                    self._report(ctx, 1, before - after_total, cached)
                    ctx.replace_json(new_body)
                    return "summarized"
                self._fallback(ctx, "too_long")
        cut = await off_loop(offload, _cut_front, prompt, tokenizer, budget, before, offload)
        if cut is None:
            return None
        kept, saved = cut
        ctx.replace_json({**body, "prompt": kept})
        ctx.response_headers[TRIMMED_HEADER] = f"turns=0; tokens={saved}"
        return "trimmed"

    # the summary -----------------------------------------------------------------------------------
    async def _summary(self, ctx: RequestContext, plan: _Plan,
                       fits: Callable[[int, str], bool]) -> tuple[int, str, bool] | None:
        """(pieces covered, summary, from the cache) or None (then the caller trims).

        The longest cached prefix is used when the prompt then fits (`fits(pieces, summary)`): the
        prefix earlier turns of the conversation were sent with, byte-identical. Otherwise a summary
        of every summarizable piece is written (from the longest cached summary and the pieces after
        it, when there is one), waited for at most `time_budget_s` and never past the request's deadline
        (then the request is trimmed and the summary goes on in the background)."""
        cached = await self.store.get_many(plan.keys)
        last = len(plan.keys)
        base = next((k for k in range(last - 1, -1, -1) if cached[k] is not None), None)
        if base is not None:
            summary = cached[base]
            assert summary is not None
            if fits(base + 1, summary):
                self.cache_hits.add(1)
                return base + 1, summary, True
        if base == last - 1 or not fits(last, ""):
            # A summary of every piece is cached and does not fit, or what is kept verbatim (system
            # prompts, tool calls and results, the newest turns) is over the budget even with an empty
            # one: no summary can make this prompt fit. Writing one anyway cost every such request a
            # sub-request and its wait (a summary of the cached summary, again and again).
            self._fallback(ctx, "too_long")
            return None
        key = plan.keys[-1]
        task = self.jobs.get(key)
        if task is None:
            if len(self.jobs) >= self.config.max_background_jobs:
                self._fallback(ctx, "busy")
                return None
            source = ([SUMMARY_PREFIX + str(cached[base]), *plan.pieces[base + 1:]]
                      if base is not None else plan.pieces)
            tenant = self.config.tenant or ctx.tenant.name
            task = asyncio.get_running_loop().create_task(
                self._write(key, source, tenant, plan.limit_tokens))
            self.jobs[key] = task
            task.add_done_callback(lambda _t: self.jobs.pop(key, None))
        wait_s = self.config.time_budget_s
        if ctx.deadline_at is not None:
            # A deadline shorter than the time budget (X-Deadline-S) bounds the wait: past it the
            # plugin runner cuts this phase off a second late and answers 504, where falling back to
            # the trim leaves the answer to the forwarder's deadline and keeps the summary going.
            wait_s = min(wait_s, max(0.0, ctx.deadline_at - time.monotonic()))
        done, _ = await asyncio.wait({task}, timeout=wait_s)
        if not done:
            self._fallback(ctx, "timeout")  # the task goes on: the next turn finds it cached
            return None
        summary = task.result() if not task.cancelled() else None
        if summary is None:
            self._fallback(ctx, "failed")
            return None
        return last, summary, False

    async def _write(self, key: str, pieces: Sequence[str], tenant: str,
                     limit_tokens: int) -> str | None:
        """Ask the small model for a summary of `pieces` through the chain; store and return it, None
        when it failed. Under its own span, which the sub-request's spans join."""
        telemetry = self.services.telemetry
        transcript = "\n".join(pieces)[-_MAX_TRANSCRIPT_CHARS:]
        tokenizer = await self.services.tokenizer_for(self.config.model)
        room = limit_tokens - tokenizer.count(INSTRUCTION) - _FRAME_TOKENS
        if tokenizer.count(transcript) > room:  # the newest part that fits (limits would refuse more)
            transcript = tokenizer.keep_last(transcript, max(room, 1))
            while transcript and tokenizer.count(transcript) > room:
                transcript = transcript[1:]
        if not transcript.strip():
            # The limit leaves no room for any of the conversation beside the instruction: a summary
            # written from nothing would replace the turns with whatever the model makes up.
            log.info("summarize_history: the limit (%d tokens) leaves no room for a transcript; no summary",
                     limit_tokens)
            return None
        body = {"model": self.config.model, "stream": False,
                "messages": [{"role": "system", "content": INSTRUCTION},
                             {"role": "user", "content": transcript}],
                "options": {"num_predict": self.config.summary_max_tokens}}
        span = telemetry.tracer.start_span(self.names.summarize_span, kind=SpanKind.INTERNAL,
                                           attributes={semconv.ATTR_GEN_AI_REQUEST_MODEL:
                                                       self.config.model})
        try:
            with trace.use_span(span, end_on_exit=False):
                status, answer = await self.services.subrequests.post_json(
                    "/api/chat", body, tenant=tenant, timeout_s=self.config.summary_timeout_s)
            message = answer.get("message") if isinstance(answer, dict) else None
            summary = message.get("content") if isinstance(message, dict) else None
            if status != 200 or not isinstance(summary, str) or not summary.strip():
                span.set_attribute(semconv.ATTR_ERROR_TYPE, f"status_{status}")
                span.set_status(Status(StatusCode.ERROR, "no summary"))
                log.info("summarize_history: no summary from %s (status %s)", self.config.model,
                         status)
                return None
            summary = summary.strip()
            await self.store.put(key, summary)
            return summary
        except asyncio.CancelledError:
            span.set_status(Status(StatusCode.ERROR, "cancelled"))
            raise
        except Exception as exc:  # fail open: the caller trims
            span.set_attribute(semconv.ATTR_ERROR_TYPE, type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR, "summary failed"))
            log.warning("summarize_history: summary failed (%s)", type(exc).__name__)
            return None
        finally:
            span.end()

    def _report(self, ctx: RequestContext, turns: int, saved: int, cached: bool) -> None:
        ctx.response_headers[HEADER] = f"turns={turns}; tokens={saved}; cached={int(cached)}"
        self.tokens_saved.add(max(0, saved))
        root = ctx.root_span
        if root is not None:
            root.set_attributes({self.names.summarize_turns: turns,
                                 self.names.summarize_tokens_saved: saved,
                                 self.names.summarize_cached: cached})

    def _fallback(self, ctx: RequestContext, reason: str) -> None:
        self.fallbacks.add(1, {"reason": reason})
        if ctx.root_span is not None:
            ctx.root_span.set_attribute(self.names.summarize_fallback, reason)


def _summarized(messages: Sequence[Any], summarized: Sequence[Group]) -> tuple[list[str], list[str]]:
    """The transcript lines of the `summarized` groups and their chained cache keys."""
    firsts = [messages[g.start] for g in summarized]
    return [_transcript_line(m) for m in firsts], chain_hashes(firsts)


def _cut_front(prompt: str, tokenizer: Tokenizer, budget: int, before: int,
               offload: bool) -> tuple[str, int] | None:
    """A generate prompt's end that fits `budget` with the rest of the prompt (`before` tokens in all),
    and the tokens it saves; None when nothing of it fits. `offload`: in a worker thread."""
    count = tokenizer.count_offloadable if offload else tokenizer.count
    prompt_tokens = count(prompt)
    room = budget - (before - prompt_tokens)
    if room <= 0:
        return None
    kept = tokenizer.keep_last(prompt, room)
    while kept and count(kept) > room:  # decode/encode can differ by one
        kept = kept[1:]
    return kept, prompt_tokens - count(kept)


def _transcript_line(message: Any) -> str:
    role = message.get("role") if isinstance(message, dict) else None
    return f"{role if isinstance(role, str) and role.isalpha() else 'user'}: {message_text(message)}"


PLUGIN = SummarizeHistory
