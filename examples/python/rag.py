"""Chunk -> embed -> retrieve -> ask, with every call going through the retrying transport.

    OLLAMA_HOST=http://proxy:11435 OLLAMA_API_KEY=sk-... python examples/python/rag.py

Chunks are sized to the embedding model's limit by an estimate that over-counts (pass the model's own
tokenizer as `count_tokens` for exact sizes); embeddings go in batches, a few calls at once, in order.
"""

from __future__ import annotations

import math
import os

import ollama
from shared_ollama_client import RetryTransport, chunk_text, embed_documents, stream_chat

MODEL = os.environ.get("MODEL", "llama3.2")
EMBED_MODEL = os.environ.get("EMBED_MODEL", "nomic-embed-text")

DOCUMENT = """\
The lighthouse at Cape Verity was built in 1874 from granite quarried on the island itself. Its lamp was
first fuelled by whale oil, then by kerosene, and since 1931 by electricity.

The keeper's logbook records every ship that passed in sight. In the storm of 1903 the keeper rowed out
twice to the schooner Margaret and brought back eleven sailors. The lifeboat used that night hangs in the
museum on the harbour front.

Visitors can climb the 212 steps to the gallery from April to October. The light is still active and is
maintained by the coastal authority; the keeper's cottage is now a guest house with four rooms.
"""

QUESTION = "How many steps lead to the gallery?"


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)) or 1.0)


def main() -> None:
    client = ollama.Client(transport=RetryTransport())
    chunks = chunk_text(DOCUMENT, max_tokens=48, overlap=8)
    vectors = embed_documents(client, EMBED_MODEL, chunks, batch_size=2, concurrency=2)
    print(f"embedded {len(chunks)} chunks")
    question = client.embed(model=EMBED_MODEL, input=QUESTION).embeddings[0]
    ranked = sorted(range(len(chunks)), key=lambda i: cosine(question, vectors[i]), reverse=True)
    context = "\n\n".join(chunks[i] for i in ranked[:2])
    print(f"retrieved: {context[:80]!r}...")
    messages = [{"role": "system", "content": f"Answer from this context only:\n\n{context}"},
                {"role": "user", "content": QUESTION}]
    print("answer: ", end="", flush=True)
    for piece in stream_chat(client, MODEL, messages, options={"num_predict": 64}):
        print(piece, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
