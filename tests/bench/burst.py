"""`make bench-burst`: the seeded RAG-burst scenario against each target, side by side, with the seed SLOs.

Targets (each with its own emulated fleet, `gpu-8b` profile, Ollama defaults: one slot per model):
    T0  one emulated Ollama, reached directly
    T1  nginx round robin over two emulated Ollamas (Debian's nginx, buffering off)
    T2  the proxy in front of one emulated Ollama, backpressure with a plain FIFO
    T3  the proxy in front of one emulated Ollama, token-fair queuing with interactive/bulk lanes
and two reference runs of T3's configuration: on `rag-quiet` (the interactive traffic without the burst,
for the TTFT-under-burst ratio) and on `fair-pair` (two equal-weight tenants both over capacity).
All targets run at once from one driver:
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
from tests.support.servers import Server, free_port, start_emulator, start_proxy

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


Target = tuple[str, str, Callable[[], None], str]
"""(label, base URL, stop, scenario name)"""

PROXY_TENANTS = [
    {"name": "chat-team", "keys": ["sk-chat-team"], "lane": "interactive"},
    {"name": "ingest-team", "keys": ["sk-ingest-team"], "lane": "bulk"},
    {"name": "team-a", "keys": ["sk-team-a"]},
    {"name": "team-b", "keys": ["sk-team-b"]},
]


def _fleet(tmp: Path, name: str, count: int, profile: str, seed: int) -> list[Server]:
    return [start_emulator(tmp, fixed_clock=False, seed=seed + i, name=f"{name}-{i}",
                           extra=["--profile", profile]) for i in range(count)]


def _proxied(tmp: Path, name: str, profile: str, seed: int, fair: bool
             ) -> tuple[Server, list[Server]]:
    fleet = _fleet(tmp, name, 1, profile, seed)
    proxy = start_proxy(tmp, [s.url for s in fleet], {
        "tenants": PROXY_TENANTS, "telemetry": {"access_log": False},
        "chain": {"limits": {"max_prompt_tokens": 32768},
                  "backpressure": {"fair": fair}}}, name=f"{name}-proxy")
    return proxy, fleet


def _targets(tmp: Path, profile: str, seed: int, scenario_name: str
             ) -> tuple[list[Target], list[Server]]:
    servers: list[Server] = []
    t0 = _fleet(tmp, "t0", 1, profile, seed)
    servers += t0
    t1 = _fleet(tmp, "t1", 2, profile, seed)
    servers += t1
    nginx = Nginx([s.url for s in t1], tmp / "nginx")
    targets: list[Target] = [
        ("T0 direct", t0[0].url, lambda: None, scenario_name),
        ("T1 nginx rr", nginx.url, nginx.stop, scenario_name),
    ]
    for label, name, fair, runs in (("T2 proxy fifo", "t2", False, scenario_name),
                                    ("T3 proxy fair", "t3", True, scenario_name),
                                    ("T3 quiet", "t3q", True, "rag-quiet"),
                                    ("T3 fair-pair", "t3p", True, "fair-pair"),
                                    ("T2 fair-pair", "t2p", False, "fair-pair")):
        proxy, fleet = _proxied(tmp, name, profile, seed, fair)
        servers += [proxy, *fleet]
        targets.append((label, proxy.url, lambda: None, runs))
    return targets, servers


async def run(profile: str, seed: int, scenario_name: str) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="sop-burst-"))
    targets, servers = _targets(tmp, profile, seed, scenario_name)
    try:
        started = time.monotonic()
        results = await asyncio.gather(*(run_plan(url, plan(scenario(runs), seed))
                                         for _, url, _, runs in targets))
        wall = time.monotonic() - started
        report: dict[str, Any] = {"scenario": scenario_name, "seed": seed, "profile": profile,
                                  "requests": len(plan(scenario(scenario_name), seed)),
                                  "wall_s": wall, "targets": {}}
        for (label, _, _, runs), records in zip(targets, results, strict=True):
            report["targets"][label] = {**summarize(records, scenario(runs).duration_s),
                                        "scenario": runs}
        report["targets_met"] = _issue5_targets(report["targets"])
        report["upstream_stats"] = {s.log_path.stem: s.stats() for s in servers}
        return report
    finally:
        for _, _, stop, _ in targets:
            stop()
        for server in servers:
            server.stop()


def _issue5_targets(targets: dict[str, Any]) -> dict[str, Any]:
    """The backpressure issue's targets for T3, each with its measured value."""
    t0, t3 = targets["T0 direct"], targets["T3 proxy fair"]
    quiet = targets["T3 quiet"]["by_class"].get("chat", {}).get("ttft_p95_s")
    burst = t3["by_class"].get("chat", {}).get("ttft_p95_s")
    ratio = burst / quiet if burst is not None and quiet else None
    jain_pair = targets["T3 fair-pair"]["jain_tokens"]
    goodput = t3["overall"]["goodput_rps"] / t0["overall"]["goodput_rps"] \
        if t0["overall"]["goodput_rps"] else None
    return {
        "seed SLOs met": (all(t3["slo"].values()), t3["slo"]),
        "interactive TTFT p95 burst/quiet <= 2": (ratio is not None and ratio <= 2, ratio),
        "Jain (tokens) >= 0.95, equal-weight pair": (jain_pair is not None and jain_pair >= 0.95,
                                                     jain_pair),
        "goodput >= 95% of T0": (goodput is not None and goodput >= 0.95, goodput),
    }


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
        ("scenario", lambda s: s["scenario"]),
        ("Jain fairness", lambda s: s["jain_fairness"]),
        ("Jain (tokens)", lambda s: s["jain_tokens"]),
        ("SLO P95 < 45 s", lambda s: s["slo"]["p95_completion_lt_45s"]),
        ("SLO timeouts < 1%", lambda s: s["slo"]["timeouts_lt_1pct"]),
        ("SLO rejections < 5%", lambda s: s["slo"]["rejections_lt_5pct"]),
    ]
    print(f"scenario {report['scenario']} seed {report['seed']} profile {report['profile']}: "
          f"{report['requests']} requests, {report['wall_s']:.0f} s wall")
    print(f"{'':<26}" + "".join(f"{label:>16}" for label in labels))
    for name, get in rows:
        print(f"{name:<26}" + "".join(f"{_fmt(get(targets[label])):>16}" for label in labels))
    for name, (met, value) in report.get("targets_met", {}).items():
        print(f"T3 target {name}: {'MET' if met else 'MISSED'} ({_fmt(value)})")
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
