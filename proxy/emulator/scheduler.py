"""Ollama's scheduler as the emulator models it (reference §10, server/sched.go):

1. A request for a model that is loaded with compatible settings takes the runner at once (refcount + 1),
   bypassing the pending queue. It then waits for one of the runner's `num_parallel` slots in FIFO order,
   without bound: Ollama never answers 503 for a loaded model (ollama#7758).
2. Any other request (model not loaded, or loaded with another `num_ctx`) is put on the pending queue of
   capacity `max_queue`; when it is full the request gets 503 "server busy, please try again.  maximum
   pending requests exceeded".
3. One loader drains the pending queue serially: it skips requests whose client left, waits for a runner
   that must reload to become idle, evicts the least recently used idle runner while `max_loaded_models`
   are resident, then loads (taking the profile's `load_s`). If the client that triggered a load leaves
   during it, the load is aborted.
4. When a runner's last reference goes, its keep_alive timer starts; `keep_alive: 0` unloads at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import attrs

from .catalog import ModelEntry
from .durations import FOREVER_NS
from .profile import ProfileSet

__all__ = ["SERVER_BUSY", "Runner", "Scheduler", "ServerBusy"]

SERVER_BUSY = "server busy, please try again.  maximum pending requests exceeded"


class ServerBusy(Exception):
    """The pending queue is full (HTTP 503 with SERVER_BUSY)."""


@attrs.define(eq=False)
class Runner:
    """A loaded model: its slots, references and keep-alive state."""

    entry: ModelEntry
    num_ctx: int
    num_parallel: int
    keep_alive_ns: int
    refcount: int = 0
    active: int = 0
    """Requests holding a slot (prefilling or decoding)."""
    slot_waiters: int = 0
    expires_ns: int = FOREVER_NS
    last_used: float = attrs.field(factory=time.monotonic)
    _slots: asyncio.Semaphore = attrs.field(init=False)
    _expiry: asyncio.TimerHandle | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.num_parallel)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the runner's parallel slots (FIFO wait, unbounded)."""
        self.slot_waiters += 1
        try:
            await self._slots.acquire()
        finally:
            self.slot_waiters -= 1
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._slots.release()


@attrs.define(eq=False)
class _Pending:
    entry: ModelEntry
    num_ctx: int
    keep_alive_ns: int | None
    future: asyncio.Future[Runner]


class Scheduler:
    """Model residency and admission for one emulated daemon."""

    def __init__(self, profiles: ProfileSet, *, num_parallel: int = 1, max_queue: int = 512,
                 max_loaded_models: int = 3, default_keep_alive_ns: int = 5 * 60 * 10**9,
                 wall_clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.profiles = profiles
        self.num_parallel = num_parallel
        self.max_queue = max_queue
        self.max_loaded_models = max(1, max_loaded_models)
        self.default_keep_alive_ns = default_keep_alive_ns
        self.runners: dict[str, Runner] = {}
        self.loading: str | None = None
        self.loads = 0
        self._wall_clock_ns = wall_clock_ns
        self._pending: asyncio.Queue[_Pending] | None = None
        self._loader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    # admission ---------------------------------------------------------------------------------------
    async def acquire(self, entry: ModelEntry, num_ctx: int, keep_alive_ns: int | None) -> Runner:
        """A reference to a runner for `entry` with `num_ctx`, loading it if needed.

        Raises ServerBusy when the pending queue is full. Cancellation while pending drops the request.
        """
        runner = self.runners.get(entry.name)
        if runner is not None and runner.num_ctx == num_ctx:
            self._take(runner, keep_alive_ns)
            return runner
        if self._pending is None:
            self._pending = asyncio.Queue(maxsize=self.max_queue)
        if self._loader is None or self._loader.done():
            self._loader = asyncio.get_running_loop().create_task(self._load_loop())
        future: asyncio.Future[Runner] = asyncio.get_running_loop().create_future()
        try:
            self._pending.put_nowait(_Pending(entry, num_ctx, keep_alive_ns, future))
        except asyncio.QueueFull:
            raise ServerBusy(SERVER_BUSY) from None
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(future.result())  # handed over just as the client left
            future.cancel()
            raise

    def _take(self, runner: Runner, keep_alive_ns: int | None) -> None:
        runner.refcount += 1
        if keep_alive_ns is not None:
            runner.keep_alive_ns = keep_alive_ns
        runner.expires_ns = FOREVER_NS
        if runner._expiry is not None:
            runner._expiry.cancel()
            runner._expiry = None

    def release(self, runner: Runner) -> None:
        """Drop a reference; start the keep_alive timer when it was the last."""
        runner.refcount = max(0, runner.refcount - 1)
        runner.last_used = time.monotonic()
        if runner.refcount == 0:
            if runner.keep_alive_ns == 0:
                self._unload(runner)
            elif runner.keep_alive_ns < FOREVER_NS:
                delay_s = runner.keep_alive_ns / 1e9
                runner.expires_ns = self._wall_clock_ns() + runner.keep_alive_ns
                runner._expiry = asyncio.get_running_loop().call_later(
                    delay_s, self._expire, runner)
        self._changed.set()

    def _expire(self, runner: Runner) -> None:
        runner._expiry = None
        if runner.refcount == 0:
            self._unload(runner)

    def _unload(self, runner: Runner) -> None:
        if self.runners.get(runner.entry.name) is runner:
            del self.runners[runner.entry.name]
        if runner._expiry is not None:
            runner._expiry.cancel()
            runner._expiry = None
        self._changed.set()

    def unload_when_idle(self, entry: ModelEntry) -> None:
        """`keep_alive: 0` with no work: unload now if idle, else when the last reference goes."""
        runner = self.runners.get(entry.name)
        if runner is not None:
            runner.keep_alive_ns = 0
            if runner.refcount == 0:
                self._unload(runner)

    def forget(self, name: str) -> None:
        """The model was deleted: drop its runner if it is idle."""
        runner = self.runners.get(name)
        if runner is not None and runner.refcount == 0:
            self._unload(runner)

    # the loader --------------------------------------------------------------------------------------
    async def _wait_changed(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    async def _load_loop(self) -> None:
        assert self._pending is not None
        while True:
            pending = await self._pending.get()
            if pending.future.done():
                continue  # the client left while queued
            name = pending.entry.name
            current = self.runners.get(name)
            if current is not None and current.num_ctx == pending.num_ctx:
                self._hand_over(pending, current)
                continue
            if current is not None:  # another num_ctx: reload once it is idle
                while current.refcount > 0 and not pending.future.done():
                    await self._wait_changed()
                self._unload(current)
            while len(self.runners) >= self.max_loaded_models and not pending.future.done():
                idle = [r for r in self.runners.values() if r.refcount == 0]
                if idle:
                    self._unload(min(idle, key=lambda r: r.last_used))
                else:
                    await self._wait_changed()
            if pending.future.done():
                continue
            profile = self.profiles.for_model(name)
            self.loading = name
            try:
                waiter = asyncio.ensure_future(asyncio.shield(pending.future))
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({waiter}, timeout=profile.load_s)
                waiter.cancel()
            finally:
                self.loading = None
            if pending.future.done():
                continue  # the client that triggered the load left: the load is aborted
            self.loads += 1
            parallel = 1 if pending.entry.is_embedding else self.num_parallel
            runner = Runner(pending.entry, pending.num_ctx, parallel,
                            pending.keep_alive_ns if pending.keep_alive_ns is not None
                            else self.default_keep_alive_ns)
            self.runners[name] = runner
            self._hand_over(pending, runner)

    def _hand_over(self, pending: _Pending, runner: Runner) -> None:
        self._take(runner, pending.keep_alive_ns)
        pending.future.set_result(runner)
