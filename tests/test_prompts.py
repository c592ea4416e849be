"""proxy/prompts.py: where a request's prompt is, as Ollama renders it, counted wherever it hides (tool
results, tool inputs, thinking blocks, Responses function items, fields spelled in another case, as Go
reads them), and a chat cut to a budget in one pass."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.ollama import classify
from proxy.prompts import count_prompt, truncate_prompt
from proxy.tokens import EstimateTokenizer

HIDDEN = "lorem ipsum dolor sit amet " * 200
"""~5,400 bytes: ~1,800 tokens by the estimate."""


class CountingTokenizer(EstimateTokenizer):
    """The estimate, counting how often it is asked."""

    def __init__(self) -> None:
        self.calls = 0

    def count(self, text: str) -> int:
        self.calls += 1
        return super().count(text)


def _anthropic(content: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": content}]}


BODIES: list[tuple[str, str, Any]] = [
    ("/v1/messages", "tool_result string", _anthropic(
        [{"type": "tool_result", "tool_use_id": "t1", "content": "{x}"}])),
    ("/v1/messages", "tool_result blocks", _anthropic(
        [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "{x}"}]}])),
    ("/v1/messages", "tool_use input", {"model": "m", "max_tokens": 10, "messages": [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f",
                                           "input": {"query": "{x}"}}]}]}),
    ("/v1/messages", "thinking block", {"model": "m", "max_tokens": 10, "messages": [
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "{x}", "signature": "s"}]}]}),
    ("/v1/messages", "a key in another case", _anthropic([{"type": "text", "Text": "{x}"}])),
    ("/v1/messages", "a key with a letter Go folds", {"model": "m", "max_tokens": 10, "messages": [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f",
                                           "\u0131nput": {"query": "{x}"}},
                                          {"type": "thinking", "th\u0131n\u212aing": "{x}"}]}]}),
    ("/v1/responses", "function_call_output", {"model": "m", "input": [
        {"type": "function_call_output", "call_id": "c", "output": "{x}"}]}),
    ("/v1/responses", "function_call arguments", {"model": "m", "input": [
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{x}"}]}),
    ("/v1/responses", "reasoning encrypted_content", {"model": "m", "input": [
        {"type": "reasoning", "summary": [], "encrypted_content": "{x}"},
        {"role": "user", "content": "hi"}]}),
    ("/v1/responses", "an item's Content", {"model": "m", "input": [
        {"Role": "user", "Content": [{"type": "input_text", "text": "{x}"}]}]}),
    ("/v1/chat/completions", "tool message with parts", {"model": "m", "messages": [
        {"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": "{x}"}]}]}),
]


def _with(body: Any, text: str) -> Any:
    if isinstance(body, dict):
        return {key: _with(value, text) for key, value in body.items()}
    if isinstance(body, list):
        return [_with(item, text) for item in body]
    return text if body == "{x}" else body


@pytest.mark.parametrize(("path", "where", "body"), BODIES, ids=[b[1] for b in BODIES])
def test_text_ollama_renders_is_counted_wherever_it_is(path: str, where: str, body: Any) -> None:
    """The same text adds its tokens wherever it sits: a limit, a quota reservation and the fair
    queue's cost cannot be escaped by moving the prompt into a tool result or a differently spelt key."""
    del where
    route = classify("POST", path)
    tokenizer = EstimateTokenizer()
    small = count_prompt(route, _with(body, "x"), tokenizer)
    large = count_prompt(route, _with(body, HIDDEN), tokenizer)
    assert small is not None and large is not None
    assert large.total - small.total >= tokenizer.count(HIDDEN) - 1


def test_a_chat_is_cut_in_one_pass() -> None:
    """Thousands of small messages over the limit: the oldest go (never a system message, never the
    last), and each message is counted a bounded number of times (recounting after each drop was
    quadratic, on the event loop: 6,000 messages froze the proxy for 19 s)."""
    route = classify("POST", "/api/chat")
    messages: list[dict[str, Any]] = [{"role": "system", "content": "be brief"}]
    messages += [{"role": "user" if i % 2 else "assistant", "content": f"message {i:05d}"}
                 for i in range(6000)]
    body = {"model": "m", "messages": messages}
    tokenizer = CountingTokenizer()
    cut = truncate_prompt(route, body, tokenizer, 4096)
    assert cut is not None
    kept = cut[0]["messages"]
    assert kept[0] == messages[0] and kept[-1] == messages[-1]
    assert kept[1:] == messages[len(messages) - len(kept) + 1:]  # the newest, in order
    total = count_prompt(route, cut[0], EstimateTokenizer())
    assert total is not None and total.total <= 4096
    assert count_prompt(route, {**body, "messages": [messages[0], *messages[-len(kept):]]},
                        EstimateTokenizer()).total > 4096  # type: ignore[union-attr]  # one more: over
    assert cut[1] == f"dropped {len(messages) - len(kept)} oldest message(s)"
    assert tokenizer.calls <= 4 * len(messages)
