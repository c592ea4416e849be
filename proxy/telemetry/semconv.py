"""Every span, attribute, event and metric name the proxy emits, in one place.

GenAI names follow the OpenTelemetry GenAI semantic conventions; HTTP names the stable HTTP conventions.
The proxy's own names are `<prefix>.<step>...` with the prefix from `telemetry.metric_prefix`: they are
built once per process by `Names(prefix)` (held by Telemetry as `telemetry.names`), so no step or module
spells a `sop.*` name, and a proxy configured with `metric_prefix: acme` emits `acme.*` names only.
Prometheus renders a name with `_` for `.`: `sop.queue.depth` is `sop_queue_depth` on /metrics.
These names are public (dashboards and alerts use them); tests/test_public_names.py pins them.
"""

from __future__ import annotations

from functools import cache

from ..escaping import escape

__all__ = [
    "ATTR_ERROR_TYPE",
    "ATTR_GEN_AI_OPERATION",
    "ATTR_GEN_AI_PROVIDER",
    "ATTR_GEN_AI_REQUEST_MODEL",
    "ATTR_GEN_AI_RESPONSE_FINISH_REASONS",
    "ATTR_GEN_AI_RESPONSE_MODEL",
    "ATTR_GEN_AI_TOKEN_TYPE",
    "ATTR_GEN_AI_USAGE_INPUT",
    "ATTR_GEN_AI_USAGE_OUTPUT",
    "ATTR_HTTP_METHOD",
    "ATTR_HTTP_ROUTE",
    "ATTR_HTTP_STATUS",
    "ATTR_OLLAMA_EVAL_DURATION",
    "ATTR_OLLAMA_LOAD_DURATION",
    "ATTR_OLLAMA_PROMPT_EVAL_DURATION",
    "ATTR_SERVER_ADDRESS",
    "ATTR_SERVER_PORT",
    "ATTR_URL_PATH",
    "ATTR_URL_SCHEME",
    "ATTR_USER_AGENT",
    "COLD_LOAD_EVENT",
    "COLD_LOAD_THRESHOLD_NS",
    "METRIC_GEN_AI_OPERATION_DURATION",
    "METRIC_GEN_AI_TIME_TO_FIRST_CHUNK",
    "METRIC_GEN_AI_TOKEN_USAGE",
    "METRIC_HTTP_ACTIVE_REQUESTS",
    "METRIC_HTTP_REQUEST_DURATION",
    "PROVIDER_OLLAMA",
    "REQUEST_MODEL_CHARS",
    "SILENT_TRUNCATION_EVENT",
    "Names",
    "metric_name",
    "request_model",
    "span_text",
]

# HTTP (stable semconv)
ATTR_HTTP_METHOD = "http.request.method"
ATTR_HTTP_ROUTE = "http.route"
ATTR_HTTP_STATUS = "http.response.status_code"
ATTR_URL_PATH = "url.path"
ATTR_URL_SCHEME = "url.scheme"
ATTR_USER_AGENT = "user_agent.original"
ATTR_SERVER_ADDRESS = "server.address"
ATTR_SERVER_PORT = "server.port"
ATTR_ERROR_TYPE = "error.type"

# GenAI semconv
ATTR_GEN_AI_OPERATION = "gen_ai.operation.name"
ATTR_GEN_AI_PROVIDER = "gen_ai.provider.name"
ATTR_GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
REQUEST_MODEL_CHARS = 256
"""Longest `gen_ai.request.model` on a span: the value is the client's text (see `request_model`)."""
ATTR_GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
ATTR_GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
ATTR_GEN_AI_USAGE_INPUT = "gen_ai.usage.input_tokens"
ATTR_GEN_AI_USAGE_OUTPUT = "gen_ai.usage.output_tokens"
ATTR_GEN_AI_TOKEN_TYPE = "gen_ai.token.type"
PROVIDER_OLLAMA = "ollama"

# Ollama's own timings, as reported in the final `done` object (nanoseconds).
ATTR_OLLAMA_LOAD_DURATION = "ollama.load_duration_ns"
ATTR_OLLAMA_PROMPT_EVAL_DURATION = "ollama.prompt_eval_duration_ns"
ATTR_OLLAMA_EVAL_DURATION = "ollama.eval_duration_ns"
COLD_LOAD_EVENT = "ollama.cold_load"
COLD_LOAD_THRESHOLD_NS = 500_000_000
"""A load_duration above this is reported as a cold-load event (a model was loaded for the request)."""
SILENT_TRUNCATION_EVENT = "ollama.silent_truncation"
"""Ollama evaluated fewer prompt tokens than the proxy counted: it cut the prompt without saying so."""

# Metrics
METRIC_HTTP_REQUEST_DURATION = "http.server.request.duration"
METRIC_HTTP_ACTIVE_REQUESTS = "http.server.active_requests"
METRIC_GEN_AI_TOKEN_USAGE = "gen_ai.client.token.usage"
METRIC_GEN_AI_OPERATION_DURATION = "gen_ai.client.operation.duration"
METRIC_GEN_AI_TIME_TO_FIRST_CHUNK = "gen_ai.client.operation.time_to_first_chunk"


def metric_name(prefix: str, *parts: str) -> str:
    """`<prefix>.<part>...`, e.g. metric_name("sop", "queue", "depth") -> "sop.queue.depth"."""
    return ".".join((prefix, *parts))


class Names:
    """The proxy's own (`<prefix>.*`) names for one prefix, computed once: the hot path reads attributes
    and never formats a name. Per-step names (span, decision, decisions metric) come from the methods,
    which cache their answers."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        p = prefix
        # Attributes shared by several steps, ingress and the forwarder
        self.step_mode = f"{p}.step.mode"
        """Every step span: the step's mode (enforce, shadow, off)."""
        self.tenant = f"{p}.tenant"
        """The tenant's configured name (never a key); on the server span and the quotas span."""
        self.lane = f"{p}.lane"
        """Queue lane (interactive, bulk): backpressure span attribute and metric label."""
        self.upstream_name = f"{p}.upstream.name"
        """A replica's configured name: span attribute and metric label."""
        # limits
        self.limits_max_prompt_tokens = f"{p}.limits.max_prompt_tokens"
        self.limits_prompt_tokens = f"{p}.limits.prompt_tokens"
        self.limits_count_method = f"{p}.limits.count_method"
        self.limits_options_rewritten = f"{p}.limits.options_rewritten"
        self.limits_truncated = f"{p}.limits.truncated"
        # quotas
        self.quotas_reserved_tokens = f"{p}.quotas.reserved_tokens"
        # backpressure
        self.queue_position = f"{p}.queue.position"
        self.queue_cold = f"{p}.queue.cold"
        """True when the request waited on a model load or a replica coming back (cold budget)."""
        # health
        self.health_candidates = f"{p}.health.candidates"
        self.health_dropped = f"{p}.health.dropped"
        self.health_reason = f"{p}.health.reason"
        self.health_models = f"{p}.health.models"
        self.health_restart_exit_code = f"{p}.health.restart.exit_code"
        self.health_restart_span = f"{p}.health.restart"
        self.health_warm_span = f"{p}.health.warm"
        # balancer
        self.balancer_scope = f"{p}.balancer.scope"
        self.balancer_targets = f"{p}.balancer.targets"
        self.balancer_late_bound = f"{p}.balancer.late_bound"
        self.balancer_would_choose = f"{p}.balancer.would_choose"
        self.balancer_costs_s = f"{p}.balancer.costs_s"
        self.balancer_dropped = f"{p}.balancer.dropped"
        self.balancer_retry_event = f"{p}.balancer.retry"
        # history plugins (trim_history, summarize_history) and limits' `prompt_policy: summarize`
        self.summarize_span = f"{p}.summarize_history.summary"
        """The making of one summary (its sub-request's GenAI CLIENT span is under it)."""
        self.summarize_turns = f"{p}.summarize_history.turns"
        self.summarize_tokens_saved = f"{p}.summarize_history.tokens_saved"
        self.summarize_cached = f"{p}.summarize_history.cached"
        self.summarize_fallback = f"{p}.summarize_history.fallback"
        """Why a summary was not used (timeout, busy, failed): the request was trimmed instead."""
        # Metrics (OpenTelemetry names; Prometheus shows `_` for `.`)
        self.metric_summarize_tokens_saved = f"{p}.summarize_history.tokens_saved"
        self.metric_summarize_cache_hits = f"{p}.summarize_history.cache_hits"
        self.metric_summarize_fallbacks = f"{p}.summarize_history.fallbacks"
        self.metric_upstream_errors = f"{p}.upstream.errors"
        self.metric_upstream_in_flight = f"{p}.upstream.in_flight"
        self.metric_upstream_max_in_flight = f"{p}.upstream.max_in_flight"
        self.metric_upstream_healthy = f"{p}.upstream.healthy"
        self.metric_queue_wait = f"{p}.queue.wait"
        self.metric_queue_depth = f"{p}.queue.depth"
        self.metric_limits_truncations = f"{p}.limits.truncations"
        self.metric_limits_count_duration = f"{p}.limits.count_duration"
        self.metric_health_ejections = f"{p}.health.ejections"
        self.metric_health_probes = f"{p}.health.probes"
        self.metric_health_restarts = f"{p}.health.restarts"
        self.metric_balancer_model_loads = f"{p}.balancer.model_loads"
        self.metric_balancer_retries = f"{p}.balancer.retries"
        self.metric_state_degraded = f"{p}.state.degraded"
        self.metric_state_failures = f"{p}.state.failures"
        # configuration reloads (proxy/reload.py)
        self.metric_config_reloads = f"{p}.config.reloads"
        """Counter of reload attempts, labelled `outcome` = applied | refused | unchanged."""
        self.metric_config_version = f"{p}.config.version"
        """Gauge: the version of the configuration being served (1 at start, +1 per applied reload)."""
        self.metric_config_refused = f"{p}.config.refused"
        """Gauge: 1 while the newest file seen was refused (the previous configuration serves), else 0."""
        self.metric_config_restart_required = f"{p}.config.restart_required"
        """Gauge: settings the file changes that only a restart applies (server.listen, ...)."""
        # embed_cache and embed_batch plugins (issue 12)
        self.metric_embed_cache_lookups = f"{p}.plugin.embed_cache.lookups"
        """Counter of inputs looked up, labelled `result` = hit | miss."""
        self.metric_embed_cache_hit_ratio = f"{p}.plugin.embed_cache.hit_ratio"
        """Gauge: hits / lookups since the process started."""
        self.metric_embed_cache_bytes = f"{p}.plugin.embed_cache.bytes"
        """Gauge: bytes held by the in-memory cache."""
        self.metric_embed_batch_batches = f"{p}.plugin.embed_batch.batches"
        """Counter of batches sent upstream, labelled `result` = ok | failed."""
        self.metric_embed_batch_requests = f"{p}.plugin.embed_batch.requests"
        """Counter of client requests answered from a batch."""
        self.metric_embed_batch_inputs = f"{p}.plugin.embed_batch.inputs"
        """Counter of inputs, labelled `sent` = yes | deduplicated."""
        # the live event stream, /system/events (proxy/events.py)
        self.metric_events_published = f"{p}.events.published"
        """Counter of events put on /system/events while someone subscribed, labelled `kind`."""
        self.metric_events_dropped = f"{p}.events.dropped"
        """Counter of events a slow /system/events reader lost (its buffer was full), labelled `kind`."""

    @cache  # noqa: B019 - one Names per process and a handful of steps: the cache stays tiny
    def step_span(self, step: str) -> str:
        """The INTERNAL span of a chain step (or plugin): `<prefix>.<step>`."""
        return f"{self.prefix}.{step}"

    @cache  # noqa: B019 - as above
    def step_decision(self, step: str) -> str:
        """The span attribute holding a step's decision: `<prefix>.<step>.decision`."""
        return f"{self.prefix}.{step}.decision"

    @cache  # noqa: B019 - as above
    def metric_step_decisions(self, step: str) -> str:
        """A step's decisions counter: `<prefix>.<step>.decisions`, labelled by `decision`."""
        return f"{self.prefix}.{step}.decisions"


def span_text(text: str, limit: int) -> str:
    """A client-chosen string as a span attribute: its first `limit` characters, with every character
    that is not printable (C0/C1 controls, CR and LF above all, line separators, bidi overrides and other
    format characters) escaped as `\\xNN`/`\\uNNNN` (proxy/escaping.py, as on log lines), cut again to
    `limit`. OTLP carries the raw string intact, but backends show it: in a trace UI, a collector's debug
    or file exporter, or a log pipeline fed from spans, an ESC sequence, a NUL or an RLO from a request
    body rewrites what the operator reads. Printable text (any script) is left as it was."""
    head = text[:limit]
    if head.isprintable():
        return head
    return escape(head, limit, str.isprintable)[:limit]


def request_model(model: str) -> str:
    """`model` as `gen_ai.request.model` on a span: the client's text, cut to REQUEST_MODEL_CHARS and
    escaped (`span_text`). A body may name a model in megabytes; each span that carries it is kept until
    exported and sent whole, so one such request made an export batch of megabytes (a collector refuses
    it, dropping every other trace of the batch)."""
    return span_text(model, REQUEST_MODEL_CHARS)
