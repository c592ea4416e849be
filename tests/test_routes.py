"""The route table (proxy/ollama.py): every route Ollama registers is in it with what each module needs,
every module asks it, and no module of the proxy core keeps its own list of Ollama paths."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import httpx
import pytest

from middlewares.quotas import is_exempt
from proxy.access import is_management
from proxy.fanout import fleet_scope
from proxy.ollama import PROXY_ROUTES, classify, known_route
from tests.support.servers import Server

ROOT = Path(__file__).resolve().parents[1]

# Reference §2 (server/routes.go at v0.33.0-rc2): every route Ollama registers, as (method, path, template).
OLLAMA_ROUTES = [
    ("HEAD", "/", "/"), ("GET", "/", "/"),
    ("HEAD", "/api/version", "/api/version"), ("GET", "/api/version", "/api/version"),
    ("GET", "/api/status", "/api/status"),
    ("POST", "/api/pull", "/api/pull"), ("POST", "/api/push", "/api/push"),
    ("HEAD", "/api/tags", "/api/tags"), ("GET", "/api/tags", "/api/tags"),
    ("POST", "/api/show", "/api/show"), ("DELETE", "/api/delete", "/api/delete"),
    ("POST", "/api/me", "/api/me"), ("POST", "/api/signout", "/api/signout"),
    ("DELETE", "/api/user/keys/c2stYWJj", "/api/user/keys/{encodedKey}"),
    ("POST", "/api/create", "/api/create"),
    ("POST", "/api/blobs/sha256:0123", "/api/blobs/{digest}"),
    ("HEAD", "/api/blobs/sha256:0123", "/api/blobs/{digest}"),
    ("POST", "/api/copy", "/api/copy"),
    ("POST", "/api/experimental/web_search", "/api/experimental/web_search"),
    ("POST", "/api/experimental/web_fetch", "/api/experimental/web_fetch"),
    ("GET", "/api/experimental/model-recommendations", "/api/experimental/model-recommendations"),
    ("GET", "/api/ps", "/api/ps"),
    ("POST", "/api/generate", "/api/generate"), ("POST", "/api/chat", "/api/chat"),
    ("POST", "/api/embed", "/api/embed"), ("POST", "/api/embeddings", "/api/embeddings"),
    ("POST", "/v1/chat/completions", "/v1/chat/completions"),
    ("POST", "/v1/completions", "/v1/completions"), ("POST", "/v1/embeddings", "/v1/embeddings"),
    ("GET", "/v1/models", "/v1/models"), ("GET", "/v1/models/llama3.2", "/v1/models/{model}"),
    ("POST", "/v1/responses", "/v1/responses"),
    ("POST", "/v1/audio/transcriptions", "/v1/audio/transcriptions"),
    ("POST", "/v1/messages", "/v1/messages"),
]


@pytest.mark.parametrize("method,path,template", OLLAMA_ROUTES)
def test_every_ollama_route_is_in_the_table(method: str, path: str, template: str) -> None:
    route = classify(method, path)
    assert route.template == template
    assert known_route(path) == template
    assert route.dialect == ("anthropic" if path == "/v1/messages"
                             else "openai" if path.startswith("/v1/") else "ollama")


# (method, path): operation, dialect, prompt shape, prompt field, system field, output limit, stream default
INFERENCE = {
    ("POST", "/api/chat"): ("chat", "ollama", "chat", "messages", None, "num_predict", True),
    ("POST", "/api/generate"): ("text_completion", "ollama", "generate", "prompt", None, "num_predict", True),
    ("POST", "/api/embed"): ("embeddings", "ollama", "embed", "input", None, None, False),
    ("POST", "/api/embeddings"): ("embeddings", "ollama", "embed", "prompt", None, None, False),
    ("POST", "/v1/chat/completions"): ("chat", "openai", "chat", "messages", None, "max_completion_tokens",
                                       False),
    ("POST", "/v1/completions"): ("text_completion", "openai", "generate", "prompt", None, "max_tokens",
                                  False),
    ("POST", "/v1/embeddings"): ("embeddings", "openai", "embed", "input", None, None, False),
    ("POST", "/v1/responses"): ("chat", "openai", "chat", "input", "instructions", "max_output_tokens",
                                False),
    ("POST", "/v1/messages"): ("chat", "anthropic", "chat", "messages", "system", "max_tokens", False),
}


@pytest.mark.parametrize("method,path", sorted(INFERENCE))
def test_inference_rows(method: str, path: str) -> None:
    route = classify(method, path)
    assert (route.operation, route.dialect, route.prompt_shape, route.prompt_field, route.system_field,
            route.output_limit, route.stream_default) == INFERENCE[(method, path)]
    assert not route.management and not route.quota_exempt and route.fleet_scope is None


def test_a_known_path_with_another_method_is_named_but_not_inference() -> None:
    # gin answers these 405; the proxy forwards them, names their route, and applies nothing.
    for method, path in (("GET", "/api/chat"), ("PUT", "/v1/messages"), ("GET", "/api/pull")):
        route = classify(method, path)
        assert route.template == path
        assert route.operation is None and route.prompt_shape == "none"
        assert not route.management and route.fleet_scope is None and not route.json_body
    assert classify("GET", "/v1/messages").dialect == "openai"  # Anthropic's only on its POST


def test_unknown_paths_have_no_template_but_keep_the_prefix_dialect() -> None:
    assert classify("POST", "/api/nope").template is None
    assert classify("POST", "/api/nope").dialect == "ollama"
    assert classify("POST", "/v1/nope").dialect == "openai"
    assert classify("GET", "/system/nope").template is None  # forwarded: not one of the proxy's routes
    for path in PROXY_ROUTES:
        assert classify("GET", path).template == path


@pytest.mark.parametrize("method,path,scope", [
    ("GET", "/api/tags", "tags"), ("GET", "/api/ps", "ps"), ("GET", "/v1/models", "models"),
    ("POST", "/api/pull", "manage"), ("POST", "/api/push", "manage"), ("POST", "/api/create", "manage"),
    ("POST", "/api/copy", "manage"), ("DELETE", "/api/delete", "manage"),
    ("HEAD", "/api/tags", None), ("POST", "/api/tags", None), ("POST", "/api/show", None),
    ("POST", "/api/blobs/sha256:0", None), ("GET", "/v1/models/m", None), ("POST", "/api/chat", None),
])
def test_fleet_scope(method: str, path: str, scope: str | None) -> None:
    assert fleet_scope(method, path) == scope


@pytest.mark.parametrize("method,path,management", [
    ("POST", "/api/pull", True), ("POST", "/api/push", True), ("POST", "/api/create", True),
    ("POST", "/api/copy", True), ("DELETE", "/api/delete", True), ("POST", "/api/blobs/sha256:0", True),
    ("HEAD", "/api/blobs/sha256:0", True), ("POST", "/api/blobs/a/b", True),
    ("GET", "/api/pull", False), ("POST", "/api/delete", False), ("POST", "/api/show", False),
    ("GET", "/api/blobs/sha256:0", False), ("POST", "/api/chat", False), ("GET", "/api/tags", False),
])
def test_management_routes(method: str, path: str, management: bool) -> None:
    assert is_management(method, path) is management
    assert classify(method, path).management is management


@pytest.mark.parametrize("method,path,exempt", [
    ("GET", "/", True), ("HEAD", "/", True), ("GET", "/api/tags", True), ("HEAD", "/api/tags", True),
    ("GET", "/api/ps", True), ("HEAD", "/api/ps", True), ("GET", "/api/version", True),
    ("GET", "/v1/models", True), ("HEAD", "/v1/models", True), ("GET", "/v1/models/llama3.2", True),
    ("HEAD", "/v1/models/m", True), ("POST", "/api/show", True),
    ("GET", "/v1/models/", False), ("GET", "/v1/models/library/m", False), ("POST", "/v1/models", False),
    ("GET", "/api/show", False), ("POST", "/api/chat", False), ("POST", "/api/pull", False),
    ("GET", "/api/status", False),
])
def test_quota_exempt_routes(method: str, path: str, exempt: bool) -> None:
    assert is_exempt(method, path) is exempt


def test_json_and_progress_rows() -> None:
    json_routes = {(m, p) for m, p, _ in OLLAMA_ROUTES if classify(m, p).json_body}
    assert json_routes == {("POST", "/api/show"), ("POST", "/api/pull"), ("POST", "/api/push"),
                           ("POST", "/api/create"), ("POST", "/api/copy"), ("DELETE", "/api/delete")}
    progress = {p for m, p, _ in OLLAMA_ROUTES if classify(m, p).progress_stream}
    assert progress == {"/api/pull", "/api/push", "/api/create"}
    uploads = {(m, t) for m, p, t in OLLAMA_ROUTES if classify(m, p).streams_body_upload}
    assert uploads == {("POST", "/api/blobs/{digest}")}


# Literals the proxy core may hold: requests it makes itself (probes, warm-up, the tokenizer fetch) and
# the OTLP exporters' paths. Anything else that names an Ollama route is a path list in disguise.
_OWN_REQUESTS = {"/api/version", "/api/ps", "/api/tags", "/api/show", "/api/generate", "/api/embed",
                 "/api/chat", "/v1/traces", "/v1/metrics"}
_ROUTE_TABLE_FILES = {"proxy/ollama.py"}
_EXCLUDED_DIRS = ("proxy/emulator/", "proxy/loadgen/")
_PATH = re.compile(r"/(api|v1)/[\w./{}:-]*")
"""A string that is a route path or prefix (prose such as the demo's curl lines is not)."""


def _docstrings(tree: ast.AST) -> set[int]:
    """Ids of the strings that are statements of their own: module, class, function and attribute
    docstrings (prose that may name routes; it classifies nothing)."""
    return {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}


def test_no_module_of_the_core_keeps_its_own_path_list() -> None:
    found: list[str] = []
    for path in sorted([*ROOT.glob("proxy/**/*.py"), *ROOT.glob("middlewares/**/*.py")]):
        relative = path.relative_to(ROOT).as_posix()
        if relative in _ROUTE_TABLE_FILES or relative.startswith(_EXCLUDED_DIRS):
            continue
        tree = ast.parse(path.read_text())
        skip = _docstrings(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
                    and _PATH.fullmatch(node.value) and node.value not in _OWN_REQUESTS):
                found.append(f"{relative}:{node.lineno}: {node.value!r}")
    assert found == [], "classify requests with proxy.ollama.classify, not a path list:\n" + "\n".join(found)


def test_the_scan_would_see_a_path_list() -> None:
    # The scan above must be able to fail: the literal forms a path list takes are seen.
    tree = ast.parse('X = frozenset({"/api/chat2", "/v1/chat/x"})\nif p.startswith("/api/blobs/"): pass\n'
                     'def f():\n    """Uses /api/chat."""\n\nprint(f"curl {u}/api/chat -d x")\n')
    skip = _docstrings(tree)
    literals = sorted(node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
                      and isinstance(node.value, str) and id(node) not in skip
                      and _PATH.fullmatch(node.value))
    assert literals == ["/api/blobs/", "/api/chat2", "/v1/chat/x"]


def test_http_route_of_a_templated_path_reaches_the_span_name(proxy: Server) -> None:
    # End to end: the table's template is what ingress names the request by (access log and metrics).
    response = httpx.get(f"{proxy.url}/v1/models/llama3.2", timeout=10)
    assert response.status_code in (200, 404)
    metrics = httpx.get(f"{proxy.url}/metrics", timeout=10).text
    assert 'http_route="/v1/models/{model}"' in metrics
