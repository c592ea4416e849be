"""Model profiles: what placement measures per model, and `GET /system/profile` built from it.

The view shows, per replica, its health and what it holds now (from `/api/ps`), and per model where it
is loaded, its configured profile (`models.<name>`), what was measured (arrival rate, service and load
times, tokens per request, loads) and a recommended profile: a `num_ctx` that fits 99 % of the requests
seen, pinning when the model keeps being reloaded, and how many replicas to keep it warm on (enough for
its measured load at 80 % utilisation), embedding models placed apart from the chat models.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import attrs

from .ollama import model_key
from .schema import ModelConfig
from .upstreams import UpstreamSet

__all__ = ["ModelStats", "fleet_profile"]

_WINDOW_S = 600.0
_TARGET_UTILISATION = 0.8


@attrs.define
class ModelStats:
    """What placement learned about one model (smoothed; recent samples only)."""

    service_s: float | None = None
    """Time an attempt takes, first byte sent to last byte received (EWMA)."""
    load_s: float | None = None
    """Time Ollama takes to load it, from `load_duration` (EWMA)."""
    last_wanted: float = -math.inf
    loads: int = 0
    """Responses that carried a model load."""
    operation: str | None = None
    arrivals: deque[float] = attrs.field(factory=lambda: deque(maxlen=4096))
    totals: deque[int] = attrs.field(factory=lambda: deque(maxlen=1024))
    """Prompt + output tokens of recent requests."""

    def rate_per_s(self, now: float) -> float:
        """Requests per second over the last ten minutes."""
        while self.arrivals and now - self.arrivals[0] > _WINDOW_S:
            self.arrivals.popleft()
        if not self.arrivals:
            return 0.0
        return len(self.arrivals) / max(60.0, now - self.arrivals[0])


def _pow2_at_least(value: float) -> int:
    return max(2048, 1 << math.ceil(math.log2(max(1.0, value))))


def fleet_profile(upstreams: UpstreamSet, health: dict[str, Any], models: Mapping[str, ModelConfig],
                  stats: Mapping[str, ModelStats]) -> dict[str, Any]:
    """The /system/profile document (see the module docstring)."""
    now = time.monotonic()
    keys = {model_key(m) for m in models} | set(stats)
    for upstream in upstreams:
        keys |= set(upstream.loaded)
    configured = {model_key(name): (name, profile) for name, profile in models.items()}
    chat_homes = {u.name for u in upstreams for k in u.loaded
                  if (s := stats.get(k)) is not None and s.operation not in (None, "embeddings")}
    out: dict[str, Any] = {}
    for key in sorted(keys):
        stat = stats.get(key)
        entry: dict[str, Any] = {
            "loaded_on": [u.name for u in upstreams if key in u.loaded],
            "on_disk": [u.name for u in upstreams if u.models is not None and key in u.models],
        }
        if key in configured:
            profile = configured[key][1]
            entry["profile"] = {"warm_on": list(profile.warm_on), "pinned": profile.pinned,
                                "replicas": list(profile.replicas), "options": profile.options}
        if stat is not None:
            rate = stat.rate_per_s(now)
            totals = sorted(stat.totals)
            p99 = totals[min(len(totals) - 1, int(0.99 * len(totals)))] if totals else None
            entry["observed"] = {
                "operation": stat.operation, "requests_per_min": round(rate * 60, 2),
                "service_s": round(stat.service_s, 3) if stat.service_s is not None else None,
                "load_s": round(stat.load_s, 3) if stat.load_s is not None else None,
                "loads": stat.loads, "tokens_p99": p99,
            }
            entry["recommended"] = _recommend(upstreams, key, stat, rate, p99, chat_homes)
        out[key] = entry
    return {"replicas": health, "models": out}


def _recommend(upstreams: UpstreamSet, key: str, stat: ModelStats, rate: float, p99: int | None,
               chat_homes: set[str]) -> dict[str, Any]:
    slots = sum(u.num_parallel for u in upstreams) / max(1, len(upstreams))
    busy = rate * (stat.service_s or 0.0) / max(1.0, slots)
    count = min(len(upstreams), max(1, math.ceil(busy / _TARGET_UTILISATION)))
    holders = [u for u in upstreams if key in u.loaded]
    others = sorted((u for u in upstreams if key not in u.loaded),
                    key=lambda u: (stat.operation == "embeddings" and u.name in chat_homes,
                                   stat.operation != "embeddings" and u.name not in chat_homes,
                                   len(u.loaded)))
    if stat.operation == "embeddings":
        holders.sort(key=lambda u: u.name in chat_homes)
    recommended: dict[str, Any] = {
        "warm_on": [u.name for u in [*holders, *others][:count]],
        "pinned": stat.loads >= 2,
    }
    if p99 is not None:
        recommended["options"] = {"num_ctx": _pow2_at_least(p99 * 1.1)}
    return recommended
