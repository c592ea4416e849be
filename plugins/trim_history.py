"""trim_history: a chat history over its token budget loses its oldest turns (before limits).

Kept: system prompts, tool calls with their results, the latest user message (only these when they are
alone over the budget), the newest turns that fit `budget_tokens` (counted
with the model's own tokenizer), and optionally the older turns most relevant to the latest user message
(`relevance: {model: <embedding model>, keep: N}`), scored with embeddings computed on the fleet through
the chain and cached by content hash. Reports `X-History-Trimmed: turns=<n>; tokens=<saved>`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from array import array
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from aiohttp import web

from proxy.context import RequestContext
from proxy.history import (
    Group,
    group_messages,
    last_question,
    message_text,
    message_tokens,
    role,
    select_groups,
)
from proxy.offload import large, off_loop, parsed_json
from proxy.plugin import Plugin, PluginConfig
from proxy.prompts import count_prompt
from proxy.schema import positive
from proxy.tokens import Tokenizer

from ._cache import ByteLRU

__all__ = ["PLUGIN", "ChatCount", "RelevanceConfig", "TrimHistory", "TrimHistoryConfig", "count_chat",
           "trim_messages"]

log = logging.getLogger("plugins.trim_history")

HEADER = "X-History-Trimmed"
_MAX_RELEVANCE_CANDIDATES = 64
"""Older turns scored per request at most (the newest of them): bounds the embedding sub-request."""


@attrs.frozen(kw_only=True)
class RelevanceConfig:
    """Keep also the older turns most similar to the latest user message."""

    model: str
    """The embedding model that scores turns (on the fleet, through the chain: /api/embed)."""
    keep: int = attrs.field(default=2, validator=positive)
    """How many of the most relevant older turns to keep, each only if it fits the budget."""
    timeout_s: float = attrs.field(default=5.0, validator=positive)
    """How long to wait for the embeddings (never past the request's deadline); then the trim goes on
    by recency alone."""
    cache_max_bytes: int = attrs.field(default=16 * 1024 * 1024, validator=positive)
    """Memory for cached turn embeddings (keyed by the model, its digest and a hash of the text)."""
    cache_scope: str = attrs.field(default="tenant", validator=attrs.validators.in_(("tenant", "shared")))
    """`tenant`: a tenant's cached embeddings serve that tenant alone, so nobody learns from how fast
    a trim came (a cached turn is not embedded again) what another tenant's chats held. `shared`:
    every tenant uses the same entries (and a fast trim then tells a tenant that someone sent those
    turns before)."""


@attrs.frozen(kw_only=True)
class TrimHistoryConfig(PluginConfig):
    """plugins[]: {name: trim_history, ...}."""

    budget_tokens: int = attrs.field(default=4096, validator=positive)
    """The prompt's budget in the model's tokens; a history over it is trimmed."""
    keep_last_turns: int = attrs.field(default=1, validator=positive)
    """Newest messages kept whatever their size (the latest user message among them)."""
    relevance: RelevanceConfig | None = None
    """Also keep the older turns most relevant to the latest user message (off when absent)."""
    tenant: str | None = None
    """The tenant the embedding sub-requests are charged to; the caller's when absent."""


@attrs.frozen
class ChatCount:
    """A chat prompt's tokens: `total`, `fixed` (besides its messages: framing, tools, a top-level
    system prompt) and each message's cost, in order (`total` = `fixed` + their sum)."""

    total: int
    fixed: int
    costs: list[int]


def _count_chat(ctx: RequestContext, body: dict[str, Any], tokenizer: Tokenizer,
                offload: bool) -> ChatCount | None:
    rest = count_prompt(ctx.route, {**body, "messages": []}, tokenizer, offload)
    if rest is None:
        return None
    count = tokenizer.count_offloadable if offload else tokenizer.count
    costs = [message_tokens(message, count) for message in body["messages"]]
    return ChatCount(rest.total + sum(costs), rest.total, costs)


async def count_chat(ctx: RequestContext, body: dict[str, Any], tokenizer: Tokenizer) -> ChatCount | None:
    """`body`'s chat prompt counted as limits counts it (proxy/prompts.py), each message once (None:
    the route has no chat prompt); a large body in a worker thread, as limits counts it
    (proxy/offload.py)."""
    offload = large(ctx)
    return await off_loop(offload, _count_chat, ctx, body, tokenizer, offload)


def trim_messages(messages: Sequence[Any], count: Callable[[str], int], budget: int, *,
                  fixed_tokens: int = 0, keep_last: int = 1, preferred: Sequence[int] = (),
                  costs: Sequence[int] | None = None) -> tuple[list[Any], int, int]:
    """The messages kept within `budget` (see proxy.history.select_groups: the latest user message
    always among them), how many groups went and what the kept messages cost (`fixed_tokens`
    included: the new prompt's count).

    `fixed_tokens` is what the prompt costs besides its messages (framing, tools, a top-level system
    prompt); `preferred` are group indices to keep first if they fit; `costs`, each message's cost when
    already counted (`ChatCount.costs`: then `count` is not called)."""
    groups = group_messages(messages)
    each = costs if costs is not None else [message_tokens(m, count) for m in messages]
    group_costs = [sum(each[g.start:g.end]) for g in groups]
    question = last_question(messages, groups)
    kept = select_groups(group_costs, [g.kind for g in groups], budget - fixed_tokens,
                         preferred=preferred, keep_last=keep_last,
                         pinned=() if question is None else (question,))
    out = [m for i in kept for m in messages[groups[i].start:groups[i].end]]
    return out, len(groups) - len(kept), fixed_tokens + sum(group_costs[i] for i in kept)


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=False))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


class TrimHistory(Plugin):
    """See the module docstring."""

    name = "trim_history"
    slot = "before_limits"
    config_class = TrimHistoryConfig
    config: TrimHistoryConfig

    def __init__(self, config: PluginConfig, services: Any) -> None:
        super().__init__(config, services)
        relevance = self.config.relevance
        self.vectors = ByteLRU(relevance.cache_max_bytes) if relevance is not None else None

    async def on_request(self, request: web.Request, ctx: RequestContext,
                         decide: Callable[[str], None]) -> web.StreamResponse | None:
        del request
        route = ctx.route
        # Nothing to do, decided in well under a microsecond: not a chat, or a body so small that its
        # prompt cannot exceed the budget (every token covers at least one byte of the body, and each
        # message's JSON framing is longer than its template overhead).
        if route.prompt_shape != "chat" or route.prompt_field != "messages" \
                or len(ctx.body or b"") <= self.config.budget_tokens:
            decide("pass")
            return None
        body = await parsed_json(ctx)
        model = ctx.model
        if not isinstance(body, dict) or model is None or not isinstance(body.get("messages"), list):
            decide("pass")
            return None
        tokenizer = await self.services.tokenizer_for(model)
        before = await count_chat(ctx, body, tokenizer)
        if before is None or before.total <= self.config.budget_tokens:
            decide("kept")
            return None
        messages: list[Any] = body["messages"]
        preferred: list[int] = []
        if self.config.relevance is not None:
            preferred = await self._relevant(ctx, model, messages, group_messages(messages))
        kept, dropped, after = trim_messages(
            messages, tokenizer.count, self.config.budget_tokens, fixed_tokens=before.fixed,
            keep_last=self.config.keep_last_turns, preferred=preferred, costs=before.costs)
        if not dropped:
            decide("kept")
            return None
        saved = before.total - after  # counted per message once: no third pass over the text
        ctx.replace_json({**body, "messages": kept})
        ctx.response_headers[HEADER] = f"turns={dropped}; tokens={saved}"
        decide("trimmed")
        return None

    async def _relevant(self, ctx: RequestContext, model: str, messages: Sequence[Any],
                        groups: Sequence[Group]) -> list[int]:
        """Indices of the older `turn` groups most similar to the latest user message, best first;
        empty when they cannot be scored (fails open to recency)."""
        relevance = self.config.relevance
        assert relevance is not None and self.vectors is not None
        query = next((message_text(m) for m in reversed(messages) if role(m) == "user"), "")
        older = len(groups) - self.config.keep_last_turns
        candidates = [i for i in range(max(0, older)) if groups[i].kind == "turn"]
        candidates = candidates[-_MAX_RELEVANCE_CANDIDATES:]
        if not query or not candidates:
            return []
        texts = ["\n".join(message_text(messages[j]) for j in range(groups[i].start, groups[i].end))
                 for i in candidates]
        vectors = await self.embed(ctx, relevance, [query, *texts])
        if vectors is None:
            return []
        scores = {i: _cosine(vectors[0], vector) for i, vector in zip(candidates, vectors[1:],
                                                                       strict=True)}
        return sorted(scores, key=lambda i: scores[i], reverse=True)[:relevance.keep]

    async def embed(self, ctx: RequestContext, relevance: RelevanceConfig,
                    texts: Sequence[str]) -> list[Sequence[float]] | None:
        """Embeddings of `texts` (cached by model, digest and text hash, and the caller's tenant under
        `cache_scope: tenant`; the misses in one /api/embed sub-request through the chain), or None
        when the fleet did not give them in time (`timeout_s`, and never past the request's
        deadline)."""
        assert self.vectors is not None
        digest = self.services.model_digest(relevance.model) or ""
        scope = ctx.tenant.name if relevance.cache_scope == "tenant" else ""
        keys = [hashlib.sha256(f"{scope}\0{relevance.model}\0{digest}\0{t}".encode()).hexdigest()
                for t in texts]
        out: list[Sequence[float] | None] = []
        for key in keys:
            cached = self.vectors.get(key)
            out.append(array("d", cached) if cached is not None else None)
        missing = [i for i, vector in enumerate(out) if vector is None]
        if missing:
            timeout_s = relevance.timeout_s
            if ctx.deadline_at is not None:
                # A deadline shorter than the timeout (X-Deadline-S) bounds the wait: past it the
                # plugin runner cuts this phase off a second late and answers 504, where trimming by
                # recency leaves the answer to the forwarder's deadline.
                timeout_s = min(timeout_s, ctx.deadline_at - time.monotonic())
                if timeout_s <= 0:
                    return None
            status, answer = await self.services.subrequests.post_json(
                "/api/embed", {"model": relevance.model, "input": [texts[i] for i in missing]},
                tenant=self.config.tenant or ctx.tenant.name, timeout_s=timeout_s)
            embeddings = answer.get("embeddings") if isinstance(answer, dict) else None
            if status != 200 or not isinstance(embeddings, list) or len(embeddings) != len(missing):
                log.info("trim_history: no embeddings for relevance (status %s); trimming by recency",
                         status)
                return None
            for i, vector in zip(missing, embeddings, strict=True):
                if not isinstance(vector, list):
                    return None
                packed = array("d", (float(x) for x in vector))
                self.vectors.put(keys[i], packed.tobytes())
                out[i] = packed
        return [vector for vector in out if vector is not None]


PLUGIN = TrimHistory
