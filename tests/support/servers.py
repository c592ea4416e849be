"""Real servers on loopback for tests: the emulator and the proxy started by their own command line, exactly
as in production, each in its own process.

Each child binds port 0 and reports the port the system gave it through `--port-file` (written atomically
once it listens), so there is no pick-then-release race with the other processes of the machine.
`free_port` remains for a test that needs a port before its server exists (a replica restarted on the
same port, an address nothing listens on)."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

__all__ = ["FIXED_CLOCK_NS", "Server", "free_port", "start_emulator", "start_proxy"]

FIXED_CLOCK_NS = 1_787_338_201_102_938_000  # 2026-08-21T18:50:01.102938Z


_serial = itertools.count(1)
"""Names log, config and port files of children whose port is not known before they start."""


def free_port() -> int:
    """A port free now, released at once: only for a test that needs a port before its server exists
    (another process may take it meanwhile; children of `start_*` bind port 0 instead)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A child process serving HTTP on 127.0.0.1:port; stopped with SIGTERM (SIGKILL with `kill()`).

    `args` are the CLI's (or, with `module`, those of `python -m module`); the child is given
    `--port-file port_file` and the server is ready when that file exists (the child writes it once
    listening), which also tells the port when it listens on 0."""

    def __init__(self, args: list[str], port_file: Path, log_path: Path,
                 extra_env: dict[str, str] | None = None, module: str = "proxy") -> None:
        self.port = 0
        self.url = ""
        self.config_path: Path | None = None
        """The configuration file a proxy was started with (start_proxy), for reload tests."""
        self.port_file = port_file
        port_file.unlink(missing_ok=True)
        self.log_path = log_path
        self._log = log_path.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for key in [k for k in env if k.startswith(("OTEL_", "SOP_", "OLLAMA_"))]:
            del env[key]
        env.update(extra_env or {})
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args, "--port-file", str(port_file)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log_path.read_text()}")
            with contextlib.suppress(FileNotFoundError):
                text = self.port_file.read_text()  # complete once it exists: written by a rename
                self.port = int(text)
                self.url = f"http://127.0.0.1:{self.port}"
                return
            time.sleep(0.02)
        self.process.kill()
        self.process.wait(5)
        raise RuntimeError(f"server not ready in {timeout_s}s:\n{self.log_path.read_text()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()

    def kill(self) -> None:
        """Die abruptly, as a crashed replica does (connections reset)."""
        self.process.kill()
        self.process.wait(5)

    def stats(self) -> dict[str, Any]:
        """The emulator's `/_emulator/stats`."""
        return dict(httpx.get(f"{self.url}/_emulator/stats", timeout=5).json())


def start_emulator(tmp: Path, *, seed: int = 7, decode_tokens_per_s: float | None = None,
                   load_s: float | None = None, fixed_clock: bool = True, models: str | None = None,
                   name: str = "emulator", output_tokens: str | None = None,
                   extra: list[str] | None = None, port: int | None = None) -> Server:
    """An emulator on `port`, or (the default) on a port the system chooses."""
    args = ["emulate", "--listen", f"127.0.0.1:{port or 0}", "--seed", str(seed)]
    # Only what the caller sets: anything passed here overrides the timing profile.
    if decode_tokens_per_s is not None:
        args += ["--decode-tokens-per-s", str(decode_tokens_per_s)]
    if load_s is not None:
        args += ["--load-s", str(load_s)]
    if fixed_clock:
        args += ["--fixed-clock-ns", str(FIXED_CLOCK_NS)]
    if models:
        args += ["--models", models]
    if output_tokens:
        args += ["--output-tokens", output_tokens]
    args += extra or []
    stem = f"{name}-{next(_serial)}"
    return Server(args, tmp / f"{stem}.port", tmp / f"{stem}.log")


def start_proxy(tmp: Path, upstreams: list[str] | list[dict[str, Any]],
                config: dict[str, Any] | None = None, name: str = "proxy",
                env: dict[str, str] | None = None) -> Server:
    """The proxy in front of `upstreams` (URLs, or upstream entries of the config file)."""
    data = dict(config or {})
    data.setdefault("server", {})["listen"] = "127.0.0.1:0"
    data["upstreams"] = [{"url": u} if isinstance(u, str) else u for u in upstreams]
    stem = f"{name}-{next(_serial)}"
    path = tmp / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(data))
    server = Server(["serve", "--config", str(path)], tmp / f"{stem}.port", tmp / f"{stem}.log", env)
    server.config_path = path
    return server


def start_module(tmp: Path, module: str, *args: str, name: str | None = None) -> Server:
    """Another server of this repository run as `python -m module ... --port-file F` (the benches'
    fast fake Ollama, OTLP sink, pass-through)."""
    stem = f"{name or module.rsplit('.', 1)[-1]}-{next(_serial)}"
    return Server(list(args), tmp / f"{stem}.port", tmp / f"{stem}.log", module=module)


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        server.stop()
