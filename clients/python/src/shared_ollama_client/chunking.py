"""Splitting documents into chunks that fit a model's prompt limit: paragraphs first, then sentences,
then words, so a chunk breaks at the most natural boundary that keeps it under `max_tokens`."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

__all__ = ["BYTES_PER_TOKEN_ESTIMATE", "chunk_text", "estimate_tokens"]

BYTES_PER_TOKEN_ESTIMATE = 3
"""Bytes of a word per estimated token. The estimate (`estimate_tokens`) counts each word (a run of
letters, digits and `_`) as ceil(UTF-8 bytes / 3) tokens, each other visible character (punctuation,
symbols) as one token, and each run of two or more whitespace characters (newlines, indentation) as one.
Tokenizers of current models take about 4 bytes of an English word per token, one token per common word,
and one or fewer per CJK character (3 bytes), so the estimate over-counts prose and code by 20-60 %, and
chunks sized by it fit. It can under-count long runs of random letters and digits (hashes, base64): for
such data, or for exact sizes, pass the model's tokenizer as `count_tokens`."""

_WHITESPACE = ("\t\n\v\f\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
               + "\u2028\u2029\u202f\u205f\u3000")
"""Unicode's White_Space, JavaScript's `\\p{White_Space}`: the only whitespace here, so the TypeScript
helper cuts the same text the same way (Python's `\\s`, isspace() and strip() also take \\x1c-\\x1f,
JavaScript's `\\s` and trim() a byte-order mark, U+FEFF)."""
_WS = f"[{re.escape(_WHITESPACE)}]"
_PIECE = re.compile(rf"\w+|{_WS}+|[^\w{re.escape(_WHITESPACE)}]")
_PARAGRAPH = re.compile(rf"\n[ \t\r\f\v]*\n{_WS}*")
_SENTENCE = re.compile(rf"(?<=[.!?]){_WS}+|(?<=[\u3002\uff01\uff1f]){_WS}*")
_SPACES = re.compile(rf"{_WS}+")

Counter = Callable[[str], int]
_Unit = tuple[str, str]  # (text, separator put before it when it follows another unit in a chunk)


def estimate_tokens(text: str) -> int:
    """A deterministic over-estimate of a tokenizer's count for prose and code (see
    `BYTES_PER_TOKEN_ESTIMATE` for the rule and where it does not hold)."""
    total = 0
    for match in _PIECE.finditer(text):
        piece = match.group()
        if piece[0] in _WHITESPACE:
            total += len(piece) > 1
        elif piece[0].isalnum() or piece[0] == "_":
            total += math.ceil(len(piece.encode("utf-8")) / BYTES_PER_TOKEN_ESTIMATE)
        else:
            total += 1
    return total


def _join(units: list[_Unit]) -> str:
    return "".join((sep if i else "") + text for i, (text, sep) in enumerate(units))


def _split_long_word(word: str, max_tokens: int, count: Counter) -> list[str]:
    """Cut a word that alone is over the limit into the longest prefixes that fit (at least one
    character each, so this always ends)."""
    pieces: list[str] = []
    while word:
        low, high = 1, len(word)
        while low < high:  # largest prefix length whose count fits
            mid = (low + high + 1) // 2
            if count(word[:mid]) <= max_tokens:
                low = mid
            else:
                high = mid - 1
        pieces.append(word[:low])
        word = word[low:]
    return pieces


def _pack_words(sentence: str, max_tokens: int, count: Counter) -> list[str]:
    words: list[str] = []
    for word in filter(None, _SPACES.split(sentence)):
        words.extend([word] if count(word) <= max_tokens else _split_long_word(word, max_tokens, count))
    pieces: list[str] = []
    current = ""
    for word in words:
        candidate = f"{current} {word}" if current else word
        if current and count(candidate) > max_tokens:
            pieces.append(current)
            current = word
        else:
            current = candidate
    if current:
        pieces.append(current)
    return pieces


def _units(text: str, max_tokens: int, count: Counter) -> list[_Unit]:
    """The document as the largest pieces that each fit: whole paragraphs, else their sentences, else
    runs of words."""
    units: list[_Unit] = []
    for raw_paragraph in _PARAGRAPH.split(text.strip(_WHITESPACE)):
        paragraph = raw_paragraph.strip(_WHITESPACE)
        if not paragraph:
            continue
        if count(paragraph) <= max_tokens:
            pieces = [paragraph]
        else:
            pieces = []
            for raw_sentence in _SENTENCE.split(paragraph):
                sentence = raw_sentence.strip(_WHITESPACE)
                if not sentence:
                    continue
                pieces.extend([sentence] if count(sentence) <= max_tokens
                              else _pack_words(sentence, max_tokens, count))
        units.extend((piece, "\n\n" if i == 0 else " ") for i, piece in enumerate(pieces))
    return units


def chunk_text(text: str, max_tokens: int, overlap: int = 0,
               count_tokens: Counter | None = None) -> list[str]:
    """Split `text` into chunks of at most `max_tokens` tokens, in document order.

    Paragraphs (separated by a blank line) are kept whole and packed together while they fit; a
    paragraph over the limit is split at sentence ends, a sentence over it at spaces, a word over it
    wherever it must. Consecutive chunks share up to `overlap` tokens: the last whole units (paragraphs,
    sentences or word runs) of a chunk that fit in `overlap` start the next one. Tokens are counted with
    `count_tokens` (the model's tokenizer; counted on the joined text, so merges across joins are seen)
    or, without one, with `estimate_tokens`. Deterministic: the same input gives the same chunks. Inside
    a paragraph, runs of whitespace between sentences become one space.
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    if not 0 <= overlap < max_tokens:
        raise ValueError("overlap must be >= 0 and smaller than max_tokens")
    count = count_tokens or estimate_tokens
    chunks: list[str] = []
    current: list[_Unit] = []
    for unit in _units(text, max_tokens, count):
        candidate = [*current, unit]
        if not current or count(_join(candidate)) <= max_tokens:
            current = candidate
            continue
        chunks.append(_join(current))
        tail: list[_Unit] = []
        if overlap:
            for previous in reversed(current):
                if count(_join([previous, *tail])) > overlap:
                    break
                tail.insert(0, previous)
        while tail and count(_join([*tail, unit])) > max_tokens:
            tail.pop(0)
        current = [*tail, unit]
    if current:
        chunks.append(_join(current))
    return chunks
