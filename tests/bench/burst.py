"""`make bench-burst`: the seeded RAG-burst scenario against each target, side by side, with the seed SLOs.

Targets (each with its own emulated fleet, `gpu-8b` profile, Ollama defaults: one slot per model):
    T0  one emulated Ollama, reached directly
    T1  nginx round robin over two emulated Ollamas (Debian's nginx, buffering off)
    T2  the proxy in front of one emulated Ollama, backpressure with a plain FIFO
    T3  the proxy in front of one emulated Ollama, token-fair queuing with interactive/bulk lanes
two reference runs of T3's configuration: on `rag-quiet` (the interactive traffic without the burst, for
the TTFT-under-burst ratio) and on `fair-pair` (two equal-weight tenants both over capacity); and the
two-model mix (`two-model`: two teams on two 8B models over two replicas that each fit one model at a
time) behind nginx round robin (T1 2-model) and the proxy (T3 2-model), counting model loads (the
replicas' own count, and the responses whose load_duration shows one).
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


Target = tuple[str, str, Callable[[], None], str, list[Server]]
"""(label, base URL, stop, scenario name, the emulated replicas behind it)"""

PROXY_TENANTS = [
    {"name": "chat-team", "keys": ["sk-chat-team"], "lane": "interactive"},
    {"name": "ingest-team", "keys": ["sk-ingest-team"], "lane": "bulk"},
    {"name": "team-a", "keys": ["sk-team-a"]},
    {"name": "team-b", "keys": ["sk-team-b"]},
]


def _fleet(tmp: Path, name: str, count: int, profile: str, seed: int,
           extra: tuple[str, ...] = ()) -> list[Server]:
    return [start_emulator(tmp, fixed_clock=False, seed=seed + i, name=f"{name}-{i}",
                           extra=["--profile", profile, *extra]) for i in range(count)]


def _proxied(tmp: Path, name: str, profile: str, seed: int, fair: bool, count: int = 1,
             extra: tuple[str, ...] = ()) -> tuple[Server, list[Server]]:
    fleet = _fleet(tmp, name, count, profile, seed, extra)
    # The scenarios ask for num_ctx 16384: the proxy's canonical options say the same, as a deployment
    # sized for its RAG prompts would (without them the proxy strips num_ctx, and Ollama would serve
    # truncated prompts faster than the other targets serve whole ones).
    canonical = {"options": {"num_ctx": 16384}}
    proxy = start_proxy(tmp, [{"url": s.url, "name": f"{name}-{i}"} for i, s in enumerate(fleet)], {
        "models": {"llama3.2": canonical, "qwen3": canonical},
        "tenants": PROXY_TENANTS, "telemetry": {"access_log": False},
        "chain": {"limits": {"max_prompt_tokens": 32768},
                  "backpressure": {"fair": fair}}}, name=f"{name}-proxy")
    return proxy, fleet


def _targets(tmp: Path, profile: str, seed: int, scenario_name: str, only: set[str] | None = None
             ) -> tuple[list[Target], list[Server]]:
    servers: list[Server] = []
    targets: list[Target] = []
    one_model = ("--max-loaded-models", "1")
    for label, name, count, runs, extra in (("T0 direct", "t0", 1, scenario_name, ()),
                                            ("T1 nginx rr", "t1", 2, scenario_name, ()),
                                            ("T1 2-model", "t1m", 2, "two-model", one_model)):
        if only is not None and label not in only:
            continue
        fleet = _fleet(tmp, name, count, profile, seed, extra)
        servers += fleet
        if count == 1:
            targets.append((label, fleet[0].url, lambda: None, runs, fleet))
        else:
            nginx = Nginx([s.url for s in fleet], tmp / f"nginx-{name}")
            targets.append((label, nginx.url, nginx.stop, runs, fleet))
    for label, name, fair, runs, count, extra in (
            ("T2 proxy fifo", "t2", False, scenario_name, 1, ()),
            ("T3 proxy fair", "t3", True, scenario_name, 1, ()),
            ("T3 quiet", "t3q", True, "rag-quiet", 1, ()),
            ("T3 fair-pair", "t3p", True, "fair-pair", 1, ()),
            ("T2 fair-pair", "t2p", False, "fair-pair", 1, ()),
            ("T3 2-model", "t3m", True, "two-model", 2, one_model)):
        if only is not None and label not in only:
            continue
        proxy, fleet = _proxied(tmp, name, profile, seed, fair, count, extra)
        servers += [proxy, *fleet]
        targets.append((label, proxy.url, lambda: None, runs, fleet))
    return targets, servers


async def run(profile: str, seed: int, scenario_name: str, only: set[str] | None = None
              ) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="sop-burst-"))
    targets, servers = _targets(tmp, profile, seed, scenario_name, only)
    try:
        started = time.monotonic()
        results = await asyncio.gather(*(run_plan(url, plan(scenario(runs), seed))
                                         for _, url, _, runs, _ in targets))
        wall = time.monotonic() - started
        report: dict[str, Any] = {"scenario": scenario_name, "seed": seed, "profile": profile,
                                  "requests": len(plan(scenario(scenario_name), seed)),
                                  "wall_s": wall, "targets": {}}
        for (label, _, _, runs, fleet), records in zip(targets, results, strict=True):
            report["targets"][label] = {**summarize(records, scenario(runs).duration_s),
                                        "scenario": runs,
                                        "model_loads": sum(s.stats()["loads"] for s in fleet)}
        report["targets_met"] = {**_issue5_targets(report["targets"]),
                                 **_issue6_targets(report["targets"])}
        report["upstream_stats"] = {s.log_path.stem: s.stats() for s in servers}
        return report
    finally:
        for _, _, stop, _, _ in targets:
            stop()
        for server in servers:
            server.stop()


def _issue5_targets(targets: dict[str, Any]) -> dict[str, Any]:
    """The backpressure issue's targets for T3, each with its measured value."""
    if not {"T0 direct", "T3 proxy fair", "T3 quiet", "T3 fair-pair"} <= set(targets):
        return {}
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


def _issue6_targets(targets: dict[str, Any]) -> dict[str, Any]:
    """The balancer issue's figures: model loads on the two-model mix, nginx round robin vs the proxy."""
    if not {"T1 2-model", "T3 2-model"} <= set(targets):
        return {}
    nginx, proxy = targets["T1 2-model"], targets["T3 2-model"]
    return {
        "2-model: fewer model loads than round robin": (
            proxy["model_loads"] < nginx["model_loads"],
            f"{proxy['model_loads']} vs {nginx['model_loads']}"),
        "2-model: seed SLOs met": (all(proxy["slo"].values()), proxy["slo"]),
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
        ("model loads (replicas)", lambda s: s["model_loads"]),
        ("cold loads seen by client", lambda s: s["overall"]["cold_loads"]),
        ("scenario", lambda s: s["scenario"]),
        ("Jain fairness", lambda s: s["jain_fairness"]),
        ("Jain (tokens)", lambda s: s["jain_tokens"]),
        ("SLO P95 < 45 s", lambda s: s["slo"]["p95_completion_lt_45s"]),
        ("SLO timeouts < 1%", lambda s: s["slo"]["timeouts_lt_1pct"]),
        ("SLO rejections < 5%", lambda s: s["slo"]["rejections_lt_5pct"]),
    ]
    print(f"scenario {report['scenario']} seed {report['seed']} profile {report['profile']}: "
          f"{report['requests']} requests, {report['wall_s']:.0f} s wall")
    print(f"{'':<26}" + "".join(f"{label:>15}" for label in labels))
    for name, get in rows:
        print(f"{name:<26}" + "".join(f"{_fmt(get(targets[label])):>15}" for label in labels))
    for name, (met, value) in report.get("targets_met", {}).items():
        print(f"target {name}: {'MET' if met else 'MISSED'} ({_fmt(value)})")
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
    parser.add_argument("--targets", help="comma-separated labels to run (default: all), "
                                          "e.g. 'T1 2-model,T3 2-model'")
    args = parser.parse_args()
    import uvloop

    only = {t.strip() for t in args.targets.split(",")} if args.targets else None
    report = uvloop.run(run(args.profile, args.seed, args.scenario, only))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
