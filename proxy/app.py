"""build_app(config, telemetry) -> web.Application: wiring only, no behaviour of its own."""

from __future__ import annotations

from aiohttp import web

from .config import Config
from .forwarding import Forwarder
from .ingress import Ingress
from .system import add_system_routes
from .telemetry.setup import Telemetry
from .upstreams import UpstreamSet

__all__ = ["FORWARDER", "build_app"]

FORWARDER: web.AppKey[Forwarder] = web.AppKey("sop_forwarder", Forwarder)


def build_app(config: Config, telemetry: Telemetry) -> web.Application:
    """The proxy application: ingress middleware, the proxy's own routes, and the forwarder for the rest.

    aiohttp's own body limit is lifted (ingress enforces `server.max_body_bytes` itself, with a 413 that
    does not read the rest, and blob uploads stream through).
    """
    upstreams = UpstreamSet.from_config(config.upstreams)
    forwarder = Forwarder(upstreams, config.forwarding, telemetry)
    app = web.Application(middlewares=[Ingress(telemetry, config.server.max_body_bytes).middleware],
                          client_max_size=2**62, handler_args={"max_field_size": 65536})
    app[FORWARDER] = forwarder
    app.cleanup_ctx.append(forwarder.lifecycle)
    add_system_routes(app, telemetry, upstreams)
    app.router.add_route("*", "/{tail:.*}", forwarder.handle)
    return app
