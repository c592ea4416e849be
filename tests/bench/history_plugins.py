"""CPU per request of trim_history and summarize_history when they have nothing to do (a small chat, a
non-chat route) and when they act (a long chat trimmed; a cached summary reused): the issue's bound for
the idle path is 5 µs.

`python -m tests.bench.history_plugins`. Not a test: nothing here asserts a time. It calls each plugin's
`on_request` in a loop on a real RequestContext (no server: the seam's own cost is measured elsewhere) and
prints microseconds per call (process CPU time).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from plugins.summarize_history import SummarizeHistory, SummarizeHistoryConfig
from plugins.trim_history import TrimHistory, TrimHistoryConfig
from proxy.config import TelemetryConfig
from proxy.context import RequestContext
from proxy.ollama import classify
from proxy.plugin import PluginServices, Subrequests
from proxy.telemetry.setup import build_telemetry
from proxy.tokens import SentencePieceTokenizer, Tokenizer

MODEL_FILE = "proxy/emulator/data/emulator.model"
SMALL = {"model": "llama3.2", "messages": [{"role": "user", "content": "hello there"}], "stream": False}
LONG = {"model": "llama3.2", "stream": False, "messages": [
    {"role": "system", "content": "be brief"},
    *({"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "lorem ipsum " * 40}
      for i in range(40)), {"role": "user", "content": "and now?"}]}


def _ctx(path: str, body: dict[str, Any]) -> RequestContext:
    ctx = RequestContext("bench", classify("POST", path))
    ctx.replace_json(body)
    return ctx


async def _per_call_us(plugin: Any, path: str, body: dict[str, Any], rounds: int) -> float:
    decisions: list[str] = []
    started = time.process_time()
    for _ in range(rounds):
        ctx = _ctx(path, body)
        await plugin.on_request(None, ctx, decisions.append)
    spent = time.process_time() - started
    # Building the context is not the plugin's cost: measured alone and subtracted.
    started = time.process_time()
    for _ in range(rounds):
        _ctx(path, body)
    baseline = time.process_time() - started
    return (spent - baseline) / rounds * 1e6


async def main() -> None:
    telemetry = build_telemetry(TelemetryConfig())
    tokenizer = SentencePieceTokenizer.from_file(MODEL_FILE)

    async def tokenizer_for(model: str) -> Tokenizer:
        del model
        return tokenizer

    services = PluginServices(telemetry, Subrequests(), tokenizer_for=tokenizer_for)
    trim = TrimHistory(TrimHistoryConfig(name="trim_history", budget_tokens=512), services)
    summarize = SummarizeHistory(SummarizeHistoryConfig(name="summarize_history", model="qwen3",
                                                        budget_tokens=512, time_budget_s=0.001),
                                 services)
    rows = [
        ("trim_history idle (small chat)", trim, "/api/chat", SMALL, 20000),
        ("trim_history idle (embed route)", trim, "/api/embed", {"model": "m", "input": "x"}, 20000),
        ("trim_history acting (41 turns)", trim, "/api/chat", LONG, 300),
        ("summarize_history idle (small chat)", summarize, "/api/chat", SMALL, 20000),
    ]
    for label, plugin, path, body, rounds in rows:
        print(f"{label:40s} {await _per_call_us(plugin, path, body, rounds):8.2f} µs/request")


if __name__ == "__main__":
    asyncio.run(main())
