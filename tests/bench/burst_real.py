"""`make bench-burst-real`: the burst comparison of `make bench-burst`, scaled down, on real tokens.

Four targets, the same seeded plan (interactive chats plus a bulk burst of RAG generations and embedding
batches), each with its own engine process:
    emu T0   the emulator (`cpu-small` profile, calibrated on the real engine), reached directly
    emu T3   the proxy (token-fair queue, interactive/bulk lanes, max_in_flight auto) in front of it
    real T0  llama.cpp (xllamacpp, Gemma 3 270M, 2 threads) behind the emulator's Ollama API, directly
    real T3  the proxy, configured as emu T3, in front of its own llama.cpp engine
Both engines run `--num-parallel 2` and the proxy declares it (max_in_flight `auto` starts there and
learns from Ollama's timings). The two emulated targets run at once (they sleep, they do not compute);
the real ones one after the other, after them, because llama.cpp computes on the machine's 2 cores.

The scenario (`rag-burst-small`, below) keeps rag-burst's shape at the real engine's scale: the RAG
contexts and the embedding batches of the seeded plan are cut to 1/16 of their size (a 64 KB context is
~10,000 Gemma tokens, an embedding batch of 64 chunks a minute of this CPU), answers are capped (chat 32
tokens, RAG 64) so that the emulator and llama.cpp produce the same lengths, and the client timeout is 60 s.
Every engine is warmed (one short generation and one embedding, sent to it directly) before its run, so no
target pays a first load.

Bounded: finite plan, 60 s client timeout, each run stops at its last arrival + 70 s whatever happens
(about 4-6 minutes in all). Loopback only. Results are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx

from proxy.loadgen.runner import Record, record_dict, run_plan
from proxy.loadgen.summary import summarize
from proxy.loadgen.workload import Burst, Planned, Scenario, Stream, Tenant, plan
from tests.support.servers import Server, start_emulator, start_proxy

MODEL = "gemma3:270m"
"""What the real engine serves (the bundled GGUF); the emulator is told to serve the same name."""
NUM_PARALLEL = 2
"""Slots of every engine (OLLAMA_NUM_PARALLEL), declared to the proxy as the replica's num_parallel."""
NUM_CTX = 4096
"""The context each slot has (the `cpu-small` profile's and the real engine's)."""
TIMEOUT_S = 60.0
"""Client timeout per request: rag-burst's 120 s halved with the scenario."""
CONTENDED_TOKENS_PER_S = 50.0
"""Below this probe decode rate (calibrated idle: 73 tok/s) a real run is flagged as CPU-contended."""
SCALE = 16
"""RAG contexts and embedding batches are cut to 1/SCALE of rag-burst's sizes."""

SMALL = Scenario(
    name="rag-burst-small", duration_s=45.0,
    tenants=(
        Tenant("chat-team", "sk-chat-team", "interactive",
               streams=(Stream("chat", 0.3, max_output_tokens=32),)),
        Tenant("ingest-team", "sk-ingest-team", "bulk",
               bursts=(Burst("rag", at_s=8.0, count=12, window_s=3.0, max_output_tokens=64),
                       Burst("embed", at_s=10.0, count=8, window_s=4.0))),
    ),
    chat_model=MODEL, embed_model=MODEL, num_ctx=NUM_CTX)
"""rag-burst, small: a steady chat stream (~1/4 of the engine when alone) and, from 8 s, a burst of
bulk work that keeps the engine busy for tens of seconds."""

ADMIN_KEY = "sk-bench-admin"
"""Reads /system/profile after a run: the slots the proxy learned."""
TENANTS = [
    {"name": "chat-team", "keys": ["sk-chat-team"], "lane": "interactive"},
    {"name": "ingest-team", "keys": ["sk-ingest-team"], "lane": "bulk"},
]

_QUESTION = "\n\nQuestion: "


def _cut_words(text: str, size: int) -> str:
    """The leading words of `text` within `size` bytes (at least one word)."""
    cut = text[:size]
    return cut.rsplit(" ", 1)[0] if " " in cut and len(text) > size else cut


def scaled(planned: Sequence[Planned], scale: int = SCALE) -> list[Planned]:
    """The plan with each RAG context and embedding batch cut to 1/scale (deterministic: same plan in,
    same plan out); chats, arrivals and everything else unchanged."""
    out: list[Planned] = []
    for item in planned:
        body = dict(item.body)
        size = item.context_bytes
        if item.kind == "rag":
            head, _, question = body["prompt"].partition(_QUESTION)
            preamble, _, context = head.partition("Context:\n")
            context = _cut_words(context, max(256, item.context_bytes // scale))
            body["prompt"] = f"{preamble}Context:\n{context}{_QUESTION}{question}"
            size = len(context)
        elif item.kind == "embed":
            inputs = list(body["input"])
            body["input"] = inputs[: max(1, len(inputs) // scale)]
            size = sum(len(text) for text in body["input"])
        out.append(attrs.evolve(item, body=body, context_bytes=size))
    return out


def small_plan(seed: int) -> list[Planned]:
    return scaled(plan(SMALL, seed))


def _engine(tmp: Path, name: str, seed: int, real: bool) -> Server:
    if real:
        from proxy.emulator.llamacpp import default_gguf

        extra = ["--engine", "llama.cpp", "--gguf", str(default_gguf())]
    else:
        extra = ["--profile", "cpu-small", "--models", MODEL]
    return start_emulator(tmp, fixed_clock=False, seed=seed, name=name,
                          extra=[*extra, "--num-parallel", str(NUM_PARALLEL)])


def _proxy(tmp: Path, name: str, engine: Server) -> Server:
    """The proxy as T3 of bench-burst: fair queue with lanes, max_in_flight auto, defaults otherwise."""
    return start_proxy(tmp, [{"url": engine.url, "name": f"{name}-engine", "num_parallel": NUM_PARALLEL}], {
        "models": {MODEL: {"options": {"num_ctx": NUM_CTX}}},
        "tenants": TENANTS, "admin": {"keys": [ADMIN_KEY]}, "telemetry": {"access_log": False},
        "chain": {"backpressure": {"fair": True, "max_in_flight": "auto"}}}, name=f"{name}-proxy")


def _warm(engine: Server) -> float:
    """One short embedding and one 32-token generation straight to the engine: the model is resident and
    llama.cpp's first-request costs are paid before the run. Returns the generation's decode rate
    (tokens/s), a probe of how much of the CPU the engine gets (calibrated: ~73 on an idle machine)."""
    httpx.post(f"{engine.url}/api/embed", timeout=120, json={
        "model": MODEL, "input": ["warm up"]}).raise_for_status()
    response = httpx.post(f"{engine.url}/api/generate", timeout=120, json={
        "model": MODEL, "prompt": "Warm up", "stream": False,
        "options": {"num_predict": 32, "num_ctx": NUM_CTX, "temperature": 0}})
    response.raise_for_status()
    final = response.json()
    return float(final["eval_count"] / (final["eval_duration"] / 1e9)) if final.get("eval_duration") \
        else 0.0


def _prompt_tokens(records: Sequence[Record]) -> dict[str, int]:
    """Prompt tokens the engine reported, per class (the work each target was given, as it counted it)."""
    totals: dict[str, int] = {}
    for record in records:
        if record.outcome == "ok":
            totals[record.kind] = totals.get(record.kind, 0) + (record.prompt_tokens or 0)
    return totals


def _learned_slots(proxy: Server) -> Any:
    """The proxy's slots per replica and model after the run (max_in_flight, how it was set, how often
    the engine queued a request internally)."""
    response = httpx.get(f"{proxy.url}/system/profile", timeout=10,
                         headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    response.raise_for_status()
    return response.json().get("slots")


def _summary(records: list[Record], engine: Server, proxy: Server | None, seconds: float,
             machine: dict[str, float]) -> dict[str, Any]:
    return {**summarize(records, SMALL.duration_s, TIMEOUT_S), "wall_s": seconds, "machine": machine,
            "prompt_tokens": _prompt_tokens(records), "engine_stats": engine.stats(),
            "proxy_slots": _learned_slots(proxy) if proxy is not None else None,
            "records": [record_dict(r) for r in records]}


async def _run_pair(tmp: Path, seed: int, real: bool, planned: list[Planned]) -> dict[str, Any]:
    """T0 and T3 on fresh engines: at once on the emulator, one after the other on llama.cpp."""
    kind = "real" if real else "emu"
    results: dict[str, Any] = {}

    async def one(label: str, proxied: bool) -> tuple[str, dict[str, Any]]:
        engine = await asyncio.to_thread(_engine, tmp, f"{kind}-{label.lower()}", seed, real)
        proxy: Server | None = None
        try:
            probe = await asyncio.to_thread(_warm, engine)
            if proxied:
                proxy = await asyncio.to_thread(_proxy, tmp, f"{kind}-{label.lower()}", engine)
            load_before = os.getloadavg()[0]
            started = time.monotonic()
            records = await run_plan((proxy or engine).url, planned, timeout_s=TIMEOUT_S)
            seconds = time.monotonic() - started
            machine = {"probe_decode_tokens_per_s": probe, "loadavg_1m_before": load_before,
                       "loadavg_1m_after": os.getloadavg()[0]}
            return f"{kind} {label}", await asyncio.to_thread(_summary, records, engine, proxy, seconds,
                                                              machine)
        finally:
            if proxy is not None:
                proxy.stop()
            engine.stop()

    if real:
        for label, proxied in (("T0", False), ("T3", True)):
            name, summary = await one(label, proxied)
            results[name] = summary
    else:
        for name, summary in await asyncio.gather(one("T0", False), one("T3", True)):
            results[name] = summary
    return results


def _chat(target: dict[str, Any], key: str) -> Any:
    return target["by_class"].get("chat", {}).get(key)


def _slots(target: dict[str, Any]) -> str | None:
    slots = target.get("proxy_slots")
    if not slots:
        return None
    return ",".join(f"{v['max_in_flight']} ({v['ollama_queued']})" for models in slots.values()
                    for v in models.values())


def _bulk_done(target: dict[str, Any]) -> int:
    return int(sum(target["by_class"].get(kind, {}).get("ok", 0) for kind in ("rag", "embed")))


CHECKS: list[tuple[str, Callable[[dict[str, Any], dict[str, Any]], bool | None]]] = [
    ("T3 cuts interactive TTFT p95", lambda t0, t3: _lt(_chat(t3, "ttft_p95_s"), _chat(t0, "ttft_p95_s"))),
    ("T3 cuts interactive completion p95",
     lambda t0, t3: _lt(_chat(t3, "completion_p95_s"), _chat(t0, "completion_p95_s"))),
    ("T3 timeouts <= T0", lambda t0, t3: t3["overall"]["timeout_pct"] <= t0["overall"]["timeout_pct"]),
    ("T3 rejects some bulk (queue budget)", lambda t0, t3: t3["overall"]["rejection_pct"] > 0),
    ("T3 completes >= 95% of T0's bulk", lambda t0, t3: _bulk_done(t3) >= 0.95 * _bulk_done(t0)),
    ("T3 overall completion p95 <= T0",
     lambda t0, t3: _lt(t3["overall"]["completion_p95_s"], t0["overall"]["completion_p95_s"], True)),
]
"""Directions of the conclusions: each is evaluated on the emulator and on llama.cpp, and compared."""


def _lt(a: float | None, b: float | None, or_equal: bool = False) -> bool | None:
    if a is None or b is None:
        return None
    return a <= b if or_equal else a < b


def conclusions(targets: dict[str, Any]) -> dict[str, dict[str, bool | None]]:
    out: dict[str, dict[str, bool | None]] = {}
    for name, check in CHECKS:
        verdicts: dict[str, bool | None] = {}
        for kind in ("emu", "real"):
            if f"{kind} T0" in targets and f"{kind} T3" in targets:
                verdicts[kind] = check(targets[f"{kind} T0"], targets[f"{kind} T3"])
        if len(verdicts) == 2:
            verdicts["same direction"] = verdicts["emu"] == verdicts["real"]
        out[name] = verdicts
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def print_table(report: dict[str, Any]) -> None:
    targets = report["targets"]
    labels = list(targets)
    rows: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
        ("requests", lambda s: s["overall"]["requests"]),
        ("completed (ok)", lambda s: s["overall"]["ok"]),
        ("chat TTFT p50 s", lambda s: _chat(s, "ttft_p50_s")),
        ("chat TTFT p95 s", lambda s: _chat(s, "ttft_p95_s")),
        ("chat completion p95 s", lambda s: _chat(s, "completion_p95_s")),
        ("rag completion p95 s", lambda s: s["by_class"].get("rag", {}).get("completion_p95_s")),
        ("embed completion p95 s", lambda s: s["by_class"].get("embed", {}).get("completion_p95_s")),
        ("completion p95 s", lambda s: s["overall"]["completion_p95_s"]),
        ("timeout %", lambda s: s["overall"]["timeout_pct"]),
        ("rejection %", lambda s: s["overall"]["rejection_pct"]),
        ("error %", lambda s: s["overall"]["error_pct"]),
        ("bulk completed", _bulk_done),
        ("chat prompt tokens", lambda s: s["prompt_tokens"].get("chat")),
        ("rag prompt tokens", lambda s: s["prompt_tokens"].get("rag")),
        ("embed prompt tokens", lambda s: s["prompt_tokens"].get("embed")),
        ("output tokens", lambda s: s["overall"]["output_tokens"]),
        ("run wall s", lambda s: s["wall_s"]),
        ("probe decode tok/s", lambda s: s["machine"]["probe_decode_tokens_per_s"]),
        ("loadavg before/after", lambda s: "{loadavg_1m_before:.1f}/{loadavg_1m_after:.1f}".format(
            **s["machine"])),
        ("slots learned (queued)", _slots),
        ("SLO P95 < 45 s", lambda s: s["slo"]["p95_completion_lt_45s"]),
        ("SLO timeouts < 1%", lambda s: s["slo"]["timeouts_lt_1pct"]),
        ("SLO rejections < 5%", lambda s: s["slo"]["rejections_lt_5pct"]),
    ]
    print(f"scenario {report['scenario']} seed {report['seed']}: {report['requests']} requests "
          f"({report['by_class']}), {NUM_PARALLEL} slots, {report['wall_s']:.0f} s wall")
    print(f"{'':<24}" + "".join(f"{label:>10}" for label in labels))
    for name, get in rows:
        print(f"{name:<24}" + "".join(f"{_fmt(get(targets[label])):>10}" for label in labels))
    for label in labels:
        probe = targets[label]["machine"]["probe_decode_tokens_per_s"]
        if label.startswith("real") and probe < CONTENDED_TOKENS_PER_S:
            print(f"WARNING {label}: the engine decoded {probe:.0f} tok/s before its run (idle: ~73): "
                  "other processes had the cores, its figures measure that contention")
    print(f"{'conclusion':<40}{'emulator':>10}{'llama.cpp':>10}{'agree':>8}")
    for name, verdicts in report["conclusions"].items():
        print(f"{name:<40}{_fmt(verdicts.get('emu')):>10}{_fmt(verdicts.get('real')):>10}"
              f"{_fmt(verdicts.get('same direction')):>8}")


async def run(seed: int, parts: set[str]) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="sop-burst-real-"))
    planned = small_plan(seed)
    by_class: dict[str, int] = {}
    for item in planned:
        by_class[item.kind] = by_class.get(item.kind, 0) + 1
    started = time.monotonic()
    targets: dict[str, Any] = {}
    for kind in ("emu", "real"):  # the emulated pair first: llama.cpp then has the cores to itself
        if kind in parts:
            targets.update(await _run_pair(tmp, seed, kind == "real", planned))
    return {"scenario": SMALL.name, "seed": seed, "requests": len(planned), "by_class": by_class,
            "num_parallel": NUM_PARALLEL, "timeout_s": TIMEOUT_S, "scale": SCALE,
            "wall_s": time.monotonic() - started, "targets": targets,
            "conclusions": conclusions(targets), "logs": str(tmp)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--parts", default="emu,real",
                        help="which pairs to run: emu (the cpu-small emulator), real (llama.cpp), or both")
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/burst_real.json"))
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"emu", "real"}:
        parser.error("--parts: emu, real or emu,real")
    report = asyncio.run(run(args.seed, parts))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
