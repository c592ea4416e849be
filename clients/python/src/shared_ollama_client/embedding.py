"""Embedding many chunks: batched `/api/embed` calls, a bounded number in flight, results in input order.

Back-off belongs to the client's transport (`RetryTransport` / `AsyncRetryTransport`): a batch refused
with 429 or 503 is retried there, after the wait the service asked for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any

import httpx

__all__ = ["aembed_documents", "embed_documents"]


def _batches(chunks: Sequence[str], batch_size: int, concurrency: int) -> list[list[str]]:
    if batch_size < 1 or concurrency < 1:
        raise ValueError("batch_size and concurrency must be >= 1")
    return [list(chunks[i:i + batch_size]) for i in range(0, len(chunks), batch_size)]


def _body(model: str, batch: list[str], options: dict[str, Any]) -> dict[str, Any]:
    return {"model": model, "input": batch, **options}


def _vectors(result: Any, batch: list[str]) -> list[list[float]]:
    vectors = result["embeddings"] if isinstance(result, dict) else result.embeddings
    if len(vectors) != len(batch):
        raise ValueError(f"asked for {len(batch)} embeddings, got {len(vectors)}")
    return [list(v) for v in vectors]


def _embed_one(client: Any, model: str, batch: list[str], options: dict[str, Any]) -> list[list[float]]:
    if isinstance(client, httpx.Client):
        response = client.post("/api/embed", json=_body(model, batch, options))
        response.raise_for_status()
        return _vectors(response.json(), batch)
    return _vectors(client.embed(model=model, input=batch, **options), batch)


def embed_documents(client: Any, model: str, chunks: Sequence[str], batch_size: int = 32,
                    concurrency: int = 2, **options: Any) -> list[list[float]]:
    """One embedding per chunk, in the order of `chunks`.

    `client` is an `ollama.Client` (anything with `.embed(model=, input=)`) or an `httpx.Client` whose
    base URL is the service. Chunks go `batch_size` to a call, at most `concurrency` calls at once
    (threads); `options` (`truncate`, `keep_alive`, `dimensions`, `options`) go into each call. The first
    failure is raised once in-flight calls end, and calls not yet started when it came are not made
    (whichever batch it came from: a slow first batch does not let the rest start behind a failure).
    """
    batches = _batches(chunks, batch_size, concurrency)
    if not batches:
        return []
    with ThreadPoolExecutor(max_workers=min(concurrency, len(batches))) as pool:
        futures: list[Future[list[list[float]]]] = [
            pool.submit(_embed_one, client, model, batch, options) for batch in batches]
        try:
            # Woken by the first failure, not by the batches in order: waiting on futures[0] first
            # let every later batch start after batch 1 had already failed.
            wait(futures, return_when=FIRST_EXCEPTION)
            for future in futures:
                failure = future.exception() if future.done() and not future.cancelled() else None
                if failure is not None:
                    raise failure
            return [vector for future in futures for vector in future.result()]
        finally:
            for future in futures:
                future.cancel()


async def _aembed_one(client: Any, model: str, batch: list[str],
                      options: dict[str, Any]) -> list[list[float]]:
    if isinstance(client, httpx.AsyncClient):
        response = await client.post("/api/embed", json=_body(model, batch, options))
        response.raise_for_status()
        return _vectors(response.json(), batch)
    return _vectors(await client.embed(model=model, input=batch, **options), batch)


async def aembed_documents(client: Any, model: str, chunks: Sequence[str], batch_size: int = 32,
                           concurrency: int = 2, **options: Any) -> list[list[float]]:
    """The async twin of `embed_documents`, for `ollama.AsyncClient` or `httpx.AsyncClient`: the first
    failure cancels the other calls and is raised."""
    batches = _batches(chunks, batch_size, concurrency)
    gate = asyncio.Semaphore(concurrency)

    async def one(batch: list[str]) -> list[list[float]]:
        async with gate:
            return await _aembed_one(client, model, batch, options)

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(batch)) for batch in batches]
    except ExceptionGroup as failed:
        # The first failure itself, as embed_documents raises it: a TaskGroup wraps it in a group that
        # `except ollama.ResponseError` (or httpx.HTTPStatusError) does not catch.
        raise failed.exceptions[0] from None
    return [vector for task in tasks for vector in task.result()]
