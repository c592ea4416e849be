"""The floor `make bench` compares the proxy with: the least an aiohttp reverse proxy does (read the request,
send it to the upstream over a keep-alive pool, relay status, content type and body), on uvloop.

    python -m tests.bench.passthrough --port-file F --upstream http://127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.bench.loopback import serve_forever


def build(upstream: str) -> web.Application:
    sessions: list[aiohttp.ClientSession] = []

    async def pool(app: web.Application) -> AsyncIterator[None]:
        del app
        sessions.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                              auto_decompress=False))
        yield
        await sessions[0].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with sessions[0].request(request.method, upstream + request.path_qs, data=body,
                                       headers={"Content-Type": "application/json"}) as answer:
            if answer.headers.get("Transfer-Encoding") != "chunked":
                return web.Response(status=answer.status, body=await answer.read(),
                                     content_type=answer.content_type)
            response = web.StreamResponse(status=answer.status)
            response.content_type = answer.content_type
            await response.prepare(request)
            async for chunk in answer.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.cleanup_ctx.append(pool)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve_forever(build(args.upstream.rstrip("/")), args.port_file))


if __name__ == "__main__":
    main()
