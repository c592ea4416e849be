"""Real servers on loopback for tests: the emulator and the proxy started by their own command line, exactly
as in production, each in its own process on a free port."""

from __future__ import annotations

import contextlib
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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A child process serving HTTP on 127.0.0.1:port; stopped with SIGTERM (SIGKILL with `kill()`)."""

    def __init__(self, args: list[str], port: int, log_path: Path,
                 extra_env: dict[str, str] | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for key in [k for k in env if k.startswith(("OTEL_", "SOP_", "OLLAMA_"))]:
            del env[key]
        env.update(extra_env or {})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy", *args], stdout=self._log, stderr=subprocess.STDOUT,
            env=env)
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log_path.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            time.sleep(0.05)
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
    port = port or free_port()
    args = ["emulate", "--listen", f"127.0.0.1:{port}", "--seed", str(seed)]
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
    return Server(args, port, tmp / f"{name}-{port}.log")


def start_proxy(tmp: Path, upstreams: list[str] | list[dict[str, Any]],
                config: dict[str, Any] | None = None, name: str = "proxy",
                env: dict[str, str] | None = None) -> Server:
    """The proxy in front of `upstreams` (URLs, or upstream entries of the config file)."""
    port = free_port()
    data = dict(config or {})
    data.setdefault("server", {})["listen"] = f"127.0.0.1:{port}"
    data["upstreams"] = [{"url": u} if isinstance(u, str) else u for u in upstreams]
    path = tmp / f"{name}-{port}.yaml"
    path.write_text(yaml.safe_dump(data))
    return Server(["serve", "--config", str(path)], port, tmp / f"{name}-{port}.log", env)


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        server.stop()
