"""The emulator's HTTP surface: gin's routing rules (404/405/trailing-slash redirect), the Host and CORS
guards of reference §3, body decoding with Go's error texts, and `/_emulator/*` introspection.

Routing is done here rather than by aiohttp's router so that fallbacks match gin byte for byte.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import cattrs
from aiohttp import web

from proxy.cors import origin_pattern
from proxy.ollama import is_cloud_model
from proxy.schema import OLLAMA_DEFAULT_ORIGINS
from proxy.validation import format_validation_error

from . import wire
from .anthropic_compat import AnthropicError, AnthropicRoutes, anthropic_error_type
from .catalog import ModelStore
from .cloud import CLOUD_PATHS, CloudRoutes, cloud_error_message
from .engine import ContextOverflow, Engine, EngineSettings
from .faults import FAULT_KEY, FAULTS, FaultBox, Faults, ListenerControl
from .management import ManagementRoutes
from .native import NativeRoutes, RequestError
from .openai_compat import OpenAIError, OpenAIRoutes, openai_error_type
from .scheduler import SERVER_BUSY, ServerBusy
from .vocabulary import Vocabulary, default_vocabulary

__all__ = ["DEFAULT_MODELS", "ENGINE", "LISTENER", "create_emulator_app"]

ENGINE: web.AppKey[Engine] = web.AppKey("emulator_engine", Engine)
LISTENER: web.AppKey[ListenerControl] = web.AppKey("emulator_listener", ListenerControl)
DEFAULT_MODELS = ("llama3.2", "qwen3", "nomic-embed-text")

Handler = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]


@attrs.frozen
class Route:
    """One registered path: its methods, handler and how its JSON body is decoded."""

    pattern: re.Pattern[str]
    methods: tuple[str, ...]
    handler: Handler
    struct: str | None = None
    """The Go request struct its body decodes into (a key of gotypes.SCHEMAS); None: no JSON body."""
    cloud: bool = False
    """Ollama forwards this route's requests for cloud models to ollama.com."""


_CORS_ALLOW_HEADERS = ("Authorization,Content-Type,User-Agent,Accept,X-Requested-With,Openai-Beta,"
                       "X-Stainless-Arch,X-Stainless-Async,X-Stainless-Custom-Poll-Interval,"
                       "X-Stainless-Helper-Method,X-Stainless-Lang,X-Stainless-Os,"
                       "X-Stainless-Package-Version,X-Stainless-Poll-Helper,X-Stainless-Retry-Count,"
                       "X-Stainless-Runtime,X-Stainless-Runtime-Version,X-Stainless-Timeout")
_CORS_PATTERNS = tuple(origin_pattern(origin) for origin in OLLAMA_DEFAULT_ORIGINS)


def _route(path: str, methods: tuple[str, ...], handler: Handler, struct: str | None = None) -> Route:
    regex = "^" + re.sub(r":(\w+)", r"(?P<\1>[^/]+)", path) + "$"
    return Route(re.compile(regex), methods, handler, struct, path in CLOUD_PATHS)


def _routes(engine: Engine) -> list[Route]:
    native = NativeRoutes(engine)
    manage = ManagementRoutes(engine)
    openai = OpenAIRoutes(engine)
    anthropic = AnthropicRoutes(engine)
    cloud = CloudRoutes()
    head_get = ("GET", "HEAD")
    return [
        _route("/", head_get, manage.root),
        _route("/api/version", head_get, manage.version),
        _route("/api/status", ("GET",), manage.status),
        _route("/api/pull", ("POST",), manage.pull, "PullRequest"),
        _route("/api/push", ("POST",), manage.push, "PushRequest"),
        _route("/api/tags", head_get, manage.tags),
        _route("/api/show", ("POST",), manage.show, "ShowRequest"),
        _route("/api/delete", ("DELETE",), manage.delete, "DeleteRequest"),
        _route("/api/create", ("POST",), manage.create, "CreateRequest"),
        _route("/api/blobs/:digest", ("POST", "HEAD"), _blob_dispatch(manage)),
        _route("/api/copy", ("POST",), manage.copy, "CopyRequest"),
        _route("/api/experimental/model-recommendations", ("GET",), manage.recommendations),
        _route("/api/ps", ("GET",), manage.ps),
        _route("/api/generate", ("POST",), native.generate, "GenerateRequest"),
        _route("/api/chat", ("POST",), native.chat, "ChatRequest"),
        _route("/api/embed", ("POST",), native.embed, "EmbedRequest"),
        _route("/api/embeddings", ("POST",), native.embeddings, "EmbeddingRequest"),
        _route("/v1/chat/completions", ("POST",), openai.chat_completions, "openai.ChatCompletionRequest"),
        _route("/v1/completions", ("POST",), openai.completions, "openai.CompletionRequest"),
        _route("/v1/embeddings", ("POST",), openai.embeddings, "openai.EmbedRequest"),
        _route("/v1/models", ("GET",), openai.models),
        _route("/v1/models/:model", ("GET",), openai.model),
        _route("/v1/responses", ("POST",), openai.responses, "openai.ResponsesRequest"),
        _route("/v1/audio/transcriptions", ("POST",), openai.transcriptions),
        _route("/v1/messages", ("POST",), anthropic.messages, "anthropic.MessagesRequest"),
        _route("/api/me", ("POST",), cloud.unauthorized),
        _route("/api/signout", ("POST",), cloud.signout),
        _route("/api/user/keys/:encodedKey", ("DELETE",), cloud.signout),
        _route("/api/experimental/web_search", ("POST",), cloud.unauthorized),
        _route("/api/experimental/web_fetch", ("POST",), cloud.unauthorized),
    ]


def _blob_dispatch(manage: ManagementRoutes) -> Handler:
    async def handler(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if request.method == "HEAD":
            return await manage.head_blob(request, body)
        return await manage.create_blob(request, body)
    return handler


def _redirect(request: web.Request, location: str) -> web.Response:
    """gin's trailing-slash redirect through Go's http.Redirect: 301 with a small HTML body for GET,
    307 with no body and no Content-Type otherwise."""
    if request.method == "GET":
        body = f'<a href="{location}">Moved Permanently</a>.\n\n'.encode()
        return web.Response(status=301, body=body, headers={
            "Location": location, "Content-Type": "text/html; charset=utf-8"})
    return web.Response(status=307, headers={"Location": location})


def _host_allowed(host_header: str) -> bool:
    """Ollama's DNS-rebinding guard for a loopback listener (reference §3.2)."""
    host = host_header
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    host = host.lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return (host in ("", "localhost", socket.gethostname().lower())
                or host.endswith((".localhost", ".local", ".internal")))
    return address.is_loopback or address.is_private or address.is_unspecified


def _origin_allowed(origin: str) -> bool:
    return any(pattern.fullmatch(origin) is not None for pattern in _CORS_PATTERNS)


def create_emulator_app(settings: EngineSettings | None = None, models: tuple[str, ...] = DEFAULT_MODELS,
                        vocabulary: Vocabulary | None = None, loopback_guard: bool = True,
                        engine: Engine | None = None) -> web.Application:
    """An aiohttp application that behaves like one Ollama daemon holding `models`.

    `loopback_guard` turns on the Host check Ollama applies when it listens on loopback. `engine`
    replaces the emulated token source (e.g. a LlamaCppEngine); it then also brings its own settings.
    """
    if engine is None:
        settings = settings or EngineSettings()
        store = ModelStore.with_models(models, settings.fixed_clock_ns or time.time_ns())
        engine = Engine(settings, store, vocabulary or default_vocabulary())
    routes = _routes(engine)
    cloud_routes = CloudRoutes()
    faults = FaultBox()
    calls: Counter[str] = Counter()
    """Requests per route (`POST /api/show`), for tests; one key per registered route."""
    anthropic_ids = AnthropicRoutes(engine)

    async def render_error(request: web.Request, exc: RequestError) -> web.StreamResponse:
        if isinstance(exc, OpenAIError) or (request.path.startswith("/v1/")
                                            and not request.path.startswith("/v1/messages")):
            value: dict[str, Any] = {"error": {"message": exc.message,
                                               "type": openai_error_type(exc.status),
                                               "param": None, "code": None}}
            return await wire.send_json(request, value, exc.status, wire.CT_JSON_PLAIN, newline=True)
        if isinstance(exc, AnthropicError) or request.path == "/v1/messages":
            value = {"type": "error", "error": {"type": anthropic_error_type(exc.status),
                                                "message": exc.message},
                     "request_id": anthropic_ids.request_id()}
            return await wire.send_json(request, value, exc.status, wire.CT_JSON_PLAIN, newline=True)
        return await wire.send_error(request, exc.status, exc.message)

    async def stats(request: web.Request) -> web.StreamResponse:
        per_model = {name: s.as_dict() for name, s in sorted(engine.stats.items())}
        totals = {key: sum(s[key] for s in per_model.values())
                  for key in ("active", "waiting", "completed", "cancelled", "rejected")}
        scheduler = engine.scheduler
        return web.json_response({**totals, "peak": engine.peak, "models": per_model,
                                  "loaded": sorted(scheduler.runners), "loading": scheduler.loading,
                                  "loads": scheduler.loads, "faults": faults.as_dict(),
                                  "requests": dict(calls),
                                  "backend": getattr(engine, "backend_url", None),
                                  "backend_startup_s": getattr(engine, "startup_s", None)})

    async def fault_admin(request: web.Request) -> web.StreamResponse:
        if request.method == "DELETE":
            faults.clear()
        elif request.method == "POST":
            try:
                data = await request.json()
                set_to = faults.set(data if isinstance(data, dict) else {})
            except cattrs.BaseValidationError as exc:
                return web.json_response(
                    {"error": f"invalid faults: {format_validation_error(exc)}"}, status=400)
            except ValueError as exc:  # not JSON at all
                return web.json_response({"error": f"invalid faults: {exc}"}, status=400)
            if set_to.refuse_connections_s > 0:
                control = request.app.get(LISTENER)
                if control is None:
                    faults.clear()
                    return web.json_response(
                        {"error": "refuse_connections_s needs the emulator started by its CLI"},
                        status=501)
                control.refuse_for(set_to.refuse_connections_s)
        return web.json_response(faults.as_dict())

    def with_retry_after(refused: web.StreamResponse, active: Faults) -> web.StreamResponse:
        """`refused` with the Retry-After the setting asks for (none unless it asks: neither Ollama
        nor ollama.com sends one); an error body is small, so its headers are not sent yet."""
        header = active.retry_after_header
        if header is not None and not refused.prepared:
            refused.headers["Retry-After"] = header
        return refused

    async def apply_faults(request: web.Request, cloud: bool) -> web.StreamResponse | None:
        """Answer or stall the request as the faults in force say; None lets it through. `cloud`: the
        request names a cloud model on a route Ollama forwards to ollama.com."""
        active = faults.take(request.path, cloud)
        if active is None:
            return None
        if active.cloud_status is not None:
            # ollama.com's refusal, copied through by the daemon: status, body, and no Retry-After
            # unless the setting asks for one.
            message = active.message or cloud_error_message(active.cloud_status, request.path)
            return with_retry_after(await render_error(request, RequestError(active.cloud_status,
                                                                             message)), active)
        if active.status is not None:
            message = active.message or (SERVER_BUSY if active.status == 503 else
                                         "an error was encountered while running the model: "
                                         "emulated fault")
            return with_retry_after(await render_error(request, RequestError(active.status, message)),
                                    active)
        if active.hang_before_headers:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                faults.abandoned += 1
                raise
        if active.shapes_streams:
            request[FAULT_KEY] = active
        return None

    async def dispatch(request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == "/_emulator/stats" and request.method == "GET":
            return await stats(request)
        if path == "/_emulator/faults":
            return await fault_admin(request)
        origin = request.headers.get("Origin")
        host = request.headers.get("Host", "")
        cors_headers: dict[str, str] = {}
        if origin and origin not in (f"http://{host}", f"https://{host}"):
            if not _origin_allowed(origin):
                return web.Response(status=403)
            if request.method == "OPTIONS":
                return web.Response(status=204, headers={
                    "Access-Control-Allow-Origin": origin,
                    "Access-Control-Allow-Methods": "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS",
                    "Access-Control-Allow-Headers": _CORS_ALLOW_HEADERS,
                    "Access-Control-Max-Age": "43200", "Vary": "Origin"})
            cors_headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if loopback_guard and not _host_allowed(host):
            return web.Response(status=403)
        matches = [(route, m) for route in routes if (m := route.pattern.match(path))]
        if not matches and path != "/" and path.endswith("/"):
            trimmed = path.rstrip("/")
            if any(route.pattern.match(trimmed) for route in routes):
                location = request.headers.get("X-Forwarded-Prefix", "") + trimmed
                return _redirect(request, location)
        if not matches:
            return await wire.send_bytes(request, 404, b"404 page not found", "text/plain")
        for route, match in matches:
            if request.method in route.methods:
                name = path if not route.pattern.groupindex else route.pattern.pattern
                calls[f"{request.method} {name}"] += 1
                request.match_info.update(match.groupdict())
                body: dict[str, Any] = {}
                decode_error: RequestError | None = None
                if route.struct is not None:
                    # Read first: whether a request is for a cloud model (and so which faults
                    # apply) is in its body.
                    raw = await request.read()
                    try:
                        body = wire.decode_body(raw, route.struct)
                    except wire.GoDecodeError as exc:
                        decode_error = RequestError(400, str(exc))
                named = request.match_info.get("model") or body.get("model") or body.get("name")
                cloud = route.cloud and is_cloud_model(named)
                faulted = await apply_faults(request, cloud)
                if faulted is not None:
                    return faulted
                try:
                    if decode_error is not None:
                        raise decode_error
                    if cloud and engine.store.get(str(named)) is None:
                        # Not a model this daemon serves: it would forward the request to ollama.com
                        # signed with its key, and it has none.
                        response = await cloud_routes.unauthorized(request, body)
                    else:
                        response = await route.handler(request, body)
                except RequestError as exc:
                    response = await render_error(request, exc)
                except ServerBusy as exc:
                    response = await render_error(request, RequestError(503, str(exc)))
                except ContextOverflow as exc:  # found by a real engine's tokenizer, before any output
                    response = await render_error(request, RequestError(400, str(exc)))
                if cors_headers and not response.prepared:
                    response.headers.update(cors_headers)
                return response
        allow = ", ".join(dict.fromkeys(m for route, _ in matches for m in route.methods))
        return await wire.send_bytes(request, 405, b"405 method not allowed", "text/plain",
                                     {"Allow": allow})

    app = web.Application(client_max_size=1 << 40)
    app[ENGINE] = engine
    app[FAULTS] = faults
    app.router.add_route("*", r"/{tail:[\s\S]*}", dispatch)  # `.` stops at a newline (%0A in a path)
    return app
