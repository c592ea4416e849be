"""`make bench-burst`: the seeded RAG-burst scenario against each target, side by side, with the seed SLOs.

Targets (each with its own emulated fleet, `gpu-8b` profile, Ollama defaults: one slot per model):
    T0  one emulated Ollama, reached directly
    T1  nginx round robin over two emulated Ollamas (Debian's nginx, buffering off)
Later issues add the proxy's configurations as further columns. All targets run at once from one driver:
the emulators sleep rather than compute, so they do not compete for the two cores in a way that matters.

Bounded: the plan is finite, every request has the 120 s client timeout, the run ends by itself.
Results are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from proxy.loadgen.runner import run_plan
from proxy.loadgen.scenarios import scenario
from proxy.loadgen.summary import summarize
from proxy.loadgen.workload import plan
from tests.support.servers import Server, free_port, start_emulator

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream ollama {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 64m;
        location / {{
            proxy_pass http://ollama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host localhost;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


class Nginx:
    """Debian's nginx as a round-robin reverse proxy in front of `upstreams`, on a free loopback port."""

    def __init__(self, upstreams: list[str], workdir: Path) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise RuntimeError("nginx is not installed: `apt-get install -y nginx` (make bench-burst "
                               "does it)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        servers = "\n".join(f"        server {u.removeprefix('http://')};" for u in upstreams)
        conf = workdir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=workdir, servers=servers, port=self.port))
        self.process = subprocess.Popen([binary, "-c", str(conf), "-p", str(workdir), "-e",
                                         str(workdir / "error.log")], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.url}/", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"nginx did not start: {(workdir / 'error.log').read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


Target = tuple[str, str, Callable[[], None]]


def _fleet(tmp: Path, name: str, count: int, profile: str, seed: int) -> list[Server]:
    return [start_emulator(tmp, fixed_clock=False, seed=seed + i, name=f"{name}-{i}",
                           extra=["--profile", profile]) for i in range(count)]


def _targets(tmp: Path, profile: str, seed: int) -> tuple[list[Target], list[Server]]:
    servers: list[Server] = []
    t0 = _fleet(tmp, "t0", 1, profile, seed)
    servers += t0
    t1 = _fleet(tmp, "t1", 2, profile, seed)
    servers += t1
    nginx = Nginx([s.url for s in t1], tmp / "nginx")
    targets: list[Target] = [
        ("T0 direct", t0[0].url, lambda: None),
        ("T1 nginx rr", nginx.url, nginx.stop),
    ]
    return targets, servers


async def run(profile: str, seed: int, scenario_name: str) -> dict[str, Any]:
    chosen = scenario(scenario_name)
    planned = plan(chosen, seed)
    tmp = Path(tempfile.mkdtemp(prefix="sop-burst-"))
    targets, servers = _targets(tmp, profile, seed)
    try:
        started = time.monotonic()
        results = await asyncio.gather(*(run_plan(url, planned) for _, url, _ in targets))
        wall = time.monotonic() - started
        report: dict[str, Any] = {"scenario": scenario_name, "seed": seed, "profile": profile,
                                  "requests": len(planned), "wall_s": wall, "targets": {}}
        for (label, _, _), records in zip(targets, results, strict=True):
            report["targets"][label] = summarize(records, chosen.duration_s)
        report["upstream_stats"] = {s.log_path.stem: s.stats() for s in servers}
        return report
    finally:
        for _, _, stop in targets:
            stop()
        for server in servers:
            server.stop()


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "PASS" if value else "FAIL"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def print_table(report: dict[str, Any]) -> None:
    targets = report["targets"]
    labels = list(targets)
    rows: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
        ("requests", lambda s: s["overall"]["requests"]),
        ("ok", lambda s: s["overall"]["ok"]),
        ("chat TTFT p50 s", lambda s: s["by_class"].get("chat", {}).get("ttft_p50_s")),
        ("chat TTFT p95 s", lambda s: s["by_class"].get("chat", {}).get("ttft_p95_s")),
        ("chat completion p95 s", lambda s: s["by_class"].get("chat", {}).get("completion_p95_s")),
        ("rag completion p95 s", lambda s: s["by_class"].get("rag", {}).get("completion_p95_s")),
        ("embed completion p95 s", lambda s: s["by_class"].get("embed", {}).get("completion_p95_s")),
        ("completion p50 s", lambda s: s["overall"]["completion_p50_s"]),
        ("completion p95 s", lambda s: s["overall"]["completion_p95_s"]),
        ("completion p99 s", lambda s: s["overall"]["completion_p99_s"]),
        ("timeout %", lambda s: s["overall"]["timeout_pct"]),
        ("rejection %", lambda s: s["overall"]["rejection_pct"]),
        ("error %", lambda s: s["overall"]["error_pct"]),
        ("goodput req/s", lambda s: s["overall"]["goodput_rps"]),
        ("Jain fairness", lambda s: s["jain_fairness"]),
        ("SLO P95 < 45 s", lambda s: s["slo"]["p95_completion_lt_45s"]),
        ("SLO timeouts < 1%", lambda s: s["slo"]["timeouts_lt_1pct"]),
        ("SLO rejections < 5%", lambda s: s["slo"]["rejections_lt_5pct"]),
    ]
    print(f"scenario {report['scenario']} seed {report['seed']} profile {report['profile']}: "
          f"{report['requests']} requests, {report['wall_s']:.0f} s wall")
    print(f"{'':<26}" + "".join(f"{label:>16}" for label in labels))
    for name, get in rows:
        print(f"{name:<26}" + "".join(f"{_fmt(get(targets[label])):>16}" for label in labels))
    for label in labels:
        tenants = targets[label]["by_tenant"]
        print(f"{label}: " + "; ".join(
            f"{t} p95 {_fmt(g['completion_p95_s'])} s, timeouts {_fmt(g['timeout_pct'])}%"
            for t, g in tenants.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="gpu-8b")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scenario", default="rag-burst")
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/burst.json"))
    args = parser.parse_args()
    import uvloop

    report = uvloop.run(run(args.profile, args.seed, args.scenario))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
