"""Locust scenarios for operators who load-test a real fleet through the proxy (or Ollama directly).

    pip install locust
    locust -f deploy/loadtest/locustfile.py --host http://127.0.0.1:11435 \
        --users 40 --spawn-rate 5 --run-time 10m --headless

Three user classes mirror the RAG workload of `shared-ollama-proxy loadgen`: interactive chat users,
RAG users sending 8-64 KB of retrieved context, and ingest users posting embedding batches. Each sends its
team's API key (`SOP_CHAT_KEY`, `SOP_RAG_KEY`, `SOP_INGEST_KEY`) and honours `Retry-After` on 429/503.
Time to first token is reported as its own request type (`TTFT /api/chat`, ...), next to the completion.
Point it only at hosts you operate. Like k6.js, it defaults to the loopback proxy (`--host`, else
`SOP_HOST`, else http://127.0.0.1:11435) and is bounded: a headless run without `--run-time` stops after
`SOP_DURATION` (default 30s).
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

from locust import HttpUser, between, events, task
from locust.env import Environment
from locust.util.timespan import parse_timespan

MODEL = os.environ.get("SOP_MODEL", "llama3.2")
EMBED_MODEL = os.environ.get("SOP_EMBED_MODEL", "nomic-embed-text")
WORDS = ("retrieval chunk index vector passage answer source policy contract invoice incident runbook "
         "release customer region quarter revenue support deployment security onboarding").split()


def _bounded(environment: Environment, **_: Any) -> None:
    """A headless run stops by itself: without --run-time it gets SOP_DURATION (read by Locust after
    this listener, before the users start)."""
    options = environment.parsed_options
    if options is not None and options.headless and not options.run_time:
        options.run_time = parse_timespan(os.environ.get("SOP_DURATION", "30s"))


events.init.add_listener(_bounded)  # type: ignore[no-untyped-call]  # Locust leaves it untyped


def _text(size_bytes: int) -> str:
    out: list[str] = []
    while sum(len(w) + 1 for w in out) < size_bytes:
        out.append(random.choice(WORDS))
    return " ".join(out)


class _OllamaUser(HttpUser):
    abstract = True
    host = os.environ.get("SOP_HOST", "http://127.0.0.1:11435")  # --host overrides it
    key_variable = ""

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.key_variable, "")
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _stream(self, path: str, body: dict[str, Any]) -> None:
        """POST a streaming request, reporting TTFT separately and honouring Retry-After."""
        start = time.perf_counter()
        with self.client.post(path, json=body, headers=self._headers(), stream=True,
                              catch_response=True, name=path, timeout=120) as response:
            if response.status_code in (429, 503):
                response.failure(f"rejected {response.status_code}")
                time.sleep(float(response.headers.get("Retry-After", "1")))
                return
            first = None
            for line in response.iter_lines():
                if first is None:
                    first = time.perf_counter() - start
                    self.environment.events.request.fire(
                        request_type="TTFT", name=path, response_time=first * 1000,
                        response_length=0, exception=None, context={})
                if b'"error"' in line:
                    response.failure(line.decode(errors="replace")[:200])
                    return
            response.success()


class ChatUser(_OllamaUser):
    """An interactive user: short chats, a few seconds apart."""

    weight = 3
    wait_time = between(2, 8)
    key_variable = "SOP_CHAT_KEY"

    @task
    def chat(self) -> None:
        self._stream("/api/chat", {"model": MODEL, "stream": True, "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": _text(random.randint(60, 400))}]})


class RagUser(_OllamaUser):
    """A RAG service: a question over 8-64 KB of retrieved context."""

    weight = 1
    wait_time = between(5, 20)
    key_variable = "SOP_RAG_KEY"

    @task
    def rag(self) -> None:
        context = _text(random.randint(8 * 1024, 64 * 1024))
        self._stream("/api/generate", {"model": MODEL, "stream": True,
                                       "prompt": f"Context:\n{context}\n\nQuestion: why?\nAnswer:"})


class IngestUser(_OllamaUser):
    """A document ingest job: embedding batches back to back."""

    weight = 1
    wait_time = between(0.5, 2)
    key_variable = "SOP_INGEST_KEY"

    @task
    def embed(self) -> None:
        chunks = [_text(random.randint(700, 1300)) for _ in range(random.randint(16, 64))]
        with self.client.post("/api/embed", json={"model": EMBED_MODEL, "input": chunks},
                              headers=self._headers(), catch_response=True, name="/api/embed",
                              timeout=120) as response:
            if response.status_code in (429, 503):
                response.failure(f"rejected {response.status_code}")
                time.sleep(float(response.headers.get("Retry-After", "1")))
            elif response.status_code != 200:
                response.failure(response.text[:200])
