"""A restart command for the health tests, standing in for `systemctl restart ollama@{name}`: start an
emulated Ollama on a given port, detached from the caller, wait until it listens, print its pid, exit.

    python -m tests.support.respawn --port 11434 --log /tmp/emu.log --pidfile /tmp/emu.pid -- [emulate args]
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--pidfile", required=True)
    parser.add_argument("emulate", nargs="*", help="extra arguments of `proxy emulate`")
    args = parser.parse_args()
    with Path(args.log).open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "emulate", "--listen", f"127.0.0.1:{args.port}",
             *args.emulate], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    Path(args.pidfile).write_text(str(process.pid))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            print(f"emulator exited with {process.returncode}")
            return 1
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", args.port), 0.2):
            print(f"emulator pid {process.pid} listening on port {args.port}")
            return 0
        time.sleep(0.05)
    print("emulator did not start listening in time")
    return 1


if __name__ == "__main__":
    sys.exit(main())
