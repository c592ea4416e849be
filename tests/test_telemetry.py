"""Telemetry as an operator receives it: spans exported over real OTLP (HTTP/protobuf and gRPC) to a
receiver on loopback, and `/metrics` parsed by the Prometheus text parser."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import ollama
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from prometheus_client.parser import text_string_to_metric_families

from tests.support.otlp_receiver import OtlpReceiver, attributes_of
from tests.support.polling import wait_for
from tests.support.servers import Server, start_emulator, start_proxy


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("telemetry")


@pytest.fixture(scope="module")
def upstream(tmp: Path) -> Iterator[Server]:
    server = start_emulator(tmp, name="telemetry-emu")
    yield server
    server.stop()


def _wait_spans(get: Any, predicate: Any, timeout_s: float = 10.0) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        spans = get()
        if predicate(spans):
            return list(spans)
        time.sleep(0.1)
    raise AssertionError(f"spans not received: {[s.name for s in get()]}")


def _check_chat_trace(spans: list[Any]) -> None:
    server = next(s for s in spans if s.name == "POST /api/chat")
    client = next(s for s in spans if s.name == "chat llama3.2")
    assert server.kind == ProtoSpan.SPAN_KIND_SERVER and client.kind == ProtoSpan.SPAN_KIND_CLIENT
    assert client.trace_id == server.trace_id and client.parent_span_id == server.span_id
    attributes = attributes_of(client)
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "ollama"
    assert attributes["gen_ai.request.model"] == "llama3.2"
    assert attributes["gen_ai.response.model"] == "llama3.2"
    assert attributes["gen_ai.usage.input_tokens"] > 0
    assert attributes["gen_ai.usage.output_tokens"] > 0
    assert attributes["gen_ai.response.finish_reasons"] in (["stop"], ["length"])
    assert attributes["server.address"] == "127.0.0.1"
    assert "ollama.eval_duration_ns" in attributes
    server_attributes = attributes_of(server)
    assert server_attributes["http.response.status_code"] == 200
    assert server_attributes["http.route"] == "/api/chat"
    # the span ends with the last byte: it covers the whole stream
    assert client.end_time_unix_nano > client.start_time_unix_nano
    for span in spans:  # never prompts or bodies on spans
        assert "Why is the sky" not in str(attributes_of(span))


def test_spans_over_otlp_http(tmp: Path, upstream: Server) -> None:
    with OtlpReceiver() as receiver:
        proxy = start_proxy(tmp, [upstream.url], {"telemetry": {
            "otlp_endpoint": receiver.url, "otlp_protocol": "http/protobuf"}}, name="otlp-http")
        try:
            client = ollama.Client(host=proxy.url)
            parts = list(client.chat(model="llama3.2", stream=True,
                                     messages=[{"role": "user", "content": "Why is the sky blue?"}]))
            assert parts[-1].done
            spans = _wait_spans(receiver.spans,
                                lambda s: {"POST /api/chat", "chat llama3.2"} <= {x.name for x in s})
            _check_chat_trace(spans)
        finally:
            proxy.stop()


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[Any] = []

    def Export(self, request: Any, context: Any) -> Any:
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_spans_over_otlp_grpc_from_standard_environment(tmp: Path, upstream: Server) -> None:
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")  # grpc binds now and returns the port it got
    server.start()
    proxy = start_proxy(tmp, [upstream.url], name="otlp-grpc", env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_SERVICE_NAME": "proxy-under-test"})
    try:
        client = ollama.Client(host=proxy.url)
        client.chat(model="llama3.2", messages=[{"role": "user", "content": "Why is the sky blue?"}])
        spans = _wait_spans(lambda: collector.spans,
                            lambda s: {"POST /api/chat", "chat llama3.2"} <= {x.name for x in s})
        _check_chat_trace(spans)
    finally:
        proxy.stop()
        server.stop(0)


def test_no_export_without_endpoint(tmp: Path, upstream: Server) -> None:
    proxy = start_proxy(tmp, [upstream.url], name="no-export")
    try:
        assert httpx.get(f"{proxy.url}/api/version").status_code == 200
    finally:
        proxy.stop()
    assert "OTLP" not in proxy.log()


def test_prometheus_metrics(proxy: Server) -> None:
    client = ollama.Client(host=proxy.url)
    client.chat(model="llama3.2", messages=[{"role": "user", "content": "hello"}])
    list(client.generate(model="llama3.2", prompt="hi", stream=True))
    client.embed(model="nomic-embed-text", input="x")
    text = httpx.get(f"{proxy.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "http_server_request_duration_seconds" in families
    assert "http_server_active_requests" in families
    usage = families["gen_ai_client_token_usage"]
    token_types = {s.labels.get("gen_ai_token_type") for s in usage.samples}
    assert {"input", "output"} <= token_types
    operations = {s.labels.get("gen_ai_operation_name")
                  for s in families["gen_ai_client_operation_duration_seconds"].samples}
    assert {"chat", "text_completion", "embeddings"} <= operations
    models = {s.labels.get("gen_ai_request_model")
              for s in families["gen_ai_client_operation_time_to_first_chunk_seconds"].samples}
    assert "llama3.2" in models
    routes = {s.labels.get("http_route")
              for s in families["http_server_request_duration_seconds"].samples}
    assert {"/api/chat", "/api/generate", "/api/embed"} <= routes


def test_every_seconds_histogram_has_buckets_in_seconds(proxy: Server) -> None:
    """A `*_seconds` histogram created without bucket advice got the SDK's default boundaries, which are
    milliseconds (0, 5, 10, ... 10000): every queue wait and token count then fell in `le="5"`, and the
    dashboard's P95 queue wait read ~4.75 s for waits of a few milliseconds."""
    client = ollama.Client(host=proxy.url)
    client.chat(model="llama3.2", messages=[{"role": "user", "content": "hello"}])
    text = httpx.get(f"{proxy.url}/metrics").text
    checked = set()
    for family in text_string_to_metric_families(text):
        if family.type != "histogram" or not family.name.endswith("_seconds"):
            continue
        bounds = {float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")}
        finite = sorted(b for b in bounds if b != float("inf"))
        if not finite:
            continue
        checked.add(family.name)
        assert finite[0] < 0.1 and finite[-1] <= 300, (family.name, finite)
    # The two that had the default boundaries, besides those of the HTTP and GenAI conventions.
    assert {"sop_queue_wait_seconds", "sop_limits_count_duration_seconds",
            "http_server_request_duration_seconds"} <= checked


def test_the_proxy_s_own_routes_are_named_in_metrics_and_the_access_log(tmp: Path,
                                                                           upstream: Server) -> None:
    """`/system/*` were unnamed: their access lines read `"GET (other)"` and their durations (an events
    stream's whole life among them) went to `http_route=""` with the unknown paths forwarded to Ollama."""
    proxy = start_proxy(tmp, [upstream.url], {"admin": {"keys": ["own-routes-admin"]}}, name="own-routes")
    try:
        admin = {"Authorization": "Bearer own-routes-admin"}
        paths = ["/system/config", "/system/quotas", "/system/queue", "/system/profile"]
        for path in paths:
            assert httpx.get(f"{proxy.url}{path}", headers=admin).status_code == 200
        with httpx.stream("GET", f"{proxy.url}/system/events", headers=admin) as events:
            assert events.status_code == 200
        assert httpx.get(f"{proxy.url}/system/nope", headers=admin).status_code == 404  # Ollama's
        routes = {s.labels.get("http_route") for f in text_string_to_metric_families(
            httpx.get(f"{proxy.url}/metrics").text) if f.name == "http_server_request_duration_seconds"
                  for s in f.samples}
        assert {*paths, "/system/events"} <= routes
        assert "/system/nope" not in routes  # not an own route: forwarded, unnamed
        deadline = time.monotonic() + 5
        while '"GET /system/events"' not in proxy.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        for path in paths:
            assert f'"GET {path}" 200' in proxy.log()
        assert '"GET /system/events" 499 client_disconnect' in proxy.log()  # the reader left
    finally:
        proxy.stop()


def test_chain_steps_have_their_own_spans(tmp: Path, upstream: Server) -> None:
    """limits and quotas each emit one INTERNAL span, a sibling under the root SERVER span, ended before
    the upstream CLIENT span starts; a rejection marks its step's span with error.type."""
    key = "sk-telemetry"
    with OtlpReceiver() as receiver:
        proxy = start_proxy(tmp, [upstream.url], {
            "telemetry": {"otlp_endpoint": receiver.url, "otlp_protocol": "http/protobuf"},
            "tenants": [{"name": "obs", "keys": [key], "requests_per_minute": 1}],
            "chain": {"limits": {"max_prompt_tokens": 1000}}}, name="chain-spans")
        try:
            headers = {"Authorization": f"Bearer {key}"}
            body = {"model": "llama3.2", "stream": False,
                    "messages": [{"role": "user", "content": "hi"}]}
            assert httpx.post(f"{proxy.url}/api/chat", json=body, headers=headers).status_code == 200
            assert httpx.post(f"{proxy.url}/api/chat", json=body, headers=headers).status_code == 429
            spans = _wait_spans(receiver.spans, lambda s: sum(x.name == "sop.quotas" for x in s) == 2)
        finally:
            proxy.stop()
    roots = sorted((s for s in spans if s.name == "POST /api/chat"), key=lambda s: s.start_time_unix_nano)
    first, second = roots
    children = [s for s in spans if s.parent_span_id == first.span_id]
    by_name = {s.name: s for s in children}
    assert {"sop.limits", "sop.quotas", "chat llama3.2"} <= set(by_name)
    client = by_name["chat llama3.2"]
    for step in ("sop.limits", "sop.quotas"):
        assert by_name[step].kind == ProtoSpan.SPAN_KIND_INTERNAL
        assert by_name[step].end_time_unix_nano <= client.start_time_unix_nano
    assert attributes_of(by_name["sop.limits"])["sop.limits.count_method"] == "sentencepiece"
    assert attributes_of(by_name["sop.limits"])["sop.limits.prompt_tokens"] > 0
    rejected = next(s for s in spans if s.parent_span_id == second.span_id and s.name == "sop.quotas")
    assert attributes_of(rejected)["error.type"] == "rate_limited"
    assert attributes_of(second)["http.response.status_code"] == 429


def test_metric_prefix_renames_every_own_name(tmp: Path, upstream: Server) -> None:
    """`telemetry.metric_prefix: acme`: every step span, attribute, event and metric of the proxy's own is
    `acme.*` (`acme_*` on /metrics), none `sop.*`; and every step records its span with a decision on
    every forwarded request, also when it has nothing to do (an anonymous tenant without limits: quotas
    `unlimited`; a route without a model: limits and backpressure `not_applicable`)."""
    steps = ("limits", "quotas", "backpressure", "health", "balancer")
    with OtlpReceiver() as receiver:
        proxy = start_proxy(tmp, [upstream.url], {
            "telemetry": {"otlp_endpoint": receiver.url, "otlp_protocol": "http/protobuf",
                          "metric_prefix": "acme"}}, name="acme-prefix")
        try:
            client = ollama.Client(host=proxy.url)
            client.chat(model="llama3.2", messages=[{"role": "user", "content": "hello"}])
            client.list()
            spans = _wait_spans(receiver.spans, lambda s: {"GET /api/tags", "chat llama3.2"}
                                <= {x.name for x in s} and sum(x.name == "acme.balancer" for x in s) >= 2)
            text = httpx.get(f"{proxy.url}/metrics").text
        finally:
            proxy.stop()
    for root_name, decisions in (("POST /api/chat", {"quotas": "unlimited"}),
                                 ("GET /api/tags", {"limits": "not_applicable", "quotas": "unlimited",
                                                    "backpressure": "not_applicable"})):
        root = next(s for s in spans if s.name == root_name)
        children = {s.name: attributes_of(s) for s in spans if s.parent_span_id == root.span_id}
        for step in steps:
            attributes = children[f"acme.{step}"]
            assert attributes["acme.step.mode"] == "enforce"
            assert isinstance(attributes[f"acme.{step}.decision"], str)
        for step, decision in decisions.items():
            assert children[f"acme.{step}"][f"acme.{step}.decision"] == decision
    for span in spans:
        names = [span.name, *attributes_of(span), *(event.name for event in span.events)]
        assert not [n for n in names if n.startswith("sop")], names
    assert any("acme.upstream.name" in attributes_of(s) for s in spans)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    own = {name for name in families if name.startswith("acme_")}
    assert {"acme_limits_decisions", "acme_quotas_decisions", "acme_queue_depth",
            "acme_upstream_healthy", "acme_upstream_in_flight"} <= own
    assert not [name for name in families if name.startswith("sop")]
    labels = {label for f in families.values() for sample in f.samples for label in sample.labels}
    assert not [label for label in labels if label.startswith("sop")], labels
    assert "acme_upstream_name" in labels


def test_export_honours_the_standard_headers_and_compression(tmp: Path, upstream: Server) -> None:
    """OTEL_EXPORTER_OTLP_HEADERS (URL-encoded values) and _COMPRESSION reach the collector, as with the
    SDK's exporter: a collector behind an auth proxy keeps working."""
    with OtlpReceiver() as receiver:
        proxy = start_proxy(tmp, [upstream.url], {"telemetry": {
            "otlp_endpoint": receiver.url, "otlp_protocol": "http/protobuf"}}, name="otlp-headers",
            env={"OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=ops,authorization=Bearer%20abc",
                 "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip"})
        try:
            ollama.Client(host=proxy.url).chat(model="llama3.2",
                                               messages=[{"role": "user", "content": "hi"}])
            _wait_spans(receiver.spans, lambda s: "chat llama3.2" in {x.name for x in s})
        finally:
            proxy.stop()
        headers = receiver.headers[0]
        assert headers["x-tenant"] == "ops" and headers["authorization"] == "Bearer abc"
        assert headers["content-encoding"] == "gzip"
        assert headers["content-type"] == "application/x-protobuf"


def test_a_collector_that_is_down_costs_no_request(tmp: Path, upstream: Server) -> None:
    """Spans that cannot be sent are dropped after one retry and said once in the log; requests and the
    process are unaffected, and the stop does not hang on the export."""
    import socket

    with socket.socket() as sock:  # a port with nobody listening
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    proxy = start_proxy(tmp, [upstream.url], {"telemetry": {
        "otlp_endpoint": dead, "otlp_protocol": "http/protobuf"}}, name="otlp-down")
    try:
        client = ollama.Client(host=proxy.url)
        for _ in range(5):
            client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
        deadline = time.monotonic() + 30
        while "span export to the OTLP endpoint failed" not in proxy.log():
            assert time.monotonic() < deadline, proxy.log()
            time.sleep(0.2)
        assert httpx.get(f"{proxy.url}/api/version").status_code == 200
    finally:
        started = time.monotonic()
        proxy.stop()
    assert time.monotonic() - started < 10  # bounded: the shutdown flush gives up
    assert proxy.process.returncode == 0
    assert proxy.log().count("span export to the OTLP endpoint failed") == 1  # once a minute at most


def test_a_model_name_of_megabytes_stays_off_the_spans(tmp: Path, upstream: Server) -> None:
    """The model a body names is the client's text: every span carries it cut to 256 characters (the
    step spans carried it whole, so one request naming a 1 MB model exported megabytes of spans)."""
    with OtlpReceiver() as receiver:
        proxy = start_proxy(tmp, [upstream.url], {
            "telemetry": {"otlp_endpoint": receiver.url, "otlp_protocol": "http/protobuf"}},
            name="otlp-long-model")
        try:
            name = "m" * (1 << 20)
            answer = httpx.post(f"{proxy.url}/api/chat", timeout=30, json={
                "model": name, "stream": False, "messages": [{"role": "user", "content": "hi"}]})
            assert answer.status_code == 400  # the replica refuses the name: it went through the chain
            spans = _wait_spans(receiver.spans, lambda s: any(x.name == "POST /api/chat" for x in s)
                                and sum(x.name.startswith("sop.") for x in s) >= 4)
        finally:
            proxy.stop()
    carrying = [s for s in spans if "gen_ai.request.model" in attributes_of(s)]
    assert {"sop.limits", "sop.health", "sop.balancer"} <= {s.name for s in carrying}
    for span in carrying:
        assert attributes_of(span)["gen_ai.request.model"] == "m" * 256, span.name
    for span in spans:
        assert all(len(str(v)) <= 1024 for v in attributes_of(span).values()), span.name


def test_control_characters_a_client_sends_reach_spans_escaped(tmp: Path, upstream: Server) -> None:
    """The model a body names and the path (percent-decoded: %1b%0d%0a are ESC CR LF) are the client's
    text: on every span they carry, non-printable characters are escaped as on log lines, so a trace UI
    or a collector's exporter shows `\\x1b`, never the escape sequence itself; printable text of any
    script is left as it was."""
    model = "x\r\nInjected: 1\x1b[31m\u202e\x00\u6a21\u578b"
    with OtlpReceiver() as receiver:
        proxy = start_proxy(tmp, [upstream.url], {
            "telemetry": {"otlp_endpoint": receiver.url, "otlp_protocol": "http/protobuf"}},
            name="otlp-control-chars")
        try:
            agent = "ua\u00e9\u0085".encode()  # UTF-8 on the wire: a C1 control (NEL) after an e-acute
            answer = httpx.post(f"{proxy.url}/api/chat", timeout=30, headers={"User-Agent": agent},
                                json={"model": model, "stream": False,
                                      "messages": [{"role": "user", "content": "hi"}]})
            assert answer.status_code == 400  # the replica refuses the name: it went through the chain
            assert httpx.get(f"{proxy.url}/api/%1b%5b2J%0d%0aforged", timeout=30).status_code == 404
            spans = _wait_spans(receiver.spans, lambda s: any(x.name == "POST /api/chat" for x in s)
                                and sum(x.name.startswith("sop.") for x in s) >= 4
                                and any(attributes_of(x).get("url.path", "").endswith("forged")
                                        for x in s))
        finally:
            proxy.stop()
    carrying = [s for s in spans if "gen_ai.request.model" in attributes_of(s)]
    assert {"sop.limits", "sop.health", "sop.balancer"} <= {s.name for s in carrying}
    for span in carrying:
        assert attributes_of(span)["gen_ai.request.model"] == (
            "x\\x0d\\x0aInjected: 1\\x1b[31m\\u202e\\x00\u6a21\u578b"), span.name
    paths = {attributes_of(s)["url.path"] for s in spans if "url.path" in attributes_of(s)}
    assert "/api/\\x1b[2J\\x0d\\x0aforged" in paths
    agents = {attributes_of(s)["user_agent.original"] for s in spans
              if s.name == "POST /api/chat"}
    assert agents == {"ua\u00e9\\x85"}
    for span in spans:
        for value in attributes_of(span).values():
            assert not isinstance(value, str) or value.isprintable(), (span.name, value)


def test_an_attempt_failed_before_its_first_byte_is_an_error_in_the_genai_duration(tmp_path: Path) -> None:
    """`gen_ai.client.operation.duration` carries `error.type` for an operation that ended in error (the
    GenAI conventions): a replica silent until the deadline (504) and a client that left before the first
    byte are recorded with their error, not among the successful operations."""
    emulator = start_emulator(tmp_path)
    proxy = start_proxy(tmp_path, [{"url": emulator.url, "name": "replica-a"}])
    body = {"model": "llama3.2", "stream": False, "messages": [{"role": "user", "content": "hi"}]}
    try:
        assert httpx.post(f"{emulator.url}/_emulator/faults", json={"hang_before_headers": True, "count": 2},
                          timeout=5).status_code == 200
        silent = httpx.post(f"{proxy.url}/api/chat", json=body, headers={"X-Deadline-S": "1"}, timeout=30)
        assert silent.status_code == 504
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{proxy.url}/api/chat", json=body, timeout=1)

        def errors() -> dict[str, float]:
            found: dict[str, float] = {}
            for family in text_string_to_metric_families(httpx.get(f"{proxy.url}/metrics", timeout=5).text):
                for sample in family.samples:
                    if sample.name == "gen_ai_client_operation_duration_seconds_count":
                        found[sample.labels.get("error_type", "")] = sample.value
            return found
        expected = {"upstream_response_timeout": 1.0, "client_disconnect": 1.0}
        wait_for(lambda: errors() == expected, 10, f"the two failed operations recorded as {expected}")
    finally:
        proxy.stop()
        emulator.stop()
