"""The fleet client against real peers on loopback (in-process aiohttp servers and raw sockets): the Host
header a replica accepts, the mapping of connection failures to the proxy's errors, probes and warm-up
calls; and the import boundaries that keep the steps from knowing each other."""

from __future__ import annotations

import ast
import asyncio
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from proxy.config import ForwardingConfig
from proxy.errors import UpstreamConnectFailure, UpstreamResetBeforeResponseStarted, UpstreamResponseTimeout
from proxy.fleet.client import FleetClient, ProbeFailed
from proxy.upstreams import Upstream, UpstreamSet

ROOT = Path(__file__).resolve().parent.parent


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, int(runner.addresses[0][1])  # bound to port 0: the kernel's choice, no race


@pytest.fixture
async def client() -> AsyncIterator[tuple[FleetClient, UpstreamSet]]:
    upstreams = UpstreamSet([Upstream("placeholder", URL("http://127.0.0.1:9"))])
    fleet = FleetClient(upstreams, ForwardingConfig(connect_timeout_s=2.0))
    lifecycle = fleet.lifecycle(web.Application())
    await lifecycle.__anext__()
    assert fleet.running
    yield fleet, upstreams
    with pytest.raises(StopAsyncIteration):
        await lifecycle.__anext__()
    assert not fleet.running


async def test_every_call_sends_the_replicas_own_host(client: tuple[FleetClient, UpstreamSet]) -> None:
    fleet, _ = client
    seen: list[tuple[str, str]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append((request.path, request.headers.get("Host", "")))
        if request.path == "/api/missing":
            return web.json_response({"error": "no"}, status=404)
        return web.json_response({"version": "0.12.0"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner, port = await _serve(app)
    try:
        replica = Upstream("r", URL(f"http://127.0.0.1:{port}"))
        assert await fleet.probe(replica, "/api/version", 5.0) == {"version": "0.12.0"}
        with pytest.raises(ProbeFailed, match="404"):
            await fleet.probe(replica, "/api/missing", 5.0)
        assert await fleet.post_status(replica, "/api/generate", {"model": "m"}, 5.0) == 200
        assert await fleet.fetch_json("/api/show", {"model": "m"}, upstream=replica) == {"version": "0.12.0"}
        assert await fleet.fetch_json("/api/missing", upstream=replica) is None
        async with fleet.request(replica, "POST", "/api/copy", data=b"{}", headers={
                "Host": "evil.example", "Content-Type": "application/json"}) as reply:
            assert reply.status == 200
        reply = await fleet.open(replica, "GET", "/api/tags?x=1", headers={"Host": replica.host_header},
                                 data=None, first_byte_s=5.0, remaining_s=float("inf"))
        reply.release()
        assert reply.status == 200
    finally:
        await runner.cleanup()
    assert [path for path, _ in seen] == ["/api/version", "/api/missing", "/api/generate", "/api/show",
                                          "/api/missing", "/api/copy", "/api/tags"]
    assert {host for _, host in seen} == {f"127.0.0.1:{port}"}  # the caller's Host never wins


async def test_refused_connection_is_a_connect_failure(client: tuple[FleetClient, UpstreamSet]) -> None:
    fleet, _ = client
    with socket.socket() as probe:  # a port that was free a moment ago and has no listener
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    replica = Upstream("gone", URL(f"http://127.0.0.1:{port}"))
    with pytest.raises(UpstreamConnectFailure, match="cannot connect to upstream gone"):
        await fleet.open(replica, "GET", "/api/tags", headers={}, data=None, first_byte_s=5.0,
                         remaining_s=float("inf"))
    with pytest.raises((aiohttp.ClientError, OSError)):
        await fleet.probe(replica, "/api/version", 5.0)
    assert await fleet.fetch_json("/api/tags", upstream=replica) is None


async def test_reset_before_headers_and_silence_map_to_their_errors(
        client: tuple[FleetClient, UpstreamSet]) -> None:
    fleet, _ = client
    accepted: list[asyncio.StreamWriter] = []
    hang_up = [True]

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        accepted.append(writer)
        if hang_up[0]:
            writer.close()  # read the request, hang up before any header
        # else: read the request, answer nothing

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    replica = Upstream("flaky", URL(f"http://127.0.0.1:{port}"))
    try:
        with pytest.raises(UpstreamResetBeforeResponseStarted, match="flaky closed the connection"):
            await fleet.open(replica, "GET", "/api/tags", headers={}, data=None, first_byte_s=5.0,
                             remaining_s=float("inf"))
        hang_up[0] = False
        with pytest.raises(UpstreamResponseTimeout, match=r"no response within 0\.3s"):
            await fleet.open(replica, "GET", "/api/tags", headers={}, data=None, first_byte_s=0.3,
                             remaining_s=float("inf"))
        with pytest.raises(UpstreamResponseTimeout, match="deadline of 7s passed"):
            await fleet.open(replica, "GET", "/api/tags", headers={}, data=None, first_byte_s=30.0,
                             remaining_s=0.3, deadline_label=7)
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_probes_do_not_wait_behind_a_full_data_pool() -> None:
    """With `pool_size: 1` and that one connection held by a client's stream, a probe still answers:
    a busy replica must not look dead."""
    release = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"{}\n")
        await release.wait()
        return response

    async def version(request: web.Request) -> web.Response:
        del request
        return web.json_response({"version": "0.12.0"})

    app = web.Application()
    app.router.add_post("/api/generate", stream)
    app.router.add_get("/api/version", version)
    runner, port = await _serve(app)
    replica = Upstream("busy", URL(f"http://127.0.0.1:{port}"))
    fleet = FleetClient(UpstreamSet([replica]), ForwardingConfig(pool_size=1))
    lifecycle = fleet.lifecycle(web.Application())
    await lifecycle.__anext__()
    try:
        held = await fleet.open(replica, "POST", "/api/generate",
                                headers={"Host": replica.host_header}, data=b"{}",
                                first_byte_s=10.0, remaining_s=float("inf"))
        assert await held.readany() == b"{}\n"
        # The data pool is full: a second client call would wait for the held connection...
        with pytest.raises(UpstreamResponseTimeout):
            await fleet.open(replica, "GET", "/api/version", headers={}, data=None, first_byte_s=0.5,
                             remaining_s=float("inf"))
        # ...the probe goes through the control pool at once.
        assert await fleet.probe(replica, "/api/version", 10.0) == {"version": "0.12.0"}
        release.set()
        held.release()
    finally:
        release.set()
        with pytest.raises(StopAsyncIteration):
            await lifecycle.__anext__()
        await runner.cleanup()


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                package = path.parent.relative_to(ROOT).parts[:len(path.parent.relative_to(ROOT).parts)
                                                               - node.level + 1]
                base = ".".join(package)
                names.add(f"{base}.{node.module}" if node.module else base)
                names.update(f"{base}.{alias.name}" for alias in node.names if not node.module)
            elif node.module:
                names.add(node.module)
    return names


def test_no_step_imports_another() -> None:
    steps = sorted(p for p in (ROOT / "middlewares").glob("*.py") if p.name != "__init__.py")
    assert {p.stem for p in steps} >= {"limits", "quotas", "backpressure", "health", "balancer"}
    for path in steps:
        others = {name for name in _imports(path) if name == "middlewares" or name.startswith("middlewares.")}
        assert not others, f"{path.name} imports {sorted(others)}"


def test_one_place_in_the_proxy_core_creates_a_client_session() -> None:
    outside_core = ("proxy/emulator/", "proxy/loadgen/", "proxy/demo.py")
    found: list[str] = []
    for path in sorted([*(ROOT / "proxy").rglob("*.py"), *(ROOT / "middlewares").rglob("*.py")]):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith(outside_core):
            continue
        found.extend(f"{relative}:{n}" for n, line in enumerate(path.read_text().splitlines(), 1)
                     if re.search(r"ClientSession\(", line))
    assert [f.split(":")[0] for f in found] == ["proxy/fleet/client.py"], found
