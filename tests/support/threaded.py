"""Run a small aiohttp application on loopback in a background thread (for test-side peers such as an
echo upstream or an OTLP receiver), so synchronous tests and clients can talk to it."""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web

__all__ = ["ThreadedApp"]


class ThreadedApp:
    """`with ThreadedApp(app) as server:` serves `app` at `server.url` until the block ends."""

    def __init__(self, app: web.Application, port: int = 0) -> None:
        """`port` 0 (the default) binds a port the system chooses, known once the block is entered;
        a fixed `port` is for a test that must know it before the server exists."""
        self.app = app
        self.port = port
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadedApp:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("threaded app did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        async def main() -> None:
            runner = web.AppRunner(self.app, handler_cancellation=True)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            address = runner.addresses[0]
            self.port = int(address[1])  # set before `_ready`: the waiting thread reads it after
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(main())
        finally:
            self._loop.close()  # not left to the collector, which may close it at interpreter exit
