"""`make calibrate`: measure the real engine (llama.cpp via xllamacpp, Gemma 3 270M, 2 threads) through the
emulator's Ollama API and print the `cpu-small` timing profile those measurements give.

Measured: ready time, prefill base (short prompt) and rate (long prompt), single-stream decode rate, the
aggregate decode rate with 2 and 4 concurrent streams (from which the plateau P of
`aggregate(n) = rate * P * n / (n + P - 1)` is solved), and the embedding rate. Bounded: a few dozen
requests on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from proxy.emulator.llamacpp import default_gguf
from tests.support.servers import start_emulator

WORDS = ("the model reads a long retrieved context about deployment incidents and quarterly revenue "
         "before it answers the question with a short summary of the relevant passages").split()


def _text(words: int, variant: int = 0) -> str:
    """Distinct from the first word on for each variant, so llama.cpp's prompt cache cannot help."""
    return " ".join(WORDS[(i * (variant + 3) + variant) % len(WORDS)] for i in range(words))


async def _generate(session: aiohttp.ClientSession, url: str, prompt: str, predict: int
                    ) -> dict[str, Any]:
    body = {"model": "gemma3:270m", "prompt": prompt, "stream": False,
            "options": {"num_predict": predict, "temperature": 0.7, "seed": 1}}
    async with session.post(f"{url}/api/generate", json=body) as response:
        return dict(await response.json())


def _plateau(n: int, ratio: float) -> float:
    """P solving n P / (n + P - 1) = ratio."""
    return (n - 1) * ratio / (n - ratio) if ratio < n else float("inf")


async def measure(url: str) -> dict[str, float]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        await _generate(session, url, "warm up", 8)
        short = [await _generate(session, url, "Hello there", 1) for _ in range(3)]
        prefill_base_s = statistics.median(r["prompt_eval_duration"] / 1e9 for r in short)
        long = [await _generate(session, url, f"Document {i}: " + _text(900, i), 1) for i in range(3)]
        prefill_rate = statistics.median(r["prompt_eval_count"] / (r["prompt_eval_duration"] / 1e9)
                                         for r in long)
        single = [await _generate(session, url, f"Story number {i}:", 64) for i in range(3)]
        decode_rate = statistics.median(r["eval_count"] / (r["eval_duration"] / 1e9) for r in single)
        aggregates: dict[int, float] = {}
        for n in (1, 2, 4):
            rates = []
            for attempt in range(2):
                start = time.monotonic()
                results = await asyncio.gather(*(_generate(session, url, f"Tale {n}-{attempt}-{i}:", 64)
                                                 for i in range(n)))
                rates.append(sum(r["eval_count"] for r in results) / (time.monotonic() - start))
            aggregates[n] = max(rates)
        chunks = [_text(150) + str(i) for i in range(16)]
        start = time.monotonic()
        async with session.post(f"{url}/api/embed", json={"model": "gemma3:270m",
                                                          "input": chunks}) as response:
            embedded = await response.json()
        embed_rate = embedded["prompt_eval_count"] / (time.monotonic() - start)
    # Wall-clock rates for 1, 2 and 4 concurrent requests are compared with each other (both include
    # the short prefill and HTTP), so the plateau is not biased by mixing decode-only and wall times.
    return {"prefill_base_s": prefill_base_s, "prefill_tokens_per_s": prefill_rate,
            "decode_tokens_per_s": decode_rate, "wall_rate_1": aggregates[1],
            "aggregate_2": aggregates[2], "aggregate_4": aggregates[4],
            "plateau_from_2": _plateau(2, aggregates[2] / aggregates[1]),
            "plateau_from_4": _plateau(4, aggregates[4] / aggregates[1]),
            "embed_tokens_per_s": embed_rate}


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="sop-calibrate-"))
    server = start_emulator(tmp, fixed_clock=False, models="gemma3:270m", name="calibrate",
                            extra=["--engine", "llama.cpp", "--gguf", str(default_gguf()),
                                   "--num-parallel", "4"])
    try:
        ready_s = server.stats()["backend_startup_s"]
        figures = asyncio.run(measure(server.url))
    finally:
        server.stop()
    figures["ready_s"] = ready_s
    for key, value in figures.items():
        print(f"{key:>24}: {value:.3f}")


if __name__ == "__main__":
    main()
