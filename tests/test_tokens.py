"""Token counting: the segment-cached count equals a full SentencePiece encode, the registry resolves
vocabularies once (file, /api/show, else the estimate), and the estimate's error is what its docstring
states."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from proxy.emulator.app import create_emulator_app
from proxy.emulator.vocabulary import MODEL_PATH, default_vocabulary
from proxy.tokens import (
    EstimateTokenizer,
    SentencePieceTokenizer,
    TokenizerRegistry,
    model_proto_from_show,
)

# A committed, project-authored corpus: the suite needs nothing outside the repository.
CORPUS = Path(__file__).resolve().parent / "data" / "corpus.md"


def _corpus_words() -> list[str]:
    """The corpus split on whitespace; a missing or trivial file fails the test at once (a fallback to
    some other text would change what the tests measure, or hang on one enormous word)."""
    if not CORPUS.is_file():
        pytest.fail(f"test corpus {CORPUS} is missing; it is part of the repository")
    words = CORPUS.read_text(encoding="utf-8").split()
    if len(words) < 200 or max(len(word) for word in words) > 1000:
        pytest.fail(f"test corpus {CORPUS} is not the expected text ({len(words)} words)")
    return words


def _random_texts(count: int) -> list[str]:
    rng = random.Random(5)
    corpus = _corpus_words()
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 300)):
            parts.append(rng.choice(corpus))
            parts.append(rng.choice([" ", " ", "  ", "\n", " \n\t", "", "   "]))
        texts.append("".join(parts))
    return texts


def test_segmented_count_equals_full_encode() -> None:
    tokenizer = SentencePieceTokenizer.from_file(MODEL_PATH)
    vocabulary = default_vocabulary()
    for text in [*_random_texts(200), "", " ", "  leading", "trailing  ", "東京 ünïcödé 12345"]:
        assert tokenizer.count(text) == vocabulary.count(text), repr(text[:80])


def test_keep_last_respects_the_budget() -> None:
    tokenizer = SentencePieceTokenizer.from_file(MODEL_PATH)
    text = " ".join(f"word{i}" for i in range(500))
    kept = tokenizer.keep_last(text, 100)
    assert tokenizer.count(kept) <= 101 and kept.endswith("word499")


def test_estimate_against_the_small_emulator_vocabulary() -> None:
    """ceil(bytes / 3) against the emulator's 8K vocabulary on markdown-heavy text, which splits into
    short tokens (~2 bytes each): the estimate undercounts there by 20-40 %. (Against a real model's
    vocabulary it over-counts: tests/test_real_engine.py.) The figures are the ones docs state."""
    estimate, exact = EstimateTokenizer(), default_vocabulary()
    ratios = [estimate.count(t) / exact.count(t) for t in _random_texts(50) if exact.count(t) > 20]
    print(f"estimate / emulator vocabulary: min {min(ratios):.2f}, max {max(ratios):.2f}")
    assert min(ratios) >= 0.55 and max(ratios) <= 0.9


def test_proto_from_show_refuses_non_sentencepiece() -> None:
    assert model_proto_from_show({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]}) \
        is None
    assert model_proto_from_show({"tokenizer.ggml.model": "llama"}) is None


async def test_registry_fetches_once_and_falls_back(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_emulator_app())
    calls: list[str] = []

    async def fetch(model: str) -> dict[str, Any] | None:
        calls.append(model)
        if model.startswith("missing"):
            return None
        response = await client.post("/api/show", json={"model": model, "verbose": True})
        return dict(await response.json())

    registry = TokenizerRegistry({}, fetch)
    first, second = await asyncio.gather(registry.for_model("llama3.2"),
                                         registry.for_model("llama3.2:latest"))
    assert first is second and first.method == "sentencepiece"
    assert calls == ["llama3.2"]  # single flight, one fetch for both spellings
    assert (await registry.for_model("missing-model")).method == "estimate"
    assert (await registry.for_model("missing-model")).method == "estimate"
    assert calls.count("missing-model") == 1  # a failure is not retried on every request
    registry.invalidate("llama3.2")
    await registry.for_model("llama3.2")
    assert calls.count("llama3.2") == 2


def test_configured_tokenizer_file_needs_no_fetch() -> None:
    async def fetch(model: str) -> dict[str, Any] | None:
        raise AssertionError("must not fetch a configured model")

    registry = TokenizerRegistry({"mymodel": str(MODEL_PATH)}, fetch)
    registry.load_configured()
    tokenizer = asyncio.run(registry.for_model("mymodel:latest"))
    assert tokenizer.count("hello world") == default_vocabulary().count("hello world")


@pytest.mark.parametrize("text", ["a", "hello world " * 50])
def test_counts_are_positive(text: str) -> None:
    assert SentencePieceTokenizer.from_file(MODEL_PATH).count(text) > 0
