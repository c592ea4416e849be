"""Running an aiohttp application the way a proxy must: handler cancellation on (a client that leaves
cancels its handler at once), a deep listen backlog, and a deadline for the request head.

aiohttp has no header-read timeout: a client trickling one byte at a time holds a connection until the
keep-alive timeout. `HeadDeadlineHandler` closes a connection whose request head is not complete within
`header_timeout_s` of its first byte (or of the connection opening).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

__all__ = ["HeadDeadlineHandler", "ProxyRunner", "run_until_signalled", "start_site"]

log = logging.getLogger("proxy.serving")


class HeadDeadlineHandler(RequestHandler):
    """A RequestHandler that closes connections whose request head arrives too slowly.

    The deadline is armed when the connection opens and whenever bytes arrive while no request is
    being handled; it is disarmed as soon as the parser produced a complete request message.
    """

    header_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self._loop.call_later(self.header_timeout_s, self._head_expired)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_expired(self) -> None:
        self._head_deadline = None
        log.info("closing a connection whose request head did not arrive within %.1fs",
                 self.header_timeout_s)
        self.force_close()
        if self.transport is not None:
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        idle = self._waiter is not None and not self._messages
        super().data_received(data)
        if self._request_count != before:
            self._disarm()
        elif idle:
            self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)


class _DeadlineServer(web.Server):
    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handler_class = type("BoundHeadDeadlineHandler", (HeadDeadlineHandler,),
                                   {"header_timeout_s": header_timeout_s})

    def __call__(self) -> RequestHandler:
        return self._handler_class(self, loop=self._loop, **self._kwargs)  # type: ignore[no-any-return]


class ProxyRunner(web.AppRunner):
    """An AppRunner whose connections get a request-head deadline."""

    def __init__(self, app: web.Application, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout_s = header_timeout_s

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()
        return _DeadlineServer(
            base.request_handler, request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation, loop=asyncio.get_running_loop(),
            header_timeout_s=self._header_timeout_s, **base._kwargs)


async def start_site(app: web.Application, host: str, port: int, *, backlog: int = 2048,
                     header_timeout_s: float = 10.0, keepalive_timeout_s: float = 75.0,
                     shutdown_timeout_s: float = 30.0) -> ProxyRunner:
    """Start serving `app` on host:port; the caller awaits `runner.cleanup()` to stop gracefully."""
    runner = ProxyRunner(app, header_timeout_s=header_timeout_s, handler_cancellation=True,
                         access_log=None, keepalive_timeout=keepalive_timeout_s,
                         shutdown_timeout=shutdown_timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=backlog, reuse_address=True)
    await site.start()
    return runner


async def run_until_signalled(runner: ProxyRunner) -> None:
    """Serve until SIGINT or SIGTERM, then stop accepting and let in-flight requests finish."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await runner.cleanup()
