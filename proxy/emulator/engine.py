"""The emulator's inference engine: model residency, deterministic text and embeddings, timing and stats.

Every front end (native `/api/*`, OpenAI `/v1/*`, Anthropic `/v1/messages`) asks the engine for a run and
formats what it yields. Text is seeded by (emulator seed, model, prompt, options.seed), so the same request
gives the same bytes; with a fixed clock, timestamps and durations are computed from the timing model
instead of measured, which makes whole responses reproducible.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs

from .catalog import ModelEntry, ModelStore
from .durations import FOREVER_NS
from .gojson import F32
from .vocabulary import Vocabulary

__all__ = ["Engine", "EngineSettings", "LoadedModel", "ModelStats", "RunResult"]

_DEFAULT_KEEP_ALIVE_NS = 5 * 60 * 1_000_000_000
# Nominal rates used for reported durations when the emulator runs without delays or with a fixed clock.
_NOMINAL_PREFILL_TPS = 1000.0
_NOMINAL_DECODE_TPS = 100.0


@attrs.define
class EngineSettings:
    """Emulator knobs that v1 exposes (load behaviour arrives with the scheduler)."""

    seed: int = 0
    decode_tokens_per_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    load_s: float = 0.0
    min_output_tokens: int = 16
    max_output_tokens: int = 64
    fixed_clock_ns: int | None = None
    version: str = "0.33.0"


@attrs.define
class ModelStats:
    """Per-model counters served by `GET /_emulator/stats`."""

    active: int = 0
    waiting: int = 0
    completed: int = 0
    cancelled: int = 0

    def as_dict(self) -> dict[str, int]:
        return attrs.asdict(self)


@attrs.define
class LoadedModel:
    """A model resident in memory, as `/api/ps` lists it."""

    entry: ModelEntry
    context_length: int
    keep_alive_ns: int
    expires_ns: int
    refcount: int = 0


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
        self.loaded: dict[str, LoadedModel] = {}
        self.stats: dict[str, ModelStats] = {}
        self._word_ids = [
            i for i in range(vocabulary.size)
            if vocabulary.is_normal(i) and vocabulary.piece(i).startswith(" ")
            and vocabulary.piece(i)[1:].isalpha() and len(vocabulary.piece(i)) > 2
        ]

    # clock -------------------------------------------------------------------------------------------
    def now_ns(self) -> int:
        """Wall-clock time for `created_at`; the fixed instant when the clock is frozen."""
        fixed = self.settings.fixed_clock_ns
        return fixed if fixed is not None else time.time_ns()

    def stats_for(self, model: str) -> ModelStats:
        return self.stats.setdefault(model, ModelStats())

    # residency ---------------------------------------------------------------------------------------
    def expire_idle(self) -> None:
        """Drop models whose keep_alive ran out while idle."""
        now = time.time_ns()
        for key, loaded in list(self.loaded.items()):
            if loaded.refcount == 0 and loaded.expires_ns <= now:
                del self.loaded[key]

    async def acquire(self, entry: ModelEntry, keep_alive_ns: int | None) -> tuple[LoadedModel, int]:
        """Make `entry` resident and take a reference; returns it and the load time spent (ns)."""
        self.expire_idle()
        start = time.monotonic_ns()
        loaded = self.loaded.get(entry.name)
        load_ns = 0
        if loaded is None:
            if self.settings.load_s > 0:
                await asyncio.sleep(self.settings.load_s)
            load_ns = time.monotonic_ns() - start if self.settings.fixed_clock_ns is None else int(
                self.settings.load_s * 1e9)
            loaded = LoadedModel(entry, min(4096, entry.preset.context_length),
                                 _DEFAULT_KEEP_ALIVE_NS, FOREVER_NS)
            self.loaded[entry.name] = loaded
        if keep_alive_ns is not None:
            loaded.keep_alive_ns = keep_alive_ns
        loaded.refcount += 1
        loaded.expires_ns = FOREVER_NS
        return loaded, load_ns

    def release(self, loaded: LoadedModel) -> None:
        """Drop a reference; the keep_alive timer starts when the last one goes."""
        loaded.refcount -= 1
        if loaded.refcount <= 0:
            loaded.refcount = 0
            if loaded.keep_alive_ns == 0:
                self.loaded.pop(loaded.entry.name, None)
            else:
                loaded.expires_ns = min(FOREVER_NS, time.time_ns() + loaded.keep_alive_ns)

    def unload(self, entry: ModelEntry) -> None:
        """`keep_alive: 0` with nothing to do: unload as soon as idle."""
        loaded = self.loaded.get(entry.name)
        if loaded is not None:
            loaded.keep_alive_ns = 0
            if loaded.refcount == 0:
                del self.loaded[entry.name]

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

    # generation --------------------------------------------------------------------------------------
    def _rng(self, *material: object) -> random.Random:
        digest = hashlib.sha256(repr((self.settings.seed, *material)).encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    async def generate(self, entry: ModelEntry, prompt_tokens: int, seed_material: object,
                       options: dict[str, Any], keep_alive_ns: int | None,
                       result: RunResult) -> AsyncIterator[str]:
        """Yield output tokens one at a time at the configured decode rate; fill `result` at the end.

        Counts the run in `stats` as active while it runs, then completed, or cancelled when the consumer
        goes away (CancelledError or generator close) before the end.
        """
        stats = self.stats_for(entry.name)
        arrival = time.monotonic_ns()
        result.created_ns = self.now_ns()
        stats.waiting += 1
        finished = False
        loaded: LoadedModel | None = None
        try:
            loaded, load_ns = await self.acquire(entry, keep_alive_ns)
            stats.waiting -= 1
            stats.active += 1
            prefill_start = time.monotonic_ns()
            if self.settings.prefill_tokens_per_s > 0:
                await asyncio.sleep(prompt_tokens / self.settings.prefill_tokens_per_s)
            decode_start = time.monotonic_ns()
            rng = self._rng(entry.name, seed_material, options.get("seed"))
            natural = rng.randint(self.settings.min_output_tokens, self.settings.max_output_tokens)
            num_predict = options.get("num_predict")
            limit = natural
            if isinstance(num_predict, int) and not isinstance(num_predict, bool) and num_predict >= 0:
                limit = min(natural, num_predict)
            delay = 1.0 / self.settings.decode_tokens_per_s if self.settings.decode_tokens_per_s else 0
            for index in range(limit):
                if delay:
                    await asyncio.sleep(delay)
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
                result.load_duration = max(load_ns, prefill_start - arrival)
                result.prompt_eval_duration = max(decode_start - prefill_start, 1000)
                result.eval_duration = max(end - decode_start, 1000)
                result.total_duration = time.monotonic_ns() - arrival
            else:
                prefill_tps = self.settings.prefill_tokens_per_s or _NOMINAL_PREFILL_TPS
                decode_tps = self.settings.decode_tokens_per_s or _NOMINAL_DECODE_TPS
                result.load_duration = load_ns + 1_000_000
                result.prompt_eval_duration = int(prompt_tokens / prefill_tps * 1e9)
                result.eval_duration = int(limit / decode_tps * 1e9)
                result.total_duration = (result.load_duration + result.prompt_eval_duration
                                         + result.eval_duration + 500_000)
            finished = True
        finally:
            if loaded is None:
                stats.waiting -= 1
            else:
                stats.active -= 1
                self.release(loaded)
            if finished:
                stats.completed += 1
            else:
                stats.cancelled += 1

    async def embed(self, entry: ModelEntry, texts: list[str], keep_alive_ns: int | None,
                    normalize: bool, dimensions: int | None = None) -> tuple[list[list[float]], RunResult]:
        """Deterministic embeddings for `texts`, L2-normalised float32 (`/api/embed`) or raw float64."""
        stats = self.stats_for(entry.name)
        arrival = time.monotonic_ns()
        stats.waiting += 1
        loaded: LoadedModel | None = None
        finished = False
        result = RunResult(created_ns=self.now_ns())
        try:
            loaded, load_ns = await self.acquire(entry, keep_alive_ns)
            stats.waiting -= 1
            stats.active += 1
            tokens = sum(self.vocabulary.count(text) + 2 for text in texts)
            if self.settings.prefill_tokens_per_s > 0:
                await asyncio.sleep(tokens / self.settings.prefill_tokens_per_s)
            dims = entry.preset.embedding_length
            vectors: list[list[float]] = []
            for text in texts:
                rng = self._rng(entry.name, "embed", text)
                raw = [rng.gauss(0.0, 1.0) for _ in range(dims)]
                if dimensions and 0 < dimensions < dims:
                    raw = raw[:dimensions]
                if normalize:
                    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
                    vectors.append([F32(v / norm) for v in raw])
                else:
                    vectors.append(raw)
            result.prompt_eval_count = tokens
            if self.settings.fixed_clock_ns is None:
                result.load_duration = load_ns
                result.total_duration = time.monotonic_ns() - arrival
            else:
                result.load_duration = load_ns + 1_000_000
                result.total_duration = result.load_duration + int(tokens / _NOMINAL_PREFILL_TPS * 1e9)
            finished = True
            return vectors, result
        finally:
            if loaded is None:
                stats.waiting -= 1
            else:
                stats.active -= 1
                self.release(loaded)
            if finished:
                stats.completed += 1
            else:
                stats.cancelled += 1
