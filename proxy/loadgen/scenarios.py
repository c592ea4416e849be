"""Named scenarios. `rag-burst` is the one the seed SLOs are measured on (`make bench-burst`)."""

from __future__ import annotations

from .workload import Burst, Scenario, Stream, Tenant

__all__ = ["SCENARIOS", "scenario"]

SCENARIOS: dict[str, Scenario] = {
    # An interactive team chats at a steady rate (short answers, about half of one Ollama slot of the
    # gpu-8b profile) while a bulk team fires a burst of long-context RAG generations and a large
    # embedding ingest (bench-and-reliability.md §3.1 rag_burst, sized so one run of arrivals lasts a
    # minute and the whole run ends within the 120 s client timeout after it).
    "rag-burst": Scenario(
        name="rag-burst", duration_s=60.0,
        tenants=(
            Tenant("chat-team", "sk-chat-team", "interactive",
                   streams=(Stream("chat", 0.15, max_output_tokens=128),)),
            Tenant("ingest-team", "sk-ingest-team", "bulk",
                   bursts=(Burst("rag", at_s=10.0, count=30, window_s=3.0),
                           Burst("embed", at_s=12.0, count=20, window_s=8.0))),
        )),
    # The same interactive traffic without the bulk team: the no-burst baseline of its TTFT.
    "rag-quiet": Scenario(
        name="rag-quiet", duration_s=60.0,
        tenants=(Tenant("chat-team", "sk-chat-team", "interactive",
                        streams=(Stream("chat", 0.15, max_output_tokens=128),)),)),
    # Two equal-weight teams, both with far more RAG work than one replica can do: how evenly is the
    # capacity shared (jain_tokens)?
    "fair-pair": Scenario(
        name="fair-pair", duration_s=60.0,
        tenants=(
            Tenant("team-a", "sk-team-a", "interactive",
                   bursts=(Burst("rag", at_s=1.0, count=5, window_s=1.0, max_output_tokens=96),)),
            Tenant("team-b", "sk-team-b", "interactive",
                   bursts=(Burst("rag", at_s=1.5, count=5, window_s=1.0, max_output_tokens=96),)),
        )),
    # Two teams, each on its own 8B model, sharing two replicas that each fit one such model at a time
    # (OLLAMA_MAX_LOADED_MODELS=1): steady chats plus a small RAG burst per team. Round robin sends both
    # models to both replicas (a swap costs a model load); routing by residency need not swap at all.
    "two-model": Scenario(
        name="two-model", duration_s=60.0,
        tenants=(
            Tenant("team-a", "sk-team-a", "interactive",
                   streams=(Stream("chat", 0.1, max_output_tokens=128, model="llama3.2"),),
                   bursts=(Burst("rag", at_s=15.0, count=4, window_s=10.0, max_output_tokens=96,
                                 model="llama3.2"),)),
            Tenant("team-b", "sk-team-b", "interactive",
                   streams=(Stream("chat", 0.1, max_output_tokens=128, model="qwen3"),),
                   bursts=(Burst("rag", at_s=20.0, count=4, window_s=10.0, max_output_tokens=96,
                                 model="qwen3"),)),
        )),
    # A few requests of each class, for tests and quick checks.
    "smoke": Scenario(
        name="smoke", duration_s=4.0,
        tenants=(
            Tenant("alpha", "sk-alpha", "interactive", streams=(Stream("chat", 1.5),)),
            Tenant("beta", "sk-beta", "bulk",
                   bursts=(Burst("rag", at_s=0.5, count=3, window_s=1.0),
                           Burst("embed", at_s=1.0, count=2, window_s=1.0))),
        )),
}


def scenario(name: str) -> Scenario:
    """A named scenario, or KeyError listing the known names."""
    try:
        return SCENARIOS[name]
    except KeyError:
        raise KeyError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}") from None
