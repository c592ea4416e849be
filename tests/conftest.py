"""Shared fixtures: an emulator and a proxy in front of it, as real processes on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.redis_server import RedisServer
from tests.support.servers import Server, start_emulator, start_proxy


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def emulator(session_tmp: Path) -> Iterator[Server]:
    """A shared emulator with a fixed clock and a decode rate that keeps streams observable."""
    server = start_emulator(session_tmp, decode_tokens_per_s=400)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def proxy(session_tmp: Path, emulator: Server) -> Iterator[Server]:
    """The proxy, as started in production, in front of `emulator`."""
    server = start_proxy(session_tmp, [emulator.url])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of the test module's own, on a port it reports (a module that kills it defines
    its own per test)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def fresh_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own: for modules whose tests kill, pause or fill it, or whose
    books must start empty (they override `redis_server` with it)."""
    server = RedisServer(tmp_path)
    yield server
    server.stop()
