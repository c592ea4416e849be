"""Workloads for the load generator: tenants, request classes, Poisson arrivals and bursts, planned ahead
from a seed so every target of a comparison receives exactly the same requests at the same offsets.

Classes:
    chat   interactive chat, streaming, a short system prompt and 1-3 short turns
    rag    RAG generation, streaming, a question over 8-64 KB of retrieved context
    embed  an embedding batch of 16-64 chunks of about 1 KB (document ingest)
"""

from __future__ import annotations

import random
from typing import Any, Literal

import attrs

__all__ = ["Burst", "Planned", "Scenario", "Stream", "Tenant", "plan"]

RequestClass = Literal["chat", "rag", "embed"]

_CORPUS = """
the retrieval pipeline splits every document into overlapping chunks and stores their vectors in an index
so that a question can be answered from the passages nearest to it while the model reads only what matters
for the answer and cites the source of each claim it makes about revenue policy support tickets contracts
invoices onboarding security incidents deployment runbooks quarterly results and customer feedback
gathered across regions teams products and releases over several years
"""
_WORDS = tuple(_CORPUS.split())


@attrs.frozen
class Stream:
    """Poisson arrivals of one request class for one tenant."""

    kind: RequestClass
    rate_per_s: float
    start_s: float = 0.0
    end_s: float | None = None
    max_output_tokens: int | None = None
    """num_predict of these requests (None: the model decides)."""
    model: str | None = None
    """The model these requests ask for (None: the scenario's chat or embedding model)."""


@attrs.frozen
class Burst:
    """`count` requests of one class spread uniformly over `window_s`, starting at `at_s`."""

    kind: RequestClass
    at_s: float
    count: int
    window_s: float = 2.0
    max_output_tokens: int | None = None
    """num_predict of these requests (None: the model decides)."""
    model: str | None = None
    """The model these requests ask for (None: the scenario's chat or embedding model)."""


@attrs.frozen
class Tenant:
    """A client team: its API key, lane and traffic."""

    name: str
    key: str
    lane: Literal["interactive", "bulk"] = "interactive"
    streams: tuple[Stream, ...] = ()
    bursts: tuple[Burst, ...] = ()


@attrs.frozen
class Scenario:
    """A complete, seeded workload."""

    name: str
    duration_s: float
    tenants: tuple[Tenant, ...]
    chat_model: str = "llama3.2"
    embed_model: str = "nomic-embed-text"
    num_ctx: int = 16384
    """num_ctx every generation asks for (a deployment sized for its RAG prompts)."""
    max_requests: int = 5000
    """Hard bound on the plan, whatever the rates say."""


@attrs.frozen
class Planned:
    """One request of the plan."""

    index: int
    at_s: float
    tenant: str
    key: str
    kind: RequestClass
    path: str
    body: dict[str, Any]
    context_bytes: int = 0


def _text(rng: random.Random, size_bytes: int) -> str:
    words: list[str] = []
    length = 0
    while length < size_bytes:
        word = rng.choice(_WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)


def _request(rng: random.Random, scenario: Scenario, kind: RequestClass,
             max_output_tokens: int | None, model: str | None) -> tuple[str, dict[str, Any], int]:
    chat_model = model or scenario.chat_model
    options: dict[str, Any] = {"num_ctx": scenario.num_ctx}
    if max_output_tokens is not None:
        options["num_predict"] = max_output_tokens
    if kind == "chat":
        turns = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."}]
        for _ in range(rng.randint(1, 3)):
            turns.append({"role": "user", "content": _text(rng, rng.randint(60, 400))})
        return "/api/chat", {"model": chat_model, "messages": turns, "stream": True,
                             "options": options}, 0
    if kind == "rag":
        size = rng.randint(8 * 1024, 64 * 1024)
        context = _text(rng, size)
        question = _text(rng, rng.randint(40, 160))
        prompt = f"Answer from the context only.\n\nContext:\n{context}\n\nQuestion: {question}\nAnswer:"
        return "/api/generate", {"model": chat_model, "prompt": prompt, "stream": True,
                                 "options": options}, size
    chunks = [_text(rng, rng.randint(700, 1300)) for _ in range(rng.randint(16, 64))]
    size = sum(len(c) for c in chunks)
    return "/api/embed", {"model": model or scenario.embed_model, "input": chunks}, size


def plan(scenario: Scenario, seed: int) -> list[Planned]:
    """Every request of the scenario, sorted by offset; identical for identical (scenario, seed)."""
    rng = random.Random(seed)
    arrivals: list[tuple[float, Tenant, RequestClass, int | None, str | None]] = []
    for tenant in scenario.tenants:
        for stream in tenant.streams:
            end = min(stream.end_s if stream.end_s is not None else scenario.duration_s,
                      scenario.duration_s)
            at = stream.start_s
            while stream.rate_per_s > 0:
                at += rng.expovariate(stream.rate_per_s)
                if at >= end:
                    break
                arrivals.append((at, tenant, stream.kind, stream.max_output_tokens, stream.model))
        for burst in tenant.bursts:
            for _ in range(burst.count):
                arrivals.append((burst.at_s + rng.uniform(0, burst.window_s), tenant, burst.kind,
                                 burst.max_output_tokens, burst.model))
    arrivals.sort(key=lambda item: item[0])
    planned = []
    for index, (at, tenant, kind, max_output, model) in enumerate(arrivals[: scenario.max_requests]):
        path, body, context = _request(rng, scenario, kind, max_output, model)
        planned.append(Planned(index, at, tenant.name, tenant.key, kind, path, body, context))
    return planned
