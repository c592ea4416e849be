"""build_app(config, telemetry) -> web.Application: wiring only, no behaviour of its own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from middlewares.backpressure import BackpressureStep
from middlewares.balancer import BalancerStep
from middlewares.health import HealthStep
from middlewares.limits import LimitsStep
from middlewares.quotas import QuotasStep

from .access import TenantDirectory
from .chain import FORWARD_ROUTE, Step, build_chain
from .config import Config
from .fanout import FanOut
from .fleet.client import FleetClient
from .fleet.health import FleetHealth
from .forwarding import Forwarder
from .ingress import Ingress, add_context_headers
from .placement import Placement
from .plugin import PluginServices, PluginStep, Subrequests, structure_plugins
from .serving import STOP, GracefulStop
from .state.base import StateBackend
from .state.memory import MemoryState
from .system import add_system_routes
from .telemetry.setup import Telemetry
from .tokens import TokenizerRegistry
from .upstreams import UpstreamSet

__all__ = ["build_app", "build_state"]


def build_state(config: Config, telemetry: Telemetry | None = None) -> StateBackend:
    """The configured state backend: memory, or Redis shared by proxy replicas behind a circuit breaker
    that applies `state.failure_mode` when Redis cannot answer (see state/failover.py)."""
    if config.state.backend == "redis":
        from .state.failover import FailoverState
        from .state.redis import RedisState

        state = config.state
        remote = RedisState(state.url, state.key_prefix, socket_timeout_s=state.socket_timeout_s,
                            max_connections=state.max_connections)
        return FailoverState(remote, failure_mode=state.failure_mode, timeout_s=state.socket_timeout_s,
                             retry_interval_s=state.retry_interval_s,
                             meter=telemetry.meter if telemetry is not None else None,
                             metric_prefix=telemetry.config.metric_prefix if telemetry is not None
                             else "sop")
    return MemoryState()


def build_app(config: Config, telemetry: Telemetry) -> web.Application:
    """The proxy application: ingress, the chain, the proxy's own routes, and the forwarder.

    aiohttp's own body limit is lifted (ingress enforces `server.max_body_bytes` itself, with a 413 that
    does not read the rest, and blob uploads stream through).
    """
    upstreams = UpstreamSet.from_config(config.upstreams, config.models)
    stop = GracefulStop()
    fleet = FleetClient(upstreams, config.forwarding)
    forwarder = Forwarder(upstreams, config.forwarding, telemetry, fleet,
                          body_timeout_s=config.server.body_timeout_s, stop=stop)
    subrequests = Subrequests()
    directory = TenantDirectory(config.tenants, config.anonymous, config.admin.keys,
                                metrics_need_admin=config.telemetry.metrics_need_admin,
                                internal=subrequests.parse)
    state = build_state(config, telemetry)

    async def fetch_show(model: str) -> dict[str, Any] | None:
        return await fleet.fetch_json("/api/show", {"model": model, "verbose": True})

    tokenizers = TokenizerRegistry({name: m.tokenizer for name, m in config.models.items()
                                    if m.tokenizer}, fetch_show)
    tokenizers.load_configured()
    fleet_health = FleetHealth(config.chain.health, upstreams, config.models, telemetry, fleet)
    health = HealthStep(config.chain.health, upstreams, fleet_health, telemetry)
    fanout = FanOut(upstreams, fleet, config.forwarding.idle_timeout_s, on_managed=fleet_health.refresh)
    placement = Placement(config.chain.balancer, upstreams)  # shared: backpressure binds, balancer reports
    balancer = BalancerStep(config.chain.balancer, upstreams, fleet_health, fanout, telemetry, placement)
    steps: dict[str, Step] = {
        "limits": LimitsStep(config.chain.limits, config.models, tokenizers, telemetry, upstreams),
        "quotas": QuotasStep(config.chain.quotas, state, telemetry),
        "backpressure": BackpressureStep(config.chain.backpressure, upstreams, telemetry,
                                         placement=placement),
        "health": health,
        "balancer": balancer,
    }
    ingress = Ingress(telemetry, config.server.max_body_bytes, directory,
                      max_header_bytes=config.server.max_header_bytes,
                      body_timeout_s=config.server.body_timeout_s, stop=stop,
                      default_deadline_s=config.chain.limits.deadline_s)
    # The parser's per-line limits are set by serving.start_site from server.max_header_bytes.
    services = PluginServices(telemetry, subrequests, knows_model=upstreams.knows,
                              tokenizer_for=tokenizers.for_model, model_digest=upstreams.digest)
    plugin_steps = [PluginStep(cls(plugin_config, services), telemetry, forward_route=FORWARD_ROUTE)
                    for cls, plugin_config in structure_plugins(config.plugins)
                    if plugin_config.mode != "off"]
    for plugin_step in plugin_steps:  # `prompt_policy: summarize` uses summarize_history's summarizer
        if plugin_step.plugin.name == "summarize_history":
            steps["limits"].summarizer = plugin_step.plugin.fit  # type: ignore[attr-defined]
    app = web.Application(middlewares=[ingress.middleware, *build_chain(steps, plugin_steps)],
                          client_max_size=2**62)
    app[STOP] = stop
    app.on_response_prepare.append(add_context_headers)
    # Order matters: the pools open before the probes start and close after they stopped.
    app.cleanup_ctx.append(fleet.lifecycle)
    app.cleanup_ctx.append(fleet_health.lifecycle)

    async def state_lifecycle(app: web.Application) -> AsyncIterator[None]:
        del app
        await state.start()  # Redis: never fails; unreachable means starting degraded (failover.py)
        yield
        await state.close()

    app.cleanup_ctx.append(state_lifecycle)

    async def plugins_lifecycle(app: web.Application) -> AsyncIterator[None]:
        del app
        subrequests.bind_session(lambda: fleet.control_session)
        for step in plugin_steps:
            await step.plugin.start()
        yield
        for step in reversed(plugin_steps):
            await step.plugin.stop()

    if plugin_steps:
        app.cleanup_ctx.append(plugins_lifecycle)
    add_system_routes(app, telemetry, upstreams, directory, steps, config.models)
    telemetry.events.add_route(app, upstreams, steps)  # GET /system/events
    app.router.add_route("*", "/{tail:.*}", forwarder.handle, name=FORWARD_ROUTE,
                         expect_handler=ingress.expect_handler)
    return app
