"""A burst bigger than the tenant's rate: every job still finishes, because the transport waits as long
as each 429/503 says (Retry-After / retry-after-ms) and then sends the same request again.

    OLLAMA_HOST=http://proxy:11435 OLLAMA_API_KEY=sk-... JOBS=70 python examples/python/retry_after.py

Each wait is logged at INFO by the "shared_ollama_client" logger (method, path, wait, status; never the
body or the key).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import ollama
from shared_ollama_client import RetryPolicy, RetryTransport

MODEL = os.environ.get("MODEL", "llama3.2")
JOBS = int(os.environ.get("JOBS", "70"))


class Waits(logging.Handler):
    """Counts the transport's wait log lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def main() -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    waits = Waits()
    logger = logging.getLogger("shared_ollama_client")
    logger.setLevel(logging.INFO)
    logger.addHandler(waits)
    # One client shared by the workers; allow more attempts than the default for a long burst, within
    # two minutes in all per request.
    client = ollama.Client(transport=RetryTransport(policy=RetryPolicy(max_attempts=10, max_total_s=120)))

    def job(i: int) -> bool:
        try:
            client.generate(model=MODEL, prompt=f"Job {i}: say hello", options={"num_predict": 8})
            return True
        except ollama.ResponseError as error:  # the service's own message and status
            print(f"job {i} failed: {error.status_code} {error.error}", file=sys.stderr)
            return False

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        done = sum(pool.map(job, range(JOBS)))
    print(f"finished {done} of {JOBS} jobs in {time.monotonic() - started:.1f} s; "
          f"the helper waited {waits.count} times as the service asked")
    return 0 if done == JOBS else 1


if __name__ == "__main__":
    sys.exit(main())
