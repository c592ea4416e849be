"""Building the tracer and meter providers for one proxy process: OTLP export (gRPC or HTTP/protobuf)
when an endpoint is configured, nothing exported otherwise, and a Prometheus registry for `/metrics`.

Providers are owned by the Telemetry object, not installed globally, so several proxies can run in one
process (tests) without sharing state.
"""

from __future__ import annotations

import logging

import attrs
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client import CollectorRegistry

from proxy import __version__
from proxy.events import EventBus
from proxy.schema import TelemetryConfig

from . import otlp_wire, semconv
from .histograms import HistogramSet, MergingPeriodicReader, MergingPrometheusReader
from .metrics import ProxyMetrics
from .rebinding import RebindingMeter
from .shipping import SpanShipper
from .tracing import FastTracer

__all__ = ["Telemetry", "build_telemetry"]

log = logging.getLogger("proxy.telemetry")


@attrs.define
class Telemetry:
    """A process's tracer, meter, instruments and the registry `/metrics` renders."""

    spans: SpanShipper | None
    """Where sampled spans go (None: nowhere, nothing is sampled)."""
    meter_provider: MeterProvider
    tracer: FastTracer
    meter: RebindingMeter
    metrics: ProxyMetrics
    registry: CollectorRegistry
    config: TelemetryConfig
    recording: bool = True
    """False when spans go nowhere (no exporter): the tracer samples nothing, and code on the hot path
    may skip starting spans altogether."""
    names: semconv.Names = attrs.field(init=False)
    """The proxy's own span, attribute, event and metric names under `config.metric_prefix`."""
    events: EventBus = attrs.field(init=False)
    """The live event stream behind `/system/events` (proxy/events.py): publishing costs nothing while
    nobody subscribes. Kept with the telemetry, so a rebuilt application publishes to the same readers."""

    def __attrs_post_init__(self) -> None:
        self.names = self.metrics.names
        self.events = EventBus(self.meter, self.names)

    def shutdown(self) -> None:
        """Flush and stop exporters (bounded: 5 s for spans, the SDK's own timeouts for metrics)."""
        if self.spans is not None:
            self.tracer.flush()  # spans that ended since the loop's last turn
            self.spans.shutdown()
        self.meter_provider.shutdown()


def _otlp_metric_exporter(config: TelemetryConfig) -> object:
    endpoint = config.otlp_endpoint
    assert endpoint is not None
    if config.otlp_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GM

        return GM(endpoint=endpoint, insecure=not endpoint.startswith("https://"))
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HM

    return HM(endpoint=f"{endpoint.rstrip('/')}/v1/metrics")


def build_telemetry(config: TelemetryConfig) -> Telemetry:
    """Providers for `config`: spans through the proxy's own tracer (tracing.py) to its shipper
    (shipping.py), metrics through the SDK (Prometheus registry, plus OTLP when an endpoint is set)."""
    resource_attributes = {"service.name": config.service_name, "service.version": __version__}
    resource = Resource.create(resource_attributes)
    registry = CollectorRegistry(auto_describe=True)
    histograms = HistogramSet(resource, InstrumentationScope("shared-ollama-proxy", __version__))
    readers: list[MetricReader] = [MergingPrometheusReader(histograms, registry=registry)]
    spans: SpanShipper | None = None
    if config.otlp_endpoint:
        spans = SpanShipper(config.otlp_endpoint, config.otlp_protocol,
                            otlp_wire.encode_resource(dict(resource.attributes)),
                            otlp_wire.encode_scope("shared-ollama-proxy", __version__))
        readers.append(MergingPeriodicReader(
            histograms, _otlp_metric_exporter(config),
            export_interval_millis=config.export_interval_s * 1000))
        log.info("exporting traces and metrics over OTLP (%s)", config.otlp_protocol)
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    # With nowhere to send spans, recording them is pure cost: sample nothing (trace ids still
    # propagate: the request's span is a NonRecordingSpan with a fresh trace id).
    tracer = FastTracer(spans if spans is not None else _NOWHERE,
                        config.sample_ratio if spans is not None else 0.0, records=spans is not None)
    # Rebinding: a plugin rebuilt by a reload re-creates its observable instruments (rebinding.py).
    meter = RebindingMeter(meter_provider.get_meter("shared-ollama-proxy", __version__), histograms)
    metrics = ProxyMetrics(meter, semconv.Names(config.metric_prefix))
    return Telemetry(spans, meter_provider, tracer, meter, metrics, registry, config,
                     recording=spans is not None)


class _Nowhere:
    def add(self, spans: bytes, count: int) -> None:
        del spans, count  # unreachable: a tracer that does not record starts no FastSpan


_NOWHERE = _Nowhere()
