"""proxy/history.py on its own: grouping (a tool call stays with its results), selection within a budget,
prefix hashes, the tail of a long prompt and chunking; counted with a real tokenizer (the emulator's
SentencePiece model) and with the estimate."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from proxy.history import (
    chain_hashes,
    chunk_text,
    group_messages,
    last_question,
    message_tokens,
    role,
    select_groups,
    split_tail,
)
from proxy.tokens import EstimateTokenizer, SentencePieceTokenizer

MODEL = Path(__file__).resolve().parent.parent / "proxy" / "emulator" / "data" / "emulator.model"


@pytest.fixture(scope="module", params=["sentencepiece", "estimate"])
def count(request: pytest.FixtureRequest) -> object:
    tokenizer = (SentencePieceTokenizer.from_file(MODEL) if request.param == "sentencepiece"
                 else EstimateTokenizer())
    return tokenizer.count


def test_groups_keep_tool_calls_with_their_results_in_every_dialect() -> None:
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
        {"role": "tool", "content": "r1"},
        {"role": "tool", "content": "r2"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "x"}]},
        {"role": "developer", "content": "d"},
        {"role": "user", "content": "u2"},
    ]
    groups = group_messages(messages)
    assert [(g.start, g.end, g.kind) for g in groups] == [
        (0, 1, "system"), (1, 2, "turn"), (2, 5, "tools"), (5, 7, "tools"), (7, 8, "system"),
        (8, 9, "turn")]


def test_roles_are_read_in_any_case_as_ollama_lower_cases_them() -> None:
    messages = [
        {"role": "SYSTEM", "content": "s"},
        {"role": "User", "content": "u1"},
        {"Role": "Assistant", "content": "", "Tool_Calls": [{"function": {"name": "f", "arguments": {}}}]},
        {"role": "Tool", "content": "r1"},
        {"role": "Assistant", "Content": [{"Type": "tool_use", "id": "t", "name": "f", "input": {}}]},
        {"role": "USER", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "x"}]},
        {"role": "Developer", "content": "d"},
        {"role": "uSeR", "content": "u2"},
        {"role": 7, "content": "not a role"},
    ]
    groups = group_messages(messages)
    assert [(g.start, g.end, g.kind) for g in groups] == [
        (0, 1, "system"), (1, 2, "turn"), (2, 4, "tools"), (4, 6, "tools"), (6, 7, "system"),
        (7, 8, "turn"), (8, 9, "turn")]
    assert last_question(messages, groups) == 5
    assert [role(m) for m in messages[:2]] == ["system", "user"] and role(messages[8]) == role(None) == ""


def test_selection_keeps_pinned_groups_the_newest_that_fit_and_preferred_first() -> None:
    costs = [5, 10, 10, 10, 10, 10]
    kinds = ["system", "turn", "tools", "turn", "turn", "turn"]
    # Pinned: 0, 2 (tools) and 5 (the last): 25; the budget leaves room for one more: the newest (4).
    assert select_groups(costs, kinds, 35) == [0, 2, 4, 5]
    # A preferred (relevant) old turn comes first; then nothing else fits.
    assert select_groups(costs, kinds, 35, preferred=[1]) == [0, 1, 2, 5]
    # The recent window stays contiguous: once a turn does not fit, older ones are not tried.
    assert select_groups([1, 1, 50, 1], ["turn"] * 4, 10) == [3]
    # Pinned groups are kept even over the budget; keep_last keeps the newest whatever they cost.
    assert select_groups([5, 100], ["system", "turn"], 10) == [0, 1]
    # What must be kept is alone over the budget: only it is kept (the closer to the budget, the
    # likelier the prompt fits the model's context).
    assert select_groups([9, 9, 9], ["turn"] * 3, 0, keep_last=2) == [1, 2]
    tool_loop = ["turn", "turn", "turn", "tools"]  # the question (2) before a tool call and its result
    assert select_groups([1, 1, 5, 20], tool_loop, 26, pinned=[2]) == [1, 2, 3]
    assert select_groups([1, 1, 5, 20], tool_loop, 22, pinned=[2]) == [2, 3]
    assert select_groups([], [], 10) == []


def test_message_tokens_count_text_parts_and_tool_calls(count: object) -> None:
    assert callable(count)
    plain = {"role": "user", "content": "hello there"}
    parts = {"role": "user", "content": [{"type": "text", "text": "hello there"}]}
    assert message_tokens(plain, count) == message_tokens(parts, count) == 4 + count("hello there")
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather"}}]}
    assert message_tokens(call, count) > 4


def test_chunking_counts_about_each_piece_not_the_rest_of_the_text(count: object) -> None:
    """The text counted to cut a document grows with the document, not with its square: four times the
    text, about four times the counting. Before, every piece counted (and bisected over) the whole rest
    of the text: 100 KB took 7 s, a megabyte minutes."""
    assert callable(count)
    rng = random.Random(3)
    words = ["alpha", "beta", "gamma", "internationalization", "東京", "ok.", "why?", "\n\n"]
    counted = [0]

    def counting(text: str) -> int:
        counted[0] += len(text)
        return int(count(text))

    def cost(size: int) -> int:
        text = " ".join(rng.choice(words) for _ in range(size))
        counted[0] = 0
        chunks = chunk_text(text, 64, counting)
        assert "".join(chunks) == text and all(count(c) <= 64 for c in chunks)
        return counted[0]

    small, large = cost(1500), cost(6000)
    assert large < 6 * small, (small, large)


def test_prefix_hashes_identify_exactly_the_prefix() -> None:
    a = [{"role": "user", "content": "x", "images": None}, {"content": "y", "role": "assistant"}]
    b = [{"images": None, "content": "x", "role": "user"}, {"role": "assistant", "content": "z"}]
    ha, hb = chain_hashes(a), chain_hashes(b)
    assert ha[0] == hb[0]  # key order does not matter
    assert ha[1] != hb[1]  # content does
    assert chain_hashes(a[:1]) == ha[:1]
    assert chain_hashes([{"role": "user", "content": "x "}])[0] != ha[0]


def test_split_tail_keeps_the_question_whole(count: object) -> None:
    assert callable(count)
    front_text = "Background paragraph. " * 200
    question = "What does the contract say about renewal dates?"
    front, tail = split_tail(front_text + "\n\n" + question, count(question) + 2, count)
    assert tail == question and front == front_text + "\n\n"
    assert split_tail("short", 100, count) == ("", "short")
    no_breaks = "x" * 3000
    front, tail = split_tail(no_breaks, 10, count)
    assert front + tail == no_breaks and 0 < count(tail) <= 10


def test_chunks_fit_and_rebuild_the_text(count: object) -> None:
    assert callable(count)
    rng = random.Random(5)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "éclair", "東京"]
    text = "\n\n".join(". ".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
                                 for _ in range(rng.randint(1, 5))) for _ in range(40))
    chunks = chunk_text(text, 64, count)
    assert len(chunks) > 1 and "".join(chunks) == text
    assert all(count(c) <= 64 for c in chunks)
    # Most pieces end at a boundary (sentence or paragraph), not inside a word.
    assert sum(c.endswith((". ", "\n\n", "\n")) for c in chunks[:-1]) >= len(chunks[:-1]) // 2
    overlapped = chunk_text(text, 64, count, overlap_tokens=16)
    assert all(count(c) <= 64 for c in overlapped)
    assert overlapped[0] == chunks[0] and len(overlapped) >= len(chunks)
    for previous, current in itertools.pairwise(overlapped):
        # Each piece starts with the end of the one before it (a shared sentence or a few words).
        assert any(current.startswith(previous[-k:]) for k in range(1, len(previous))), current[:40]
    assert chunk_text("", 10, count) == [] and chunk_text("tiny", 10, count) == ["tiny"]
    with pytest.raises(ValueError):
        chunk_text(text, 10, count, overlap_tokens=10)
