"""redis-server on a free loopback port for tests (no persistence). Fails loudly when it is missing.

The failure helpers act on the real process: `kill` (SIGKILL, data lost), `pause`/`resume` (SIGSTOP /
SIGCONT: the port still accepts connections but nothing answers, like a frozen host) and `restart` (a new,
empty server on the same port).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support.servers import free_port

__all__ = ["RedisServer"]


class _BindFailed(RuntimeError):
    """redis-server exited before listening: most likely its port was taken meanwhile."""


class RedisServer:
    """A throwaway redis-server; `url` is its redis:// URL."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is required for these tests: apt-get install redis-server")
        self.binary = binary
        self.workdir = workdir
        # redis-server cannot bind port 0 (`--port 0` turns TCP off), so the port is picked first; a
        # port taken between the pick and the bind makes redis-server exit, and another is tried.
        for attempt in range(5):
            self.port = port or free_port()
            self.url = f"redis://127.0.0.1:{self.port}/0"
            try:
                self.process = self._start()
                return
            except _BindFailed:
                if port is not None or attempt == 4:
                    raise
        raise AssertionError("unreachable")

    def _start(self) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise _BindFailed(f"redis-server exited at start (port {self.port} taken?)")
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2):
                    return process
            except OSError:
                time.sleep(0.05)
        process.kill()
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        """SIGKILL: connections reset, new ones refused, all data lost."""
        self.process.kill()
        self.process.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, but no command is answered."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause`: commands sent meanwhile run now."""
        self.process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """A new, empty redis-server on the same port (after `kill`, or killing this one first)."""
        if self.process.poll() is None:
            self.kill()
        self.process = self._start()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            self.process.terminate()
            self.process.wait(10)
