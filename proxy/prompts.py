"""How many tokens a route's prompt has, how to cut it, how much output the request may produce, and the
canonical-options rewrite. Where the prompt and the output limit are in each route's body is the route
table's to say (proxy/ollama.py: `prompt_shape`, `prompt_field`, `system_field`, `output_limit`).

Counting follows the rendering every Llama-style chat template shares: BOS, then per message a header of
4 tokens (start, role, end, separator) plus the content, then 3 tokens opening the assistant turn; a
generate prompt is BOS + system + prompt + 3. The emulator renders the same way, so against it the count
is exact; against other templates it differs by a few tokens per message (tests/test_tokens.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs

from . import gojson
from .ollama import RouteInfo, classify
from .schema import LOAD_OPTIONS
from .tokens import Tokenizer

__all__ = [
    "LOAD_OPTIONS",
    "MESSAGE_OVERHEAD",
    "PromptCount",
    "canonicalize",
    "count_prompt",
    "expected_output",
    "int_option",
    "message_role",
    "message_text",
    "message_tokens",
    "request_cost",
    "truncate_prompt",
]


MESSAGE_OVERHEAD = 4
_CHAT_FRAME = 1 + 3
_GENERATE_FRAME = 1 + 3
_EMBED_FRAME = 2


@attrs.frozen
class PromptCount:
    """Tokens of one request's prompt: the total, and the largest single input (embedding batches are
    limited per input, as Ollama truncates each to the context)."""

    total: int
    largest: int


_PART_TEXT = ("text", "thinking", "output", "arguments", "refusal", "encrypted_content")
"""Content-part fields whose string Ollama renders into the prompt: text blocks, Anthropic `thinking`,
Responses `function_call_output.output` and `function_call.arguments`, OpenAI `refusal`, and a
Responses `reasoning` item's `encrypted_content` (Ollama makes it the next assistant turn's thinking,
or a turn of its own)."""


def _field(item: dict[str, Any], key: str) -> Any:
    """`item[key]` (`key` lower-case ASCII), matched as Go's JSON decoder matches struct fields when it
    is not there as written: without regard to case, and with the non-ASCII letters Go folds onto ASCII
    ones (`\u0131nput` is `input`, `th\u0131n\u212aing` is `thinking`: Anthropic's content blocks are
    a struct), so a prompt cannot escape counting by its spelling."""
    value = item.get(key)
    if value is None and item:
        folded = key.upper()
        for name, candidate in item.items():
            if isinstance(name, str) and gojson.go_fold(name) == folded:
                return candidate
    return value


def _part_text(part: dict[str, Any], depth: int = 0) -> str:
    """What one content part (or a Responses item without `content`) puts into the prompt: its text
    fields, a tool result's own content, a tool call's input (as JSON). Images are not text."""
    pieces = [value for key in _PART_TEXT if isinstance(value := _field(part, key), str)]
    inner = _field(part, "content")  # Anthropic tool_result: a string or blocks
    if inner is not None:
        pieces.append(_text(inner, depth + 1))
    arguments = _field(part, "input")  # Anthropic tool_use
    if isinstance(arguments, dict):
        pieces.append(_json_text(arguments))
    return "".join(pieces)


def _text(content: Any, depth: int = 0) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or depth > 8:  # nesting bounded: a body may nest 1,000 deep
        return ""
    pieces = []
    for part in content:  # OpenAI / Anthropic content parts
        if isinstance(part, dict):
            pieces.append(_part_text(part, depth))
        elif isinstance(part, str):
            pieces.append(part)
    return "".join(pieces)


def message_text(message: dict[str, Any]) -> str:
    """A chat message's text, what counting and the history plugins' transcripts read: its content
    (case as Go reads it), or, for a Responses item without one (function_call,
    function_call_output), the item's own text fields."""
    content = _field(message, "content")
    return _text(content) if content is not None else _part_text(message)


def _json_text(value: Any) -> str:
    """Structured content that a chat template renders into the prompt (tools, tool calls), as text
    for counting; empty when absent."""
    if not value or not isinstance(value, list | dict):
        return ""
    return gojson.dumps(value).decode("utf-8", "replace")


def _messages(route: RouteInfo, body: dict[str, Any]) -> list[dict[str, Any]] | None:
    messages = body.get(route.prompt_field or "messages")
    if route.prompt_field == "input":  # Responses: a string is one user message
        messages = [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
    if not isinstance(messages, list):
        return None
    out = [m for m in messages if isinstance(m, dict)]
    system = body.get(route.system_field) if route.system_field else None
    if system:
        out = [{"role": "system", "content": _text(system)}, *out]
    return out


def message_tokens(message: dict[str, Any], count: Callable[[str], int]) -> int:
    """A chat message's cost in the prompt: the template's overhead, its text and its tool calls
    (rendered into the prompt as JSON). The one count: limits, quotas and the history plugins."""
    return (MESSAGE_OVERHEAD + count(message_text(message))
            + count(_json_text(_field(message, "tool_calls"))))


def _inputs(route: RouteInfo, body: dict[str, Any]) -> list[str]:
    raw = body.get(route.prompt_field or "input")
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list):
        return [item for item in raw if isinstance(item, str)]
    return []


def count_prompt(route: RouteInfo, body: dict[str, Any], tokenizer: Tokenizer,
                 offload: bool = False) -> PromptCount | None:
    """The prompt's token count for an inference route (its `prompt_shape` and `prompt_field` say where
    the prompt is), or None when the route has no prompt.

    `offload` counts the way that suits a worker thread (see Tokenizer.count_offloadable).
    """
    count = tokenizer.count_offloadable if offload else tokenizer.count
    shape = route.prompt_shape
    if shape == "chat":
        messages = _messages(route, body)
        if messages is None:
            return None
        total = _CHAT_FRAME + sum(message_tokens(m, count) for m in messages)
        total += count(_json_text(body.get("tools")))  # tool schemas are rendered into the prompt
        return PromptCount(total, total)
    if shape == "generate":
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return None
        frame = 1 if body.get("raw") else _GENERATE_FRAME
        total = frame + count(prompt) + sum(count(value) for key in ("system", "suffix", "template")
                                            if isinstance(value := body.get(key), str))
        context = body.get("context")
        if isinstance(context, list):
            total += len(context)  # token ids of an earlier exchange, prepended by Ollama as they are
        return PromptCount(total, total)
    if shape == "embed":
        sizes = [_EMBED_FRAME + count(text) for text in _inputs(route, body)]
        return PromptCount(sum(sizes), max(sizes, default=0)) if sizes else None
    return None


def int_option(options: Any, name: str) -> int | None:
    """Option `name` of a native request's `options` as Ollama reads it into its int option: an int, or
    a finite float truncated (options are a map to Go, converted by truncation: 512.0 is 512); None
    when absent or anything else."""
    value = options.get(name) if isinstance(options, dict) else None
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def expected_output(route: RouteInfo, body: dict[str, Any]) -> int | None:
    """The output limit the request sets in its route's `output_limit` field (num_predict in options,
    max_tokens, ...), None when it sets none (or an unlimited one, a negative num_predict)."""
    key = route.output_limit
    value: Any
    if key == "num_predict":
        value = int_option(body.get("options"), "num_predict")  # the /v1 structs refuse a float
    elif key == "max_completion_tokens":  # OpenAI's chat: the newer name wins, the older still counts
        value = body.get("max_completion_tokens", body.get("max_tokens"))
    else:
        value = body.get(key) if key is not None else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def request_cost(path: str, body: Any, operation: str | None, prompt_tokens: int | None,
                 body_bytes: int, default_output: int) -> int:
    """What a request is expected to cost in tokens before it runs: its prompt (as counted, else a byte
    estimate) plus the output it may produce (num_predict / max_tokens, else `default_output`; none for
    embeddings). Quotas reserve it and the fair queue charges it; both settle with the real counts.
    `path` is the request's: its route (as a POST, the only method with a body to read) says where the
    output limit is."""
    output = expected_output(classify("POST", path), body) if isinstance(body, dict) else None
    if operation == "embeddings":
        output = 0
    elif output is None:
        output = default_output
    prompt = prompt_tokens if prompt_tokens is not None else math.ceil(body_bytes / 3)
    return prompt + output


_INSTRUCTION_ROLES = ("system", "developer")
"""Roles whose messages instruct rather than converse: kept when turns are dropped. `developer` is
OpenAI's name for the system prompt of its newer models (the history plugins keep it too)."""


def message_role(message: dict[str, Any]) -> str:
    """A chat message's role as Ollama reads it: lower-cased (api.Message's decoding lower-cases it, and
    the OpenAI and Anthropic routes decode through it), so `System` is a system prompt; empty when it
    has no string role."""
    value = _field(message, "role")
    return value.lower() if isinstance(value, str) else ""


def truncate_prompt(route: RouteInfo, body: dict[str, Any], tokenizer: Tokenizer,
                    limit: int) -> tuple[dict[str, Any], str] | None:
    """A copy of `body` whose prompt fits `limit`, and what was cut; None when it cannot fit.

    Chats keep the system (and developer) messages and the newest turns that fit and drop the oldest
    (the items of a Responses `input` list alike; its `instructions`, like Anthropic's `system`, stay);
    a generate prompt loses its front. Embedding inputs are never cut here (Ollama truncates each input
    itself).
    """
    if route.prompt_shape == "chat" and route.prompt_field in ("messages", "input"):
        field = route.prompt_field
        messages = body.get(field)
        if not isinstance(messages, list):  # a Responses `input` string is one turn: nothing to drop
            return None
        counted = count_prompt(route, body, tokenizer)
        if counted is None:
            return None
        # One pass: each message counted once, the oldest droppable ones (not system messages, not
        # the last) left out until the rest fits. (Recounting after every drop was quadratic, on the
        # event loop: 6,000 small messages froze the proxy for 19 s.)
        total = counted.total
        drop: set[int] = set()
        for i, message in enumerate(messages[:-1]):
            if total <= limit:
                break
            if isinstance(message, dict) and message_role(message) in _INSTRUCTION_ROLES:
                continue
            if isinstance(message, dict):
                total -= message_tokens(message, tokenizer.count)
            drop.add(i)
        if total > limit:
            return None
        kept = [m for i, m in enumerate(messages) if i not in drop]
        return {**body, field: kept}, f"dropped {len(drop)} oldest message(s)"
    if route.prompt_shape == "generate":
        prompt = body.get("prompt")
        counted = count_prompt(route, body, tokenizer)
        if not isinstance(prompt, str) or counted is None:
            return None
        budget = limit - (counted.total - tokenizer.count(prompt))
        if budget <= 0:
            return None
        kept_text = tokenizer.keep_last(prompt, budget)
        while tokenizer.count(kept_text) > budget and kept_text:  # decode/encode can differ by one
            kept_text = kept_text[1:]
        cut = tokenizer.count(prompt) - tokenizer.count(kept_text)
        return {**body, "prompt": kept_text}, f"cut {cut} token(s) from the front of the prompt"
    return None


def _shown(value: Any) -> str:
    """A client's option value as it may appear in a response header: printable ASCII, bounded."""
    text = getattr(value, "text", None) or (value if isinstance(value, str) else repr(value))
    text = "".join(c if " " <= c <= "~" and c not in ",;" else "?" for c in str(text))
    return text if len(text) <= 32 else text[:29] + "..."


_LOAD_ORDER = tuple(sorted(LOAD_OPTIONS))
"""The load-time options in a fixed order: the change list reads the same for the same body."""


def canonicalize(body: dict[str, Any], canonical: dict[str, Any], strip_others: bool
                 ) -> tuple[dict[str, Any], list[str]]:
    """Rewrite a native body's load-time options (and keep_alive) to the model's canonical values.

    Returns the new body and one `name=old->new` (or `name=removed`, `name=+new`) entry per change; old
    values are shown as printable ASCII, at most 32 characters (they come from the client and go into
    a response header). Options that are not an object are left alone: Ollama refuses them itself.
    """
    changes: list[str] = []
    options = body.get("options")
    if options is not None and not isinstance(options, dict):
        return body, changes
    options = dict(options) if isinstance(options, dict) else {}
    for name in _LOAD_ORDER:
        if name in canonical and name != "keep_alive":
            if name not in options:
                changes.append(f"{name}=+{canonical[name]}")
            elif options[name] != canonical[name]:
                changes.append(f"{name}={_shown(options[name])}->{canonical[name]}")
            options[name] = canonical[name]
        elif name in options and strip_others:
            changes.append(f"{name}=removed")
            del options[name]
    new_body = dict(body)
    if options or "options" in body:
        new_body["options"] = options
    if "keep_alive" in canonical:
        if body.get("keep_alive") != canonical["keep_alive"]:
            previous = _shown(body.get("keep_alive", ""))
            changes.append(f"keep_alive={previous}->{canonical['keep_alive']}" if "keep_alive" in body
                           else f"keep_alive=+{canonical['keep_alive']}")
        new_body["keep_alive"] = canonical["keep_alive"]
    return new_body, changes
