"""Turn selection and chunking for chat histories and long prompts: pure functions, no I/O, no aiohttp.

Used by the trim_history and summarize_history plugins and by the limits step; the client helpers of
issue 13 reuse them as they are (they need only a `count(text) -> int` function, any tokenizer's).

A history is a list of chat messages (Ollama native, OpenAI or Anthropic shapes). It is cut into
*groups*, the units that are kept or dropped whole: a system message; an assistant message that calls
tools together with the tool results that answer it (a call is never separated from its result); any
other message on its own.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs

from . import gojson
from .prompts import MESSAGE_OVERHEAD
from .prompts import message_role as prompt_message_role
from .prompts import message_text as prompt_message_text
from .prompts import message_tokens as prompt_message_tokens

__all__ = [
    "MESSAGE_OVERHEAD_TOKENS",
    "Group",
    "chain_hashes",
    "chunk_text",
    "group_messages",
    "last_question",
    "message_text",
    "message_tokens",
    "role",
    "select_groups",
    "split_tail",
]

MESSAGE_OVERHEAD_TOKENS = MESSAGE_OVERHEAD
"""Tokens a chat template adds per message (start, role, end, separator): proxy/prompts.py counts so."""

Count = Callable[[str], int]


@attrs.frozen
class Group:
    """Messages `start` to `end` (exclusive) of a history, kept or dropped together.

    `kind` is `system`, `tools` (a tool call and its results) or `turn`."""

    start: int
    end: int
    kind: str


def message_text(message: Any) -> str:
    """The text a message carries (proxy/prompts.py's reading: content parts, tool results and inputs,
    thinking blocks, keys in any case); empty for what is not a message."""
    return prompt_message_text(message) if isinstance(message, dict) else ""


def _get(message: dict[str, Any], key: str) -> Any:
    """`message[key]`, the key matched without regard to case when it is not there as written (Go's
    JSON decoding, which Ollama's structs get)."""
    value = message.get(key)
    if value is None:
        for name, candidate in message.items():
            if isinstance(name, str) and name.lower() == key:
                return candidate
    return value


def role(message: Any) -> str:
    """A message's role as Ollama reads it: lower-cased (api.Message's decoding lower-cases it, and the
    OpenAI and Anthropic routes decode through it), so `System` is a system prompt and `Tool` a tool
    result; empty for what is not a message or has no string role (proxy/prompts.py's reading, which
    limits' `truncate` keeps system prompts by)."""
    return prompt_message_role(message) if isinstance(message, dict) else ""


def _parts_of_type(message: Any, kind: str) -> bool:
    content = _get(message, "content") if isinstance(message, dict) else None
    return isinstance(content, list) and any(
        isinstance(part, dict) and _get(part, "type") == kind for part in content)


def _calls_tools(message: Any) -> bool:
    if role(message) != "assistant":
        return False
    return bool(_get(message, "tool_calls")) or _parts_of_type(message, "tool_use")


def _is_tool_result(message: Any) -> bool:
    if not isinstance(message, dict):
        return False
    return role(message) == "tool" or _parts_of_type(message, "tool_result")


def message_tokens(message: Any, count: Count) -> int:
    """A message's cost in the prompt, counted as proxy/prompts.py counts it for limits (the same
    function: what a plugin takes off a prompt is what limits will find gone); 0 for what is not a
    message."""
    return prompt_message_tokens(message, count) if isinstance(message, dict) else 0


def group_messages(messages: Sequence[Any]) -> list[Group]:
    """Cut `messages` into groups (see the module docstring), in order, covering every message once."""
    groups: list[Group] = []
    index = 0
    total = len(messages)
    while index < total:
        message = messages[index]
        if role(message) in ("system", "developer"):
            groups.append(Group(index, index + 1, "system"))
            index += 1
            continue
        if _calls_tools(message) or _is_tool_result(message):
            end = index + 1
            while end < total and _is_tool_result(messages[end]):
                end += 1
            groups.append(Group(index, end, "tools"))
            index = end
            continue
        groups.append(Group(index, index + 1, "turn"))
        index += 1
    return groups


def last_question(messages: Sequence[Any], groups: Sequence[Group]) -> int | None:
    """The index of the group holding the latest user message (a `turn` whose role is `user`: what
    the model is asked to answer), None when there is none."""
    for index in range(len(groups) - 1, -1, -1):
        group = groups[index]
        if group.kind == "turn" and role(messages[group.start]) == "user":
            return index
    return None


def select_groups(costs: Sequence[int], kinds: Sequence[str], budget: int, *,
                  preferred: Iterable[int] = (), keep_last: int = 1,
                  pinned: Iterable[int] = ()) -> list[int]:
    """Which groups to keep (their indices, ascending) so that their total cost fits `budget`.

    Always kept, whatever the budget: `system` and `tools` groups, the last `keep_last` groups (the
    newest turns) and the `pinned` ones (the latest user message: in a tool loop the tool groups are
    the newest, and the question they serve must not be the turn that goes). Then `preferred` groups
    (in the order given, each only if it still fits: the most relevant older turns), then the newest
    remaining groups, newest first, up to the first that does not fit (the recent window stays
    contiguous). So when the groups always kept are alone over `budget`, only they are kept: the
    prompt cannot fit the budget, but the closer it comes, the likelier it fits the model's context
    (tool results grow with every step of an agent loop).
    """
    count = len(costs)
    if count == 0:
        return []
    kept = {i for i in range(count) if kinds[i] != "turn"}
    kept.update(range(max(0, count - keep_last), count))
    kept.update(i for i in pinned if 0 <= i < count)
    used = sum(costs[i] for i in kept)
    for i in preferred:
        if 0 <= i < count and i not in kept and used + costs[i] <= budget:
            kept.add(i)
            used += costs[i]
    for i in range(count - 1, -1, -1):
        if i in kept:
            continue
        if used + costs[i] > budget:
            break
        kept.add(i)
        used += costs[i]
    return sorted(kept)


def chain_hashes(items: Iterable[Any]) -> list[str]:
    """`h[k]` = a hash of exactly the first k+1 items (canonical JSON, keys sorted): a prefix of a
    history is recognised by one hash whatever follows it, and computing every prefix's hash costs one
    pass."""
    out: list[str] = []
    digest = hashlib.sha256(b"sop-history-v1")
    for item in items:
        digest.update(gojson.dumps(_sorted(item)))
        digest.update(b"\x1e")
        out.append(digest.copy().hexdigest())
    return out


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def split_tail(text: str, tail_tokens: int, count: Count) -> tuple[str, str]:
    """(front, tail): `tail` is the end of `text` holding at most `tail_tokens` tokens, starting at a
    paragraph, line or sentence boundary where one is near, so a question at the end stays whole."""
    if tail_tokens <= 0:
        return text, ""
    if count(text) <= tail_tokens:
        return "", text
    # Candidate cut points, nearest the end first: paragraph, line, sentence, then word boundaries.
    for separator in ("\n\n", "\n", ". ", "? ", "! ", " "):
        position = len(text)
        best = -1
        while True:
            position = text.rfind(separator, 0, position)
            if position <= 0:
                break
            cut = position + len(separator)
            if cut >= len(text):  # a separator at the very end: the tail would be empty
                continue
            if count(text[cut:]) > tail_tokens:
                break
            best = cut
        if best > 0:
            return text[:best], text[best:]
    # No boundary at all: cut inside the text, by characters, from the end.
    low, high = 0, len(text)
    while low < high:
        middle = (low + high) // 2
        if count(text[middle:]) <= tail_tokens:
            high = middle
        else:
            low = middle + 1
    return text[:low], text[low:]


def chunk_text(text: str, max_tokens: int, count: Count, *, overlap_tokens: int = 0) -> list[str]:
    """`text` in pieces of at most `max_tokens` tokens each (by `count`), cut at paragraph, line,
    sentence or word boundaries where possible. With `overlap_tokens`, each piece after the first
    starts with the end (at most that many tokens) of the one before (for retrieval, where a sentence
    cut in two should still be found whole). Without overlap, the pieces joined give `text` back."""
    if max_tokens <= 0:
        raise ValueError("max_tokens must be > 0")
    if overlap_tokens < 0 or overlap_tokens >= max_tokens:
        raise ValueError("overlap_tokens must be >= 0 and < max_tokens")
    pieces: list[str] = []
    rest = text
    while rest:
        budget = max_tokens - overlap_tokens if pieces else max_tokens
        head = _head(rest, budget, count)
        pieces.append(head)
        rest = rest[len(head):]
    if not overlap_tokens:
        return pieces
    out = pieces[:1]
    for previous, piece in itertools.pairwise(pieces):
        _, shared = split_tail(previous, overlap_tokens, count)
        # Counts are nearly additive; where joining costs a token more, the overlap gives way.
        out.append(shared + piece if count(shared + piece) <= max_tokens else piece)
    return out


_FIRST_PROBE_CHARS_PER_TOKEN = 8
"""Where the search for a piece's end starts (characters per token of the budget), doubling from there:
a few counts of about a piece's length each, whatever follows in the text."""


def _head(text: str, max_tokens: int, count: Count) -> str:
    """`text` itself when it fits `max_tokens`, else its longest start within them, ending at the best
    boundary available.

    Only about a piece's length of `text` is ever counted: a window that doubles until it no longer
    fits, then a bisection inside it. (Counting the whole rest of the text, and bisecting over all of
    it, for every piece made chunking quadratic: 100 KB took 7 s, a megabyte minutes.)"""
    low, window = 0, max(1, max_tokens * _FIRST_PROBE_CHARS_PER_TOKEN)
    while True:
        if window >= len(text):
            if count(text) <= max_tokens:
                return text
            high = len(text)
            break
        if count(text[:window]) > max_tokens:
            high = window
            break
        low, window = window, window * 2
    # The start of `low` characters fits (or low is 0), that of `high` does not.
    low, high = max(low, 1), high - 1
    while low < high:  # the longest prefix that fits, by characters
        middle = (low + high + 1) // 2
        if count(text[:middle]) <= max_tokens:
            low = middle
        else:
            high = middle - 1
    fits = text[:low]
    for separator in ("\n\n", "\n", ". ", "? ", "! ", " "):
        position = fits.rfind(separator)
        if position > len(fits) // 2:  # a boundary, unless it would leave a piece too small
            return fits[:position + len(separator)]
    return fits
