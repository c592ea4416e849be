"""Summaries of a load run and the seed SLOs: P95 completion < 45 s, timeouts < 1 %, rejections < 5 %.

A request that failed (a 5xx other than a 503 refusal, no answer, a stream ending in an error line) never
completed: the completion SLO counts it as a completion that missed 45 s, so a run where 1 in 10 requests
fails misses it however fast the rest were, as the proxy's slow-completion rules count it. A client
error (4xx) is the request's own and counts in no SLO. Timeouts are the requests the client gave up on,
those whose deadline passed at the proxy (504, a stream ending in `upstream_response_timeout`) and its
503 `queue_timeout` refusals (also rejections), as the proxy's SLO rules count them. Percentiles are
nearest-rank over the requests that completed. Goodput counts requests that succeeded within the
completion SLO, per second of the scenario. Jain's fairness index is taken over the tenants'
satisfaction (the share of each tenant's requests served within the SLO): 1.0 when every tenant is
served equally well, 1/n when one tenant gets everything; `jain_tokens` takes it over the tokens
(prompt + output) each tenant was served, the measure for tenants that all wanted more than they got.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from .runner import QUEUE_TIMEOUT, Record

__all__ = ["SLO", "jain", "percentile", "slo_verdicts", "summarize"]

SLO = {"p95_completion_s": 45.0, "timeout_pct": 1.0, "rejection_pct": 5.0}
_COLD_LOAD_NS = 500_000_000
"""A load_duration this long means the answer waited for a model load."""


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def jain(values: Iterable[float]) -> float | None:
    """Jain's fairness index of non-negative values."""
    items = list(values)
    if not items or not any(items):
        return None
    return sum(items) ** 2 / (len(items) * sum(v * v for v in items))


def _group(records: Sequence[Record], duration_s: float, timeout_s: float) -> dict[str, Any]:
    total = len(records)
    done = [r for r in records if r.outcome == "ok" and r.completion_s is not None]
    # A request the client gave up on took at least the timeout: it counts in the completion
    # percentiles as that (censored) value instead of vanishing from them; one the server ended at its
    # deadline counts with the time its answer took.
    completions = [r.completion_s for r in done if r.completion_s is not None] + [
        timeout_s if r.completion_s is None else r.completion_s
        for r in records if r.outcome == "timeout"]
    ttfts = [r.ttft_s for r in done if r.ttft_s is not None]
    # Without the answers that waited for a model load: the baseline a burst is compared with.
    warm = [r.ttft_s for r in done if r.ttft_s is not None and (r.load_duration_ns or 0) < _COLD_LOAD_NS]
    good = [r for r in done if (r.completion_s or 0) <= SLO["p95_completion_s"]]
    failed = sum(1 for r in records if r.outcome == "error" and not 400 <= r.status < 500)
    # The completion SLO's percentile: a failure is a completion that never came (math.inf).
    slo_p95 = percentile(completions + [math.inf] * failed, 95)

    def pct(outcome: str) -> float:
        return 100.0 * sum(1 for r in records if r.outcome == outcome) / total if total else 0.0

    # A 503 queue_timeout is a rejection and a timeout, as the proxy's SLO rules count it.
    timeouts = sum(1 for r in records if r.outcome == "timeout"
                   or (r.outcome == "rejected" and r.error == QUEUE_TIMEOUT))

    return {
        "requests": total,
        "ok": len(done),
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
        "ttft_p99_s": percentile(ttfts, 99),
        "ttft_warm_p95_s": percentile(warm, 95),
        "completion_p50_s": percentile(completions, 50),
        "completion_p95_s": percentile(completions, 95),
        "completion_p99_s": percentile(completions, 99),
        "timeout_pct": 100.0 * timeouts / total if total else 0.0, "rejection_pct": pct("rejected"),
        "error_pct": pct("error"),
        "failed_pct": 100.0 * failed / total if total else 0.0,
        # None when no request completed, or when failures alone exceed 5 % (the P95 never came).
        "slo_completion_p95_s": slo_p95 if slo_p95 is not None and math.isfinite(slo_p95) else None,
        "goodput_rps": len(good) / duration_s if duration_s else 0.0,
        "satisfaction": len(good) / total if total else 0.0,
        "output_tokens": sum(r.output_tokens or 0 for r in done),
        "cold_loads": sum(1 for r in done if (r.load_duration_ns or 0) >= _COLD_LOAD_NS),
        "attempts": sum(r.attempts for r in records),
        "refused_then_ok": sum(1 for r in done if r.refusals),
    }


def summarize(records: Sequence[Record], duration_s: float, timeout_s: float = 120.0) -> dict[str, Any]:
    """Overall, per-class and per-tenant figures, Jain fairness across tenants, and the SLO verdicts."""
    classes = sorted({r.kind for r in records})
    tenants = sorted({r.tenant for r in records})
    summary: dict[str, Any] = {
        "overall": _group(records, duration_s, timeout_s),
        "by_class": {c: _group([r for r in records if r.kind == c], duration_s, timeout_s)
                     for c in classes},
        "by_tenant": {t: _group([r for r in records if r.tenant == t], duration_s, timeout_s)
                      for t in tenants},
    }
    summary["jain_fairness"] = jain(g["satisfaction"] for g in summary["by_tenant"].values())
    # Fairness of service between tenants that all had more work than they got: tokens served.
    summary["jain_tokens"] = jain(float(sum((r.prompt_tokens or 0) + (r.output_tokens or 0)
                                            for r in records if r.tenant == t and r.outcome == "ok"))
                                  for t in tenants)
    summary["slo"] = slo_verdicts(summary["overall"])
    return summary


def slo_verdicts(group: dict[str, Any]) -> dict[str, bool]:
    """Pass/fail of the seed SLOs for one group of requests (P95 completion over the answers, timeouts
    and failures, a failure counting as never completed)."""
    p95 = group["slo_completion_p95_s"]
    return {
        "p95_completion_lt_45s": p95 is not None and p95 < SLO["p95_completion_s"],
        "timeouts_lt_1pct": group["timeout_pct"] < SLO["timeout_pct"],
        "rejections_lt_5pct": group["rejection_pct"] < SLO["rejection_pct"],
    }
