"""A lean closed-loop HTTP/1.1 load client for `make bench` (what wrk is to C, in a raw asyncio protocol).

aiohttp's client spends ~100 us of CPU per request; on two cores shared by client, proxy and upstream
that is CPU the proxy does not get, and the bench would measure the client. This one sends one
pre-encoded request per round over keep-alive connections and reads the response (Content-Length or
chunked) from a byte buffer: a few microseconds per request. It checks every status.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

__all__ = ["closed_loop", "request_bytes"]


def request_bytes(host: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """A POST of `body` as JSON, keep-alive."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = exc or ConnectionError("connection closed")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.lost)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        status = self._complete()
        if status is not None and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(status)

    def _complete(self) -> int | None:
        """The status once the whole response is in the buffer (and removed from it), else None."""
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(buffer[:end]).lower()
        status = int(head[9:12])
        start = end + 4
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17:stop if stop >= 0 else len(head)])
            if len(buffer) < start + length:
                return None
            del buffer[:start + length]
            return status
        # Chunked: walk the chunk sizes to the zero-size chunk.
        position = start
        while True:
            line_end = buffer.find(b"\r\n", position)
            if line_end < 0:
                return None
            size = int(bytes(buffer[position:line_end]).split(b";", 1)[0], 16)
            if size == 0:
                if len(buffer) < line_end + 4:
                    return None
                del buffer[:line_end + 4]
                return status
            position = line_end + 2 + size + 2
            if position > len(buffer):
                return None

    async def exchange(self, request: bytes) -> int:
        if self.lost is not None:
            raise self.lost
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        assert self.transport is not None
        self.transport.write(request)
        return await self.waiter


async def closed_loop(host: str, port: int, request: bytes, total: int, concurrency: int
                      ) -> tuple[list[float], float]:
    """`total` requests over `concurrency` keep-alive connections, each sending its next request when
    the last answer is in. Returns the latencies (s) and the wall time of the whole run. Any status but
    200 raises."""
    loop = asyncio.get_running_loop()
    connections = [(await loop.create_connection(_Connection, host, port))[1]
                   for _ in range(concurrency)]
    latencies: list[float] = []
    remaining = total

    async def worker(connection: _Connection) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            status = await connection.exchange(request)
            latencies.append(time.perf_counter() - start)
            if status != 200:
                raise RuntimeError(f"unexpected status {status}")

    began = time.perf_counter()
    try:
        await asyncio.gather(*(worker(c) for c in connections))
    finally:
        for connection in connections:
            if connection.transport is not None:
                connection.transport.close()
    return latencies, time.perf_counter() - began
