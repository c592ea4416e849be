"""Ollama wire knowledge the proxy needs: the route table (every route Ollama registers, with what each
module needs to know about it), and how to read usage from a response without re-encoding it.

Usage is read from bytes: the final `done` object (native), the `usage` object (OpenAI) or the
`message_delta` event (Anthropic) all sit at the end of the body, so a bounded tail is scanned with
anchored regexes. JSON string content cannot produce a false match: quotes inside strings are escaped.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

__all__ = [
    "EMBEDDINGS_PATH",
    "EMBED_PATH",
    "OPENAI_EMBEDDINGS_PATH",
    "PROXY_ROUTES",
    "RouteInfo",
    "Usage",
    "UsageScanner",
    "classify",
    "is_cloud_model",
    "known_route",
    "model_key",
    "path_model",
]


EMBED_PATH = "/api/embed"
"""Ollama's batch embedding route (also what the proxy itself sends embedding sub-requests to)."""
EMBEDDINGS_PATH = "/api/embeddings"
"""Ollama's legacy single-input embedding route (unnormalised vectors)."""
OPENAI_EMBEDDINGS_PATH = "/v1/embeddings"
"""The OpenAI-compatible embedding route."""


def model_key(model: str) -> str:
    """Ollama's name matching: `llama3.2`, `LLaMA3.2:latest`, `library/llama3.2` and
    `registry.ollama.ai/library/llama3.2:latest` are one model (host `registry.ollama.ai`, namespace
    `library` and tag `latest` by default, case-insensitive; a registry host's port is not a tag). The
    key is the short form replicas list (`llama3.2:latest`): a fully qualified name meets the same
    queue, slots and quotas as the short one."""
    key = _KEYS.get(model)
    if key is None:
        name = model.strip().lower()
        scheme, sep, rest = name.partition("://")
        if sep and scheme in ("http", "https"):  # Ollama's name parser drops a scheme
            name = rest
        if name.startswith(_DEFAULT_HOST):
            rest = name[len(_DEFAULT_HOST):]
            if rest.count("/") == 1:  # host/namespace/model: the host is the default one
                name = rest
        if name.startswith(_DEFAULT_NAMESPACE) and name.count("/") == 1 \
                and len(name) > len(_DEFAULT_NAMESPACE):
            name = name[len(_DEFAULT_NAMESPACE):]
        key = name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"
        if len(model) <= 256:  # client-chosen names: bounded in size and in number
            if len(_KEYS) >= 4096:
                _KEYS.clear()
            _KEYS[model] = key
    return key


_DEFAULT_HOST = "registry.ollama.ai/"
_DEFAULT_NAMESPACE = "library/"
_KEYS: dict[str, str] = {}
"""model_key's answers (~20 a request, for a handful of names)."""


def is_cloud_model(model: object) -> bool:
    """Whether Ollama forwards a request for `model` to ollama.com instead of running it: the last
    `:`-suffix is `cloud` or ends with `-cloud` (`gpt-oss:120b-cloud`, `qwen3:cloud`), case-insensitive,
    as Ollama's model reference parser reads it. Such a request's errors are the cloud's, not the
    replica's."""
    if not isinstance(model, str):
        return False
    name = model.strip()
    colon = name.rfind(":")
    if colon < 0:
        return False
    suffix = name[colon + 1:].strip()
    lowered = suffix.lower()
    return lowered == "cloud" or ("/" not in suffix and lowered.endswith("-cloud"))


@attrs.frozen
class RouteInfo:
    """What the proxy knows about a request from its method and path alone: one row of the route table.

    Every module that classifies a request asks this (via `classify`, an O(1) lookup) instead of keeping
    its own list of paths: ingress (`template`, `streams_body_upload`), access (`management`), limits
    (`prompt_shape`, `json_body`, `dialect`), prompts (`prompt_field`, `system_field`, `output_limit`),
    quotas (`quota_exempt`) and the fan-out (`fleet_scope`).
    """

    operation: str | None
    """GenAI operation name (`chat`, `text_completion`, `embeddings`) or None for other routes."""
    dialect: str
    """Error and stream dialect of the route: `ollama`, `openai` or `anthropic`."""
    stream_default: bool
    """Whether the route streams when the body does not say (native true, /v1 false)."""
    streams_body_upload: bool = False
    """True for blob uploads, whose body is relayed as it arrives instead of being read first."""
    template: str | None = None
    """The route as `http.route` names it (`/api/blobs/{digest}`), None for paths Ollama does not
    define. It depends on the path only: `GET /api/chat` is still `/api/chat` (gin answers it 405)."""
    prompt_shape: str = "none"
    """How the prompt is counted and cut: `chat` (messages), `generate` (one prompt string), `embed`
    (inputs, each limited on its own) or `none`."""
    prompt_field: str | None = None
    """The body field that holds the prompt: `messages`, `input` (Responses, embed) or `prompt`."""
    system_field: str | None = None
    """The top-level field that holds a system prompt outside the messages (`system` on Anthropic's
    Messages, `instructions` on Responses), None where system prompts are messages."""
    output_limit: str | None = None
    """The body field that caps the output: `num_predict` (in `options`), `max_tokens`,
    `max_completion_tokens` (falling back to `max_tokens`, as OpenAI's chat API does) or
    `max_output_tokens`."""
    fleet_scope: str | None = None
    """`tags`, `ps`, `models` (merged listings) or `manage` (sent to every replica), None for routes one
    replica answers (proxy/fanout.py)."""
    management: bool = False
    """Changes the replicas' model store (pull, push, create, copy, delete, blobs): needs
    `allow_management` or an admin key."""
    quota_exempt: bool = False
    """A listing or metadata route, which spends no quota."""
    model_in_path: bool = False
    """The path's last segment names the model (`GET /v1/models/{model}`): routing must send it to a
    replica that has the model, as the body's `model` does for `/api/show`."""
    json_body: bool = False
    """A non-inference route whose body Ollama decodes as JSON (limits refuses what Go would refuse)."""
    progress_stream: bool = False
    """A management route that answers with NDJSON progress when it streams (pull, push, create); the
    others (copy, delete) answer once, with an empty body."""
    missing_model_not_found: bool = False
    """Ollama answers a body that names no model 404 `model '' not found` (/api/generate, /api/embed, and
    /v1/completions and /v1/embeddings, which it runs on those), not 400 `model is required` (chat,
    /api/embeddings, the other /v1 routes, Anthropic's Messages)."""
    go_type: str = "api.Request"
    """The Go type Ollama decodes the body into, as its decoder's errors name it
    (`json: cannot unmarshal array into Go value of type api.GenerateRequest`)."""

    @property
    def go_struct(self) -> str:
        """`go_type` without its package, as a struct field error names it (`GenerateRequest.model`)."""
        return self.go_type.rpartition(".")[2]


_NATIVE = RouteInfo(None, "ollama", True, output_limit="num_predict")
_OPENAI = RouteInfo(None, "openai", False, output_limit="max_completion_tokens")


def _native(**fields: Any) -> RouteInfo:
    """A native non-inference row: streams by default (Ollama's `stream` is true when absent)."""
    return attrs.evolve(_NATIVE, **fields)


def _openai(**fields: Any) -> RouteInfo:
    """An OpenAI-compatible non-inference row."""
    return attrs.evolve(_OPENAI, **fields)


_ROUTE_TABLE: tuple[tuple[tuple[str, ...], str, RouteInfo], ...] = (
    # (methods, path or template, row), in the order of reference §2.
    (("HEAD", "GET"), "/", _native(quota_exempt=True)),
    (("HEAD", "GET"), "/api/version", _native(quota_exempt=True)),
    (("GET",), "/api/status", _native()),
    (("POST",), "/api/pull", _native(fleet_scope="manage", management=True, json_body=True,
                                         progress_stream=True, go_type="api.PullRequest")),
    (("POST",), "/api/push", _native(fleet_scope="manage", management=True, json_body=True,
                                         progress_stream=True, go_type="api.PushRequest")),
    (("GET",), "/api/tags", _native(fleet_scope="tags", quota_exempt=True)),
    (("HEAD",), "/api/tags", _native(quota_exempt=True)),
    (("POST",), "/api/show", _native(quota_exempt=True, json_body=True, go_type="api.ShowRequest")),
    (("DELETE",), "/api/delete", _native(fleet_scope="manage", management=True, json_body=True,
                                         go_type="api.DeleteRequest")),
    (("POST",), "/api/me", _native()),
    (("POST",), "/api/signout", _native()),
    (("DELETE",), "/api/user/keys/{encodedKey}", _native()),
    (("POST",), "/api/create", _native(fleet_scope="manage", management=True, json_body=True,
                                         progress_stream=True, go_type="api.CreateRequest")),
    (("POST",), "/api/blobs/{digest}", RouteInfo(None, "ollama", False, streams_body_upload=True,
                                                 output_limit="num_predict", management=True)),
    (("HEAD",), "/api/blobs/{digest}", _native(management=True)),
    (("POST",), "/api/copy", _native(fleet_scope="manage", management=True, json_body=True,
                                     go_type="api.CopyRequest")),
    (("POST",), "/api/experimental/web_search", _native()),
    (("POST",), "/api/experimental/web_fetch", _native()),
    (("GET",), "/api/experimental/model-recommendations", _native()),
    (("GET",), "/api/ps", _native(fleet_scope="ps", quota_exempt=True)),
    (("HEAD",), "/api/ps", _native(quota_exempt=True)),
    (("POST",), "/api/generate", RouteInfo("text_completion", "ollama", True, prompt_shape="generate",
                                           prompt_field="prompt", output_limit="num_predict",
                                           missing_model_not_found=True, go_type="api.GenerateRequest")),
    (("POST",), "/api/chat", RouteInfo("chat", "ollama", True, prompt_shape="chat",
                                       prompt_field="messages", output_limit="num_predict",
                                       go_type="api.ChatRequest")),
    (("POST",), "/api/embed", RouteInfo("embeddings", "ollama", False, prompt_shape="embed",
                                        prompt_field="input", missing_model_not_found=True,
                                        go_type="api.EmbedRequest")),
    (("POST",), "/api/embeddings", RouteInfo("embeddings", "ollama", False, prompt_shape="embed",
                                             prompt_field="prompt", go_type="api.EmbeddingRequest")),
    (("POST",), "/v1/chat/completions", RouteInfo(
        "chat", "openai", False, prompt_shape="chat", prompt_field="messages",
        output_limit="max_completion_tokens", go_type="openai.ChatCompletionRequest")),
    (("POST",), "/v1/completions", RouteInfo("text_completion", "openai", False, prompt_shape="generate",
                                             prompt_field="prompt", output_limit="max_tokens",
                                             missing_model_not_found=True,
                                             go_type="openai.CompletionRequest")),
    (("POST",), "/v1/embeddings", RouteInfo("embeddings", "openai", False, prompt_shape="embed",
                                            prompt_field="input", missing_model_not_found=True,
                                            go_type="openai.EmbedRequest")),
    (("GET",), "/v1/models", _openai(fleet_scope="models", quota_exempt=True)),
    (("HEAD",), "/v1/models", _openai(quota_exempt=True)),
    (("GET", "HEAD"), "/v1/models/{model}", _openai(quota_exempt=True, model_in_path=True)),
    (("POST",), "/v1/responses", RouteInfo("chat", "openai", False, prompt_shape="chat",
                                           prompt_field="input", system_field="instructions",
                                           output_limit="max_output_tokens",
                                           go_type="openai.ResponsesRequest")),
    (("POST",), "/v1/audio/transcriptions", _openai()),
    (("POST",), "/v1/messages", RouteInfo("chat", "anthropic", False, prompt_shape="chat",
                                          prompt_field="messages", system_field="system",
                                          output_limit="max_tokens", go_type="anthropic.MessagesRequest")),
)
"""Every route Ollama registers (reference §2), one row per method: the only list of Ollama paths in the
proxy core."""

PROXY_ROUTES = ("/metrics", "/healthz", "/readyz", "/system/config", "/system/quotas", "/system/queue",
                "/system/profile", "/system/events")
"""The proxy's own routes (proxy/system.py, proxy/events.py), named in `http.route`, span names and the
access log like Ollama's. Exact paths: another path under `/system/` is forwarded, and stays unnamed."""

_TEMPLATE_PREFIXES = {"/api/blobs/": "/api/blobs/{digest}", "/v1/models/": "/v1/models/{model}",
                      "/api/user/keys/": "/api/user/keys/{encodedKey}"}
"""Path-parameter templates, by the fixed prefix before the parameter."""


def _path_default(path: str, template: str | None) -> RouteInfo:
    """The row for a method the route table has no row for: no operation, the dialect of the prefix."""
    if path.startswith("/v1/"):
        return _openai(template=template)
    return _native(template=template)


def _build() -> tuple[dict[tuple[str, str], RouteInfo], dict[str, RouteInfo]]:
    rows: dict[tuple[str, str], RouteInfo] = {}
    by_path: dict[str, RouteInfo] = {}
    for methods, path, row in _ROUTE_TABLE:
        for method in methods:
            rows[(method, path)] = attrs.evolve(row, template=path)
        by_path[path] = _path_default(path, path)
    for path in PROXY_ROUTES:
        by_path[path] = _path_default(path, path)
    return rows, by_path


_ROUTES, _BY_PATH = _build()
_OTHER_OLLAMA = _native()
_OTHER_OPENAI = _openai()


def _template(path: str) -> str | None:
    for prefix, template in _TEMPLATE_PREFIXES.items():
        if path.startswith(prefix):
            return template
    return None


def classify(method: str, path: str) -> RouteInfo:
    """The route table's row for a request line: an exact (method, path) row, else the row of a path
    template (`/api/blobs/{digest}`, `/v1/models/{model}`), else a row that only names the route and its
    dialect (a known path with another method), else the default of the prefix (`/v1/` is OpenAI's).
    O(1): two dict lookups and a few prefix tests."""
    row = _ROUTES.get((method, path))
    if row is not None:
        return row
    template = _template(path)
    if template is not None:
        model = path[len("/v1/models/"):]
        if template == "/v1/models/{model}" and (not model or "/" in model):
            # gin's `:model` is one non-empty segment: anything else is Ollama's 404, not a lookup.
            return _path_default(path, template)
        row = _ROUTES.get((method, template))
        return row if row is not None else _path_default(path, template)
    row = _BY_PATH.get(path)
    if row is not None:
        return row
    return _OTHER_OPENAI if path.startswith("/v1/") else _OTHER_OLLAMA


def path_model(route: RouteInfo, path: str) -> str | None:
    """The model named by the (decoded) `path` of a `route` that names one there, else None."""
    if not route.model_in_path:
        return None
    return path.rpartition("/")[2] or None


def known_route(path: str) -> str | None:
    """The route template for span names and metrics, or None for paths Ollama does not define."""
    return classify("", path).template


@attrs.define
class Usage:
    """Token counts and timings reported by the upstream for one response (None when absent)."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    response_model: str | None = None
    finish_reason: str | None = None
    load_duration_ns: int | None = None
    prompt_eval_duration_ns: int | None = None
    eval_duration_ns: int | None = None
    total_duration_ns: int | None = None
    """From the request's arrival at Ollama: minus load, prompt and eval, the time it queued for a slot."""

    def queued_s(self) -> float | None:
        """The time the request waited inside Ollama for one of the runner's slots; None when the
        response does not report its total and eval durations (embeddings and /v1 routes do not).
        Ollama omits a zero load or prompt-eval duration (`omitempty`): absent counts as zero."""
        total, decode = self.total_duration_ns, self.eval_duration_ns
        if total is None or decode is None:
            return None
        spent = decode + (self.load_duration_ns or 0) + (self.prompt_eval_duration_ns or 0)
        return max(0, total - spent) / 1e9


_COUNTS = re.compile(rb'"(prompt_eval_count|eval_count|load_duration|prompt_eval_duration|eval_duration|'
                     rb'total_duration|prompt_tokens|completion_tokens|input_tokens|output_tokens)":(\d+)')
_MODEL = re.compile(rb'"model":"((?:[^"\\]|\\.)*)"')
_REASON = re.compile(rb'"(done_reason|finish_reason|stop_reason)":"(\w+)"')


_FINAL_MARKERS = (b'"done":true', b'"done": true', b"[DONE]", b"message_stop", b"response.completed",
                  b"response.failed", b"response.incomplete", b'"error"')
"""What only a stream's last record holds, in each dialect (Go's encoder writes no spaces; an
Ollama-compatible server in another language may)."""


class UsageScanner:
    """Fed every relayed chunk; keeps the first and last few KiB and reads usage from them at the end.

    Cost per chunk is a bounded slice copy, independent of the response size.
    """

    __slots__ = ("_carry", "_head", "_tail", "bytes_seen", "data_lines", "newlines")

    HEAD_BYTES = 1024
    TAIL_BYTES = 8192

    def __init__(self) -> None:
        self._head = b""
        self._tail = b""
        self.bytes_seen = 0
        self.newlines = 0
        self.data_lines = 0
        self._carry = b"\n"
        """The end of the previous chunk: a `data:` line split across chunks still counts once."""

    def feed(self, chunk: bytes) -> None:
        """Account one relayed chunk."""
        if len(self._head) < self.HEAD_BYTES:
            self._head += chunk[: self.HEAD_BYTES - len(self._head)]
        self._tail = (self._tail + chunk)[-self.TAIL_BYTES:]
        self.bytes_seen += len(chunk)
        self.newlines += chunk.count(b"\n")
        self.data_lines += (self._carry + chunk[:5]).count(b"\ndata:") + chunk.count(b"\ndata:")
        self._carry = chunk[-5:] if len(chunk) >= 5 else (self._carry + chunk)[-5:]

    def records(self, event_stream: bool) -> int:
        """Records relayed: NDJSON lines, or SSE `data:` lines (an `event:` line may come with each,
        Anthropic's and Responses' streams). JSON escapes a newline inside a string, so every raw one
        ends a record, and a `data:` after one starts an event."""
        return self.data_lines if event_stream else self.newlines

    def usage(self) -> Usage:
        """What the response reported (fields left None when it did not say)."""
        tail = self._tail
        # One pass over the tail for every count (the last occurrence of each wins, as in a stream the
        # final object carries the totals), one for the finish reasons.
        counts = {name: int(value) for name, value in _COUNTS.findall(tail)}
        get = counts.get
        usage = Usage(
            input_tokens=get(b"prompt_eval_count"),
            output_tokens=get(b"eval_count"),
            load_duration_ns=get(b"load_duration"),
            prompt_eval_duration_ns=get(b"prompt_eval_duration"),
            eval_duration_ns=get(b"eval_duration"),
            total_duration_ns=get(b"total_duration"),
        )
        if usage.input_tokens is None:
            usage.input_tokens = get(b"prompt_tokens") or get(b"input_tokens")
        if usage.output_tokens is None:
            usage.output_tokens = get(b"completion_tokens") or get(b"output_tokens")
        model = _MODEL.search(self._head)
        usage.response_model = model.group(1).decode("utf-8", "replace") if model else None
        reasons = dict(_REASON.findall(tail))
        for name in (b"done_reason", b"finish_reason", b"stop_reason"):
            reason = reasons.get(name)
            if reason is not None:
                usage.finish_reason = reason.decode("utf-8", "replace")
                break
        return usage

    def ended_whole(self, event_stream: bool) -> bool:
        """Whether a generation stream's last record is one that ends it: Ollama's `"done":true` line,
        OpenAI's `[DONE]`, Anthropic's `message_stop`, a Responses terminal event, or an error record.
        A stream that stopped after an ordinary record was cut short upstream. True when the last
        record is not in the tail (longer than TAIL_BYTES: an `/api/generate` final line with a long
        `context`): what cannot be seen is not called cut."""
        boundary = b"\n\n" if event_stream else b"\n"
        tail = self._tail.replace(b"\r\n", b"\n").rstrip(b"\n")
        while True:
            start = tail.rfind(boundary)
            if start < 0 and self.bytes_seen > len(self._tail):
                return True
            last = tail[start + len(boundary):] if start >= 0 else tail
            # An SSE comment (`: ping`, a keep-alive some gateways add) after the last event ends
            # nothing: the event before it is the one that counts.
            if not (event_stream and last and all(line.startswith(b":") for line in last.split(b"\n"))):
                return any(marker in last for marker in _FINAL_MARKERS)
            if start < 0:
                return False
            tail = tail[:start].rstrip(b"\n")
