"""Signals against the real proxy process: SIGTERM stops accepting, lets short requests finish within
`server.shutdown_timeout_s`, ends every remaining stream with one final `shutting_down` record in its
dialect, answers what has no response yet with 503 `shutting_down`, and exits by the deadline; SIGHUP
leaves the process and its streams alone."""

from __future__ import annotations

import json
import signal
import socket
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

from proxy.app import build_app
from proxy.config import load_config
from proxy.emulator.app import create_emulator_app
from proxy.emulator.engine import EngineSettings
from proxy.emulator.profile import ProfileSet
from proxy.serving import STOP
from proxy.telemetry.setup import build_telemetry
from tests.support.polling import wait_for
from tests.support.raw import read_response
from tests.support.servers import Server, start_emulator, start_proxy

GRACE_S = 3.0
EXIT_MARGIN_S = 3.0  # cleanup and interpreter exit on a loaded machine


@pytest.fixture(scope="module")
def slow_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """20 tokens/s and 400-token answers: a stream runs 20 s unless num_predict says otherwise."""
    server = start_emulator(tmp_path_factory.mktemp("signals-emu"), name="signals-emu",
                            decode_tokens_per_s=20, output_tokens="400,400",
                            extra=["--num-parallel", "4"])
    yield server
    server.stop()


def _proxy(tmp: Path, emulator: Server, num_parallel: int = 4, **server: Any) -> Server:
    return start_proxy(tmp, [{"url": emulator.url, "num_parallel": num_parallel}],
                       {"server": {"shutdown_timeout_s": GRACE_S, **server}}, name="signals")


def _gate(proxy: Server) -> tuple[int, int]:
    """(running, queued) in the proxy's llama3.2 gate, from `/system/queue` (open: no keys here)."""
    gate = httpx.get(f"{proxy.url}/system/queue", timeout=10).json()["models"].get("llama3.2:latest")
    return (0, 0) if gate is None else (sum(gate["in_flight"].values()), gate["queued"])


class Reader(threading.Thread):
    """Streams one request in the background, keeping every line it receives."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.body = body
        self.lines: list[str] = []
        self.status = 0
        self.headers: httpx.Headers | None = None
        self.error: BaseException | None = None
        self.started = threading.Event()

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url, json=self.body, timeout=60) as response:
                self.status = response.status_code
                self.headers = response.headers
                for line in response.iter_lines():
                    if line:
                        self.lines.append(line)
                        self.started.set()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.started.set()


def _stop_and_time(server: Server) -> float:
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(GRACE_S + 20)
    return time.monotonic() - started


def test_sigterm_ends_streams_with_a_final_line_and_exits_by_the_deadline(slow_emulator: Server,
                                                                          tmp_path: Path) -> None:
    proxy = _proxy(tmp_path, slow_emulator)
    native = Reader(f"{proxy.url}/api/generate", {"model": "llama3.2", "prompt": "a long story"})
    openai = Reader(f"{proxy.url}/v1/chat/completions", {
        "model": "llama3.2", "stream": True, "messages": [{"role": "user", "content": "a long story"}]})
    anthropic = Reader(f"{proxy.url}/v1/messages", {
        "model": "llama3.2", "stream": True, "max_tokens": 1000,
        "messages": [{"role": "user", "content": "a long story"}]})
    for reader in (native, openai, anthropic):
        reader.start()
        assert reader.started.wait(20) and reader.lines, reader.error
    short = Reader(f"{proxy.url}/api/generate", {"model": "llama3.2", "prompt": "short",
                                                 "stream": False, "options": {"num_predict": 3}})
    short.start()
    # The short request is in flight (it needs well under the grace period), or already done.
    wait_for(lambda: short.status or _gate(proxy)[0] == 4, what="the short request in flight")
    took = _stop_and_time(proxy)
    for reader in (native, openai, anthropic, short):
        reader.join(10)
    assert took < GRACE_S + EXIT_MARGIN_S, f"exit took {took:.1f}s"
    assert took > GRACE_S * 0.5, "the streams were not given their grace period"

    assert short.status == 200 and short.error is None
    assert json.loads(short.lines[-1])["done"] is True

    assert native.status == 200 and native.error is None
    last = json.loads(native.lines[-1])
    assert last["code"] == "shutting_down" and "shutting down" in last["error"]
    assert all("error" not in json.loads(line) for line in native.lines[:-1])

    assert openai.status == 200 and openai.error is None
    events = [line for line in openai.lines if line.startswith("data: ")]
    final = json.loads(events[-1].removeprefix("data: "))
    assert final["error"]["code"] == "shutting_down"

    assert anthropic.status == 200 and anthropic.error is None
    assert anthropic.lines[-2] == "event: error"
    final = json.loads(anthropic.lines[-1].removeprefix("data: "))
    assert final == {"type": "error", "error": {"type": "overloaded_error", "message": final["error"][
        "message"]}} and "shutting down" in final["error"]["message"]
    log = proxy.log()
    assert "Traceback" not in log
    assert "stopping: ending 3 request(s) still in flight" in log
    proxy.stop()


def test_sigterm_stops_accepting_at_once(slow_emulator: Server, tmp_path: Path) -> None:
    proxy = _proxy(tmp_path, slow_emulator)
    stream = Reader(f"{proxy.url}/api/generate", {"model": "llama3.2", "prompt": "keep going"})
    stream.start()
    assert stream.started.wait(20)
    idle = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    idle.sendall(b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(idle).status == 200  # now an idle keep-alive connection
    proxy.process.send_signal(signal.SIGTERM)
    idle.settimeout(GRACE_S * 0.5)  # closed at once, long before the grace period ends
    assert idle.recv(1) == b""
    idle.close()
    deadline = time.monotonic() + GRACE_S
    refused = False
    while time.monotonic() < deadline and not refused:
        try:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=0.5) as sock:
                sock.sendall(b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n")
                sock.settimeout(0.5)
                refused = sock.recv(100) == b""
        except OSError:
            refused = True
        time.sleep(0.05)
    assert refused, "the proxy still accepted connections after SIGTERM"
    proxy.process.wait(GRACE_S + 20)
    stream.join(10)
    assert json.loads(stream.lines[-1])["code"] == "shutting_down"
    proxy.stop()


def test_a_response_sent_while_stopping_says_connection_close(slow_emulator: Server,
                                                               tmp_path: Path) -> None:
    """A request in flight when SIGTERM comes and answered within the grace period (a 200 whose headers
    go out after the signal) says `Connection: close`, as the README promises, so that a client does
    not send its next request on a connection the proxy closes after this response."""
    proxy = _proxy(tmp_path, slow_emulator)
    native = Reader(f"{proxy.url}/api/generate", {"model": "llama3.2", "prompt": "short",
                                                  "stream": False, "options": {"num_predict": 20}})
    openai = Reader(f"{proxy.url}/v1/chat/completions", {
        "model": "llama3.2", "stream": False, "max_tokens": 20,
        "messages": [{"role": "user", "content": "short"}]})
    for reader in (native, openai):
        reader.start()
    wait_for(lambda: _gate(proxy)[0] == 2, what="both requests in flight")
    proxy.process.send_signal(signal.SIGTERM)  # about 1 s before either answer is ready
    for reader in (native, openai):
        reader.join(GRACE_S + 10)
        assert reader.status == 200 and reader.error is None, reader.lines
        assert reader.headers is not None and reader.headers.get("connection") == "close", \
            dict(reader.headers or {})
    assert json.loads(native.lines[-1])["done"] is True
    assert proxy.process.wait(GRACE_S + 20) == 0
    proxy.stop()


def test_a_head_half_received_at_sigterm_is_answered(slow_emulator: Server, tmp_path: Path) -> None:
    """A client whose request head is arriving when SIGTERM comes (its request line sent, the rest of
    the head not yet) has a request in flight: once the head is complete it is answered, with
    `Connection: close` (before: the connection was closed with the idle ones, and the client got no
    response at all). A connection with no byte of a request still closes at once."""
    proxy = _proxy(tmp_path, slow_emulator)
    stream = Reader(f"{proxy.url}/api/generate", {"model": "llama3.2", "prompt": "keep going"})
    stream.start()  # keeps the proxy in its grace period
    assert stream.started.wait(20)
    body = json.dumps({"model": "llama3.2", "prompt": "hi", "stream": False,
                       "options": {"num_predict": 3}}).encode()
    half = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    half.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\n")
    empty = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    time.sleep(0.3)  # both connections accepted and the half head read (nothing shows it outside)
    proxy.process.send_signal(signal.SIGTERM)
    wait_for(lambda: "no longer accepting connections" in proxy.log(), what="the stop")
    empty.settimeout(GRACE_S * 0.5)
    assert empty.recv(1) == b""
    half.sendall(b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    answer = read_response(half)
    assert answer.status == 200, answer.raw_head
    assert answer.json()["done"] is True and answer.headers.get("connection") == "close"
    half.close()
    empty.close()
    proxy.process.wait(GRACE_S + 20)
    stream.join(10)
    assert json.loads(stream.lines[-1])["code"] == "shutting_down"
    proxy.stop()


def test_requests_without_a_response_yet_get_503_shutting_down(slow_emulator: Server,
                                                               tmp_path: Path) -> None:
    """One slot, held by a stream: a second request waits in the proxy's queue and gets 503
    `shutting_down` (with Retry-After) at the deadline, while the stream ends with its final line."""
    proxy = _proxy(tmp_path, slow_emulator, num_parallel=1)
    stream = Reader(f"{proxy.url}/api/generate", {"model": "llama3.2", "prompt": "hold the slot"})
    stream.start()
    assert stream.started.wait(20)
    queued = Reader(f"{proxy.url}/api/generate", {"model": "llama3.2", "prompt": "wait",
                                                  "stream": False})
    queued.start()
    wait_for(lambda: _gate(proxy) == (1, 1), what="the second request in the proxy's queue")
    took = _stop_and_time(proxy)
    queued.join(10)
    stream.join(10)
    assert took < GRACE_S + EXIT_MARGIN_S
    assert queued.status == 503, queued.lines
    assert json.loads(queued.lines[-1])["code"] == "shutting_down"
    assert queued.headers is not None and queued.headers["retry-after"] == "1"
    assert json.loads(stream.lines[-1])["code"] == "shutting_down"
    proxy.stop()


def test_a_request_waiting_for_upstream_headers_gets_503(tmp_path: Path) -> None:
    """The model takes 60 s to load: no headers by the deadline, so 503 `shutting_down`."""
    emulator = start_emulator(tmp_path, name="loading-emu", load_s=60)
    try:
        proxy = _proxy(tmp_path, emulator, num_parallel=1)
        waiting = Reader(f"{proxy.url}/api/generate", {"model": "llama3.2", "prompt": "hi",
                                                       "stream": False})
        waiting.start()
        wait_for(lambda: emulator.stats()["loading"], what="the request waiting for the model to load")
        took = _stop_and_time(proxy)
        waiting.join(10)
        assert took < GRACE_S + EXIT_MARGIN_S
        assert waiting.status == 503
        assert json.loads(waiting.lines[-1])["code"] == "shutting_down"
        proxy.stop()
    finally:
        emulator.kill()


def test_sighup_reloads_and_streams_continue(slow_emulator: Server, tmp_path: Path) -> None:
    proxy = _proxy(tmp_path, slow_emulator)
    stream = Reader(f"{proxy.url}/api/generate", {"model": "llama3.2", "prompt": "go on",
                                                  "options": {"num_predict": 40}})
    stream.start()
    assert stream.started.wait(20)
    proxy.process.send_signal(signal.SIGHUP)
    stream.join(30)
    assert stream.error is None
    last = json.loads(stream.lines[-1])
    assert last["done"] is True and "error" not in last
    assert proxy.process.poll() is None
    assert httpx.get(f"{proxy.url}/api/version", timeout=10).status_code == 200
    wait_for(lambda: "configuration reload (sighup): nothing to apply" in proxy.log(),
             what="the reload SIGHUP asked for")
    proxy.stop()


def test_a_body_still_arriving_at_the_deadline_gets_503(slow_emulator: Server, tmp_path: Path) -> None:
    """A client uploading its body slowly (but within the body timeout) when SIGTERM comes: it is
    waited for during the grace period, then answered 503 `shutting_down`."""
    proxy = _proxy(tmp_path, slow_emulator, body_timeout_s=30)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        # Not a barrier that can be polled (a request still reading its body shows nowhere): time for
        # the head to be parsed and the handler to start reading, so SIGTERM finds a request in flight.
        time.sleep(0.3)
        started = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        response = None
        while time.monotonic() - started < GRACE_S + EXIT_MARGIN_S:
            try:
                sock.sendall(b" ")
            except OSError:
                break
            sock.settimeout(0.3)
            try:
                response = read_response(sock, 0.3)
                break
            except TimeoutError:
                continue
    proxy.process.wait(20)
    assert response is not None and response.status == 503, response and response.status_line
    assert response.json()["code"] == "shutting_down"
    assert time.monotonic() - started < GRACE_S + EXIT_MARGIN_S
    proxy.stop()


def test_a_second_sigterm_ends_the_streams_at_once(slow_emulator: Server, tmp_path: Path) -> None:
    proxy = _proxy(tmp_path, slow_emulator, shutdown_timeout_s=60)
    stream = Reader(f"{proxy.url}/api/generate", {"model": "llama3.2", "prompt": "a long story"})
    stream.start()
    assert stream.started.wait(20)
    started = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # time passing, not a barrier: the process is still there a while after SIGTERM
    assert proxy.process.poll() is None  # the first one waits for the stream
    proxy.process.send_signal(signal.SIGTERM)
    proxy.process.wait(30)
    stream.join(10)
    assert time.monotonic() - started < 30, "the second signal did not cut the 60 s grace period short"
    assert json.loads(stream.lines[-1])["code"] == "shutting_down"
    assert "second signal" in proxy.log()
    proxy.stop()


def test_a_sighup_sent_the_moment_the_port_file_appears_reloads(slow_emulator: Server,
                                                                tmp_path: Path) -> None:
    """The port file is what says "up" (to tests, to `serve --workers`' supervisor, which forwards a
    SIGHUP once every worker's exists): a SIGHUP sent the instant it appears must reload, not meet the
    SIG_IGN that covers start-up. The file is watched in a tight loop, so the signal lands within
    microseconds of the rename (the window the proxy once left open while it logged "listening")."""
    config = tmp_path / "hup.yaml"
    config.write_text(yaml.safe_dump({"server": {"listen": "127.0.0.1:0", "config_watch_s": 0},
                                      "upstreams": [{"url": slow_emulator.url}]}))
    for attempt in range(3):
        port_file, log_path = tmp_path / f"hup-{attempt}.port", tmp_path / f"hup-{attempt}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve", "--config", str(config),
                 "--port-file", str(port_file)], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 20
            while not port_file.exists():
                assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            process.send_signal(signal.SIGHUP)
            wait_for(lambda path=log_path: "configuration reload (sighup)" in path.read_text(), timeout_s=10,
                     what=f"the reload of a SIGHUP sent as the port file appeared (attempt {attempt})")
            assert process.poll() is None
        finally:
            process.terminate()
            process.wait(10)


async def test_the_stop_cuts_a_stream_whose_relay_was_already_woken(
        aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path) -> None:
    """The stop ends a relay by firing its timer. A fast stream's relay is often already woken (a chunk
    came) when the stop runs; its reschedule then cancelled that firing, and the stream ran on past the
    grace period without its final record. In-process: the application `serve` builds, the stop
    sequence's `expire()` called as `run_until_signalled` calls it, at varying points of the stream."""
    emulator = await aiohttp_server(create_emulator_app(EngineSettings(
        seed=7, num_parallel=4,
        profiles=ProfileSet().with_defaults(decode_tokens_per_s=100_000.0, output_tokens=(20_000, 20_000)))))
    config = tmp_path / "proxy.yaml"
    config.write_text(yaml.safe_dump({"upstreams": [{"url": f"http://127.0.0.1:{emulator.port}"}]}))
    loaded = load_config(config, environ={})
    for trial in range(12):
        client = await aiohttp_client(build_app(loaded, build_telemetry(loaded.telemetry)))
        stop = client.app[STOP]
        lines: list[bytes] = []
        async with client.post("/api/generate", json={"model": "llama3.2", "prompt": "x"}) as response:
            async for line in response.content:
                lines.append(line)
                if len(lines) == 20 + 15 * trial:
                    assert stop.in_flight == 1  # far from the stream's 20,001 records
                    stop.expire()
        await client.close()
        assert len(lines) < 20_000, trial
        final = json.loads(lines[-1])
        assert final["code"] == "shutting_down" and "shutting down" in final["error"], (trial, final)
