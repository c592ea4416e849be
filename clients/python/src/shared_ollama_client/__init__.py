"""Client helpers for a shared Ollama service (shared-ollama-proxy): a retrying httpx transport that plugs
into the official clients unchanged, `X-Service-Limits` parsing, chunking, batched embedding and
streaming with early exit. Depends on httpx only."""

from shared_ollama_client.chunking import BYTES_PER_TOKEN_ESTIMATE, chunk_text, estimate_tokens
from shared_ollama_client.embedding import aembed_documents, embed_documents
from shared_ollama_client.limits import SUPPORTED_VERSIONS, ServiceLimits, limits, parse_limits
from shared_ollama_client.retry import (
    AsyncRetryTransport,
    RetryPolicy,
    RetryTransport,
    retry_delay,
    server_delay_s,
)
from shared_ollama_client.streaming import astream_chat, stream_chat

__all__ = [
    "BYTES_PER_TOKEN_ESTIMATE",
    "SUPPORTED_VERSIONS",
    "AsyncRetryTransport",
    "RetryPolicy",
    "RetryTransport",
    "ServiceLimits",
    "aembed_documents",
    "astream_chat",
    "chunk_text",
    "embed_documents",
    "estimate_tokens",
    "limits",
    "parse_limits",
    "retry_delay",
    "server_delay_s",
    "stream_chat",
]

__version__ = "0.1.0"
