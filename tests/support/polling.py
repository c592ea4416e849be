"""Polling instead of sleeping: a test waits for the state it needs (a request queued in the proxy, a
request running in the emulator), observed through `/system/queue` or `/_emulator/stats`, rather than for
a guessed time. That is faster when the machine is idle and still right when it is loaded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

__all__ = ["until", "wait_for"]

_STEP_S = 0.02


def wait_for(predicate: Callable[[], Any], timeout_s: float = 15.0, what: str = "condition") -> Any:
    """Call `predicate` until it returns a true value, and return that value; fails after `timeout_s`
    naming `what` (generous by default: CI machines are loaded, and success returns at once)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {value!r})")
        time.sleep(_STEP_S)


async def until(predicate: Callable[[], Any], timeout_s: float = 15.0, what: str = "condition") -> Any:
    """`wait_for` for a coroutine: `predicate` (which may block, e.g. an httpx call) runs in a thread,
    so the event loop keeps driving the requests whose effect is awaited."""
    return await asyncio.to_thread(wait_for, predicate, timeout_s, what)
