"""CPU per request of trim_history and summarize_history when they have nothing to do (a small chat, a
non-chat route) and when they act (a chat of N turns trimmed; a cached summary reused): the issue's bound
for the idle path is 5 µs.

`python -m tests.bench.history_plugins` (also run by `make bench-embed`). Not a test: nothing here asserts
a time. It calls each plugin's `on_request` in a loop on a real RequestContext (no server: the seam's own
cost is measured elsewhere) and prints microseconds per call (process CPU time). The cached summary is
written once beforehand by an answered sub-request (the small model's answer is not the plugin's CPU);
every measured call then finds it in the cache.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
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


def _long(turns: int) -> dict[str, Any]:
    """A system prompt, `turns` turns of about 80 tokens each, and the question: turns + 2 messages."""
    return {"model": "llama3.2", "stream": False, "messages": [
        {"role": "system", "content": "be brief"},
        *({"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "lorem ipsum " * 40}
          for i in range(turns)), {"role": "user", "content": "and now?"}]}


LONG = _long(40)


class _AnsweredSubrequests(Subrequests):
    """The summary's sub-request answered at once with a fixed summary (the small model's work is not
    the plugin's CPU)."""

    async def post_json(self, path: str, body: Mapping[str, Any], *, tenant: str,
                        timeout_s: float = 60.0) -> tuple[int, Any]:
        del path, body, tenant, timeout_s
        return 200, {"message": {"role": "assistant",
                                 "content": "The user and the assistant discussed lorem ipsum at length."}}


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

    services = PluginServices(telemetry, _AnsweredSubrequests(), tokenizer_for=tokenizer_for)
    trim = TrimHistory(TrimHistoryConfig(name="trim_history", budget_tokens=512), services)
    summarize = SummarizeHistory(SummarizeHistoryConfig(name="summarize_history", model="qwen3",
                                                        budget_tokens=512, keep_last_turns=2,
                                                        time_budget_s=5),
                                 services)
    # Write the summary once (cached=0); every measured call below is then a cache hit.
    warm = _ctx("/api/chat", LONG)
    await summarize.on_request(None, warm, lambda decision: None)  # type: ignore[arg-type]
    assert warm.response_headers.get("X-History-Summarized", "").endswith("cached=0"), "no summary"
    rows: list[tuple[str, Any, str, dict[str, Any], int]] = [
        ("trim_history idle (small chat)", trim, "/api/chat", SMALL, 20000),
        ("trim_history idle (embed route)", trim, "/api/embed", {"model": "m", "input": "x"}, 20000),
        *((f"trim_history acting ({turns + 2} messages)", trim, "/api/chat", _long(turns), rounds)
          for turns, rounds in ((10, 1000), (40, 300), (160, 100))),
        ("summarize_history idle (small chat)", summarize, "/api/chat", SMALL, 20000),
        ("summarize_history cached hit (42 msgs)", summarize, "/api/chat", LONG, 300),
    ]
    for label, plugin, path, body, rounds in rows:
        print(f"{label:40s} {await _per_call_us(plugin, path, body, rounds):8.2f} µs/request")
    # The measured calls were hits: no summary was written after the first, and one more call says so.
    check = _ctx("/api/chat", LONG)
    await summarize.on_request(None, check, lambda decision: None)  # type: ignore[arg-type]
    assert check.response_headers.get("X-History-Summarized", "").endswith("cached=1"), "not a hit"
    assert not summarize.jobs, "a measured call wrote a summary instead of reusing the cached one"


if __name__ == "__main__":
    asyncio.run(main())
