"""The embedding routes' wire shapes, for the plugins that answer them (embed_cache, embed_batch).

What a request asks for (`Ask`: model, inputs, the options that change the vectors), the vectors of an
answer as the exact bytes Ollama wrote (so Go's float32 formatting survives without re-encoding), and
an answer rebuilt in the route's own shape from such bytes.
"""

from __future__ import annotations

import base64
import json
import re
import struct
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import orjson
from aiohttp import web

from .ollama import EMBED_PATH, EMBEDDINGS_PATH, OPENAI_EMBEDDINGS_PATH, Usage

if TYPE_CHECKING:
    from .context import RequestContext

__all__ = ["EMBED_ROUTES", "Answer", "Ask", "apportion", "keep_alive_ok", "parse_ask", "read_answer",
           "render", "respond", "to_base64"]

EMBED_ROUTES = (EMBED_PATH, EMBEDDINGS_PATH, OPENAI_EMBEDDINGS_PATH)

_KEYS = {
    EMBED_PATH: frozenset({"model", "input", "truncate", "dimensions", "options", "keep_alive"}),
    EMBEDDINGS_PATH: frozenset({"model", "prompt", "options", "keep_alive"}),
    OPENAI_EMBEDDINGS_PATH: frozenset({"model", "input", "encoding_format", "dimensions", "user"}),
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_NS = {"ns": 1, "us": 1e3, "µs": 1e3, "μs": 1e3, "ms": 1e6, "s": 1e9, "m": 60e9, "h": 3600e9}
_GO_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
                             "\u2028": "\\u2028", "\u2029": "\\u2029"})
CT_GIN = "application/json; charset=utf-8"
CT_ENCODER = "application/json"


@attrs.frozen
class Ask:
    """One embedding request as the plugins understand it.

    `kind` says what a vector is on the wire: `f32` (a JSON array of float32, /api/embed and /v1 float:
    the same vectors, since Ollama's /v1 route calls its embed handler), `b64` (/v1 base64 of the same
    float32) or `legacy` (/api/embeddings: unnormalised float64, a different vector). `variant` is the
    canonical encoding of everything else that changes the vectors (truncate, dimensions, options).
    `upstream` holds the fields an /api/embed request for the same vectors carries besides model and
    input (keep_alive included: it changes residency, not vectors)."""

    route: str
    model: str
    inputs: tuple[str, ...]
    kind: str
    variant: bytes
    upstream: Mapping[str, Any]


def keep_alive_ok(value: Any) -> bool:
    """Whether Ollama accepts `value` as a `keep_alive` (api.Duration's decoding): absent, a number of
    seconds, or a Go duration string (time.ParseDuration: `5m`, `1h30m`, `-1s`, `0`). Conservative:
    a string near int64 nanoseconds' overflow counts as refused (the replica then says)."""
    if value is None:
        return True
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    if not isinstance(value, str):
        return False
    text = value[1:] if value[:1] in ("+", "-") else value
    if text == "0":
        return True
    total, position = 0.0, 0
    while position < len(text):
        part = _DURATION_PART.match(text, position)
        if part is None:
            return False
        total += float(part.group(1)) * _DURATION_NS[part.group(2)]
        position = part.end()
    return position > 0 and total < 9.2e18  # Go refuses beyond 2**63 - 1 ns (about 9.22e18)


def parse_ask(route: str, body: Any) -> Ask | None:
    """The ask of a body Ollama would accept and the plugins can answer exactly, else None (then the
    request goes on untouched: unknown keys, token arrays, empty inputs, odd types and a keep_alive
    Ollama refuses all do: the replica answers them its own way, a cache must not answer 200)."""
    keys = _KEYS.get(route)
    if keys is None or not isinstance(body, dict) or not keys.issuperset(body):
        return None
    if not keep_alive_ok(body.get("keep_alive")):
        return None
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return None
    if route == EMBEDDINGS_PATH:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return None
        inputs: tuple[str, ...] = (prompt,)
        options = body.get("options")
        variant_of: dict[str, Any] = {"o": options}
        kind = "legacy"
        upstream: dict[str, Any] = {}
    else:
        raw = body.get("input")
        if isinstance(raw, str):
            inputs = (raw,)
        elif isinstance(raw, list) and raw and all(isinstance(item, str) for item in raw):
            inputs = tuple(raw)
        else:
            return None
        if not all(inputs):
            return None
        dimensions = body.get("dimensions")
        if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool)):
            return None
        if route == EMBED_PATH:
            truncate = body.get("truncate", True)
            options = body.get("options")
            if not isinstance(truncate, bool):
                return None
            kind = "f32"
        else:
            truncate, options = True, None  # Ollama's /v1 route sends neither
            encoding = body.get("encoding_format") or "float"
            if encoding not in ("float", "base64"):
                return None
            kind = "f32" if encoding == "float" else "b64"
        variant_of = {"t": truncate, "d": dimensions, "o": options}
        upstream = {k: v for k, v in (("truncate", truncate if truncate is False else None),
                                      ("dimensions", dimensions), ("options", options),
                                      ("keep_alive", body.get("keep_alive"))) if v is not None}
    if options is not None and not isinstance(options, dict):
        return None
    if route == EMBEDDINGS_PATH and body.get("keep_alive") is not None:
        upstream = {"keep_alive": body["keep_alive"]}
    try:
        variant = orjson.dumps(variant_of, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # a number Python cannot hold (kept as text by gojson): not ours to answer
        return None
    return Ask(route, model, inputs, kind, variant, upstream)


@attrs.frozen
class Answer:
    """A 200 answer of an embedding route: its vectors as the exact bytes written (a JSON array, or a
    quoted base64 string on /v1 base64) in input order, the prompt tokens Ollama counted for all of
    them (0 when the route does not say) and its total_duration (0 likewise)."""

    vectors: list[bytes]
    tokens: int
    total_duration_ns: int


def read_answer(route: str, raw: bytes) -> Answer | None:
    """`raw` read as a 200 answer of `route`, or None when it is not the shape expected (then nothing
    is cached or merged)."""
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    vectors = _split(route, raw, parsed)
    if vectors is None:
        return None
    usage = parsed.get("usage")
    tokens = parsed.get("prompt_eval_count") if route == EMBED_PATH else (
        usage.get("prompt_tokens") if isinstance(usage, dict) else 0)
    duration = parsed.get("total_duration")
    return Answer(vectors, tokens if isinstance(tokens, int) else 0,
                  duration if isinstance(duration, int) else 0)


def _split(route: str, raw: bytes, parsed: dict[str, Any]) -> list[bytes] | None:
    if route == EMBED_PATH:
        expected = parsed.get("embeddings")
        marker = b'"embeddings":['
    elif route == EMBEDDINGS_PATH:
        vector = parsed.get("embedding")
        expected = [vector] if isinstance(vector, list) and vector else None
        marker = b'"embedding":'
    else:
        data = parsed.get("data")
        if not isinstance(data, list) or any(
                not isinstance(item, dict) or item.get("index") != index for index, item in enumerate(data)):
            return None
        expected = data
        marker = b'"embedding":'
    if not isinstance(expected, list):
        return None
    # Inside a JSON string every `"` is escaped, so the marker cannot occur in a string value; vectors
    # hold numbers only, so a vector ends at the first `]` (or `"` for base64).
    vectors: list[bytes] = []
    position = raw.find(marker)
    if position < 0:
        return None
    if route == EMBED_PATH:
        position += len(marker)
        while position < len(raw) and raw[position] == ord("["):
            end = raw.find(b"]", position)
            if end < 0:
                return None
            vectors.append(raw[position:end + 1])
            position = end + 1
            if raw[position:position + 1] == b",":
                position += 1
    else:
        while position >= 0:
            start = position + len(marker)
            closer = {ord("["): b"]", ord('"'): b'"'}.get(raw[start]) if start < len(raw) else None
            if closer is None:
                return None
            end = raw.find(closer, start + 1)
            if end < 0:
                return None
            vectors.append(raw[start:end + 1])
            position = raw.find(marker, end + 1)
    return vectors if len(vectors) == len(expected) and all(len(v) > 2 for v in vectors) else None


def to_base64(vector: bytes) -> bytes:
    """A float32 JSON array (as Ollama writes it) as /v1's quoted little-endian base64 string."""
    values = orjson.loads(vector)
    return b'"' + base64.b64encode(struct.pack(f"<{len(values)}f", *values)) + b'"'


def apportion(total: int, inputs: Sequence[str], tokens: Sequence[int] | None = None) -> list[int]:
    """`total` tokens shared among `inputs` as integers summing to it (Ollama reports one count per
    batch; a per-input share is what each input is charged and cached with): in proportion to each
    input's own token count `tokens` (the proxy's tokenizer's) when given, else to its length in bytes.
    Bytes are a poor proxy for tokens (digits and punctuation take a token each, long words a few
    bytes per token): where inputs of several tenants share a count, only token counts keep one
    tenant's cost off another's."""
    if len(inputs) == 1:
        return [total]
    lengths = list(tokens) if tokens is not None else [len(text.encode()) for text in inputs]
    whole = sum(lengths) or 1
    shares = [total * length // whole for length in lengths]
    for index in range(total - sum(shares)):
        shares[index % len(shares)] += 1
    return shares


def _go_string(value: str) -> bytes:
    return json.dumps(value, ensure_ascii=False).translate(_GO_ESCAPES).encode()


def render(ask: Ask, vectors: Sequence[bytes], tokens: int,
           total_duration_ns: int) -> tuple[bytes, str]:
    """The body and content type Ollama answers `ask`'s route with, from vectors of `ask.kind`: field
    order of Ollama's structs, zero fields omitted where Go omits them, json.Encoder's newline on /v1."""
    if ask.route == EMBEDDINGS_PATH:
        return b'{"embedding":' + vectors[0] + b"}", CT_GIN
    if ask.route == EMBED_PATH:
        body = b'{"model":' + _go_string(ask.model) + b',"embeddings":[' + b",".join(vectors) + b"]"
        if total_duration_ns:
            body += b',"total_duration":%d' % total_duration_ns
        if tokens:
            body += b',"prompt_eval_count":%d' % tokens
        return body + b"}", CT_GIN
    items = b",".join(b'{"object":"embedding","embedding":%s,"index":%d}' % (vector, index)
                      for index, vector in enumerate(vectors))
    return (b'{"object":"list","data":[' + items + b'],"model":' + _go_string(ask.model)
            + b',"usage":{"prompt_tokens":%d,"total_tokens":%d}}\n' % (tokens, tokens)), CT_ENCODER


def respond(ctx: RequestContext, body: bytes, content_type: str) -> web.Response:
    """A plugin's own 200 answer, made as the forwarder makes a relayed one: `ctx.status` set and the
    response observers already attached (by plugins earlier in the chain: embed_cache's, when
    embed_batch answers) fed the body and so able to keep what they need of it. The exchange counts as
    answered in full, so quotas and the fair queue settle the caller by the `usage` the plugin set
    (its share of a batch, the misses it paid for), and by nothing when it set none (all from cache)."""
    ctx.status = 200
    exchange = ctx.exchange
    if exchange.first_byte_at is None:
        exchange.first_byte_at = time.monotonic()
    exchange.complete = True
    if exchange.usage is None:
        exchange.usage = Usage(input_tokens=0, output_tokens=0)
    for observer in list(ctx.observers):
        try:
            observer.feed(body)
        except Exception:  # an observer that raises is dropped, as the forwarder does
            ctx.observers.remove(observer)
    return web.Response(body=body, headers={"Content-Type": content_type})
