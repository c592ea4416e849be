"""The proxy's own routes: `/metrics` (Prometheus text), `/healthz` (the process is up), `/readyz` (it can
take traffic) and the admin routes under `/system/` (an admin key is required once any key or tenant is
configured; see proxy/access.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .access import TenantDirectory
from .chain import Step
from .context import CONTEXT
from .profiles import fleet_profile
from .reload import Reloader
from .telemetry.setup import Telemetry
from .telemetry.workers import WORKER_METRICS
from .upstreams import UpstreamSet

__all__ = ["add_system_routes"]


def add_system_routes(app: web.Application, telemetry: Telemetry, upstreams: UpstreamSet,
                      directory: TenantDirectory, steps: dict[str, Step], reloader: Reloader,
                      refusing_all: Callable[[], Awaitable[str | None]] | None = None,
                      before_scrape: Callable[[], Awaitable[None]] | None = None) -> None:
    """Register the proxy's own routes on `app` (before the catch-all forwarder). `refusing_all` says
    why every request is being refused right now (None: it is not), for /readyz; `before_scrape` makes
    what /metrics reports current first (the shared state's `degraded`, which an idle process would
    otherwise not learn)."""

    async def quotas(request: web.Request) -> web.Response:
        """Per-tenant usage and remaining quota, across replicas when the state is shared."""
        del request
        step = steps.get("quotas")
        snapshot = await step.snapshot([*directory.tenants, directory.anonymous]) if step is not None \
            and hasattr(step, "snapshot") else {}
        return web.json_response({"tenants": snapshot})

    async def metrics(request: web.Request) -> web.Response:
        """This process's metrics; a worker of `serve --workers` answers with every worker's."""
        if before_scrape is not None:
            await before_scrape()
        workers = request.app.get(WORKER_METRICS)
        body = await workers.scrape() if workers is not None else generate_latest(telemetry.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        del request
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        """Ready when at least one replica takes traffic (an outer load balancer stops sending else), or
        health enforces only for a canary of tenants (the rest are served as in shadow mode)."""
        del request
        statuses = {u.name: u.status for u in upstreams}
        # First: while every request is refused (closed mode without Redis), no canary makes it ready.
        why = await refusing_all() if refusing_all is not None else None
        if why is not None:
            return web.json_response({"status": why, "upstreams": statuses}, status=503)
        if not upstreams.eligible(None):
            health = steps.get("health")
            if health is None or health.canary is None:
                return web.json_response({"status": "no healthy upstream", "upstreams": statuses},
                                         status=503)
            # A health canary: the tenants outside it are served as in shadow mode (which is ready
            # too), and pulling the whole proxy from its load balancer would fail them all.
            return web.json_response({"status": "ready (no healthy upstream for the health canary's "
                                                "tenants)", "upstreams": statuses})
        return web.json_response({"status": "ready", "upstreams": statuses})

    async def profile(request: web.Request) -> web.Response:
        """Which replica holds which model now, measured load per model, and a recommended profile."""
        del request
        health = steps.get("health")
        balancer = steps.get("balancer")
        snapshot = health.snapshot() if health is not None and hasattr(health, "snapshot") else {}
        stats = getattr(balancer, "stats", {})
        profile = fleet_profile(upstreams, snapshot, reloader.config.models, stats)
        backpressure = steps.get("backpressure")
        if backpressure is not None and hasattr(backpressure, "slots"):
            profile["slots"] = backpressure.slots()
        return web.json_response(profile)

    app.router.add_get("/metrics", metrics, allow_head=True)
    app.router.add_get("/healthz", healthz, allow_head=True)
    app.router.add_get("/readyz", readyz, allow_head=True)
    async def queue(request: web.Request) -> web.Response:
        """Queue depth, in-flight, limits, waits, drain rate and rejections per model; a tenant's own
        key sees only its own queue entries."""
        step = steps.get("backpressure")
        identity = request[CONTEXT].identity
        own = None if identity is None or identity.admin or directory.open_mode \
            else identity.tenant.name
        snapshot = step.snapshot(own) if step is not None and hasattr(step, "snapshot") else {}
        body: dict[str, Any] = {"models": snapshot}
        shared = getattr(step, "shared", None)
        if shared is not None and own is None:  # slots shared through Redis (several processes)
            body["shared"] = shared.slots.snapshot()
        return web.json_response(body)

    async def config(request: web.Request) -> web.Response:
        """The configuration being served (secrets redacted), its version, the last reload (with the
        error of a refused one), settings that wait for a restart, and replicas still draining."""
        del request
        return web.Response(body=orjson.dumps(reloader.snapshot(), option=orjson.OPT_INDENT_2),
                            content_type="application/json")

    app.router.add_get("/system/config", config)
    app.router.add_get("/system/quotas", quotas)
    app.router.add_get("/system/queue", queue)
    app.router.add_get("/system/profile", profile)
