"""A TCP relay on loopback that can hold one connection's replies: a request gets to the server and runs
there, but its answer is late, as for a client process too busy to read it in time (the case a timeout
cannot tell from a lost request). The other connections pass through untouched."""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["StallingRelay"]


class StallingRelay:
    """`await StallingRelay.start(port)`: relays 127.0.0.1:`self.port` to 127.0.0.1:`port`.

    `hold_next()`: the next connection to get a reply from the server keeps that reply and every later
    one (`held` is set once it has one) until `release()` or `close()`. `hold_next(requests=True)`:
    the next connection to send a request keeps it from the server instead (the server runs it only
    once released)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.held = asyncio.Event()
        self._arm = False
        self._arm_requests = False
        self._holding: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    @classmethod
    async def start(cls, target_port: int) -> StallingRelay:
        relay = cls(target_port)
        relay._server = await asyncio.start_server(relay._accept, "127.0.0.1", 0)
        relay.port = relay._server.sockets[0].getsockname()[1]
        return relay

    def hold_next(self, requests: bool = False) -> None:
        if requests:
            self._arm_requests = True
        else:
            self._arm = True

    def release(self) -> None:
        if self._holding is not None:
            self._holding.set()

    async def close(self) -> None:
        self.release()
        if self._server is not None:
            self._server.close()
        for pipe in list(self._pipes):
            pipe.cancel()
        for pipe in list(self._pipes):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await pipe

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        for pipe in (self._pipe(reader, up_writer, False), self._pipe(up_reader, writer, True)):
            task = asyncio.get_running_loop().create_task(pipe)
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    replies: bool) -> None:
        gate: asyncio.Event | None = None
        try:
            while data := await reader.read(65536):
                armed = self._arm if replies else self._arm_requests
                if gate is None and armed:
                    # This connection's direction is the one held, from these bytes on.
                    if replies:
                        self._arm = False
                    else:
                        self._arm_requests = False
                    gate = self._holding = asyncio.Event()
                    self.held.set()
                if gate is not None:
                    await gate.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
