"""A bursty tenant, with and without the helper: the same burst of jobs sent by the bare ollama client
and by the client with `RetryTransport`, each under its own tenant key with the same limits, one after
the other. Prints a table: the share of jobs that finish and their completion times.

    OLLAMA_HOST=http://proxy:11435 BARE_KEY=sk-a HELPER_KEY=sk-b JOBS=70 WORKERS=8 \\
        python examples/python/burst_compare.py
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import ollama
from shared_ollama_client import RetryPolicy, RetryTransport

MODEL = os.environ.get("MODEL", "llama3.2")
JOBS = int(os.environ.get("JOBS", "70"))
WORKERS = int(os.environ.get("WORKERS", "8"))


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered) + 0.5) - 1))]


def burst(client: ollama.Client) -> tuple[list[float], dict[str, int]]:
    """Completion times of the jobs that finished (seconds from the start of the burst) and the
    refusals of those that did not, by status."""
    started = time.monotonic()

    def job(i: int) -> float | int:
        try:
            client.generate(model=MODEL, prompt=f"job {i}", options={"num_predict": 16})
            return time.monotonic() - started
        except ollama.ResponseError as error:
            return error.status_code

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        results = list(pool.map(job, range(JOBS)))
    failures: dict[str, int] = {}
    for result in results:
        if isinstance(result, int):
            failures[str(result)] = failures.get(str(result), 0) + 1
    return [r for r in results if isinstance(r, float)], failures


def main() -> None:
    host = os.environ["OLLAMA_HOST"]
    rows = []
    for name, key, kwargs in (
            ("bare ollama.Client", os.environ["BARE_KEY"], {}),
            ("ollama.Client + RetryTransport", os.environ["HELPER_KEY"],
             {"transport": RetryTransport(policy=RetryPolicy(max_attempts=30, max_total_s=120))})):
        client = ollama.Client(host=host, headers={"Authorization": f"Bearer {key}"}, **kwargs)
        times, failures = burst(client)
        refused = ", ".join(f"{n} x {s}" for s, n in sorted(failures.items())) or "-"
        rows.append(f"| {name} | {len(times)}/{JOBS} ({100 * len(times) / JOBS:.0f} %) | "
                    f"{statistics.median(times) if times else float('nan'):.2f} s | "
                    f"{percentile(times, 0.95):.2f} s | {refused} |")
    print(f"{JOBS} jobs, {WORKERS} at a time, model {MODEL}; a burst allows more attempts than the "
          "default 5 (30, within 120 s)\n")
    print("| client | jobs finished | median time | P95 time | refused (status) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
