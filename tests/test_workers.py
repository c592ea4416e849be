"""`serve --workers N` from its real command line: a supervisor and N worker processes sharing one port
(SO_REUSEPORT), in front of a real emulator, with a real redis-server as the shared state. It serves from
every worker, reloads every worker on SIGHUP, restarts a worker that dies, gives up (exit 1) when workers
keep dying, stops every worker on SIGTERM (exit 0), and refuses to start without shared state."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.polling import wait_for
from tests.support.redis_server import RedisServer
from tests.support.servers import Server, start_emulator

BODY = {"model": "llama3.2", "prompt": "hello", "stream": False, "options": {"num_predict": 3}}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("workers")


@pytest.fixture(scope="module")
def emulator(tmp: Path) -> Iterator[Server]:
    server = start_emulator(tmp, fixed_clock=False, name="workers-emu", extra=["--num-parallel", "4"])
    yield server
    server.stop()


def _config(tmp: Path, name: str, emulator: Server, state: dict[str, Any]) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "server": {"listen": "127.0.0.1:0", "shutdown_timeout_s": 5},
        "upstreams": [{"url": emulator.url, "num_parallel": 4}],
        "state": state}))
    return path


def _workers(tmp: Path, name: str, config: Path, count: int = 2) -> Server:
    return Server(["serve", "--config", str(config), "--workers", str(count)], tmp / f"{name}.port",
                  tmp / f"{name}.log")


def _pids(server: Server) -> dict[int, list[int]]:
    """Worker index -> the pids it was started with, in order (from the supervisor's log)."""
    pids: dict[int, list[int]] = {}
    for index, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", server.log()):
        pids.setdefault(int(index), []).append(int(pid))
    return pids


def _served_by(server: Server) -> set[str]:
    return set(re.findall(r"\[(worker \d+)\] \S+ \S+ \"POST /api/generate\" 200", server.log()))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not reaped yet) is not serving.
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


def _generate(server: Server) -> int:
    # A new connection each time: SO_REUSEPORT spreads connections, not requests.
    with httpx.Client(timeout=30) as client:
        return client.post(f"{server.url}/api/generate", json=BODY).status_code


def test_workers_need_shared_state(tmp: Path, emulator: Server) -> None:
    config = _config(tmp, "memory", emulator, {"backend": "memory"})
    result = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(config),
                             "--workers", "2"], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 2
    assert "--workers N (N > 1) needs state.backend: redis" in result.stderr


def test_workers_serve_reload_restart_and_stop(tmp: Path, emulator: Server,
                                               redis_server: RedisServer) -> None:
    config = _config(tmp, "redis", emulator, {"backend": "redis", "url": redis_server.url,
                                              "key_prefix": "workers:"})
    server = _workers(tmp, "workers", config)
    try:
        pids = _pids(server)
        assert sorted(pids) == [1, 2]
        # Serves, from both workers (the kernel spreads new connections over them).
        wait_for(lambda: _generate(server) == 200 and _served_by(server) == {"worker 1", "worker 2"},
                 timeout_s=60, what="both workers serving")
        # SIGHUP reloads every worker.
        data = yaml.safe_load(config.read_text())
        data["chain"] = {"backpressure": {"queue_timeout_s": 31}}
        config.write_text(yaml.safe_dump(data))
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: {m for m in re.findall(r"\[(worker \d+)\] configuration version 2 applied",
                                                server.log())} == {"worker 1", "worker 2"},
                 what="both workers reloaded")
        # A worker that dies is started again, on the same port.
        first = pids[1][0]
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: len(_pids(server).get(1, [])) == 2, what="worker 1 restarted")
        wait_for(lambda: all(_generate(server) == 200 for _ in range(10)), timeout_s=30,
                 what="serving after the restart")
        assert server.process.poll() is None
        # SIGTERM stops every worker, and the supervisor exits 0.
        workers = [p[-1] for p in _pids(server).values()]
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0
        assert not any(_alive(pid) for pid in workers)
        assert "[supervisor]" in server.log() and "stopped" in server.log()
    finally:
        server.stop()


def test_workers_that_keep_dying_stop_the_supervisor(tmp: Path, emulator: Server,
                                                      redis_server: RedisServer) -> None:
    config = _config(tmp, "dying", emulator, {"backend": "redis", "url": redis_server.url,
                                              "key_prefix": "dying:"})
    server = _workers(tmp, "dying", config)
    try:
        for death in range(5):
            index = 1 + death % 2
            starts = len(_pids(server)[index])
            pid = _pids(server)[index][-1]
            os.kill(pid, signal.SIGKILL)
            if death < 4:
                wait_for(lambda i=index, n=starts: len(_pids(server)[i]) == n + 1, timeout_s=30,
                         what=f"worker {index} restarted")
                wait_for(lambda: all(_alive(p[-1]) for p in _pids(server).values()),
                         what="workers running")
        assert server.process.wait(60) == 1
        assert "workers keep dying" in server.log()
        assert not any(_alive(p[-1]) for p in _pids(server).values())
    finally:
        server.stop()
