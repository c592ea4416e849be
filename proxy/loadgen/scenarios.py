"""Named scenarios. `rag-burst` is the one the seed SLOs are measured on (`make bench-burst`);
`rag-chat-ingest` is the one prompt and embedding hygiene (T4 in `make bench-burst`) is measured on;
`rag-burst-fleet` is the bursts two replicas can absorb, on which the seed SLOs are proven (issue 15)."""

from __future__ import annotations

from .workload import Burst, Conversations, Ingests, Scenario, Stream, Tenant

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
    # Bursts two replicas can absorb (issue 15): rag-burst's interactive chats throughout, and a bulk team
    # that fires 5 long-context RAG generations within 15 s (a sharp burst), then 5 within 25 s (a broad
    # one), each with an 8-batch embedding ingest over the same window.
    # Arithmetic on the gpu-8b profile, one slot per model per replica (Ollama's default), per request:
    #   chat   ~140 prompt tokens: 0.15 + 140/2500 = 0.21 s prefill, 128 tokens at 40/s = 3.2 s: ~3.4 s
    #   rag    8-64 KB of context (cut to num_ctx less 256 tokens), ~9,800 tokens on average:
    #          0.15 + 9800/2500 = 4.1 s prefill, 150-600 tokens (375 on average) at 40/s = 9.4 s: ~13.4 s
    #   embed  16-64 chunks, ~10,200 tokens: 10200/20000 = 0.5 s on the embedding model's own slot
    # Chat-model work offered, in replicas (slot-seconds per second):
    #   quiet  0.15 chats/s x 3.4 s = 0.51 of one replica
    #   peak   sharp burst (20-35 s): 5 x 13.4 s / 15 s + 0.51 = 4.98 replicas, ~5x one replica;
    #          broad burst (80-105 s): 5 x 13.4 s / 25 s + 0.51 = 3.19 replicas
    #   mean   (150 s x 0.51 + 10 x 13.4 s) / 150 s = 1.40 replicas: 70 % of two, 140 % of one
    # So two replicas end the sharp burst ~45 slot-seconds behind ((4.98 - 2) x 15 s) and the broad one
    # ~30 behind ((3.19 - 2) x 25 s), and catch up within ~30 s and ~20 s (at 2 - 0.51 per second):
    # by 65 s and by 125 s; one replica never catches up. In the sharp burst round robin deals the RAG
    # generations out by arrival, so one replica's queue holds three of them (~40 s of work) with chats
    # waiting behind them; a shared queue with an interactive lane serves the chats first, and only the
    # RAG generations at its back wait long. Embeddings: 8 x 0.5 s per window, at most a quarter of
    # one embedding slot.
    "rag-burst-fleet": Scenario(
        name="rag-burst-fleet", duration_s=150.0,
        tenants=(
            Tenant("chat-team", "sk-chat-team", "interactive",
                   streams=(Stream("chat", 0.15, max_output_tokens=128),)),
            Tenant("ingest-team", "sk-ingest-team", "bulk",
                   bursts=(Burst("rag", at_s=20.0, count=5, window_s=15.0),
                           Burst("embed", at_s=20.0, count=8, window_s=15.0),
                           Burst("rag", at_s=80.0, count=5, window_s=25.0),
                           Burst("embed", at_s=80.0, count=8, window_s=25.0))),
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
    # Long conversations and repeated ingests next to the interactive chats (issue 12): two users each hold
    # a 12-turn conversation, pasting 3-5 KB of material per question, and their client resends the
    # whole history every turn, so prompts grow by about 1,100 tokens a turn to about 13,700 (under the
    # num_ctx 16384 every request asks for, past a 4,096-token history budget from turn 4 on). An
    # ingest team re-embeds a corpus of 12 documents x 8 chunks in 5 jobs 25 s apart, each job 6
    # documents, 4 of them the previous job's (240 chunks embedded, 96 distinct); jobs alternate between
    # 16-chunk /api/embed batches and one call per chunk, a document's 8 calls at once. Sized on the
    # gpu-8b profile so that the chat model's one slot is about fully busy when every history is sent
    # whole (about 160 s of work in 150 s of arrivals) and about 80 % busy when histories are held to
    # 4,096 tokens.
    "rag-chat-ingest": Scenario(
        name="rag-chat-ingest", duration_s=150.0,
        tenants=(
            Tenant("chat-team", "sk-chat-team", "interactive",
                   streams=(Stream("chat", 0.08, max_output_tokens=128),)),
            Tenant("assist-team", "sk-assist-team", "interactive",
                   conversations=(Conversations(count=2, turns=12, at_s=2.0, stagger_s=6.0,
                                                think_s=(9.0, 13.0), question_bytes=(3000, 5000),
                                                answer_bytes=(220, 280), max_output_tokens=64),)),
            Tenant("ingest-team", "sk-ingest-team", "bulk",
                   ingests=(Ingests(documents=12, chunks_per_document=8, jobs=5, window=6, step=2,
                                    at_s=5.0, every_s=25.0, gap_s=1.0, batch_inputs=16),)),
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
