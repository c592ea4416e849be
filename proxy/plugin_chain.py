"""The configured plugins as the chain runs them: one middleware per slot, over a list a reload replaces.

aiohttp fixes an application's middlewares when it starts; the plugins of a slot are instead read by the
slot's middleware when a request enters it, so a reload can swap them. A request keeps the plugins it
entered with. A reload keeps every plugin whose entry is unchanged (with its caches and counters) and
builds and starts the others before the swap; the plugins it drops are stopped once the requests inside
them have left (bounded by `RETIRE_TIMEOUT_S`), and their counters keep their totals (rebinding.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Sequence
from typing import Any

from aiohttp import web

from .chain import Handler
from .plugin import SLOTS, Plugin, PluginConfig, PluginServices, PluginStep
from .telemetry.setup import Telemetry

__all__ = ["RETIRE_TIMEOUT_S", "START_TIMEOUT_S", "STOP_TIMEOUT_S", "PluginChain"]

log = logging.getLogger("proxy.plugins")

RETIRE_TIMEOUT_S = 600.0
"""Longest wait for the requests inside a dropped plugin before it is stopped anyway."""
START_TIMEOUT_S = 30.0
"""Longest a plugin's `start()` may take: past it the reload is refused (the start-up fails), rather
than every later reload waiting behind it for good."""
STOP_TIMEOUT_S = 10.0
"""Longest a plugin's `stop()` may take: past it the plugin is left as it is (logged), rather than a
reload, or the process's exit after SIGTERM, waiting for it for good."""


class PluginChain:
    """The current plugin steps by slot; see the module docstring."""

    def __init__(self, telemetry: Telemetry, services: PluginServices, forward_route: str) -> None:
        self.telemetry = telemetry
        self.services = services
        self.forward_route = forward_route
        self.steps: tuple[PluginStep, ...] = ()
        self._by_slot: dict[str, tuple[PluginStep, ...]] = {slot: () for slot in SLOTS}
        self._pending: tuple[PluginStep, ...] = ()
        self._retiring: dict[PluginStep, asyncio.Task[None]] = {}

    def _build(self, cls: type[Plugin], config: PluginConfig) -> PluginStep:
        return PluginStep(cls(config, self.services), self.telemetry, forward_route=self.forward_route)

    def set_initial(self, entries: Sequence[tuple[type[Plugin], PluginConfig]]) -> None:
        """The plugins at start-up (started by `lifecycle`)."""
        self._bind(tuple(self._build(cls, config) for cls, config in entries if config.mode != "off"))

    def _bind(self, steps: tuple[PluginStep, ...]) -> None:
        self.steps = steps
        self._by_slot = {slot: tuple(s for s in steps if s.plugin.slot == slot) for slot in SLOTS}

    def middleware(self, slot: str) -> Handler:
        """The aiohttp middleware of `slot`: the slot's plugins as they are when a request enters."""

        @web.middleware
        def run(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
            # Not a coroutine itself: an empty slot hands back the next handler's coroutine, so the
            # request's await chain (walked at every resumption) has no frame for it.
            steps = self._by_slot[slot]
            if not steps:
                return handler(request)
            return self._run(steps, request, handler)

        return run  # type: ignore[return-value]

    @staticmethod
    async def _run(steps: Sequence[PluginStep], request: web.Request,
                   handler: Handler) -> web.StreamResponse:
        # Counted in every plugin of the slot from here on, not as each is reached: a reload must
        # not stop a later plugin of the slot while this request is still in an earlier one.
        for step in steps:
            step.enter()
        try:
            for step in reversed(steps):
                handler = functools.partial(step.middleware, handler=handler)
            return await handler(request)
        finally:
            for step in steps:
                step.leave()

    def find(self, name: str) -> Plugin | None:
        """The first configured plugin called `name`, if any."""
        return next((s.plugin for s in self.steps if s.plugin.name == name), None)

    async def replace(self, entries: Sequence[tuple[type[Plugin], PluginConfig]]) -> list[str]:
        """Build and start what `entries` adds or changes, then return what changed, one entry per
        plugin name: `name (added)`, `name (rebuilt)` or `name (removed)`; the caller makes it current
        with `commit` (in the same synchronous stretch as the rest of a reload).
        Raises when a new plugin cannot be built or started (the reload is refused; nothing is bound)."""
        reusable = list(self.steps)
        plan: list[PluginStep] = []
        started: list[PluginStep] = []
        try:
            for cls, config in entries:
                if config.mode == "off":
                    continue
                same = next((s for s in reusable
                             if type(s.plugin) is cls and s.plugin.config == config), None)
                if same is not None:
                    reusable.remove(same)
                    plan.append(same)
                    continue
                step = self._build(cls, config)
                started.append(step)  # stopped and retired if its start fails half way
                await self._start(step)
                plan.append(step)
        except BaseException:
            for step in started:
                await self._stop(step)
            raise
        self._pending = tuple(plan)
        built = {s.plugin.name for s in started}
        dropped = {s.plugin.name for s in reusable}  # not reused: replaced by a rebuilt one, or gone
        return sorted(f"{name} ({'rebuilt' if name in dropped else 'added'})" for name in built) + \
            sorted(f"{name} (removed)" for name in dropped - built)

    def commit(self) -> None:
        """Make the plugins `replace` prepared current; retire the ones it dropped."""
        plan = self._pending
        dropped = [s for s in self.steps if s not in plan]
        self._bind(plan)
        self._pending = ()
        for step in dropped:
            self._retiring[step] = asyncio.get_running_loop().create_task(
                self._retire(step), name=f"retire-{step.plugin.name}")

    async def abandon(self) -> None:
        """Stop what `replace` started when the reload is refused after all."""
        for step in self._pending:
            if step not in self.steps:
                await self._stop(step)
        self._pending = ()

    async def _retire(self, step: PluginStep) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RETIRE_TIMEOUT_S):
                await step.wait_idle()
        del self._retiring[step]
        await self._stop(step)

    @staticmethod
    async def _start(step: PluginStep) -> None:
        """`start()` the plugin, bounded by START_TIMEOUT_S (RuntimeError past it)."""
        bound = asyncio.timeout(START_TIMEOUT_S)
        try:
            async with bound:
                await step.plugin.start()
        except TimeoutError:
            if not bound.expired():
                raise  # the plugin's own failure
            raise RuntimeError(f"plugin {step.plugin.name} did not start within "
                               f"{START_TIMEOUT_S:g}s") from None

    async def _stop(self, step: PluginStep) -> None:
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await step.plugin.stop()
        except TimeoutError:
            log.warning("plugin %s did not stop within %gs; left as it is", step.plugin.name,
                        STOP_TIMEOUT_S)
        except Exception as exc:  # a plugin's stop must not fail a reload or a shutdown
            log.warning("plugin %s failed to stop (%s)", step.plugin.name, type(exc).__name__)
        self.telemetry.meter.retire(step)
        self.telemetry.meter.retire(step.plugin)

    async def lifecycle(self, app: web.Application) -> Any:
        """aiohttp cleanup context: start the plugins, and stop whatever is current or retiring."""
        del app
        for step in self.steps:
            await self._start(step)
        yield
        # The application is stopping: nothing waits for the retiring plugins' requests any more.
        retiring = dict(self._retiring)
        for task in retiring.values():
            task.cancel()
        await asyncio.gather(*retiring.values(), return_exceptions=True)
        for step in [*reversed(self.steps), *(s for s, t in retiring.items() if t.cancelled())]:
            await self._stop(step)
