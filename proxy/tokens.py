"""Token counting with the model's own vocabulary.

Sources, in order, per model:
1. `models.<name>.tokenizer`: a SentencePiece `.model` file named in the configuration;
2. the upstream's `/api/show` with `"verbose": true`: when `tokenizer.ggml.model == "llama"` the pieces,
   scores and token types are an exact SentencePiece model (BPE by score, identity normalisation, as
   llama.cpp's SPM tokenizer reads a GGUF); fetched once per model, then cached;
3. an estimate: ceil(UTF-8 bytes / 3), never below the real count for the languages we know of: CJK runs
   near 3 bytes per token, so a larger divisor would under-count it. The price is over-counting English:
   measured 1.84-1.92x against Gemma 3's 262K vocabulary (5.6 bytes per token, tests/test_real_engine.py);
   about 1.4x for the ~4.3 bytes per token of 128K BPE vocabularies (Llama 3), which is where the estimate
   is used, as their tokenizer is not SentencePiece. Spans mark it `sop.limits.count_method=estimate`.

Counting is fast because SentencePiece splits on whitespace before it merges: a count is the sum of the
counts of whitespace-led segments, each cached. That equals a full encode exactly (tests/test_tokens.py
checks it on randomised text) and costs well under 1 ms for a 4K-token prompt (`make bench`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as _model_pb2

from .ollama import model_key
from .serving import escape_field

__all__ = ["BYTES_PER_TOKEN", "EstimateTokenizer", "SentencePieceTokenizer", "Tokenizer",
           "TokenizerFileError", "TokenizerRegistry", "load_tokenizer_files", "model_proto_from_show"]

log = logging.getLogger("proxy.tokens")
model_pb2: Any = _model_pb2  # generated protobuf module, untyped

BYTES_PER_TOKEN = 3.0
_SEGMENT = re.compile(r" ?[^ ]+| ")
_RETRY_FAILED_FETCH_S = 60.0
_MAX_ENTRIES = 256
"""Tokenizers and failed lookups kept per registry; the oldest go first (only reached while the fleet's
models are unknown: otherwise only real models get here)."""


class Tokenizer:
    """Counts tokens of text and cuts text to a token budget."""

    method = "estimate"

    def count(self, text: str) -> int:
        raise NotImplementedError

    def keep_last(self, text: str, tokens: int) -> str:
        """The end of `text` that holds at most `tokens` tokens."""
        raise NotImplementedError

    def count_offloadable(self, text: str) -> int:
        """The same count, computed so that it can run in a worker thread without holding the GIL
        (for large prompts, so the event loop keeps serving others meanwhile)."""
        return self.count(text)


class EstimateTokenizer(Tokenizer):
    """No vocabulary available: a deliberately generous estimate (see the module docstring)."""

    method = "estimate"

    def count(self, text: str) -> int:
        return math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN) if text else 0

    def keep_last(self, text: str, tokens: int) -> str:
        data = text.encode("utf-8")
        return data[max(0, len(data) - int(tokens * BYTES_PER_TOKEN)):].decode("utf-8", "ignore")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; counts through a cache of whitespace-led segments."""

    method = "sentencepiece"

    def __init__(self, model_proto: bytes, cache_size: int = 65536) -> None:
        self._full = spm.SentencePieceProcessor(model_proto=model_proto)
        proto = model_pb2.ModelProto()
        proto.ParseFromString(model_proto)
        self._dummy_prefix = proto.normalizer_spec.add_dummy_prefix
        self._exact_segments = (proto.trainer_spec.split_by_whitespace
                                and not proto.trainer_spec.treat_whitespace_as_suffix
                                and not proto.normalizer_spec.remove_extra_whitespaces)
        proto.normalizer_spec.add_dummy_prefix = False
        bare = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self._segment_count = functools.lru_cache(maxsize=cache_size)(
            lambda segment: len(bare.encode(segment)))

    @classmethod
    def from_file(cls, path: str | Path) -> SentencePieceTokenizer:
        return cls(Path(path).read_bytes())

    def count(self, text: str) -> int:
        if not text:
            return 0
        if not self._exact_segments:
            return len(self._full.encode(text))
        if self._dummy_prefix:
            text = " " + text
        count = self._segment_count
        return sum(count(segment) for segment in _SEGMENT.findall(text))

    def count_offloadable(self, text: str) -> int:
        # One encode call in C++, which releases the GIL (the cached path is Python-level work).
        return len(self._full.encode(text)) if text else 0

    def keep_last(self, text: str, tokens: int) -> str:
        ids = self._full.encode(text)
        return str(self._full.decode(ids[-tokens:])) if tokens > 0 else ""


def model_proto_from_show(model_info: dict[str, Any]) -> bytes | None:
    """An exact SentencePiece model from /api/show's verbose `model_info`, or None when the model's
    tokenizer is not SentencePiece (e.g. `gpt2` BPE) or the arrays are missing."""
    if model_info.get("tokenizer.ggml.model") != "llama":
        return None
    pieces = model_info.get("tokenizer.ggml.tokens")
    scores = model_info.get("tokenizer.ggml.scores")
    types = model_info.get("tokenizer.ggml.token_type")
    if not (isinstance(pieces, list) and isinstance(scores, list) and isinstance(types, list)
            and len(pieces) == len(scores) == len(types) and pieces):
        return None
    proto = model_pb2.ModelProto()
    proto.trainer_spec.model_type = model_pb2.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = 6 in types
    proto.trainer_spec.split_by_whitespace = True
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = bool(model_info.get("tokenizer.ggml.add_space_prefix",
                                                                 True))
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for piece, score, kind in zip(pieces, scores, types, strict=True):
        entry = proto.pieces.add()
        entry.piece = str(piece)
        entry.score = float(score)
        entry.type = int(kind) if 1 <= int(kind) <= 6 else 1
    if not any(p.type == model_pb2.ModelProto.SentencePiece.UNKNOWN for p in proto.pieces):
        return None  # SentencePiece requires an unknown piece
    return bytes(proto.SerializeToString())


class TokenizerFileError(ValueError):
    """A `models.<model>.tokenizer` file that cannot be loaded; the message names the key path."""


def load_tokenizer_files(configured: dict[str, str]) -> dict[str, Tokenizer]:
    """Load each model's configured tokenizer file (model name -> path), keyed by `model_key`. Raises
    TokenizerFileError naming the first file that cannot be read or is not a SentencePiece model:
    `serve` and `check-config` refuse such a file as they refuse any bad value, with its key path."""
    loaded: dict[str, Tokenizer] = {}
    for name, path in configured.items():
        try:
            loaded[model_key(name)] = SentencePieceTokenizer.from_file(path)
        except (OSError, ValueError, RuntimeError) as exc:
            # SentencePiece raises RuntimeError (or OSError) for a file that is not its model.
            raise TokenizerFileError(f"models.{name}.tokenizer: cannot be loaded ({type(exc).__name__}: "
                                     f"{str(exc)[:200]})") from None
    return loaded


class TokenizerRegistry:
    """The tokenizer of each model, resolved once (single-flight) and cached by model name.

    `fetch_show(model)` returns the verbose /api/show body of the model from some replica, or None.
    `tracks(model)` (UpstreamSet.tracks) says whether a name may be looked up at all: a name the fleet
    does not have gets the estimate without a replica being asked or an entry made, whoever asks (the
    limits step or a plugin), so random names cost nothing.
    """

    def __init__(self, configured: dict[str, str],
                 fetch_show: Callable[[str], Awaitable[dict[str, Any] | None]],
                 wait_s: float = 5.0, tracks: Callable[[str], bool] | None = None) -> None:
        self._names = dict(configured)
        """The configured files by model name as the file spells it (for load_configured's errors)."""
        self._configured = {model_key(name): path for name, path in configured.items()}
        self._fetch_show = fetch_show
        self._tracks = tracks
        self._wait_s = wait_s
        self._cache: dict[str, Tokenizer] = {}
        self._failed_at: dict[str, float] = {}
        self._inflight: dict[str, asyncio.Task[Tokenizer]] = {}
        self.estimate = EstimateTokenizer()

    def load_configured(self) -> None:
        """Load the tokenizer files named in the configuration (at start-up, not on the request path).
        Raises TokenizerFileError (a ValueError) naming the key path of a file that cannot be loaded."""
        self._cache.update(load_tokenizer_files(self._names))

    def prepare(self, configured: dict[str, str]) -> dict[str, Tokenizer]:
        """A reload's tokenizer files, loaded (raises OSError or ValueError for one that cannot be):
        the files already loaded for the same path are reused. Pass the result to `apply`."""
        keyed = {model_key(name): path for name, path in configured.items()}
        return {key: self._cache[key] if self._configured.get(key) == path and key in self._cache
                else SentencePieceTokenizer.from_file(path) for key, path in keyed.items()}

    def apply(self, configured: dict[str, str], loaded: dict[str, Tokenizer]) -> None:
        """Bind what `prepare` loaded; models no longer configured fall back to /api/show."""
        for key in self._configured:
            if key not in loaded:
                self._cache.pop(key, None)
        self._configured = {model_key(name): path for name, path in configured.items()}
        self._cache.update(loaded)

    def invalidate(self, model: str) -> None:
        """Forget a model's tokenizer (after a pull, create or delete changed what the name means)."""
        key = model_key(model)
        if key not in self._configured:
            self._cache.pop(key, None)
            self._failed_at.pop(key, None)

    async def for_model(self, model: str) -> Tokenizer:
        """The model's tokenizer; the estimate while it cannot be had (retried after a minute)."""
        key = model_key(model)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        if self._tracks is not None and not self._tracks(model):
            return self.estimate
        failed = self._failed_at.get(key)
        if failed is not None and time.monotonic() - failed < _RETRY_FAILED_FETCH_S:
            return self.estimate
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._resolve(key, model))
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        try:
            return await asyncio.wait_for(asyncio.shield(task), self._wait_s)
        except TimeoutError:
            return self.estimate

    async def _resolve(self, key: str, model: str) -> Tokenizer:
        try:
            show = await self._fetch_show(model)
            proto = model_proto_from_show((show or {}).get("model_info") or {})
            if proto is None:
                raise ValueError("the model's tokenizer is not SentencePiece")
            tokenizer: Tokenizer = await asyncio.to_thread(SentencePieceTokenizer, proto)
        except Exception as exc:
            # The name came from a client: escaped, so it can neither start a line nor forge a field.
            log.info("no vocabulary for %s (%s); estimating token counts", escape_field(model, 128),
                     type(exc).__name__)
            _bounded_put(self._failed_at, key, time.monotonic())
            return self.estimate
        _bounded_put(self._cache, key, tokenizer, keep=self._configured)
        return tokenizer


def _bounded_put(table: dict[str, Any], key: str, value: Any, keep: Any = ()) -> None:
    """`table[key] = value`, dropping the oldest entries (never those in `keep`) past _MAX_ENTRIES."""
    table.pop(key, None)
    table[key] = value
    if len(table) > _MAX_ENTRIES:
        for old in [k for k in table if k not in keep][: len(table) - _MAX_ENTRIES]:
            del table[old]
