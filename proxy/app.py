"""build_app(config, telemetry) -> web.Application: wiring only, no behaviour of its own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

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
from .ingress import INGRESS, Ingress, add_context_headers
from .placement import Placement
from .plugin import PluginServices, Subrequests, structure_plugins
from .plugin_chain import PluginChain
from .reload import Reloader, Runtime
from .serving import EDGE_ERROR_HEADERS, STOP, GracefulStop
from .state.base import StateBackend
from .state.memory import MemoryState
from .system import add_system_routes
from .telemetry.setup import Telemetry
from .tokens import TokenizerRegistry
from .upstreams import UpstreamSet

if TYPE_CHECKING:  # imported (with redis) only when the state is in Redis
    from .shared_admission import SharedAdmission

__all__ = ["RELOADER", "build_app", "build_state"]

RELOADER = web.AppKey("reloader", Reloader)
"""The application's Reloader (the CLI installs its SIGHUP handler)."""


def own_routes(app: web.Application) -> dict[str, tuple[str, ...]]:
    """The proxy's own paths (every plain route registered before the catch-all) and the methods each
    answers, sorted."""
    owned: dict[str, set[str]] = {}
    for route in app.router.routes():
        resource = route.resource
        if route.name != FORWARD_ROUTE and isinstance(resource, web.PlainResource):
            owned.setdefault(resource.canonical, set()).add(route.method)
    return {path: tuple(sorted(methods)) for path, methods in owned.items()}


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


async def _verify_state(state: StateBackend) -> None:
    """Before a scrape: a Redis-backed state that has not heard from Redis for `retry_interval_s`
    asks it (`FailoverState.verify`, bounded), so `sop_state_degraded` and the SOPStateDegraded alert
    see an outage also in an idle process, in either failure mode."""
    from .state.failover import FailoverState

    if isinstance(state, FailoverState):
        await state.verify()


async def _refusing_all(state: StateBackend, shared: SharedAdmission | None) -> str | None:
    """With `failure_mode: closed` and Redis out, every request gets 503 state_unavailable: the
    process is not ready (an outer load balancer sends the traffic to a proxy that can serve). Asked
    of Redis when no call has answered lately (`FailoverState.verify`): an idle process would
    otherwise stay ready through a whole outage, and its first requests be refused. Also while Redis
    answers again but the slots this process holds are not back in its books yet (the next tick adds
    them): until then its shared admission refuses the same way (`SharedSlots.degraded`)."""
    from .state.failover import FailoverState

    if not isinstance(state, FailoverState) or state.failure_mode != "closed":
        return None
    await state.verify()
    if state.degraded:
        return "shared state unavailable (state.failure_mode: closed)"
    if shared is not None and shared.slots.degraded:
        return "shared state recovering: this process's slots are not back in Redis yet " \
               "(state.failure_mode: closed)"
    return None


def _shared_admission(config: Config, state: StateBackend) -> SharedAdmission | None:
    """With Redis state, the replicas' slots and the fair queue's counters are shared by every proxy
    process that points at it (proxy/shared_admission.py)."""
    from .state.failover import FailoverState

    if not isinstance(state, FailoverState):
        return None
    from .shared_admission import SharedAdmission
    from .state.leases import SharedSlots

    slots = SharedSlots(state, config.state.url, config.state.key_prefix, config.state.lease_ttl_s,
                        connect_timeout_s=config.state.socket_timeout_s)
    return SharedAdmission(slots)


def build_app(config: Config, telemetry: Telemetry, *, config_path: str | None = None,
              load: Callable[[], Config] | None = None,
              internal_secret: str | None = None) -> web.Application:
    """The proxy application: ingress, the chain, the proxy's own routes, and the forwarder.

    aiohttp's own body limit is lifted (ingress enforces `server.max_body_bytes` itself, with a 413 that
    does not read the rest, and blob uploads stream through). `config_path` and `load` (which reads that
    file again with the same overrides) make it reloadable: `app[RELOADER]`, proxy/reload.py.
    `internal_secret`: the plugin sub-request secret shared by the workers of `serve --workers N`
    (default: a random one of this process).
    """
    upstreams = UpstreamSet.from_config(config.upstreams, config.models)
    stop = GracefulStop()
    fleet = FleetClient(upstreams, config.forwarding)
    forwarder = Forwarder(upstreams, config.forwarding, telemetry, fleet,
                          body_timeout_s=config.server.body_timeout_s, stop=stop)
    subrequests = Subrequests(internal_secret)
    directory = TenantDirectory(config.tenants, config.anonymous, config.admin.keys,
                                metrics_need_admin=config.telemetry.metrics_need_admin,
                                internal=subrequests.parse)
    state = build_state(config, telemetry)

    async def fetch_show(model: str) -> dict[str, Any] | None:
        return await fleet.fetch_json("/api/show", {"model": model, "verbose": True})

    tokenizers = TokenizerRegistry({name: m.tokenizer for name, m in config.models.items()
                                    if m.tokenizer}, fetch_show, tracks=upstreams.tracks)
    tokenizers.load_configured()
    fleet_health = FleetHealth(config.chain.health, upstreams, config.models, telemetry, fleet)
    health = HealthStep(config.chain.health, upstreams, fleet_health, telemetry)
    fanout = FanOut(upstreams, fleet, config.forwarding.idle_timeout_s, on_managed=fleet_health.refresh)
    placement = Placement(config.chain.balancer, upstreams)  # shared: backpressure binds, balancer reports
    balancer = BalancerStep(config.chain.balancer, upstreams, fleet_health, fanout, telemetry, placement)
    limits = LimitsStep(config.chain.limits, config.models, tokenizers, telemetry, upstreams)
    shared = _shared_admission(config, state)
    steps: dict[str, Step] = {
        "limits": limits,
        "quotas": QuotasStep(config.chain.quotas, state, telemetry),
        "backpressure": BackpressureStep(config.chain.backpressure, upstreams, telemetry,
                                         placement=placement, shared=shared),
        "health": health,
        "balancer": balancer,
    }
    ingress = Ingress(telemetry, config.server.max_body_bytes, directory,
                      max_header_bytes=config.server.max_header_bytes,
                      body_timeout_s=config.server.body_timeout_s, stop=stop,
                      default_deadline_s=config.chain.limits.deadline_s,
                      cors_origins=config.server.cors_origins)
    # The parser's per-line limits are set by serving.start_site from server.max_header_bytes.
    services = PluginServices(telemetry, subrequests, knows_model=upstreams.knows,
                              tokenizer_for=tokenizers.for_model, model_digest=upstreams.digest)
    plugins = PluginChain(telemetry, services, FORWARD_ROUTE)
    plugins.set_initial(structure_plugins(config.plugins))

    def bind_plugins(chain: PluginChain) -> None:
        # `prompt_policy: summarize` uses summarize_history's summarizer (None: it truncates).
        summarizer = chain.find("summarize_history")
        limits.summarizer = getattr(summarizer, "fit", None)

    bind_plugins(plugins)
    app = web.Application(middlewares=[ingress.middleware, *build_chain(steps, plugins)],
                          client_max_size=2**62)
    app[STOP] = stop
    app[INGRESS] = ingress
    app[EDGE_ERROR_HEADERS] = ingress.edge_error_headers
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
    if shared is not None:
        slots = shared.slots

        async def slots_lifecycle(app: web.Application) -> AsyncIterator[None]:
            del app
            await slots.start()
            yield
            await slots.close()

        app.cleanup_ctx.append(slots_lifecycle)

    subrequests.bind_session(lambda: fleet.control_session)
    app.cleanup_ctx.append(plugins.lifecycle)
    runtime = Runtime(directory, upstreams, fleet_health, steps, plugins, tokenizers, bind_plugins,
                      ingress)
    reloader = Reloader(config, runtime, telemetry, path=config_path,
                        load=load if load is not None else (lambda: config))
    app[RELOADER] = reloader
    app.cleanup_ctx.append(reloader.lifecycle)
    add_system_routes(app, telemetry, upstreams, directory, steps, reloader,
                      refusing_all=lambda: _refusing_all(state, shared),
                      before_scrape=lambda: _verify_state(state))
    telemetry.events.add_route(app, upstreams, steps, directory)  # GET /system/events
    reloader.listeners.append(
        lambda r: telemetry.events.reload(r.version, r.outcome != "refused", changed=r.changed,
                                          error=r.error))
    # Open streams check their key again after an applied reload (a revoked one ends with `shutdown`,
    # before the reload event published just above).
    reloader.listeners.append(
        lambda r: telemetry.events.access_changed() if r.outcome == "applied" else None)
    # Every path, newlines included (`.` stops at one, and a %0A-encoded path is decoded before it is
    # matched): Ollama answers those itself, not aiohttp's text/plain 404.
    app.router.add_route("*", r"/{tail:[\s\S]*}", forwarder.handle, name=FORWARD_ROUTE,
                         expect_handler=ingress.expect_handler)
    ingress.own_routes = own_routes(app)
    return app
