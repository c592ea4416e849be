"""Quick start: the official ollama client, unchanged, with the retrying transport under it; streaming.

    pip install ollama ./clients/python
    OLLAMA_HOST=http://proxy:11435 OLLAMA_API_KEY=sk-... python examples/python/quickstart.py
"""

from __future__ import annotations

import os

import ollama
from shared_ollama_client import RetryTransport

MODEL = os.environ.get("MODEL", "llama3.2")


def main() -> None:
    # Host and key come from OLLAMA_HOST and OLLAMA_API_KEY, as for every ollama client. The transport
    # retries 429/503 after the wait the service asks for (at most 5 attempts, 120 s in all).
    client = ollama.Client(transport=RetryTransport())
    print("answer: ", end="", flush=True)
    # Streaming first: text arrives as it is produced, and a long answer never waits silently for its
    # headers (timeouts of proxies and clients in between apply to silence, and there is none).
    for part in client.chat(model=MODEL, stream=True,
                            messages=[{"role": "user", "content": "Why is the sky blue?"}]):
        print(part.message.content, end="", flush=True)
        if part.done:
            print(f"\n({part.prompt_eval_count} prompt tokens, {part.eval_count} answer tokens)")


if __name__ == "__main__":
    main()
