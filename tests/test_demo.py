"""`shared-ollama-proxy demo` (what `make demo` runs, the README's quick start): two emulated replicas
and the proxy in one process, a first chat printed, then instructions that work as printed."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support.tools import ROOT


def test_demo_on_free_ports_prints_instructions_that_work(tmp_path: Path) -> None:
    """Port 0 (for the proxy and the replicas) is any free port, and the printed addresses are the
    bound ones (it used to print, and send its first chat to, port 0, and die with a traceback)."""
    log = (tmp_path / "demo.out").open("w+")
    demo = subprocess.Popen([sys.executable, "-m", "proxy", "demo", "--listen", "127.0.0.1:0",
                             "--replica-ports", "0,0", "--decode-tokens-per-s", "0"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        text = ""
        while "Ctrl-C stops it." not in text:
            assert demo.poll() is None and time.monotonic() < deadline, text
            time.sleep(0.1)
            text = (tmp_path / "demo.out").read_text()
        base = re.search(r"export OLLAMA_HOST=(http://127\.0\.0\.1:(\d+))", text)
        assert base is not None and base.group(2) != "0", text
        assert "A first chat went through the proxy: '" in text
        replicas = re.findall(r"http://127\.0\.0\.1:(\d+)", text.split("replicas", 1)[1].split("\n")[0])
        assert len(replicas) == 2 and "0" not in replicas, text
        for port in replicas:  # the replicas are real emulated Ollama daemons on the ports printed
            assert httpx.get(f"http://127.0.0.1:{port}/api/version", timeout=5).status_code == 200
        # The printed python line, as printed, with the printed OLLAMA_HOST.
        line = next(x.strip() for x in text.splitlines() if x.strip().startswith("python -c"))
        env = {**os.environ, "OLLAMA_HOST": base.group(1)}
        env.pop("OLLAMA_API_KEY", None)
        argv = shlex.split(line)
        done = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 0 and "done=True" in done.stdout, done.stderr[-2000:]
        # The printed curl lines (as httpx requests: the same method, URL and body).
        for curl in (x.strip() for x in text.splitlines() if x.strip().startswith("curl")):
            words = shlex.split(curl.split("#")[0])
            url = next(w for w in words if w.startswith("http://"))
            body = words[words.index("-d") + 1] if "-d" in words else None
            response = (httpx.post(url, content=body, timeout=30) if body is not None
                        else httpx.get(url, timeout=30))
            assert response.status_code == 200, (curl, response.text[:300])
    finally:
        demo.send_signal(signal.SIGINT)  # Ctrl-C stops it
        try:
            assert demo.wait(15) == 0
        finally:
            if demo.poll() is None:
                demo.kill()
                demo.wait(5)
            log.close()
