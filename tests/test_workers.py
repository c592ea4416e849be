"""`serve --workers N` from its real command line: a supervisor and N worker processes sharing one port
(SO_REUSEPORT), in front of a real emulator, with a real redis-server as the shared state. It serves from
every worker, reloads every worker on SIGHUP, restarts a worker that dies, gives up (exit 1) when workers
keep dying, stops every worker on SIGTERM (exit 0), and refuses to start without shared state."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

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


def test_workers_refuse_a_port_another_supervisor_serves(tmp: Path, emulator: Server,
                                                         redis_server: RedisServer) -> None:
    """A second `serve --workers 2` on the port of one running exits 2 (before: its SO_REUSEPORT
    sockets joined the first one's and the kernel spread connections over both instances)."""
    state = {"backend": "redis", "url": redis_server.url, "key_prefix": "taken:"}
    first = _workers(tmp, "taken-first", _config(tmp, "taken-first", emulator, state))
    try:
        config = _config(tmp, "taken-second", emulator, state)
        data = yaml.safe_load(config.read_text())
        data["server"]["listen"] = f"127.0.0.1:{first.port}"
        config.write_text(yaml.safe_dump(data))
        scratch = tmp / "taken-second-tmp"
        scratch.mkdir()
        result = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(config),
                                 "--workers", "2"], capture_output=True, text=True, timeout=60,
                                check=False, env={**os.environ, "TMPDIR": str(scratch)})
        assert result.returncode == 2, result.stderr
        assert f"cannot bind 127.0.0.1:{first.port}" in result.stderr
        assert "worker 1 started" not in result.stderr
        assert list(scratch.iterdir()) == []  # before: its workers' scratch directory stayed behind
        assert _generate(first) == 200
    finally:
        first.stop()


def test_a_stop_during_start_up_is_a_stop_by_signal(tmp: Path, emulator: Server,
                                                    redis_server: RedisServer) -> None:
    """SIGTERM to the supervisor before its workers listen stops them and exits 0, as a stop after
    does (before: exit 2, "the workers could not start", leaving a stopped systemd unit failed). The
    workers are frozen from their start until the SIGTERM, so it surely comes before they listen."""
    config = _config(tmp, "stop-start", emulator,
                     {"backend": "redis", "url": redis_server.url, "key_prefix": "stopstart:"})
    log_path = tmp / "stop-start.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config),
                                    "--workers", "2"], stdout=log, stderr=log)
    workers: list[int] = []
    try:
        def frozen() -> bool:
            for pid in map(int, re.findall(r"worker \d+ started \(pid (\d+)\)", log_path.read_text())):
                if pid not in workers:
                    os.kill(pid, signal.SIGSTOP)
                    workers.append(pid)
            return len(workers) == 2

        wait_for(frozen, timeout_s=30, what="both workers started")
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: "stopping during start-up" in log_path.read_text(), what="the stop")
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        assert process.wait(60) == 0
        assert "workers listening" not in log_path.read_text()
        assert not any(_alive(pid) for pid in workers)
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if process.poll() is None:
            process.kill()
            process.wait(30)


def test_a_worker_that_dies_while_stopping_is_logged(tmp: Path, emulator: Server,
                                                    redis_server: RedisServer) -> None:
    """A worker killed during the graceful stop (the OOM killer, a crash mid-drain) cut whatever it
    still served: the supervisor says so in one line naming the worker and its status, and still
    exits 0 for the stop by signal (before: only "stopped", as if every worker had drained). Worker 1
    is frozen before the SIGTERM so that it is surely still stopping when it is killed."""
    config = _config(tmp, "die-stopping", emulator,
                     {"backend": "redis", "url": redis_server.url, "key_prefix": "diestop:"})
    server = _workers(tmp, "die-stopping", config)
    first = 0
    try:
        first = _pids(server)[1][0]
        os.kill(first, signal.SIGSTOP)
        server.process.send_signal(signal.SIGTERM)
        wait_for(lambda: "[worker 2] stopping" in server.log() or "stopped" in server.log(),
                 what="the stop under way")
        os.kill(first, signal.SIGKILL)
        assert server.process.wait(30) == 0
        lines = [line for line in server.log().splitlines() if "while stopping" in line]
        assert len(lines) == 1 and "worker 1 exited with status -9 while stopping" in lines[0], \
            server.log()
        assert "Traceback" not in server.log()
    finally:
        if first:
            with contextlib.suppress(ProcessLookupError):
                os.kill(first, signal.SIGKILL)
        server.stop()


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
        # Whichever worker a scrape lands on, it holds every worker's series, each labelled `worker`
        # (a new connection per scrape: the kernel spreads them over both).
        served = 1 + sum(1 for _ in range(39) if _generate(server) == 200)

        def scrape() -> dict[str, Any]:
            text = httpx.get(f"{server.url}/metrics", timeout=10).text
            families = {f.name: f for f in text_string_to_metric_families(text)}
            requests = [s for s in families["http_server_request_duration_seconds"].samples
                        if s.name.endswith("_count") and s.labels.get("http_route") == "/api/generate"]
            return {"workers": families["sop_metrics_workers"].samples[0].value,
                    "instances": {s.labels["worker"]: s.labels["service_instance_id"]
                                  for s in families["target_info"].samples},
                    "by_worker": {s.labels["worker"] for s in requests},
                    "requests": sum(s.value for s in requests)}

        # One generate before the burst (the wait above) plus the burst: at least `served`, all counted
        # in every scrape (earlier waits may have sent more).
        for _ in range(10):
            seen = scrape()
            assert seen["workers"] == 2 and set(seen["instances"]) == {"1", "2"}, seen
            assert len(set(seen["instances"].values())) == 2 and seen["by_worker"] == {"1", "2"}, seen
            assert seen["requests"] >= served, seen
        assert len({scrape()["requests"] for _ in range(6)}) == 1  # the same total from either worker
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
        # The restarted worker's metrics are in every scrape again (it replaced its stale socket).
        wait_for(lambda: all(scrape()["workers"] == 2 for _ in range(6)), timeout_s=30,
                 what="both workers in the scrape after the restart")
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


def _ignores_sighup(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    except OSError:
        pass
    return False


def _has_loaded(pid: int, name: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
            return name in maps.read()
    except OSError:
        return False


def _start_under_sighup(tmp: Path, name: str, config: Path, *extra: str) -> subprocess.Popen[bytes]:
    """Start `serve` from its real command line and send it SIGHUP every 20 ms until it listens (or
    exits): a `systemctl reload` right after a start. Returns the process, listening."""
    port_file = tmp / f"{name}.port"
    port_file.unlink(missing_ok=True)
    log = (tmp / f"{name}.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config),
                                "--port-file", str(port_file), *extra], stdout=log, stderr=log)
    deadline = time.monotonic() + 60
    # The storm starts once the process ignores SIGHUP or has begun loading aiohttp, whichever comes
    # first: a process that loads the proxy before ignoring it dies here, without any timing guess.
    while process.poll() is None and time.monotonic() < deadline and not (
            _ignores_sighup(process.pid) or _has_loaded(process.pid, "aiohttp")):
        time.sleep(0.001)
    while not port_file.exists() and process.poll() is None and time.monotonic() < deadline:
        process.send_signal(signal.SIGHUP)
        time.sleep(0.02)
    assert process.poll() is None, f"serve ended under SIGHUP at start-up: {process.returncode}"
    assert port_file.exists()
    return process


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_while_starting_does_not_end_the_proxy(tmp: Path, emulator: Server,
                                                      redis_server: RedisServer, workers: int) -> None:
    """Python's default for SIGHUP ends a process, and the proxy takes ~0.3 s to import: SIGHUP is
    ignored from the first line until serving installs its reload handler, in the supervisor and in
    every worker it starts."""
    config = _config(tmp, f"hup-start-{workers}", emulator,
                     {"backend": "redis", "url": redis_server.url, "key_prefix": f"hup{workers}:"})
    process = _start_under_sighup(tmp, f"hup-start-{workers}", config, "--workers", str(workers))
    try:
        port = int((tmp / f"hup-start-{workers}.port").read_text())
        with httpx.Client(timeout=30) as client:
            for _ in range(4):
                assert client.post(f"http://127.0.0.1:{port}/api/generate", json=BODY).status_code == 200
        for _ in range(5):  # and while serving, each is a reload
            process.send_signal(signal.SIGHUP)
            time.sleep(0.05)
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


def test_a_sighup_while_a_worker_restarts_reaches_it_once_it_listens(
        tmp: Path, emulator: Server, redis_server: RedisServer) -> None:
    """A worker restarted after a crash reads the file, then builds its app and listens, ignoring
    SIGHUP meanwhile. A reload asked for in that window is held by the supervisor and sent once the
    worker listens: otherwise that worker would serve the old configuration until the next reload (no
    file watch here) while its sibling serves the new one. The worker is frozen (SIGSTOP) inside the
    window, so the SIGHUP lands there whatever the machine's speed."""
    config = _config(tmp, "restart-hup", emulator, {"backend": "redis", "url": redis_server.url,
                                                    "key_prefix": "restart-hup:"})
    data = yaml.safe_load(config.read_text())
    data["server"]["config_watch_s"] = 0  # only SIGHUP reloads
    config.write_text(yaml.safe_dump(data))
    server = _workers(tmp, "restart-hup", config)
    read_file = re.compile(r"\[worker 1\] serving at most")  # logged once it has read the file
    listening = re.compile(r"\[worker 1\] shared-ollama-proxy \S+ listening")
    try:
        for attempt in range(1, 4):
            pid = _pids(server)[1][-1]
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda n=attempt: len(_pids(server)[1]) == n + 1, timeout_s=30,
                     what="worker 1 restarted")
            new = _pids(server)[1][-1]
            deadline = time.monotonic() + 30
            while len(read_file.findall(server.log())) < attempt + 1:  # tight: the window is ~70 ms
                assert time.monotonic() < deadline, "the restarted worker 1 did not read its file"
            os.kill(new, signal.SIGSTOP)
            if len(listening.findall(server.log())) == attempt:  # frozen before it listened
                break
            os.kill(new, signal.SIGCONT)  # it listened already: the window was missed, again
        else:
            pytest.fail("could not freeze a restarted worker before it listened")
        data["chain"] = {"backpressure": {"queue_timeout_s": 31}}
        config.write_text(yaml.safe_dump(data))
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "[supervisor] SIGHUP: reloading every worker" in server.log(),
                 what="the supervisor to take the SIGHUP")
        os.kill(new, signal.SIGCONT)
        wait_for(lambda: {m for m in re.findall(r"\[(worker \d+)\] configuration version 2 applied",
                                                server.log())} == {"worker 1", "worker 2"},
                 what="both workers reloaded, the restarted one included")
        assert server.process.poll() is None
    finally:
        for pids in _pids(server).values():  # nothing left frozen, whatever failed
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        server.stop()


def test_the_supervisors_start_survives_a_sighup_storm(tmp_path: Path) -> None:
    """The supervisor's handler queues signals while it waits for its workers to listen, and it runs
    between any two bytecodes: walking the queue while a SIGHUP came raised "deque mutated during
    iteration" and ended the supervisor (CI saw it once under `test_sighup_while_starting...`). Here
    the wait runs in this process while another process sends it SIGHUP as fast as it can, until the
    (only) worker's port file appears; the wait must say the workers listen."""
    from proxy.supervisor import Supervisor

    supervisor = Supervisor([], 1, "127.0.0.1", 0)
    assert not supervisor._tmp.exists()  # made by run(): a Supervisor never run leaves nothing behind
    supervisor._tmp.mkdir(mode=0o700)  # as run() makes it (this test calls its wait directly)
    previous = signal.signal(signal.SIGHUP, supervisor._on_signal)
    storm = subprocess.Popen([sys.executable, "-c", (
        "import os, signal, sys, time\n"
        "pid, end = int(sys.argv[1]), time.monotonic() + 1.5\n"
        "while time.monotonic() < end:\n"
        "    os.kill(pid, signal.SIGHUP)\n"), str(os.getpid())])

    def listen_when_the_storm_ends() -> None:
        storm.wait(30)
        supervisor._port_file(supervisor.workers[0]).write_text("0\n")

    thread = threading.Thread(target=listen_when_the_storm_ends, daemon=True)
    try:
        thread.start()
        assert supervisor._wait_listening() is True
        assert len(supervisor._signals) > 100  # the storm reached the queue while it was walked
    finally:
        storm.kill()
        storm.wait(10)
        thread.join(10)
        signal.signal(signal.SIGHUP, previous)
        for path in supervisor._tmp.glob("*"):
            path.unlink()
        supervisor._tmp.rmdir()


def test_merged_scrape_names_the_worker_count_with_the_metric_prefix() -> None:
    """`telemetry.metric_prefix: acme` makes every name of ours `acme_*` (proxy/telemetry/semconv.py):
    the merged scrape's worker count too (it was `sop_metrics_workers` whatever the prefix)."""
    from proxy.telemetry.workers import merge_worker_metrics

    one = "# HELP acme_queue_depth d\n# TYPE acme_queue_depth gauge\nacme_queue_depth 1.0\n"
    families = {f.name: f for f in text_string_to_metric_families(
        merge_worker_metrics({0: one, 1: one}, "acme").decode())}
    assert families["acme_metrics_workers"].samples[0].value == 2
    assert not [name for name in families if name.startswith("sop_")]
    default = merge_worker_metrics({0: one}).decode()
    assert "sop_metrics_workers 1.0" in default
