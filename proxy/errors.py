"""The ProxyError tree: every refusal the proxy itself makes, with one table of status, code and Retry-After.

Codes use Envoy's vocabulary; the same string is `error.type` on spans and metrics and the outcome in the
access log. Steps raise these; only ingress renders them (see proxy/ingress.py).
"""

from __future__ import annotations

MAX_RETRY_AFTER_S = 60.0
"""The longest wait a `Retry-After` header asks for. A longer wait is a refusal the client should
surface, not sleep through (the OpenAI SDKs ignore a Retry-After over 60 s and retry after their own
short backoff instead): the header says 60 and `x-should-retry: false` is added; the body's
`retry_after_s` keeps the real estimate."""

__all__ = [
    "MAX_RETRY_AFTER_S",
    "ExpectationFailed",
    "Forbidden",
    "InternalProxyError",
    "InvalidRequest",
    "MalformedBody",
    "MethodNotAllowed",
    "ModelNotFound",
    "NoHealthyUpstream",
    "OutOfDescriptors",
    "Overload",
    "PromptTooLong",
    "ProxyError",
    "QueueTimeout",
    "QuotaExceeded",
    "RateLimited",
    "RequestExceedsQuota",
    "RequestHeaderFieldsTooLarge",
    "RequestPayloadTooLarge",
    "RequestTimeout",
    "ShuttingDown",
    "StateUnavailable",
    "TooManySubscribers",
    "Unauthorized",
    "UnsupportedTransferCoding",
    "UpstreamBusy",
    "UpstreamConnectFailure",
    "UpstreamResetBeforeResponseStarted",
    "UpstreamResponseTimeout",
]


class ProxyError(Exception):
    """A request the proxy ends itself.

    Contract: `status` is the HTTP status before the first byte; `code` is a stable machine-readable
    reason; `message` is safe to show a client (never a prompt, body or key); `retry_after_s`, when set,
    becomes the `Retry-After` header (whole seconds, rounded up) and `retry_after_s` in the body.
    """

    status = 500
    code = "internal_error"
    should_retry: bool | None = None
    """False where retrying the same request cannot help (it is malformed, too large, not allowed, or
    can never fit a budget): rendered as `x-should-retry: false` (the header the OpenAI SDKs obey), and
    no Retry-After. None: the status says it (429/503 say when in Retry-After; 5xx may be retried)."""

    step: str | None = None
    """The chain step (or plugin) that refused, set when a step's `decide` raises it."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    def extra_headers(self) -> dict[str, str]:
        """Headers of this refusal besides the content type and the retry ones (none by default)."""
        return {}


class RequestPayloadTooLarge(ProxyError):
    """The body is larger than `server.max_body_bytes`."""

    status = 413
    code = "request_payload_too_large"
    should_retry = False


class RequestHeaderFieldsTooLarge(ProxyError):
    """The request head (request line and headers) is larger than `server.max_header_bytes`; refused
    before authentication, and the connection is closed."""

    status = 431
    code = "request_header_fields_too_large"
    should_retry = False


class MethodNotAllowed(ProxyError):
    """A method the proxy does not answer on one of its own routes (`/healthz`, `/readyz`, `/metrics`,
    `/system/*`): 405 with `Allow`, as RFC 9110 asks. No replica knows these routes, so forwarding the
    request (as any other unknown one is) could only reach a replica for nothing."""

    status = 405
    code = "method_not_allowed"
    should_retry = False

    def __init__(self, message: str, *, allow: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allow = allow

    def extra_headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allow)}


class ExpectationFailed(ProxyError):
    """An `Expect` header other than `100-continue` (the only expectation HTTP defines): refused before
    authentication, as Go's net/http refuses it, and the body is not read."""

    status = 417
    code = "expectation_failed"
    should_retry = False


class UnsupportedTransferCoding(ProxyError):
    """A request Transfer-Encoding with another coding before `chunked` (`gzip, chunked`): 501 as Go's
    net/http answers it (one not ending in `chunked` never gets here: aiohttp's parser refuses it, a 400
    `bad_request` as RFC 9112 asks). aiohttp reads only the chunked framing, so the body would reach
    the replica still coded and with nothing left to say so (Transfer-Encoding is hop-by-hop). The body
    is not read."""

    status = 501
    code = "unsupported_transfer_coding"
    should_retry = False


class RequestTimeout(ProxyError):
    """The request body stopped arriving for `server.body_timeout_s`; the connection is closed."""

    status = 408
    code = "request_timeout"


class UpstreamConnectFailure(ProxyError):
    """No TCP connection to the replica could be made."""

    status = 502
    code = "upstream_connect_failure"


class UpstreamResetBeforeResponseStarted(ProxyError):
    """The replica closed the connection before sending response headers."""

    status = 502
    code = "upstream_reset_before_response_started"


class UpstreamResponseTimeout(ProxyError):
    """The replica sent no headers within the first-byte timeout (or a body chunk within the idle one)."""

    status = 504
    code = "upstream_response_timeout"


class DeadlinePassed(UpstreamResponseTimeout):
    """The request's own deadline (`deadline_s`, or lower by `X-Deadline-S`) passed before the first
    byte: the same answer, but not the replica's failure (quotas charge a prompt it was sent), and not
    one to retry as it is (`x-should-retry: false`: the OpenAI SDKs retried it twice, each attempt
    another prompt evaluation that the same deadline would cut again)."""

    should_retry = False


class InternalProxyError(ProxyError):
    """An unexpected failure inside the proxy; details go to the log and the span only."""

    status = 500
    code = "internal_error"


class Unauthorized(ProxyError):
    """No valid API key where one is required (or an unknown key)."""

    status = 401
    code = "unauthorized"
    should_retry = False


class Forbidden(ProxyError):
    """A known caller asking for something its role does not allow (management, /system)."""

    status = 403
    code = "forbidden"
    should_retry = False


class PromptTooLong(ProxyError):
    """The prompt has more tokens than the limit that applies (policy `reject`)."""

    status = 400
    code = "prompt_too_long"
    should_retry = False


class InvalidRequest(ProxyError):
    """A request the proxy cannot apply its limits to (for example options of the wrong type)."""

    status = 400
    code = "invalid_request"
    should_retry = False


class ModelNotFound(ProxyError):
    """A body that names no model on a route where Ollama answers that 404 `model '' not found`
    (/api/generate, /api/embed and the /v1 routes it maps to them); the others answer 400 `model is
    required` (InvalidRequest), as Ollama does."""

    status = 404
    code = "model_not_found"
    should_retry = False


class MalformedBody(InvalidRequest):
    """The request body's framing is broken (a bad chunk), or its Content-Encoding does not decode;
    the connection cannot be reused."""

    UNDECODABLE = "the request body could not be decoded as its Content-Encoding says"


class RateLimited(ProxyError):
    """Too many requests (per minute or in flight) for the tenant; retry after `retry_after_s`."""

    status = 429
    code = "rate_limited"


class QuotaExceeded(ProxyError):
    """The tenant's token budget cannot cover the request now; retry after `retry_after_s`."""

    status = 429
    code = "quota_exceeded"


class RequestExceedsQuota(ProxyError):
    """The request alone reserves more tokens than the tenant's whole budget (`tokens_per_minute`, the
    bucket's capacity): it can never be admitted, so waiting cannot help and no Retry-After is sent."""

    status = 400
    code = "request_exceeds_quota"
    should_retry = False


class Overload(ProxyError):
    """The model's queue is full, or the request could not be served within its deadline anyway."""

    status = 503
    code = "overload"


class OutOfDescriptors(Overload):
    """This process ran out of file descriptors (or socket buffers) connecting to the replica: the
    proxy's own overload, the same `overload` 503 with a short Retry-After. Never counted against the
    replica (the replica was not reached) and never retried on another one (it would meet the same
    limit)."""


class QueueTimeout(ProxyError):
    """The request waited its queue timeout (or deadline) without getting a slot."""

    status = 503
    code = "queue_timeout"


class NoHealthyUpstream(ProxyError):
    """No replica that may serve the model is healthy; retry when the next probe or backoff ends."""

    status = 503
    code = "no_healthy_upstream"


class StateUnavailable(ProxyError):
    """The shared state (Redis) cannot answer and `state.failure_mode` is `closed`: quotas cannot be
    checked, so nothing is admitted; retry after `retry_after_s`."""

    status = 503
    code = "state_unavailable"


class ShuttingDown(ProxyError):
    """The proxy is stopping (SIGTERM) and the request did not finish within the grace period."""

    status = 503
    code = "shutting_down"


class TooManySubscribers(ProxyError):
    """`/system/events` already has its maximum of streams open in this process."""

    status = 503
    code = "too_many_subscribers"


class UpstreamBusy(Overload):
    """The replica answered 503 (Ollama's `server busy`) and the balancer may try another one; a client
    sees it only when no other replica could be tried in time."""
