"""`serve --workers N`: a supervisor process and N worker processes sharing one listening port.

Each worker is the ordinary `serve` (the same command line) with SO_REUSEPORT on its listening socket:
the kernel spreads incoming connections over the workers, and each runs its own event loop, so the
proxy uses N cores. The supervisor serves nothing itself. Contract:
- Port: the supervisor binds the address first (with SO_REUSEPORT, not listening: it receives no
  connection) and keeps it bound, so a configured port 0 becomes one real port that every worker and
  every restarted worker binds. `--port-file` is written once all N workers listen.
- Secret: the plugin sub-request secret (proxy/plugin.py Subrequests) is drawn once here and given to
  every worker through a pipe (never the command line or the environment), since a sub-request sent to
  the shared port may reach any worker.
- Signals: SIGTERM or SIGINT is forwarded as SIGTERM to every worker (each stops gracefully within
  `server.shutdown_timeout_s`; a second signal is forwarded too and ends what remains); workers still
  alive `_KILL_AFTER_S` past the grace period are killed. SIGHUP is forwarded: every worker reloads. A
  worker still starting (its port file, written once its handlers are installed, not there yet) may
  have read the file before the change: it gets the SIGHUP once it listens.
  Workers run in their own session, so a terminal's Ctrl-C reaches them once, through here; they get
  SIGTERM if the supervisor itself dies (PR_SET_PDEATHSIG on Linux).
- Restarts: a worker that exits while the supervisor is not stopping is started again after a backoff
  (0.5 s, doubling up to 10 s, reset after a minute of good health). `_MAX_DEATHS` deaths within
  `_DEATH_WINDOW_S` stop everything, and the supervisor exits 1.
- Metrics: each worker serves its own metrics on a Unix socket in the supervisor's private directory
  (`--worker-peers`), so a scrape landing on any worker answers with every worker's series
  (proxy/telemetry/workers.py).
- Exit: 0 after a stop by signal (a worker that died during it is logged, not counted), 1 when workers
  keep dying, 2 when the workers could not start.
Worker log lines carry `[worker i]`, the supervisor's `[supervisor]`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["Supervisor", "read_secret"]

log = logging.getLogger("proxy.supervisor")

_MAX_DEATHS = 5
_DEATH_WINDOW_S = 60.0
_BACKOFF_S = (0.5, 10.0)
_HEALTHY_S = 60.0
"""A worker that has run this long resets its backoff."""
_KILL_AFTER_S = 5.0
_START_TIMEOUT_S = 60.0
_POLL_S = 0.05


def read_secret(fd: int) -> str:
    """The sub-request secret the supervisor wrote to pipe `fd` (read once, then closed)."""
    with os.fdopen(fd, "r", encoding="ascii") as pipe:
        return pipe.read().strip()


def _in_child() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Die with the supervisor, and ignore SIGHUP until the worker installs its reload handler (an
    ignored signal stays ignored across exec): a reload forwarded to a worker still starting must not
    end it (the supervisor holds it back until that worker listens)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.backoff = _BACKOFF_S[0]
        self.restart_at: float | None = None
        self.reload_pending = False
        """A SIGHUP came while this worker was starting: it is sent once the worker listens."""


class Supervisor:
    """Runs `workers` copies of `serve` (see the module docstring). `serve_args` is the `serve` command
    line without `--workers`, `--listen` and `--port-file`."""

    def __init__(self, serve_args: Sequence[str], workers: int, host: str, port: int, *,
                 log_level: str = "INFO", port_file: str | None = None,
                 grace_s: float = 30.0) -> None:
        self.serve_args = list(serve_args)
        self.workers = [_Worker(i) for i in range(1, workers + 1)]
        self.host = host
        self.port = port
        self.log_level = log_level
        self.port_file = port_file
        self.grace_s = grace_s
        self.secret = secrets.token_urlsafe(24)
        self.deaths: deque[float] = deque()
        self.stopping = False
        self._signals: deque[int] = deque()
        """Signals received, oldest first: appended by the handler at any bytecode of the main
        thread, so read only with popleft() or a one-call copy (tuple()), never iterated."""
        self._tmp = Path(tempfile.gettempdir()) / f"sop-workers-{secrets.token_hex(8)}"
        """The workers' scratch directory (port files, peers' metrics): made by `run`, removed as it
        ends, so a Supervisor that never runs leaves nothing behind."""
        self._socket: socket.socket | None = None

    # -- the port ------------------------------------------------------------------------------------

    def _reserve(self) -> int:
        """Bind (not listen) the address with SO_REUSEPORT and keep it: the port for every worker.
        Raises OSError (EADDRINUSE) when anything else holds the address, another `serve --workers`
        included: the address is first bound once without SO_REUSEPORT, because a bind with it alone
        succeeds beside another process's SO_REUSEPORT sockets of the same user, and the kernel would
        then spread the connections over both instances (an old one still running, say)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # SO_REUSEADDR only lets the port's TIME_WAIT connections (a previous run's) be.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((self.host, self.port))
            self.port = int(probe.getsockname()[1])  # port 0: the one the system picked
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((self.host, self.port))
        self._socket = sock
        return int(sock.getsockname()[1])

    def _listen_arg(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    # -- workers -------------------------------------------------------------------------------------

    def _port_file(self, worker: _Worker) -> Path:
        return self._tmp / f"worker-{worker.index}.port"

    def _start(self, worker: _Worker) -> None:
        read, write = os.pipe()
        try:
            os.write(write, self.secret.encode("ascii"))
        finally:
            os.close(write)
        self._port_file(worker).unlink(missing_ok=True)
        command = [sys.executable, "-m", "proxy", "--log-level", self.log_level, "serve",
                   *self.serve_args, "--listen", self._listen_arg(),
                   "--port-file", str(self._port_file(worker)),
                   "--worker-index", str(worker.index), "--worker-secret-fd", str(read),
                   "--worker-peers", str(self._tmp)]
        try:
            worker.process = subprocess.Popen(command, pass_fds=(read,), start_new_session=True,
                                              preexec_fn=_in_child)  # noqa: PLW1509 - no threads here
        finally:
            os.close(read)
        worker.started = time.monotonic()
        worker.restart_at = None
        worker.reload_pending = False  # started now: it reads the file as it is from here on
        log.info("worker %d started (pid %d)", worker.index, worker.process.pid)

    def _send(self, signum: int) -> None:
        for worker in self.workers:
            self._signal(worker, signum)

    @staticmethod
    def _signal(worker: _Worker, signum: int) -> None:
        if worker.process is not None and worker.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signum)

    def _reload(self) -> None:
        """Forward a SIGHUP: now to each worker that listens; to one still starting once it listens.
        Why not at once: a starting worker ignores SIGHUP until its handler is installed, and it may
        have read the file before this change (it would serve the old configuration until the next
        reload). Its port file appears only once the handler is installed (serving.run_until_signalled)."""
        for worker in self.workers:
            # One waiting to be restarted (no process) reads the file as it is when it starts.
            worker.reload_pending = worker.process is not None
        self._send_pending_reloads()

    def _send_pending_reloads(self) -> None:
        """SIGHUP to each worker with a reload pending that listens now."""
        for worker in self.workers:
            if worker.reload_pending and worker.process is not None \
                    and self._port_file(worker).exists():
                worker.reload_pending = False
                self._signal(worker, signal.SIGHUP)

    def _on_signal(self, signum: int, frame: Any) -> None:
        del frame
        self._signals.append(signum)

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> int:
        """Start the workers and supervise them until a signal stops them; the exit status."""
        # Private (0700, as mkdtemp makes it); a name taken is an error, never shared.
        self._tmp.mkdir(mode=0o700)
        # Everything inside the try: the scratch directory goes on every exit, a refused bind included.
        try:
            try:
                self.port = self._reserve()
            except OSError as exc:
                log.error("cannot bind %s: %s", self._listen_arg(), exc)
                return 2
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(signum, self._on_signal)
            for worker in self.workers:
                self._start(worker)
            if not self._wait_listening():
                # A stop asked for while starting is a stop by signal (exit 0, as for a single
                # `serve`, whose unit a `systemctl stop` must not leave failed), not a failed start.
                signalled = any(signum != signal.SIGHUP for signum in tuple(self._signals))
                if signalled:
                    log.info("stopping during start-up: SIGTERM to every worker")
                self._stop()
                return 0 if signalled else 2
            if self.port_file:
                from .serving import write_port_file

                write_port_file(self.port_file, self.port)
            log.info("%d workers listening on %s", len(self.workers), self._listen_arg())
            return self._supervise()
        finally:
            if self._socket is not None:
                self._socket.close()
            for path in self._tmp.glob("*"):
                path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self._tmp.rmdir()

    def _wait_listening(self) -> bool:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            # A SIGHUP waits in the queue: it is forwarded once every worker listens (a worker reads
            # the current file when it starts); any other signal stops the start.
            # tuple(): one C call. The handler (_on_signal) runs between any two bytecodes of this
            # thread, and appending while a generator walks the deque raised "deque mutated during
            # iteration", ending the supervisor in a SIGHUP storm at start-up.
            if any(signum != signal.SIGHUP for signum in tuple(self._signals)):
                return False
            if all(self._port_file(w).exists() for w in self.workers):
                return True
            dead = [w for w in self.workers if w.process is not None and w.process.poll() is not None]
            if dead:
                log.error("worker %d exited at start-up (status %s)", dead[0].index,
                          dead[0].process.returncode if dead[0].process else None)
                return False
            time.sleep(_POLL_S)
        log.error("the workers did not listen within %.0fs", _START_TIMEOUT_S)
        return False

    def _supervise(self) -> int:
        while True:
            while self._signals:
                signum = self._signals.popleft()
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: reloading every worker")
                    self._reload()
                else:
                    if not self.stopping:
                        log.info("stopping: SIGTERM to every worker")
                    self.stopping = True
                    self._send(signal.SIGTERM)
            if self.stopping:
                return self._finish()
            self._send_pending_reloads()
            now = time.monotonic()
            for worker in self.workers:
                process = worker.process
                if process is not None and process.poll() is not None \
                        and self._died(worker, process.returncode, now):
                    log.error("workers keep dying (%d deaths within %.0fs): stopping",
                              len(self.deaths), _DEATH_WINDOW_S)
                    self._stop()
                    return 1
                if worker.process is None and worker.restart_at is not None \
                        and now >= worker.restart_at:
                    self._start(worker)
            time.sleep(_POLL_S)

    def _died(self, worker: _Worker, status: int, now: float) -> bool:
        """Record an unexpected exit and schedule the restart; whether the deaths are too many."""
        worker.process = None
        self.deaths.append(now)
        while self.deaths and now - self.deaths[0] > _DEATH_WINDOW_S:
            self.deaths.popleft()
        if now - worker.started >= _HEALTHY_S:
            worker.backoff = _BACKOFF_S[0]
        log.warning("worker %d exited unexpectedly (status %s): restarting in %.1fs", worker.index,
                    status, worker.backoff)
        worker.restart_at = now + worker.backoff
        worker.backoff = min(_BACKOFF_S[1], worker.backoff * 2)
        return len(self.deaths) >= _MAX_DEATHS

    def _finish(self) -> int:
        """Wait for the workers to stop (a further signal is forwarded); kill what outlives the grace."""
        deadline = time.monotonic() + self.grace_s + _KILL_AFTER_S
        killed = False
        while any(w.process is not None and w.process.poll() is None for w in self.workers):
            while self._signals:
                if self._signals.popleft() != signal.SIGHUP:
                    self._send(signal.SIGTERM)
            if time.monotonic() > deadline:
                log.warning("stopping: killing workers still running after %.0fs", self.grace_s)
                self._send(signal.SIGKILL)
                killed = True
                break
            time.sleep(_POLL_S)
        for worker in self.workers:
            if worker.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.process.wait(5)
                status = worker.process.returncode
                # A graceful stop exits 0. Anything else (the OOM killer, a crash mid-drain) cut the
                # requests that worker held without their final record: say so, once per worker (the
                # workers this loop killed itself are already reported above).
                if status not in (0, None) and not killed:
                    log.warning("worker %d exited with status %s while stopping: the requests it "
                                "still held were cut", worker.index, status)
        log.info("stopped")
        return 0

    def _stop(self) -> None:
        self.stopping = True
        self._send(signal.SIGTERM)
        self._finish()
