"""Building the tracer and meter providers for one proxy process: OTLP export (gRPC or HTTP/protobuf)
when an endpoint is configured, nothing exported otherwise, and a Prometheus registry for `/metrics`.

Providers are owned by the Telemetry object, not installed globally, so several proxies can run in one
process (tests) without sharing state.
"""

from __future__ import annotations

import logging

import attrs
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from opentelemetry.trace import Tracer
from prometheus_client import CollectorRegistry

from proxy import __version__
from proxy.events import EventBus
from proxy.schema import TelemetryConfig

from . import semconv
from .metrics import ProxyMetrics
from .rebinding import RebindingMeter

__all__ = ["Telemetry", "build_telemetry"]

log = logging.getLogger("proxy.telemetry")


@attrs.define
class Telemetry:
    """A process's tracer, meter, instruments and the registry `/metrics` renders."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    tracer: Tracer
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
        """Flush and stop exporters (bounded by the SDK's own timeouts)."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def _otlp_exporters(config: TelemetryConfig) -> tuple[SpanExporter, object]:
    endpoint = config.otlp_endpoint
    assert endpoint is not None
    if config.otlp_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GM
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GS

        insecure = not endpoint.startswith("https://")
        return GS(endpoint=endpoint, insecure=insecure), GM(endpoint=endpoint, insecure=insecure)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HM
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HS

    base = endpoint.rstrip("/")
    return HS(endpoint=f"{base}/v1/traces"), HM(endpoint=f"{base}/v1/metrics")


def build_telemetry(config: TelemetryConfig, extra_processors: tuple[SpanProcessor, ...] = ()
                    ) -> Telemetry:
    """Providers for `config`. `extra_processors` lets an embedding program add its own span sink."""
    resource = Resource.create({"service.name": config.service_name, "service.version": __version__})
    exporting = bool(config.otlp_endpoint) or bool(extra_processors)
    # With nowhere to send spans, recording them is pure cost: sample nothing (trace ids still propagate).
    sampler = ParentBased(TraceIdRatioBased(config.sample_ratio)) if exporting else ALWAYS_OFF
    tracer_provider = TracerProvider(resource=resource, sampler=sampler)
    registry = CollectorRegistry(auto_describe=True)
    readers: list[MetricReader] = [PrometheusMetricReader(registry=registry)]
    if config.otlp_endpoint:
        span_exporter, metric_exporter = _otlp_exporters(config)
        tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter, schedule_delay_millis=500))
        readers.append(PeriodicExportingMetricReader(
            metric_exporter,  # type: ignore[arg-type]
            export_interval_millis=config.export_interval_s * 1000))
        log.info("exporting traces and metrics over OTLP (%s)", config.otlp_protocol)
    for processor in extra_processors:
        tracer_provider.add_span_processor(processor)
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    tracer = tracer_provider.get_tracer("shared-ollama-proxy", __version__)
    # Rebinding: a plugin rebuilt by a reload re-creates its observable instruments (rebinding.py).
    meter = RebindingMeter(meter_provider.get_meter("shared-ollama-proxy", __version__))
    metrics = ProxyMetrics(meter, semconv.Names(config.metric_prefix))
    return Telemetry(tracer_provider, meter_provider, tracer, meter, metrics, registry, config,
                     recording=exporting)
