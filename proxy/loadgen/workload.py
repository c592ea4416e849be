"""Workloads for the load generator: tenants, request classes, Poisson arrivals and bursts, planned ahead
from a seed so every target of a comparison receives exactly the same requests at the same offsets.

Classes:
    chat       interactive chat, streaming, a short system prompt and 1-3 short turns
    rag        RAG generation, streaming, a question over 8-64 KB of retrieved context
    embed      an embedding batch of 16-64 chunks of about 1 KB (document ingest), or, from `Ingests`,
               the chunks of a corpus of overlapping documents, batched or one per call
    long-chat  a turn of a long conversation (`Conversations`): the whole history so far plus a question

No generation prompt of a plan exceeds `Scenario.prompt_budget()` tokens, the scenario's num_ctx less a
margin for the model's template: a RAG context is cut at a word, a chat (a long conversation's history
included) loses its oldest turns, as a client that knows the model's context would do. Tokens are
counted with the emulator's vocabulary (proxy/emulator/vocabulary.py), the one the emulated replicas and
the proxy (from their /api/show) count with, so a prompt of the plan is never refused or cut for its
length there.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import Any, Literal

import attrs

from proxy.emulator.vocabulary import default_vocabulary

__all__ = ["Burst", "Conversations", "Ingests", "Planned", "Scenario", "Stream", "Tenant", "plan"]

IndependentClass = Literal["chat", "rag", "embed"]
"""Classes of requests drawn one by one (streams and bursts)."""
RequestClass = Literal["chat", "rag", "embed", "long-chat"]

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

    kind: IndependentClass
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

    kind: IndependentClass
    at_s: float
    count: int
    window_s: float = 2.0
    max_output_tokens: int | None = None
    """num_predict of these requests (None: the model decides)."""
    model: str | None = None
    """The model these requests ask for (None: the scenario's chat or embedding model)."""


@attrs.frozen
class Conversations:
    """`count` long chat conversations of `turns` turns each (class `long-chat`, streaming).

    Every turn resends the whole history so far (the system prompt, each earlier question and the answer
    to it) plus a new question, as chat clients do, so the prompt grows turn by turn. Conversation i
    starts at `at_s + i * stagger_s`; each next turn leaves `think_s` after the previous one left. Open
    loop: the plan does not wait for answers (every target gets the same turns at the same offsets), so
    the earlier answers in a history are text of an answer's size (`answer_bytes`, about
    `max_output_tokens`), not what a target answered."""

    count: int
    turns: int
    at_s: float = 0.0
    stagger_s: float = 5.0
    think_s: tuple[float, float] = (8.0, 14.0)
    """Seconds between two turns of one conversation (uniform in the range)."""
    question_bytes: tuple[int, int] = (2000, 4000)
    """Each question's size: a question with pasted material (a log, a section of a document)."""
    answer_bytes: tuple[int, int] = (220, 280)
    """Each earlier answer's size as the client resends it."""
    max_output_tokens: int | None = 64
    """num_predict of every turn (None: the model decides)."""
    model: str | None = None
    """The model the conversations use (None: the scenario's chat model)."""


@attrs.frozen
class Ingests:
    """Repeated ingest jobs over one corpus of overlapping documents (class `embed`).

    The corpus is `documents` documents of `chunks_per_document` chunks. Job j (leaving at
    `at_s + j * every_s`) embeds documents j*step .. j*step+window-1 (modulo the corpus), so each job
    embeds `window - step` documents the previous one embedded, chunk for chunk the same text. Even jobs
    send `batch_inputs` chunks per `/api/embed` call (a list input), one call every `gap_s`; odd jobs
    send one chunk per call (a string input), the calls of one document at once (a client's worker
    pool), one document every `gap_s`."""

    documents: int
    chunks_per_document: int
    jobs: int
    window: int
    """Documents per job."""
    step: int
    """How far each job's window moves on: `window - step` documents are shared with the previous job."""
    at_s: float = 0.0
    every_s: float = 20.0
    gap_s: float = 1.0
    chunk_bytes: tuple[int, int] = (700, 1300)
    batch_inputs: int = 16
    model: str | None = None
    """The embedding model (None: the scenario's)."""


@attrs.frozen
class Tenant:
    """A client team: its API key, lane and traffic."""

    name: str
    key: str
    lane: Literal["interactive", "bulk"] = "interactive"
    streams: tuple[Stream, ...] = ()
    bursts: tuple[Burst, ...] = ()
    conversations: tuple[Conversations, ...] = ()
    ingests: tuple[Ingests, ...] = ()


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
    template_margin_tokens: int = 256
    """Room left in num_ctx for what the model's template adds around a prompt: the emulator and the
    proxy count 4 tokens around a prompt and 4 per chat message; a real template takes a few dozen
    (Llama 3.2's adds a dated system header), a Modelfile's SYSTEM prompt more."""
    fit_prompts: bool = True
    """False: prompts stay as drawn, past the budget if need be (for a plan cut down before it is sent,
    as bench-burst-real cuts its RAG contexts to 1/16)."""
    max_requests: int = 5000
    """Hard bound on the plan, whatever the rates say."""

    def prompt_budget(self) -> int | None:
        """The most tokens a generation prompt of the plan may count as the replica renders it (BOS and
        headers included): `num_ctx` less the margin; None without `fit_prompts`."""
        return self.num_ctx - self.template_margin_tokens if self.fit_prompts else None


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
    group: str = ""
    """The conversation (`<tenant>/conversation-<i>`) or ingest job (`<tenant>/ingest-<j>`) it belongs
    to; empty for independent requests."""


def _text(rng: random.Random, size_bytes: int) -> str:
    words: list[str] = []
    length = 0
    while length < size_bytes:
        word = rng.choice(_WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)


TokenCount = Callable[[str], int]
"""Tokens of a text, as the emulator's vocabulary counts them."""

_GENERATE_FRAME = 1 + 3
_CHAT_FRAME = 1 + 3
_MESSAGE_OVERHEAD = 4
"""A prompt's tokens around its text: BOS and the assistant header, and in a chat per message its role
header and end (proxy/prompts.py and the emulator count a rendered prompt the same way)."""


def _counter() -> TokenCount:
    vocabulary = default_vocabulary()
    # A word counts the same wherever it stands in these texts (the vocabulary splits at whitespace):
    # the per-word cache makes counting a 64 KB context a dictionary walk.
    return functools.lru_cache(maxsize=4096)(vocabulary.count)


def _count_text(count: TokenCount, text: str) -> int:
    return sum(count(word) for word in text.split(" "))


def _leading_words(count: TokenCount, text: str, tokens: int) -> str:
    """The longest run of leading words of `text` counting at most `tokens` (may be empty)."""
    kept: list[str] = []
    total = 0
    for word in text.split(" "):
        total += count(word)
        if total > tokens:
            break
        kept.append(word)
    return " ".join(kept)


def _rag_prompt(count: TokenCount, context: str, question: str, budget: int | None) -> tuple[str, str]:
    """(prompt, context): the prompt with as many leading words of `context` as `budget` tokens allow."""
    def prompt(text: str) -> str:
        return f"Answer from the context only.\n\nContext:\n{text}\n\nQuestion: {question}\nAnswer:"

    def full(text: str) -> int:
        return _GENERATE_FRAME + default_vocabulary().count(text)

    frame = full(prompt(""))
    # Counted by words, a prompt is a token or two off at its newlines: within a slack of 8 it fits
    # without counting the whole (64 KB) text once more; near the budget, the whole prompt is counted,
    # and cut by 16 more tokens until it fits.
    if budget is None or _count_text(count, context) + 8 <= budget - frame:
        return prompt(context), context
    room = budget - frame
    while True:
        context = _leading_words(count, context, room)
        if full(prompt(context)) <= budget:
            return prompt(context), context
        if not context:
            raise ValueError(f"a prompt budget of {budget} tokens leaves no room for a RAG context")
        room -= 16


def _chat_tokens(count: TokenCount, messages: list[dict[str, str]]) -> int:
    return _CHAT_FRAME + sum(_MESSAGE_OVERHEAD + _count_text(count, m["content"]) for m in messages)


def _fit_chat(count: TokenCount, messages: list[dict[str, str]],
              budget: int | None) -> list[dict[str, str]]:
    """`messages` within `budget` tokens: the oldest turns after the system prompt go first (a question
    with the answer to it); the last message is never dropped, but cut to its leading words if it
    alone is still too long. ValueError: not even the system prompt fits."""
    kept = list(messages)
    while budget is not None and _chat_tokens(count, kept) > budget:
        turns = [i for i, m in enumerate(kept[:-1]) if m["role"] != "system"]
        if not turns:
            room = budget - _chat_tokens(count, kept[:-1]) - _MESSAGE_OVERHEAD
            if room < 0:
                raise ValueError(f"a prompt budget of {budget} tokens does not hold the system prompt")
            kept[-1] = {**kept[-1], "content": _leading_words(count, kept[-1]["content"], room)}
            break
        del kept[turns[0]]
        # The history starts again with a question, as a client dropping whole exchanges leaves it.
        while (rest := [i for i, m in enumerate(kept[:-1]) if m["role"] != "system"]) \
                and kept[rest[0]]["role"] != "user":
            del kept[rest[0]]
    return kept


def _request(rng: random.Random, scenario: Scenario, kind: IndependentClass,
             max_output_tokens: int | None, model: str | None,
             count: TokenCount) -> tuple[str, dict[str, Any], int]:
    chat_model = model or scenario.chat_model
    options = _options(scenario, max_output_tokens)
    if kind == "chat":
        turns = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."}]
        for _ in range(rng.randint(1, 3)):
            turns.append({"role": "user", "content": _text(rng, rng.randint(60, 400))})
        return "/api/chat", {"model": chat_model, "messages": _fit_chat(count, turns,
                                                                        scenario.prompt_budget()),
                             "stream": True, "options": options}, 0
    if kind == "rag":
        size = rng.randint(8 * 1024, 64 * 1024)
        context = _text(rng, size)
        question = _text(rng, rng.randint(40, 160))
        # Cut after drawing: the generator's sequence, so every other request, is the same either way.
        prompt, kept = _rag_prompt(count, context, question, scenario.prompt_budget())
        return "/api/generate", {"model": chat_model, "prompt": prompt, "stream": True,
                                 "options": options}, size if len(kept) == len(context) else len(kept)
    chunks = [_text(rng, rng.randint(700, 1300)) for _ in range(rng.randint(16, 64))]
    size = sum(len(c) for c in chunks)
    return "/api/embed", {"model": model or scenario.embed_model, "input": chunks}, size


def _options(scenario: Scenario, max_output_tokens: int | None) -> dict[str, Any]:
    options: dict[str, Any] = {"num_ctx": scenario.num_ctx}
    if max_output_tokens is not None:
        options["num_predict"] = max_output_tokens
    return options


_Fixed = tuple[float, Tenant, RequestClass, str, dict[str, Any], int, str]
"""(offset, tenant, class, path, body, context bytes, group) of a request built ahead."""


def _conversations(seed: int, scenario: Scenario, tenant: Tenant, index: int,
                   spec: Conversations, count: TokenCount) -> list[_Fixed]:
    # Its own generator per spec: adding conversations to a scenario leaves its other requests as
    # they were (the main generator's sequence is untouched).
    rng = random.Random(f"{seed}/{tenant.name}/conversations/{index}")
    model = spec.model or scenario.chat_model
    out: list[_Fixed] = []
    for number in range(spec.count):
        group = f"{tenant.name}/conversation-{index}.{number}"
        history: list[dict[str, str]] = [
            {"role": "system", "content": "You are a helpful assistant. Answer from the material the "
                                          "user gives you."}]
        at = spec.at_s + number * spec.stagger_s
        for turn in range(spec.turns):
            if turn:
                history.append({"role": "assistant", "content": _text(rng, rng.randint(*spec.answer_bytes))})
                at += rng.uniform(*spec.think_s)
            history.append({"role": "user", "content": _text(rng, rng.randint(*spec.question_bytes))})
            sent = _fit_chat(count, history, scenario.prompt_budget())
            body = {"model": model, "messages": sent, "stream": True,
                    "options": _options(scenario, spec.max_output_tokens)}
            out.append((at, tenant, "long-chat", "/api/chat", body,
                        sum(len(m["content"]) for m in sent), group))
    return out


def _ingests(seed: int, scenario: Scenario, tenant: Tenant, index: int, spec: Ingests) -> list[_Fixed]:
    rng = random.Random(f"{seed}/{tenant.name}/ingests/{index}")
    model = spec.model or scenario.embed_model
    corpus = [[_text(rng, rng.randint(*spec.chunk_bytes)) for _ in range(spec.chunks_per_document)]
              for _ in range(spec.documents)]
    out: list[_Fixed] = []
    for job in range(spec.jobs):
        group = f"{tenant.name}/ingest-{index}.{job}"
        start = spec.at_s + job * spec.every_s
        documents = [corpus[(job * spec.step + d) % spec.documents] for d in range(spec.window)]
        if job % 2 == 0:
            chunks = [chunk for document in documents for chunk in document]
            for call, first in enumerate(range(0, len(chunks), spec.batch_inputs)):
                batch = chunks[first:first + spec.batch_inputs]
                out.append((start + call * spec.gap_s, tenant, "embed", "/api/embed",
                            {"model": model, "input": batch}, sum(len(c) for c in batch), group))
        else:
            for number, document in enumerate(documents):
                for chunk in document:
                    out.append((start + number * spec.gap_s, tenant, "embed", "/api/embed",
                                {"model": model, "input": chunk}, len(chunk), group))
    return out


def plan(scenario: Scenario, seed: int) -> list[Planned]:
    """Every request of the scenario, sorted by offset; identical for identical (scenario, seed)."""
    rng = random.Random(seed)
    count = _counter()
    arrivals: list[tuple[float, Tenant, IndependentClass, int | None, str | None] | _Fixed] = []
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
        for index, conversations in enumerate(tenant.conversations):
            arrivals += _conversations(seed, scenario, tenant, index, conversations, count)
        for index, ingests in enumerate(tenant.ingests):
            arrivals += _ingests(seed, scenario, tenant, index, ingests)
    arrivals.sort(key=lambda item: item[0])  # stable: calls planned at one offset keep their order
    planned = []
    for index, arrival in enumerate(arrivals[: scenario.max_requests]):
        if len(arrival) == 7:
            at, tenant, kind, path, body, context, group = arrival
        else:
            at, tenant, kind, max_output, model = arrival
            path, body, context = _request(rng, scenario, kind, max_output, model, count)
            group = ""
        planned.append(Planned(index, at, tenant.name, tenant.key, kind, path, body, context, group))
    return planned
