"""The proxy's metric instruments, created once per process from a Meter.

Duration histograms use the GenAI/HTTP semconv bucket advice: seconds with boundaries that reach minutes,
because a completion of 45 s is normal here. Every histogram in seconds gets boundaries in seconds
(`DURATION_BUCKETS_S`, `COUNT_BUCKETS_S`): without advice the SDK's defaults are milliseconds (0, 5, 10,
... 10000), which would put nearly every sample in the `le="5"` bucket.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from . import semconv

__all__ = ["COUNT_BUCKETS_S", "DURATION_BUCKETS_S", "TOKEN_BUCKETS", "ProxyMetrics"]

DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90,
                      120, 180, 300)
COUNT_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                   2.5)
"""Work the proxy does itself (counting a prompt's tokens): from a tenth of a millisecond to seconds."""
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)


class ProxyMetrics:
    """Instruments shared by ingress and the forwarder."""

    def __init__(self, meter: Meter, names: semconv.Names) -> None:
        self.names = names
        self.request_duration = meter.create_histogram(
            semconv.METRIC_HTTP_REQUEST_DURATION, unit="s",
            description="Duration of HTTP server requests, to the last byte of the response.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S)
        # Active requests are counted in a plain Counter and observed at collection time: an SDK
        # up-down counter would cost two measurements per request on the hot path.
        self.active: Counter[tuple[str, str]] = Counter()
        meter.create_observable_up_down_counter(
            semconv.METRIC_HTTP_ACTIVE_REQUESTS, callbacks=[self._observe_active], unit="{request}",
            description="Number of active HTTP server requests.")
        self.token_usage = meter.create_histogram(
            semconv.METRIC_GEN_AI_TOKEN_USAGE, unit="{token}",
            description="Number of input and output tokens used, as reported by Ollama.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)
        self.operation_duration = meter.create_histogram(
            semconv.METRIC_GEN_AI_OPERATION_DURATION, unit="s",
            description="GenAI operation duration, to the last byte.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S)
        self.time_to_first_chunk = meter.create_histogram(
            semconv.METRIC_GEN_AI_TIME_TO_FIRST_CHUNK, unit="s",
            description="Time from request to the first response body chunk from the upstream.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S)
        self.upstream_errors = meter.create_counter(
            names.metric_upstream_errors, unit="{error}",
            description="Upstream failures by error.type (connect, reset or timeout before the "
                        "answer; failure mid-stream) and replica; a request's own deadline is not one.")

    def _observe_active(self, options: CallbackOptions) -> Iterable[Observation]:
        del options
        for (method, route), count in list(self.active.items()):
            attributes = {semconv.ATTR_HTTP_METHOD: method}
            if route:
                attributes[semconv.ATTR_HTTP_ROUTE] = route
            yield Observation(count, attributes)
