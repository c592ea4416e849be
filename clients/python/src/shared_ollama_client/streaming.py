"""Streaming first: text as it is produced, and leaving early closes the stream, which is what cancels
the work upstream (closing the connection is Ollama's only cancel signal; the proxy passes it on)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

__all__ = ["astream_chat", "stream_chat"]


def _content(part: Any) -> str:
    message = part["message"] if isinstance(part, dict) else part.message
    content = message["content"] if isinstance(message, dict) else message.content
    return str(content or "")


def stream_chat(client: Any, model: str, messages: Sequence[Any], *, max_chars: int | None = None,
                **kwargs: Any) -> Iterator[str]:
    """The answer's text, piece by piece, from `client.chat(..., stream=True)` (an `ollama.Client`).

    The stream is closed when `max_chars` characters have come, when the caller stops iterating and
    closes this generator (`break` in a `for` loop, then garbage collection, or `.close()` / a `with
    contextlib.closing(...)` to be prompt), or on an error: the HTTP response is closed at once and the
    service stops generating.
    """
    parts = client.chat(model=model, messages=list(messages), stream=True, **kwargs)
    try:
        received = 0
        for part in parts:
            text = _content(part)
            yield text
            received += len(text)
            if max_chars is not None and received >= max_chars:
                return
    finally:
        parts.close()


async def astream_chat(client: Any, model: str, messages: Sequence[Any], *, max_chars: int | None = None,
                       **kwargs: Any) -> AsyncIterator[str]:
    """The async twin of `stream_chat`, for `ollama.AsyncClient`; close it with `await gen.aclose()`."""
    parts = await client.chat(model=model, messages=list(messages), stream=True, **kwargs)
    try:
        received = 0
        async for part in parts:
            text = _content(part)
            yield text
            received += len(text)
            if max_chars is not None and received >= max_chars:
                return
    finally:
        await parts.aclose()
