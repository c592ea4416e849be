"""The proxy's own routes: `/metrics` (Prometheus text), `/healthz` (the process is up) and `/readyz`
(it can take traffic). Admin `/system/*` routes join here as the chain steps land."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .telemetry.setup import Telemetry
from .upstreams import UpstreamSet

__all__ = ["add_system_routes"]


def add_system_routes(app: web.Application, telemetry: Telemetry, upstreams: UpstreamSet) -> None:
    """Register the proxy's own routes on `app` (before the catch-all forwarder)."""

    async def metrics(request: web.Request) -> web.Response:
        del request
        return web.Response(body=generate_latest(telemetry.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        del request
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        del request
        return web.json_response({"status": "ready",
                                  "upstreams": [u.name for u in upstreams]})

    app.router.add_get("/metrics", metrics, allow_head=True)
    app.router.add_get("/healthz", healthz, allow_head=True)
    app.router.add_get("/readyz", readyz, allow_head=True)
