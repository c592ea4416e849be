"""`make bench-burst-real`: the burst comparison of `make bench-burst`, scaled down, on real tokens.

Three pairs of targets, T0 (the engine reached directly) and T3 (the proxy: token-fair queue,
interactive/bulk lanes, max_in_flight `auto`, its defaults otherwise, in front of the engine), all given the
same seeded plan (interactive chats plus a bulk burst of RAG generations and embedding batches), each
target with its own engine process:
    emu    the emulator with the shipped `cpu-small` profile (calibrated on the real engine, elsewhere)
    real   llama.cpp (xllamacpp, Gemma 3 270M, 2 threads) behind the emulator's Ollama API; here also
           T3=2, the proxy with max_in_flight fixed at the engine's 2 slots instead of learning them
    rcal   the emulator with `cpu-small` recalibrated on this host during this run (from the real
           engines' probes, converted into the emulator's own token counts): is a gap between emu and
           real the timing model's fault or a stale calibration's?
Every engine runs `--num-parallel 2` and the proxy declares it (max_in_flight `auto` starts there and
learns from Ollama's timings). The emulated targets of a pair run at once (they sleep, they do not
compute); the real ones one after the other, between the two emulated pairs, because llama.cpp computes on
the machine's 2 cores.

The scenario (`rag-burst-small`, below) keeps rag-burst's shape at the real engine's scale: the RAG
contexts and the embedding batches of the seeded plan are cut to 1/16 of their size (a 64 KB context is
~10,000 Gemma tokens, an embedding batch of 64 chunks a minute of this CPU), answers are capped (chat 32
tokens, RAG 64) so that the engines produce similar lengths, and the client timeout is 60 s.

A real engine starts once other processes leave the cores mostly idle (waiting at most 30 s; what
they used is reported). Before its run every engine is warmed and probed with requests sent to it directly
(a few seconds; the model is resident and no target pays a first load): prefill, decode and embedding
rates, the aggregate rate of 2 concurrent streams, and how long those 2 waited outside their prompt and
eval times (what the proxy reads as queueing inside Ollama).

Bounded: finite plan, 60 s client timeout, each run stops at its last arrival + 70 s whatever happens
(about 5-6 minutes in all). Loopback only. Results are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx
import yaml

from proxy.emulator.profile import PROFILES_DIR
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
SCALE = 16
"""RAG contexts and embedding batches are cut to 1/SCALE of rag-burst's sizes."""
ADMIN_KEY = "sk-bench-admin"
"""Reads /system/profile after a run: the slots the proxy learned."""

SMALL = Scenario(
    name="rag-burst-small", duration_s=45.0,
    tenants=(
        Tenant("chat-team", "sk-chat-team", "interactive",
               streams=(Stream("chat", 0.3, max_output_tokens=32),)),
        Tenant("ingest-team", "sk-ingest-team", "bulk",
               bursts=(Burst("rag", at_s=8.0, count=12, window_s=3.0, max_output_tokens=64),
                       Burst("embed", at_s=10.0, count=8, window_s=4.0))),
    ),
    # Drawn at rag-burst's sizes and then scaled down (`scaled`): the context cap would cut the drawn
    # prompts before the scaling does.
    chat_model=MODEL, embed_model=MODEL, num_ctx=NUM_CTX, fit_prompts=False)
"""rag-burst, small: a steady chat stream (a fifth of the engine when alone) and, from 8 s, a burst of
bulk work that keeps the engine busy for tens of seconds."""

TENANTS = [
    {"name": "chat-team", "keys": ["sk-chat-team"], "lane": "interactive"},
    {"name": "ingest-team", "keys": ["sk-ingest-team"], "lane": "bulk"},
]
KINDS = ("emu", "real", "rcal")

_QUESTION = "\n\nQuestion: "


# the plan ------------------------------------------------------------------------------------------------
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


def probe_texts(seed: int) -> tuple[str, list[str]]:
    """A ~2 KB prompt and 4 embedding chunks in the scenario's words that no request of the scaled plan
    starts with (llama.cpp's prompt cache cannot carry the probe into the run): a RAG context with another
    preamble, and the tail of an embedding batch (the scaled plan keeps the head of each batch)."""
    full = plan(SMALL, seed)
    rag = next(item for item in full if item.kind == "rag")
    context = rag.body["prompt"].partition("Context:\n")[2]
    embed = next(item for item in full if item.kind == "embed")
    return "Probe notes: " + _cut_words(context, 2048), list(embed.body["input"][-4:])


# engines and the proxy -------------------------------------------------------------------------------------
def _engine(tmp: Path, name: str, seed: int, profile: str | None) -> Server:
    """llama.cpp behind the emulator's Ollama API (profile None), or the emulator with `profile`."""
    if profile is None:
        from proxy.emulator.llamacpp import default_gguf

        extra = ["--engine", "llama.cpp", "--gguf", str(default_gguf())]
    else:
        extra = ["--profile", profile, "--models", MODEL]
    return start_emulator(tmp, fixed_clock=False, seed=seed, name=name,
                          extra=[*extra, "--num-parallel", str(NUM_PARALLEL)])


def _proxy(tmp: Path, name: str, engine: Server, max_in_flight: int | str = "auto") -> Server:
    """The proxy as T3 of bench-burst: fair queue with lanes, max_in_flight auto (or fixed), its
    defaults otherwise."""
    upstream = {"url": engine.url, "name": f"{name}-engine", "num_parallel": NUM_PARALLEL}
    return start_proxy(tmp, [upstream], {
        "models": {MODEL: {"options": {"num_ctx": NUM_CTX}}},
        "tenants": TENANTS, "admin": {"keys": [ADMIN_KEY]}, "telemetry": {"access_log": False},
        "chain": {"backpressure": {"fair": True, "max_in_flight": max_in_flight}}}, name=f"{name}-proxy")


def _outside_s(final: dict[str, Any]) -> float:
    """total_duration minus load, prompt and eval: what the proxy reads as time queued inside Ollama."""
    spent = sum(int(final.get(k) or 0) for k in ("load_duration", "prompt_eval_duration", "eval_duration"))
    return max(0, int(final["total_duration"]) - spent) / 1e9


async def probe(url: str, texts: tuple[str, list[str]]) -> dict[str, float]:
    """Warm the engine (model resident, first-request costs paid), then measure it as `make calibrate`
    does, in a few seconds: prefill rate (a ~2 KB prompt), single-stream decode rate, wall-clock rate of
    1 and of 2 concurrent 64-token generations (their ratio gives the concurrency plateau), the time
    those 2 spent outside prompt and eval, and the embedding rate (4 chunks). Token counts are the
    engine's own: llama.cpp's Gemma tokenizer, or the emulator's vocabulary."""
    prompt, chunks = texts
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def generate(text: str, predict: int) -> dict[str, Any]:
            response = await client.post("/api/generate", json={
                "model": MODEL, "prompt": text, "stream": False,
                "options": {"num_predict": predict, "num_ctx": NUM_CTX, "temperature": 0.7, "seed": 1}})
            response.raise_for_status()
            return dict(response.json())

        (await client.post("/api/embed", json={"model": MODEL, "input": ["warm up"]})).raise_for_status()
        await generate("Warm up", 4)
        long = await generate(prompt, 64)
        started = time.monotonic()
        single = await generate("Tale 0:", 64)
        wall_1 = single["eval_count"] / (time.monotonic() - started)
        started = time.monotonic()
        pair = await asyncio.gather(generate("Tale 1:", 64), generate("Tale 2:", 64))
        wall_2 = sum(r["eval_count"] for r in pair) / (time.monotonic() - started)
        started = time.monotonic()
        response = await client.post("/api/embed", json={"model": MODEL, "input": chunks})
        response.raise_for_status()
        embedded = response.json()
        embed_s = time.monotonic() - started
    ratio = wall_2 / wall_1
    return {
        "prompt_tokens": float(long["prompt_eval_count"]),
        "prefill_tokens_per_s": long["prompt_eval_count"] / (long["prompt_eval_duration"] / 1e9),
        "decode_tokens_per_s": statistics.fmean(  # single streams only
            r["eval_count"] / (r["eval_duration"] / 1e9) for r in (long, single)),
        "wall_rate_1": wall_1, "wall_rate_2": wall_2, "ratio_2": ratio,
        "plateau": (ratio / (2 - ratio)) if ratio < 2 else 4.0,
        "outside_2_ms": 1000 * max(_outside_s(r) for r in pair),
        "embed_tokens": float(embedded["prompt_eval_count"]),
        "embed_tokens_per_s": embedded["prompt_eval_count"] / embed_s,
    }


def recalibrated(tmp: Path, emu: list[dict[str, float]], real: list[dict[str, float]]) -> Path:
    """`cpu-small` with the best rates the real engines showed in this run (the plateau of the probe
    with the fastest single stream), in the emulator's token units
    (the emulator counts the same text in more tokens than Gemma's tokenizer: a rate in Gemma tokens
    would make its prompts too slow), the plateau of 2 concurrent streams, and answers that run to
    num_predict (the base model seldom stops). Prefill base, context and the rest stay."""
    def mean(probes: list[dict[str, float]], key: str) -> float:
        return statistics.fmean(p[key] for p in probes)

    def best(key: str) -> float:  # other processes only ever slow an engine down
        return max(p[key] for p in real)

    shipped = yaml.safe_load((PROFILES_DIR / "cpu-small.yaml").read_text(encoding="utf-8"))
    prompt_ratio = mean(emu, "prompt_tokens") / mean(real, "prompt_tokens")
    embed_ratio = mean(emu, "embed_tokens") / mean(real, "embed_tokens")
    fastest = max(real, key=lambda p: p["wall_rate_1"])
    defaults = {**shipped["defaults"],
                "prefill_tokens_per_s": round(best("prefill_tokens_per_s") * prompt_ratio, 1),
                "decode_tokens_per_s": round(best("decode_tokens_per_s"), 1),
                "embed_tokens_per_s": round(best("embed_tokens_per_s") * embed_ratio, 1),
                "concurrency_plateau": round(min(4.0, max(1.0, fastest["plateau"])), 2),
                "output_tokens": [64, 128]}
    path = tmp / "cpu-small-here.yaml"
    path.write_text(yaml.safe_dump({
        "name": "cpu-small-here",
        "source": f"cpu-small recalibrated by tests/bench/burst_real.py from {len(real)} real-engine "
                  f"probes; emulator/Gemma token ratio {prompt_ratio:.2f} (prompts), "
                  f"{embed_ratio:.2f} (embeddings)",
        "defaults": defaults}))
    return path


# runs --------------------------------------------------------------------------------------------------
QUIET_CPU = 0.25
"""Share of the 2 cores others may use before a real engine starts (the machine is shared)."""
QUIET_WAIT_S = 30.0
"""How long to wait for that, at most; the run then goes ahead and the share is in its report."""


def _cpu_busy(window_s: float = 2.0) -> float | None:
    """Share of all cores busy over `window_s` (None where /proc/stat cannot be read)."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields) - idle, sum(fields)

    try:
        busy_0, total_0 = sample()
        time.sleep(window_s)
        busy_1, total_1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (busy_1 - busy_0) / max(1, total_1 - total_0)


def await_quiet() -> dict[str, float | None]:
    """Before a real engine starts: wait (bounded) until other processes leave the cores mostly idle."""
    started = time.monotonic()
    busy = _cpu_busy()
    while busy is not None and busy > QUIET_CPU and time.monotonic() - started < QUIET_WAIT_S:
        busy = _cpu_busy()
    return {"others_cpu_busy": busy, "waited_s": time.monotonic() - started}


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
             machine: dict[str, Any]) -> dict[str, Any]:
    return {**summarize(records, SMALL.duration_s, TIMEOUT_S), "wall_s": seconds, "machine": machine,
            "prompt_tokens": _prompt_tokens(records), "engine_stats": engine.stats(),
            "proxy_slots": _learned_slots(proxy) if proxy is not None else None,
            "records": [record_dict(r) for r in records]}


Variant = tuple[str, int | str | None]
"""A target's label and its proxy's max_in_flight (None: no proxy, the engine reached directly)."""
PAIR: list[Variant] = [("T0", None), ("T3", "auto")]
REAL: list[Variant] = [*PAIR, ("T3=2", NUM_PARALLEL)]
"""On llama.cpp also T3 with max_in_flight fixed at the engine's real parallelism: what `auto` learns
there is a finding of its own (see the report)."""


async def _run_pair(tmp: Path, seed: int, kind: str, profile: str | None, planned: list[Planned],
                    texts: tuple[str, list[str]]) -> dict[str, Any]:
    """T0 and T3 on fresh engines: at once on the emulator, one after the other on llama.cpp."""

    async def one(label: str, max_in_flight: int | str | None) -> tuple[str, dict[str, Any]]:
        name = f"{kind}-{label.lower().replace('=', '-')}"
        quiet = await asyncio.to_thread(await_quiet) if profile is None else {}
        engine = await asyncio.to_thread(_engine, tmp, name, seed, profile)
        proxy: Server | None = None
        try:
            probed = await probe(engine.url, texts)
            if max_in_flight is not None:
                proxy = await asyncio.to_thread(_proxy, tmp, name, engine, max_in_flight)
            load_before = os.getloadavg()[0]
            started = time.monotonic()
            records = await run_plan((proxy or engine).url, planned, timeout_s=TIMEOUT_S)
            seconds = time.monotonic() - started
            machine = {"probe": probed, "profile": profile or "llama.cpp", **quiet,
                       "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0]}
            summary = await asyncio.to_thread(_summary, records, engine, proxy, seconds, machine)
            return f"{kind} {label}", {**summary, "max_in_flight": max_in_flight}
        finally:
            if proxy is not None:
                proxy.stop()
            engine.stop()

    if profile is None:
        return dict([await one(label, limit) for label, limit in REAL])
    return dict(await asyncio.gather(*(one(label, limit) for label, limit in PAIR)))


# the verdicts ----------------------------------------------------------------------------------------
def _chat(target: dict[str, Any], key: str) -> Any:
    return target["by_class"].get("chat", {}).get(key)


def _bulk_done(target: dict[str, Any]) -> int:
    return int(sum(target["by_class"].get(kind, {}).get("ok", 0) for kind in ("rag", "embed")))


def _lt(a: float | None, b: float | None, or_equal: bool = False) -> bool | None:
    if a is None or b is None:
        return None
    return a <= b if or_equal else a < b


CHECKS: list[tuple[str, Callable[[dict[str, Any], dict[str, Any]], bool | None]]] = [
    ("T3 cuts interactive TTFT p95", lambda t0, t3: _lt(_chat(t3, "ttft_p95_s"), _chat(t0, "ttft_p95_s"))),
    ("T3 cuts interactive completion p95",
     lambda t0, t3: _lt(_chat(t3, "completion_p95_s"), _chat(t0, "completion_p95_s"))),
    ("T3 timeouts <= T0", lambda t0, t3: t3["overall"]["timeout_pct"] <= t0["overall"]["timeout_pct"]),
    ("T3 rejects no request", lambda t0, t3: t3["overall"]["rejection_pct"] == 0),
    ("T3 completes >= 95% of T0's bulk", lambda t0, t3: _bulk_done(t3) >= 0.95 * _bulk_done(t0)),
    ("T3 overall completion p95 <= T0",
     lambda t0, t3: _lt(t3["overall"]["completion_p95_s"], t0["overall"]["completion_p95_s"], True)),
    ("T3 meets the seed SLOs", lambda t0, t3: all(t3["slo"].values())),
]
"""Directions of the conclusions: each is evaluated per pair (T0 vs T3 of one engine kind)."""


COMPARED = [("emu", "emu T0", "emu T3"), ("real", "real T0", "real T3"),
            ("real T3=2", "real T0", "real T3=2"), ("rcal", "rcal T0", "rcal T3")]
"""(column, T0 target, T3 target) of the conclusions table."""


def conclusions(targets: dict[str, Any]) -> dict[str, dict[str, bool | None]]:
    """Per check: its verdict on each pair that ran, and whether the emulated pairs agree with llama.cpp."""
    out: dict[str, dict[str, bool | None]] = {}
    for name, check in CHECKS:
        verdicts: dict[str, bool | None] = {}
        for column, t0, t3 in COMPARED:
            if t0 in targets and t3 in targets:
                verdicts[column] = check(targets[t0], targets[t3])
        for kind in ("emu", "rcal"):
            if kind in verdicts and "real" in verdicts:
                verdicts[f"{kind} = real"] = verdicts[kind] == verdicts["real"]
        out[name] = verdicts
    return out


# the report ------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _slots(target: dict[str, Any]) -> str | None:
    slots = target.get("proxy_slots")
    if not slots:
        return None
    return ",".join(f"{v['max_in_flight']} ({v['ollama_queued']})" for models in slots.values()
                    for v in models.values())


def _probe(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda s: s["machine"]["probe"][key]


ROWS: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
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
    ("slots learned (queued)", _slots),
    ("probe prefill tok/s", _probe("prefill_tokens_per_s")),
    ("probe decode tok/s", _probe("decode_tokens_per_s")),
    ("probe embed tok/s", _probe("embed_tokens_per_s")),
    ("probe 2 streams / 1", _probe("ratio_2")),
    ("probe 2: outside ms", _probe("outside_2_ms")),
    ("others' CPU at start", lambda s: s["machine"].get("others_cpu_busy")),
    ("loadavg before/after", lambda s: "{loadavg_1m_before:.1f}/{loadavg_1m_after:.1f}".format(
        **s["machine"])),
    ("SLO P95 < 45 s", lambda s: s["slo"]["p95_completion_lt_45s"]),
    ("SLO timeouts < 1%", lambda s: s["slo"]["timeouts_lt_1pct"]),
    ("SLO rejections < 5%", lambda s: s["slo"]["rejections_lt_5pct"]),
]


def print_table(report: dict[str, Any]) -> None:
    targets = report["targets"]
    labels = list(targets)
    print(f"scenario {report['scenario']} seed {report['seed']}: {report['requests']} requests "
          f"({report['by_class']}), {NUM_PARALLEL} slots, {report['wall_s']:.0f} s wall")
    print(f"{'':<24}" + "".join(f"{label:>11}" for label in labels))
    for name, get in ROWS:
        print(f"{name:<24}" + "".join(f"{_fmt(get(targets[label])):>11}" for label in labels))
    real = [targets[label]["machine"]["probe"]["decode_tokens_per_s"] for label in labels
            if label.startswith("real")]
    for label in labels:
        rate = targets[label]["machine"]["probe"]["decode_tokens_per_s"]
        if label.startswith("real") and rate < 0.8 * max(real):
            print(f"WARNING {label}: its engine decoded {rate:.0f} tok/s before the run, the other "
                  f"{max(real):.0f}: other processes had the cores, its figures measure that too")
    if report.get("recalibrated"):
        print(f"rcal profile: {report['recalibrated']}")
    columns = [k for k in (*(c for c, _, _ in COMPARED), "emu = real", "rcal = real")
               if any(k in v for v in report["conclusions"].values())]
    print(f"{'conclusion (T3 vs T0)':<36}" + "".join(f"{c:>12}" for c in columns))
    for name, verdicts in report["conclusions"].items():
        print(f"{name:<36}" + "".join(f"{_fmt(verdicts.get(c)):>12}" for c in columns))


async def run(seed: int, parts: set[str]) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="sop-burst-real-"))
    planned = scaled(plan(SMALL, seed))
    texts = probe_texts(seed)
    by_class: dict[str, int] = {}
    for item in planned:
        by_class[item.kind] = by_class.get(item.kind, 0) + 1
    started = time.monotonic()
    targets: dict[str, Any] = {}
    recal: dict[str, Any] | None = None
    # The emulated pairs before and after llama.cpp's: it has the cores to itself.
    if "emu" in parts:
        targets.update(await _run_pair(tmp, seed, "emu", "cpu-small", planned, texts))
    if "real" in parts:
        targets.update(await _run_pair(tmp, seed, "real", None, planned, texts))
    if "rcal" in parts:
        probes = {kind: [t["machine"]["probe"] for label, t in targets.items() if label.startswith(kind)]
                  for kind in ("emu", "real")}
        path = recalibrated(tmp, probes["emu"], probes["real"])
        recal = yaml.safe_load(path.read_text())["defaults"]
        targets.update(await _run_pair(tmp, seed, "rcal", str(path), planned, texts))
    return {"scenario": SMALL.name, "seed": seed, "requests": len(planned), "by_class": by_class,
            "num_parallel": NUM_PARALLEL, "timeout_s": TIMEOUT_S, "scale": SCALE,
            "wall_s": time.monotonic() - started, "recalibrated": recal, "targets": targets,
            "conclusions": conclusions(targets), "logs": str(tmp)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--parts", default="emu,real,rcal",
                        help="pairs to run: emu (shipped cpu-small), real (llama.cpp), rcal (cpu-small "
                             "recalibrated from real's probes: needs emu and real)")
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/burst_real.json"))
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - set(KINDS) or ("rcal" in parts and not {"emu", "real"} <= parts):
        parser.error("--parts: any of emu, real; rcal only with both")
    report = asyncio.run(run(args.seed, parts))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
