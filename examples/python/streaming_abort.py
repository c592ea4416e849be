"""Leaving a stream early: closing it closes the connection, which is the only cancel signal Ollama has;
the proxy passes it on, so the replica stops generating and its slot is free for the next request.

    OLLAMA_HOST=http://proxy:11435 OLLAMA_API_KEY=sk-... python examples/python/streaming_abort.py
"""

from __future__ import annotations

import contextlib
import os

import ollama
from shared_ollama_client import RetryTransport, stream_chat

MODEL = os.environ.get("MODEL", "llama3.2")
MESSAGES = [{"role": "user", "content": "Tell me a very long story about the sea."}]


def main() -> None:
    client = ollama.Client(transport=RetryTransport())

    # 1. The bare client: the stream is a generator; close() ends the HTTP response at once.
    stream = client.chat(model=MODEL, messages=MESSAGES, stream=True)
    received = ""
    for part in stream:
        received += part.message.content
        if len(received) >= 40:
            break
    stream.close()  # without it the connection stays open until the generator is garbage-collected
    print(f"closed the stream after {len(received)} characters: {received!r}")

    # 2. The helper: stops after max_chars, or when the caller stops iterating and closes it.
    with contextlib.closing(stream_chat(client, MODEL, MESSAGES, max_chars=40)) as pieces:
        text = "".join(pieces)
    print(f"closed the stream after {len(text)} characters: {text!r}")


if __name__ == "__main__":
    main()
