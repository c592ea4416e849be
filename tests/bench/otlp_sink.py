"""An OTLP/HTTP sink for `make bench`: a separate process that takes what the proxy exports (`/v1/traces`,
`/v1/metrics`), counts the spans (decoded, so a broken export shows), and answers `GET /stats`.

    python -m tests.bench.otlp_sink --port-file F
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.bench.loopback import serve_forever

_EMPTY = ExportTraceServiceResponse().SerializeToString()


def build() -> web.Application:
    stats = {"spans": 0, "exports": 0, "bytes": 0}

    async def traces(request: web.Request) -> web.Response:
        body = await request.read()
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        stats["exports"] += 1
        stats["bytes"] += len(body)
        stats["spans"] += sum(len(scope.spans) for resource in message.resource_spans
                              for scope in resource.scope_spans)
        return web.Response(body=_EMPTY, content_type="application/x-protobuf")

    async def metrics(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def report(request: web.Request) -> web.Response:
        del request
        return web.json_response(stats)

    app = web.Application(client_max_size=256 << 20)
    app.router.add_post("/v1/traces", traces)
    app.router.add_post("/v1/metrics", metrics)
    app.router.add_get("/stats", report)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port-file", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(serve_forever(build(), args.port_file))


if __name__ == "__main__":
    main()
