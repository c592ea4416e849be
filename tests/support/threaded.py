"""Run a small aiohttp application on loopback in a background thread (for test-side peers such as an
echo upstream or an OTLP receiver), so synchronous tests and clients can talk to it."""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web

from tests.support.servers import free_port

__all__ = ["ThreadedApp"]


class ThreadedApp:
    """`with ThreadedApp(app) as server:` serves `app` at `server.url` until the block ends."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

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
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(main())
