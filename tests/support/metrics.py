"""Reading the proxy's /metrics in tests."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["metric"]


def metric(url: str, name: str, **labels: str) -> float | None:
    """The sum of the samples of `name` at `url`/metrics whose labels include `labels` (None: none)."""
    total = None
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=5).text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total = (total or 0.0) + sample.value
    return total
