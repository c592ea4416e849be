"""Serving a bench helper's aiohttp application on a loopback port the system chooses."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from proxy.serving import write_port_file


async def serve_forever(app: web.Application, port_file: Path, backlog: int = 2048) -> None:
    """Serve `app` on 127.0.0.1 (port 0), write the port to `port_file` once listening (the contract of
    tests.support.servers.Server), then serve until the process is stopped."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, backlog=backlog).start()
    write_port_file(str(port_file), runner.addresses[0][1])
    await asyncio.Event().wait()
