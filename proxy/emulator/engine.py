"""The emulator's inference engine: deterministic text and embeddings on top of the scheduler, timed by
the model's profile, with Ollama's context-overflow rules and per-model stats.

Every front end (native `/api/*`, OpenAI `/v1/*`, Anthropic `/v1/messages`) asks the engine for a run and
formats what it yields. Text is seeded by (emulator seed, model, prompt, options.seed), so the same request
gives the same bytes; with a fixed clock, timestamps and durations are computed from the timing model
instead of measured, which makes whole responses reproducible.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs

from .catalog import ModelEntry, ModelStore
from .gojson import F32
from .profile import ProfileSet, TimingProfile
from .scheduler import Runner, Scheduler, ServerBusy
from .vocabulary import Vocabulary

__all__ = ["CONTEXT_OVERFLOW", "ContextOverflow", "Engine", "EngineSettings", "ModelStats", "RunResult"]

CONTEXT_OVERFLOW = ("the prompt is longer than the context length currently available to the model; "
                    "shorten the prompt, adjust the context length in settings, or use a model with a "
                    "longer context length")
# Rates used for reported durations under a fixed clock when the profile has no delay at all.
_NOMINAL_PREFILL_TPS = 1000.0
_NOMINAL_DECODE_TPS = 100.0
_SLOT_WAIT_FLOOR_NS = 1_000_000
"""Slot waits below this are reported as none (scheduling noise; a fixed clock stays deterministic)."""


class ContextOverflow(Exception):
    """A prompt that does not fit and may not be truncated (`truncate: false`): HTTP 400."""


@attrs.define
class EngineSettings:
    """One emulated daemon: its scheduler limits, timing profiles, seed and clock."""

    seed: int = 0
    profiles: ProfileSet = attrs.field(factory=ProfileSet)
    num_parallel: int = 1
    """OLLAMA_NUM_PARALLEL (embedding models always get 1)."""
    max_queue: int = 512
    """OLLAMA_MAX_QUEUE: requests that may wait for a model load before 503."""
    max_loaded_models: int = 3
    """OLLAMA_MAX_LOADED_MODELS."""
    keep_alive_s: float = 300.0
    """OLLAMA_KEEP_ALIVE default."""
    fixed_clock_ns: int | None = None
    version: str = "0.33.0"


@attrs.define
class ModelStats:
    """Per-model counters served by `GET /_emulator/stats`."""

    active: int = 0
    waiting: int = 0
    completed: int = 0
    cancelled: int = 0
    rejected: int = 0
    peak: int = 0
    """The most requests for the model inside the daemon at once (waiting for a slot or running)."""

    def as_dict(self) -> dict[str, int]:
        return attrs.asdict(self)


@attrs.define
class RunResult:
    """What a finished run reports in Ollama's final `done` object."""

    prompt_eval_count: int = 0
    eval_count: int = 0
    total_duration: int = 0
    load_duration: int = 0
    prompt_eval_duration: int = 0
    eval_duration: int = 0
    done_reason: str = "stop"
    created_ns: int = 0

    def metrics(self) -> dict[str, int]:
        """The six metric fields in Go's declaration order (all omitempty)."""
        fields = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
                  "eval_count", "eval_duration")
        return {name: getattr(self, name) for name in fields if getattr(self, name)}


class Engine:
    """Shared emulator state. One instance per emulated Ollama daemon."""

    def __init__(self, settings: EngineSettings, store: ModelStore, vocabulary: Vocabulary) -> None:
        self.settings = settings
        self.store = store
        self.vocabulary = vocabulary
        self.scheduler = Scheduler(
            settings.profiles, num_parallel=settings.num_parallel, max_queue=settings.max_queue,
            max_loaded_models=settings.max_loaded_models,
            default_keep_alive_ns=int(settings.keep_alive_s * 1e9))
        self.stats: dict[str, ModelStats] = {}
        self.inside = 0
        """Requests inside the daemon now, all models (waiting for a slot or running)."""
        self.peak = 0
        """The most requests that were inside the daemon at once (a proxy's slot limit shows here)."""
        self._word_ids = [
            i for i in range(vocabulary.size)
            if vocabulary.is_normal(i) and vocabulary.piece(i).startswith(" ")
            and vocabulary.piece(i)[1:].isalpha() and len(vocabulary.piece(i)) > 2
        ]

    # clock and profiles ------------------------------------------------------------------------------
    def now_ns(self) -> int:
        """Wall-clock time for `created_at`; the fixed instant when the clock is frozen."""
        fixed = self.settings.fixed_clock_ns
        return fixed if fixed is not None else time.time_ns()

    def profile(self, entry: ModelEntry) -> TimingProfile:
        return self.settings.profiles.for_model(entry.name)

    def stats_for(self, model: str) -> ModelStats:
        return self.stats.setdefault(model, ModelStats())

    def num_ctx_for(self, entry: ModelEntry, options: dict[str, Any]) -> int:
        """Effective num_ctx: the request's, else the profile default, clamped to the trained context."""
        requested = options.get("num_ctx")
        if isinstance(requested, int | float) and not isinstance(requested, bool) and requested > 0:
            value = int(requested)
        else:
            value = self.profile(entry).context_length
        return max(4, min(value, entry.preset.context_length))

    # token accounting --------------------------------------------------------------------------------
    def count_prompt(self, text: str) -> int:
        """Tokens of a rendered generate prompt: BOS + text + the assistant header (3)."""
        return 1 + self.vocabulary.count(text) + 3

    def count_chat(self, messages: list[dict[str, Any]]) -> int:
        """Tokens of a rendered chat: BOS + per message (4 header tokens + content) + assistant header (3)."""
        total = 1
        for message in messages:
            content = message.get("content")
            total += 4 + self.vocabulary.count(content if isinstance(content, str) else "")
        return total + 3

    @staticmethod
    def fit_tokens(tokens: int, num_ctx: int, truncate: bool) -> int:
        """Ollama's token-level overflow rule: with truncation (default) the front of the prompt is cut so
        about half the context is free; without it the request fails."""
        if tokens < num_ctx:
            return tokens
        if not truncate:
            raise ContextOverflow(CONTEXT_OVERFLOW)
        return max(1, num_ctx // 2)

    def fit_chat(self, messages: list[dict[str, Any]], num_ctx: int, truncate: bool) -> int:
        """Prompt tokens of a chat after Ollama's truncation (reference §11): whole messages are dropped
        from the front (system messages and the last message kept), then the token-level rule applies."""
        kept = list(messages)
        if truncate:
            while self.count_chat(kept) > num_ctx:
                droppable = [i for i, m in enumerate(kept[:-1]) if m.get("role") != "system"]
                if not droppable:
                    break
                del kept[droppable[0]]
        return self.fit_tokens(self.count_chat(kept), num_ctx, truncate)

    # generation --------------------------------------------------------------------------------------
    def rng(self, *material: object) -> random.Random:
        """A generator seeded by the emulator seed and `material` (deterministic across runs)."""
        digest = hashlib.sha256(repr((self.settings.seed, *material)).encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    async def _acquire(self, entry: ModelEntry, num_ctx: int, keep_alive_ns: int | None
                       ) -> tuple[Runner, int]:
        start = time.monotonic_ns()
        loads_before = self.scheduler.loads
        runner = await self.scheduler.acquire(entry, num_ctx, keep_alive_ns)
        if self.settings.fixed_clock_ns is not None:
            loaded_now = self.scheduler.loads != loads_before
            return runner, int(self.profile(entry).load_s * 1e9 * loaded_now) + 1_000_000
        return runner, time.monotonic_ns() - start

    async def load(self, entry: ModelEntry, num_ctx: int, keep_alive_ns: int | None) -> None:
        """A load-only request: make the model resident (queueing like any other request)."""
        runner, _ = await self._acquire(entry, num_ctx, keep_alive_ns)
        self.scheduler.release(runner)

    @staticmethod
    def render_chat(messages: list[dict[str, Any]]) -> str:
        """A chat as one prompt, in Gemma's turn format (system text leads the first user turn)."""
        system = "\n".join(str(m.get("content") or "") for m in messages if m.get("role") == "system")
        turns: list[str] = []
        for message in messages:
            role = message.get("role")
            if role == "system":
                continue
            content = str(message.get("content") or "")
            if system and not turns and role == "user":
                content = f"{system}\n\n{content}"
            turns.append(f"<start_of_turn>{'model' if role == 'assistant' else 'user'}\n"
                         f"{content}<end_of_turn>\n")
        return "".join(turns) + "<start_of_turn>model\n"

    async def generate(self, entry: ModelEntry, prompt_text: str, prompt_tokens: int,
                       options: dict[str, Any], keep_alive_ns: int | None,
                       result: RunResult, *, truncate: bool = True) -> AsyncIterator[str]:
        """Yield output tokens one at a time; fill `result` at the end. `truncate` is the request's
        (Ollama's default true): whether a prompt the token source finds too long may be cut.

        Counts the run in `stats`: waiting until it holds a slot, then active, then completed, or
        cancelled when the consumer goes away (CancelledError or generator close) before the end.
        """
        arrival = time.monotonic_ns()
        result.created_ns = self.now_ns()
        async with self._admitted(entry, self.num_ctx_for(entry, options), keep_alive_ns) as (
                runner, load_ns, waited_ns):
            async for piece in self._decode(entry, runner, prompt_text, prompt_tokens, options,
                                            result, truncate):
                yield piece
        result.load_duration = load_ns if self.settings.fixed_clock_ns is not None else max(
            load_ns, 1000)
        if self.settings.fixed_clock_ns is None:
            result.total_duration = time.monotonic_ns() - arrival
        else:
            result.total_duration = (result.load_duration + result.prompt_eval_duration
                                     + result.eval_duration + 500_000 + waited_ns)

    @contextlib.asynccontextmanager
    async def _admitted(self, entry: ModelEntry, num_ctx: int, keep_alive_ns: int | None
                        ) -> AsyncIterator[tuple[Runner, int, int]]:
        """Hold a runner reference and one of its slots for the body; yields (runner, load ns, ns
        queued for the slot: 0 below a millisecond, so a fixed clock stays deterministic unqueued).

        Keeps `stats` exact on every path: waiting until the slot, then active, then completed when the
        body finished, rejected on ServerBusy, cancelled on anything else (client gone, generator closed).
        """
        stats = self.stats_for(entry.name)
        stats.waiting += 1
        stats.peak = max(stats.peak, stats.waiting + stats.active)
        self.inside += 1
        self.peak = max(self.peak, self.inside)
        state = "waiting"
        runner: Runner | None = None
        try:
            try:
                runner, load_ns = await self._acquire(entry, num_ctx, keep_alive_ns)
            except ServerBusy:
                state = "rejected"
                raise
            queued = time.monotonic_ns()
            async with runner.slot():
                stats.waiting -= 1
                stats.active += 1
                state = "active"
                # Time queued for one of the runner's parallel slots: in total_duration only, as in
                # Ollama (its load_duration ends when the runner is granted; the slot wait follows).
                waited_ns = time.monotonic_ns() - queued
                yield runner, load_ns, waited_ns if waited_ns > _SLOT_WAIT_FLOOR_NS else 0
            state = "completed"
        finally:
            self._settle(stats, state, runner)

    async def _decode(self, entry: ModelEntry, runner: Runner, prompt_text: str, prompt_tokens: int,
                      options: dict[str, Any], result: RunResult,
                      truncate: bool = True) -> AsyncIterator[str]:
        """The emulated token source: prefill and decode delays from the profile, seeded text.

        Fills the prompt/eval counts, durations and done_reason of `result`. (`prompt_tokens` is already
        fitted to the context here, so `truncate` has nothing left to decide.)
        """
        del truncate
        profile = self.profile(entry)
        prefill_start = time.monotonic_ns()
        prefill_s = profile.prefill_s(prompt_tokens)
        if prefill_s:
            await asyncio.sleep(prefill_s)
        decode_start = time.monotonic_ns()
        rng = self.rng(entry.name, prompt_text, options.get("seed"))
        low, high = profile.output_tokens
        natural = rng.randint(low, max(low, high))
        num_predict = options.get("num_predict")
        limit = natural
        if isinstance(num_predict, int) and not isinstance(num_predict, bool) and num_predict >= 0:
            limit = min(natural, num_predict)
        modelled_decode_s = 0.0
        for index in range(limit):
            gap = profile.decode_gap_s(runner.active)
            if gap:
                modelled_decode_s += gap
                await asyncio.sleep(gap)
            piece = self.vocabulary.piece(rng.choice(self._word_ids))
            if index == 0:
                piece = piece.lstrip().capitalize()
            elif index == limit - 1 or rng.random() < 0.08:
                piece += "."
            yield piece
        end = time.monotonic_ns()
        result.prompt_eval_count = prompt_tokens
        result.eval_count = limit
        result.done_reason = "length" if limit < natural else "stop"
        if self.settings.fixed_clock_ns is None:
            result.prompt_eval_duration = max(decode_start - prefill_start, 1000)
            result.eval_duration = max(end - decode_start, 1000)
        else:
            result.prompt_eval_duration = int((prefill_s or prompt_tokens / _NOMINAL_PREFILL_TPS) * 1e9)
            result.eval_duration = int((modelled_decode_s or limit / _NOMINAL_DECODE_TPS) * 1e9)

    def _settle(self, stats: ModelStats, state: str, runner: Runner | None) -> None:
        self.inside -= 1
        if state in ("waiting", "rejected"):
            stats.waiting -= 1
        elif state in ("active", "completed"):
            stats.active -= 1
        if state == "completed":
            stats.completed += 1
        elif state == "rejected":
            stats.rejected += 1
        else:
            stats.cancelled += 1
        if runner is not None:
            self.scheduler.release(runner)

    async def embed(self, entry: ModelEntry, texts: list[str], keep_alive_ns: int | None,
                    normalize: bool, options: dict[str, Any] | None = None,
                    dimensions: int | None = None) -> tuple[list[list[float]], RunResult]:
        """Deterministic embeddings for `texts`, L2-normalised float32 (`/api/embed`) or raw float64."""
        arrival = time.monotonic_ns()
        result = RunResult(created_ns=self.now_ns())
        num_ctx = self.num_ctx_for(entry, options or {})
        async with self._admitted(entry, num_ctx, keep_alive_ns) as (_, load_ns, waited_ns):
            vectors, tokens, modelled_s = await self._embed_texts(entry, texts, normalize, dimensions,
                                                                  num_ctx)
        result.prompt_eval_count = tokens
        if self.settings.fixed_clock_ns is None:
            result.load_duration = max(load_ns, 1000)
            result.total_duration = time.monotonic_ns() - arrival
        else:
            result.load_duration = load_ns
            result.total_duration = load_ns + int((modelled_s or tokens / _NOMINAL_PREFILL_TPS) * 1e9) \
                + waited_ns
        return vectors, result

    async def _embed_texts(self, entry: ModelEntry, texts: list[str], normalize: bool,
                           dimensions: int | None, num_ctx: int
                           ) -> tuple[list[list[float]], int, float]:
        """The emulated embedder: vectors, tokens read, and the modelled time it slept."""
        profile = self.profile(entry)
        tokens = sum(min(self.vocabulary.count(text) + 2, num_ctx) for text in texts)
        embed_s = profile.prefill_base_s + profile.embed_s(tokens)
        if embed_s:
            await asyncio.sleep(embed_s)
        return [self._vector(entry, text, normalize, dimensions) for text in texts], tokens, embed_s

    def _vector(self, entry: ModelEntry, text: str, normalize: bool,
                dimensions: int | None) -> list[float]:
        rng = self.rng(entry.name, "embed", text)
        dims = entry.preset.embedding_length
        raw = [rng.gauss(0.0, 1.0) for _ in range(dims)]
        if dimensions and 0 < dimensions < dims:
            raw = raw[:dimensions]
        if not normalize:
            return raw
        norm = math.sqrt(sum(v * v for v in raw)) or 1.0
        return [F32(v / norm) for v in raw]

