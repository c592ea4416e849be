"""Every span, attribute and metric name the proxy emits, in one place.

GenAI names follow the OpenTelemetry GenAI semantic conventions; HTTP names the stable HTTP conventions.
The proxy's own names are `<prefix>.<step>...` with the prefix from `telemetry.metric_prefix`.
"""

from __future__ import annotations

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
    "ATTR_UPSTREAM_NAME",
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
    "metric_name",
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

# The proxy's own attributes
ATTR_UPSTREAM_NAME = "sop.upstream.name"

# Metrics
METRIC_HTTP_REQUEST_DURATION = "http.server.request.duration"
METRIC_HTTP_ACTIVE_REQUESTS = "http.server.active_requests"
METRIC_GEN_AI_TOKEN_USAGE = "gen_ai.client.token.usage"
METRIC_GEN_AI_OPERATION_DURATION = "gen_ai.client.operation.duration"
METRIC_GEN_AI_TIME_TO_FIRST_CHUNK = "gen_ai.client.operation.time_to_first_chunk"


def metric_name(prefix: str, *parts: str) -> str:
    """`<prefix>.<part>...`, e.g. metric_name("sop", "queue", "depth") -> "sop.queue.depth"."""
    return ".".join((prefix, *parts))
