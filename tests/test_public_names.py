"""The public names, pinned: span names, metric names as `/metrics` exposes them, the response headers the
proxy adds, and every configuration key path. Dashboards, alerts, clients and config files use them, so a
rename must fail here (and then be a deliberate, documented change).

Names are read from what a real proxy emits (spans over OTLP to a receiver on loopback, `/metrics` through
the Prometheus parser, headers from an HTTP client), and config keys from both the loader's class tree and
deploy/config.example.yaml, then compared with the literal lists below.
"""

from __future__ import annotations

import time
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Config
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.servers import Server, start_emulator, start_proxy

ROOT = Path(__file__).resolve().parent.parent

STEP_SPANS = ["sop.limits", "sop.quotas", "sop.backpressure", "sop.health", "sop.balancer"]
"""One INTERNAL span per step, on every forwarded request (in chain order)."""

SEEN_METRICS = {
    "http_server_request_duration_seconds", "http_server_active_requests",
    "gen_ai_client_token_usage", "gen_ai_client_operation_duration_seconds",
    "gen_ai_client_operation_time_to_first_chunk_seconds",
    "sop_limits_decisions", "sop_quotas_decisions", "sop_backpressure_decisions", "sop_health_decisions",
    "sop_balancer_decisions", "sop_limits_count_duration_seconds", "sop_queue_wait_seconds",
    "sop_queue_depth", "sop_upstream_in_flight", "sop_upstream_healthy", "sop_health_probes",
    "sop_config_version", "sop_config_refused", "sop_config_restart_required",
    "sop_upstream_max_in_flight",
}
"""Families every proxy that served a chat exposes (counters without `_total`, as the parser names them)."""

ALL_PROXY_METRICS = SEEN_METRICS | {
    "sop_upstream_errors", "sop_limits_truncations", "sop_health_ejections", "sop_health_restarts",
    "sop_balancer_model_loads", "sop_balancer_retries", "sop_state_degraded", "sop_state_failures",
    "sop_config_reloads", "sop_events_published", "sop_events_dropped",
}
"""Every family of the proxy's own; the ones not in SEEN_METRICS appear once something happened."""

METRIC_LABELS = {"sop_upstream_name", "sop_lane", "decision", "outcome", "method", "gen_ai_request_model",
                 "kind"}
"""Label names of the proxy's own metrics (besides the semconv ones and otel_scope_*)."""

HEADERS = {
    "x-service-limits", "x-request-id", "x-queue-wait-ms", "x-ratelimit-limit", "x-ratelimit-remaining",
    "x-ratelimit-reset", "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests", "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens", "x-ratelimit-limit-concurrent", "x-ratelimit-remaining-concurrent",
    "x-options-rewritten", "x-prompt-truncated",
}
"""Response headers the proxy adds to a chat of a tenant with every limit, rewritten and truncated."""

CONFIG_KEYS = """
server.listen server.max_body_bytes server.header_timeout_s server.keepalive_timeout_s server.backlog
server.shutdown_timeout_s server.max_header_bytes server.body_timeout_s server.max_connections
server.config_watch_s
server.cors_origins
admin.keys
upstreams[].url upstreams[].name upstreams[].num_parallel upstreams[].weight upstreams[].restart_command
forwarding.connect_timeout_s forwarding.first_byte_timeout_s forwarding.idle_timeout_s forwarding.pool_size
forwarding.keepalive_s
tenants[].name tenants[].keys tenants[].lane tenants[].weight tenants[].requests_per_minute
tenants[].tokens_per_minute tenants[].max_concurrent tenants[].deadline_s tenants[].max_prompt_tokens
tenants[].allow_management
anonymous.allow anonymous.keys anonymous.requests_per_minute anonymous.tokens_per_minute
anonymous.max_concurrent anonymous.deadline_s anonymous.max_prompt_tokens
models.*.max_prompt_tokens models.*.prompt_policy models.*.tokenizer models.*.options models.*.warm_on
models.*.pinned models.*.replicas
chain.limits.mode chain.limits.max_prompt_tokens chain.limits.prompt_policy chain.limits.deadline_s
chain.limits.strip_load_options chain.limits.truncation_tolerance_tokens chain.limits.upstream_truncation
chain.quotas.mode chain.quotas.default_output_tokens chain.quotas.lease_ttl_s
chain.backpressure.mode chain.backpressure.max_queue_size chain.backpressure.queue_timeout_s
chain.backpressure.max_in_flight chain.backpressure.fair chain.backpressure.bulk_share
chain.backpressure.adaptive
chain.backpressure.adaptive_max_in_flight chain.backpressure.adaptive_tolerance
chain.backpressure.auto_max_in_flight chain.backpressure.cold_queue_timeout_s
chain.health.mode chain.health.probe_interval_s chain.health.probe_jitter chain.health.probe_timeout_s
chain.health.eject_after_failures chain.health.base_ejection_s chain.health.max_ejection_s
chain.health.max_ejection_ratio chain.health.stuck_after_s chain.health.restart_after_failures
chain.health.restart_min_interval_s chain.health.restart_timeout_s chain.health.warm_timeout_s
chain.balancer.mode chain.balancer.affinity chain.balancer.affinity_prefix_bytes chain.balancer.cold_load_s
chain.balancer.max_retries chain.balancer.retry_budget_ratio chain.balancer.min_retry_concurrency
state.backend state.url state.key_prefix state.failure_mode state.socket_timeout_s state.max_connections
state.retry_interval_s state.lease_ttl_s
telemetry.service_name telemetry.otlp_endpoint telemetry.otlp_protocol telemetry.sample_ratio
telemetry.metric_prefix telemetry.export_interval_s telemetry.access_log telemetry.metrics_auth
plugins
chain.limits.rollout.enforce_share chain.limits.rollout.tenants
chain.quotas.rollout.enforce_share chain.quotas.rollout.tenants
chain.backpressure.rollout.enforce_share chain.backpressure.rollout.tenants
chain.health.rollout.enforce_share chain.health.rollout.tenants
chain.balancer.rollout.enforce_share chain.balancer.rollout.tenants
""".split()


def _class_paths(cls: type, prefix: str = "") -> set[str]:
    """Key paths of an attrs class tree as the loader reads it: `[]` for list items, `*` for map keys."""
    paths: set[str] = set()
    hints = typing.get_type_hints(cls)
    for field in attrs.fields(cls):
        path = f"{prefix}{field.name}"
        type_ = hints[field.name]
        args = typing.get_args(type_)
        if attrs.has(type_):
            paths |= _class_paths(type_, f"{path}.")
        elif typing.get_origin(type_) is tuple and args and attrs.has(args[0]):
            paths |= _class_paths(args[0], f"{path}[].")
        elif typing.get_origin(type_) is dict and attrs.has(args[1]):
            paths |= _class_paths(args[1], f"{path}.*.")
        else:
            paths.add(path)
    return paths


def _yaml_paths(value: Any, prefix: str = "", *, leaf_maps: frozenset[str] = frozenset()) -> set[str]:
    """Key paths of the example file; `models` is a map by model name; `leaf_maps` are values that are
    mappings themselves (`models.*.options`)."""
    if isinstance(value, dict) and prefix.rstrip(".") not in leaf_maps:
        paths: set[str] = set()
        for key, item in value.items():
            segment = "*" if prefix == "models." else str(key)
            paths |= _yaml_paths(item, f"{prefix}{segment}.", leaf_maps=leaf_maps)
        return paths
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return _yaml_paths(value[0], prefix.rstrip(".") + "[].", leaf_maps=leaf_maps)
    return {prefix.rstrip(".")}


def test_config_keys_are_pinned_and_documented() -> None:
    """Every key the loader accepts is in the pinned list and in deploy/config.example.yaml, and back."""
    example = yaml.safe_load((ROOT / "deploy" / "config.example.yaml").read_text(encoding="utf-8"))
    documented = _yaml_paths(example, leaf_maps=frozenset({"models.*.options"}))
    loaded = _class_paths(Config)
    assert len(CONFIG_KEYS) == len(set(CONFIG_KEYS))
    assert loaded == set(CONFIG_KEYS), (sorted(loaded - set(CONFIG_KEYS)), sorted(set(CONFIG_KEYS) - loaded))
    assert documented == loaded, (sorted(documented - loaded), sorted(loaded - documented))


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_emulator(tmp_path_factory.mktemp("names-emu"), name="names-emu")
    yield server
    server.stop()


def _wait(get: Any, predicate: Any, timeout_s: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = get()
        if predicate(value):
            return value
        time.sleep(0.1)
    raise AssertionError(f"not received in time: {get()!r:.2000}")


def test_span_metric_and_header_names(tmp_path: Path, upstream: Server) -> None:
    key = "sk-names"
    with OtlpReceiver() as receiver:
        proxy = start_proxy(tmp_path, [upstream.url], {
            "telemetry": {"otlp_endpoint": receiver.url, "otlp_protocol": "http/protobuf"},
            "tenants": [{"name": "names", "keys": [key], "requests_per_minute": 100,
                         "tokens_per_minute": 1_000_000, "max_concurrent": 4}],
            "models": {"llama3.2": {"max_prompt_tokens": 64, "prompt_policy": "truncate",
                                    "options": {"num_ctx": 2048}}}}, name="names-proxy")
        try:
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " * 4}
                        for i in range(9)]
            response = httpx.post(f"{proxy.url}/api/chat", headers={"Authorization": f"Bearer {key}"},
                                  json={"model": "llama3.2", "stream": False, "messages": messages,
                                        "options": {"num_ctx": 8192}}, timeout=30)
            assert response.status_code == 200, response.text
            added = {name.lower() for name in response.headers if name.lower().startswith("x-")}
            assert added == HEADERS, (sorted(added - HEADERS), sorted(HEADERS - added))

            wanted = {"chat llama3.2", "POST /api/chat"}
            spans = _wait(receiver.spans, lambda s: wanted <= {x.name for x in s})
            root = next(s for s in spans if s.name == "POST /api/chat")
            children = [s.name for s in sorted(spans, key=lambda s: s.start_time_unix_nano)
                        if s.parent_span_id == root.span_id]
            assert children == [*STEP_SPANS, "chat llama3.2"]

            families = _wait(lambda: {f.name: f for f in text_string_to_metric_families(
                httpx.get(f"{proxy.url}/metrics").text)}, lambda f: set(f) >= SEEN_METRICS)
        finally:
            proxy.stop()
    own = {name for name in families if name.startswith("sop_")}
    assert own <= ALL_PROXY_METRICS, sorted(own - ALL_PROXY_METRICS)
    labels = {label for name in own for sample in families[name].samples for label in sample.labels
              if not label.startswith("otel_scope_") and label != "le"}
    assert labels <= METRIC_LABELS, sorted(labels - METRIC_LABELS)
    assert {"sop_upstream_name", "sop_lane", "decision"} <= labels
