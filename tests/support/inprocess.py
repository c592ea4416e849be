"""The proxy and an emulated replica inside the test's own event loop, for step logic that gains nothing
from a subprocess (access decisions, refusals made before the fleet is asked): no process start, no
port to wait for, the same application `serve` builds. End-to-end behaviour (signals, the edge handler,
the real CLI, several processes) stays in tests that use `tests.support.servers`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import build_app
from proxy.config import load_config
from proxy.emulator.app import create_emulator_app
from proxy.emulator.engine import EngineSettings
from proxy.telemetry.setup import build_telemetry
from tests.support.servers import FIXED_CLOCK_NS

__all__ = ["in_process_proxy"]


async def in_process_proxy(aiohttp_client: Any, aiohttp_server: Any, tmp: Path,
                           config: dict[str, Any] | None = None) -> tuple[TestClient, TestServer]:
    """(a client of the proxy, the emulator behind it), both served on loopback by this event loop.

    `config` is the YAML configuration as a dict (its upstreams are set to the emulator); it goes through
    `load_config`, file and all, with an empty environment, exactly as `serve --config` reads it."""
    emulator: TestServer = await aiohttp_server(create_emulator_app(
        EngineSettings(seed=7, fixed_clock_ns=FIXED_CLOCK_NS)))
    data = dict(config or {})
    data["upstreams"] = [{"url": f"http://127.0.0.1:{emulator.port}"}]
    path = tmp / "in-process.yaml"
    path.write_text(yaml.safe_dump(data))
    loaded = load_config(path, environ={})
    client: TestClient = await aiohttp_client(build_app(loaded, build_telemetry(loaded.telemetry)))
    return client, emulator
