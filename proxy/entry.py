"""The process's entry point: SIGHUP is ignored before anything else is imported.

Why: `serve` reloads on SIGHUP once its handler is installed, but importing the proxy takes ~0.3 s and
Python's default for SIGHUP ends the process. A `systemctl reload` (or a supervisor forwarding a
reload) right after a start would otherwise kill the service, and systemd counts death by SIGHUP as a
clean exit, so nothing would restart it. Ignoring it until `serve` installs its handler loses nothing:
a process that has not read its configuration yet reads the current file.
"""

from __future__ import annotations

import signal

__all__ = ["main"]


def main() -> int:
    """Entry point of the `shared-ollama-proxy` console script and of `python -m proxy`."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from .cli import main as cli_main  # imported after the line above, which is the point

    return cli_main()
