"""Request bodies read as Ollama reads them: Go's `encoding/json` (gin's ShouldBindJSON, a json.Decoder).

orjson is the fast path. When it refuses, `loads` decodes the way Go does instead of giving up, because a
body the proxy cannot read but Ollama can would skip every limit of the chain:
- invalid UTF-8 bytes become U+FFFD, one per byte (Go's utf8.DecodeRune), lone `\\uD800`-style surrogate
  escapes become U+FFFD;
- numbers out of float64's range (`1e400`) are kept as `BigNumber` with their original text: Go skips them
  in fields it does not know and refuses them where it decodes them (`check_numbers`);
- the first JSON value is the body (json.Decoder stops there: bytes after it are never read);
- duplicate keys: the last one wins, except that a map field written twice (`options`) merges the
  two maps as Go does, and an array of plain structs written twice (OpenAI's and Anthropic's
  `messages`) is read into the earlier array's elements; struct fields match case-insensitively
  (`MODEL`, `\u017fystem`), so the fields the chain reads are looked up the way Go matches them
  (`request_view`);
- NaN, Infinity, comments, single quotes, control characters in strings, a BOM: refused with Go's error
  text (`GoJSONError`), which Ollama answers with 400.

`dumps` re-encodes a (rewritten) body so that Go reads the same values: BigNumbers keep their text. A
value nested deeper than orjson writes (254 levels) is written with Python opening only its deep part,
within a budget (`RewriteTooLarge`, a 400, past it).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable
from itertools import compress, count, repeat
from typing import Any

import orjson

from .errors import InvalidRequest

__all__ = ["MAP_FIELDS", "REUSED_ELEMENTS", "BigNumber", "GoJSONError", "RewriteTooLarge", "check_numbers",
           "dumps", "go_fold", "loads", "request_view"]

_WHITESPACE = b" \t\r\n"
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1
_MAX_DEPTH = 10000
"""Go's limit on nesting; Python's recursion limit comes first and is reported the same way."""


class GoJSONError(ValueError):
    """A body Go's decoder refuses; `str()` is Go's error text (what Ollama answers with 400)."""


class BigNumber:
    """A JSON number Python cannot hold as Go does: out of float64's range (`overflow`, Go refuses it
    where it decodes it) or an integer beyond 64 bits (a float64 for Go). `text` is the original."""

    __slots__ = ("overflow", "text")

    def __init__(self, text: str, overflow: bool) -> None:
        self.text = text
        self.overflow = overflow

    def __repr__(self) -> str:
        return f"BigNumber({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BigNumber) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


class _Object(dict[str, Any]):
    """A decoded object that remembers its keys in document order (duplicates included): Go assigns
    struct fields in that order, and case variants of one field replace each other."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.pairs = pairs


def _per_byte_replace(error: UnicodeError) -> tuple[str, int]:
    assert isinstance(error, UnicodeDecodeError)
    return "\ufffd" * (error.end - error.start), error.end


codecs.register_error("sop-go-replace", _per_byte_replace)


def _parse_float(text: str) -> Any:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        return BigNumber(text, overflow=True)
    return value


def _parse_int(text: str) -> Any:
    value = int(text)
    if _INT64_MIN <= value <= _UINT64_MAX:
        return value
    try:
        float(value)
    except OverflowError:
        return BigNumber(text, overflow=True)
    return BigNumber(text, overflow=False)


def _parse_constant(text: str) -> Any:
    if text[0] == "-":  # -Infinity: Go's scanner wants a digit after the minus sign
        raise GoJSONError(f"invalid character '{text[1]}' in numeric literal")
    raise GoJSONError(f"invalid character '{text[0]}' looking for beginning of value")


def _no_surrogate(text: str) -> str:
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


def _no_surrogates(value: Any) -> Any:
    """A copy of a decoded value whose strings and keys hold U+FFFD for each lone surrogate. Walked from
    a stack, not by recursion: a body nested ~500 deep (Go takes 10,000) overflowed Python's stack
    here, a 500 where Ollama serves it."""
    top: list[Any] = [None]
    stack: list[tuple[Any, list[Any], int]] = [(value, top, 0)]
    objects: list[tuple[_Object, list[str], list[Any]]] = []
    while stack:
        item, into, at = stack.pop()
        if isinstance(item, str):
            into[at] = _no_surrogate(item)
        elif isinstance(item, _Object):
            values: list[Any] = [None] * len(item.pairs)
            copy = _Object([])
            objects.append((copy, [_no_surrogate(k) for k, _ in item.pairs], values))
            stack.extend((v, values, i) for i, (_, v) in enumerate(item.pairs))
            into[at] = copy
        elif isinstance(item, list):
            elements: list[Any] = [None] * len(item)
            stack.extend((v, elements, i) for i, v in enumerate(item))
            into[at] = elements
        else:
            into[at] = item
    for copy, keys, values in objects:  # once every value is in place: dict(pairs) semantics
        copy.pairs = list(zip(keys, values, strict=True))
        dict.update(copy, copy.pairs)
    return top[0]


_DECODER = json.JSONDecoder(object_pairs_hook=_Object, parse_float=_parse_float, parse_int=_parse_int,
                            parse_constant=_parse_constant, strict=True)


def _go_syntax_error(text: str, exc: json.JSONDecodeError) -> GoJSONError:
    if exc.pos >= len(text.rstrip(" \t\r\n")):
        return GoJSONError("unexpected EOF")
    char = text[exc.pos]
    message = exc.msg
    if message.startswith("Expecting value") and char == "-":
        # A minus sign not followed by a digit: Go names the character after it.
        if exc.pos + 1 >= len(text.rstrip(" \t\r\n")):
            return GoJSONError("unexpected EOF")
        char, message = text[exc.pos + 1], "in numeric literal"
    shown = "'\\''" if char == "'" else f"'{char}'" if char.isprintable() else repr(char)
    if message == "in numeric literal":
        where = message
    elif message.startswith("Expecting value"):
        where = "looking for beginning of value"
    elif "property name" in message:
        where = "looking for beginning of object key string"
    elif "':'" in message:
        where = "after object key"
    elif "','" in message:
        where = ("after object key:value pair" if _innermost(text, exc.pos) == "{"
                 else "after array element")
    elif message.startswith("Invalid control character"):
        where = "in string literal"
    elif message.startswith("Invalid \\escape") or message.startswith("Invalid \\u"):
        where = "in string escape code"
    else:
        where = "looking for beginning of value"
    return GoJSONError(f"invalid character {shown} {where}")


def _innermost(text: str, pos: int) -> str:
    """The innermost container (`{` or `[`) open at `pos` (error path only: a linear scan)."""
    stack: list[str] = []
    in_string = escaped = False
    for char in text[:pos]:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            stack.append(char)
        elif char in "}]" and stack:
            stack.pop()
    return stack[-1] if stack else ""


def slow_loads(data: bytes) -> Any:
    """Decode `data` exactly as Go's json.Decoder does (see the module docstring); objects are dicts that
    also keep their key order in `.pairs`. Raises GoJSONError with Go's text."""
    text = data.decode("utf-8", "sop-go-replace")
    start = len(text) - len(text.lstrip(" \t\r\n"))
    if start == len(text):
        raise GoJSONError("missing request body")  # io.EOF: what Ollama answers for an empty body
    try:
        value, _end = _DECODER.raw_decode(text, start)  # like json.Decoder, what follows is not read
    except json.JSONDecodeError as exc:
        raise _go_syntax_error(text, exc) from None
    except RecursionError:
        raise GoJSONError("exceeded max depth") from None
    if _SURROGATE_ESCAPE.search(data) is None:
        return value  # a lone surrogate can only come from an escape: nothing to replace
    return _no_surrogates(value)


def loads(data: bytes) -> tuple[Any, bool]:
    """(value, slow): orjson's result when it accepts `data`, else Go's reading of it (`slow` True: it
    may hold BigNumbers and `_Object`s). Raises GoJSONError where Go refuses."""
    try:
        return orjson.loads(data), False
    except orjson.JSONDecodeError:
        pass
    return slow_loads(data), True


# Go's case-insensitive field matching ------------------------------------------------------------------

_SPECIAL_FOLDS = {"\u017f": "S", "\u212a": "K", "\u0130": "I", "\u0131": "I"}
"""Non-ASCII letters that Go's field matching (upper(lower(r))) folds onto ASCII ones."""


def go_fold(name: str) -> str:
    """The key Go's encoding/json compares struct field names by (ASCII upper-cased; U+017F, U+212A,
    U+0130 and U+0131 onto S, K, I and I; other letters folded as Go does, which never yields ASCII)."""
    if name.isascii():
        return name.upper()
    return "".join(_SPECIAL_FOLDS.get(c) or (c.upper() if c.isascii() else c.lower().upper())
                   for c in name)


TOP_FIELDS = frozenset({
    "model", "name", "messages", "prompt", "system", "suffix", "template", "context", "raw", "images",
    "format", "input", "stream", "options", "keep_alive", "think", "truncate", "shift", "tools",
    "logprobs", "top_logprobs", "dimensions", "instructions", "max_tokens", "max_completion_tokens",
    "max_output_tokens", "stream_options", "temperature", "top_p", "seed", "stop", "n",
    "frequency_penalty", "presence_penalty", "response_format", "verbose", "source", "destination",
    "from", "quantize", "insecure", "encoding_format", "user", "tool_choice", "reasoning",
    "reasoning_effort", "top_k", "metadata", "stop_sequences", "thinking"})
"""Fields of Ollama's request structs (native, OpenAI and Anthropic compatibility) the chain reads or
that Go decodes into typed values."""
MESSAGE_FIELDS = frozenset({"role", "content", "images", "tool_calls", "thinking", "tool_name", "name",
                            "tool_call_id", "reasoning"})
RAW_FIELDS = frozenset({"format"})
"""Fields Go keeps as json.RawMessage: their numbers are never converted, so never refused."""

_TOP_FOLDS = {go_fold(name): name for name in TOP_FIELDS}
_MESSAGE_FOLDS = {go_fold(name): name for name in MESSAGE_FIELDS}


def _needs_fold(value: dict[str, Any], exact: frozenset[str], folds: dict[str, str]) -> bool:
    if value.keys() <= exact:  # the usual body: one C-level subset test
        return False
    return any(key not in exact and go_fold(key) in folds for key in value)


MAP_FIELDS = frozenset({"options"})
"""Top-level fields that are maps to Ollama (`Options map[string]any`): Go decodes a key that comes again
into the map it already holds, keeping its entries ("Unmarshal reuses the existing map, keeping
existing entries"), so `"options":{"num_ctx":1},"options":{}` has num_ctx 1 for Ollama."""


def _key_spelling(name: str) -> bytes:
    """A regex for every spelling of the key `name` (lower-case ASCII) that Go matches to the field in
    a JSON text: any case, each letter possibly a \\u escape, and the non-ASCII letters Go folds onto
    ASCII ones (`_SPECIAL_FOLDS`), raw or escaped. Case-insensitive: a few more match, never fewer."""
    parts = []
    for letter in name:
        spellings = [re.escape(letter.encode()), rb"\\u00%02x" % ord(letter),
                     rb"\\u00%02x" % ord(letter.upper())]
        for special, folded in _SPECIAL_FOLDS.items():
            if folded == letter.upper():
                spellings += [re.escape(special.encode()), rb"\\u%04x" % ord(special)]
        parts.append(b"(?:" + b"|".join(spellings) + b")")
    return b'"' + b"".join(parts) + rb'"[ \t\r\n]*:'


REUSED_ELEMENTS = {"openai": frozenset({"messages"}), "anthropic": frozenset({"messages", "tools"})}
"""Top-level fields that are slices of plain structs, by the dialect of the route (`[]openai.Message`,
`[]anthropic.MessageParam`, `[]anthropic.Tool`: no UnmarshalJSON of their own, unlike the native
api.Message): Go decodes an array that comes again into
the elements it already holds, so a field a later element leaves out keeps the earlier element's value
(golang/go#21092)."""
_TWICE_KEYS = {name: re.compile(_key_spelling(name), re.IGNORECASE)
               for name in sorted(MAP_FIELDS.union(*REUSED_ELEMENTS.values()))}


def _written_twice(data: bytes, name: str) -> bool:
    """May `data` write the field `name` (MAP_FIELDS, REUSED_ELEMENTS) more than once? A key spelling
    found twice anywhere (also inside strings: then the slow reading finds once, at some cost and no
    harm)."""
    found = _TWICE_KEYS[name].finditer(data)
    return next(found, None) is not None and next(found, None) is not None


def _into_elements(previous: list[Any], item: list[Any]) -> list[Any]:
    """`item` decoded as Go decodes an array into a slice of structs that holds `previous`: element i
    of both objects is one struct, its fields assigned in document order (the earlier ones first)."""
    return [_Object([*_pairs(previous[i]), *_pairs(new)])
            if i < len(previous) and isinstance(previous[i], dict) and isinstance(new, dict) else new
            for i, new in enumerate(item)]


def _pairs(value: dict[str, Any]) -> list[tuple[str, Any]]:
    return list(value.pairs) if isinstance(value, _Object) else list(value.items())


def _struct(value: dict[str, Any], folds: dict[str, str], maps: frozenset[str] = frozenset(),
            elements: frozenset[str] = frozenset()) -> dict[str, Any]:
    pairs: Iterable[tuple[str, Any]] = value.pairs if isinstance(value, _Object) else value.items()
    out: dict[str, Any] = {}
    for key, item in pairs:
        name = folds.get(go_fold(key), key)
        previous = out.pop(name, None)  # a later case variant is the value Go keeps,
        if name in maps and isinstance(previous, dict) and isinstance(item, dict):
            out[name] = {**previous, **item}  # merged into it when the field is a map (MAP_FIELDS)
        elif name in elements and isinstance(previous, list) and isinstance(item, list):
            out[name] = _into_elements(previous, item)  # or decoded into its elements
        else:
            out[name] = item
    return out


def request_view(value: Any, data: bytes, slow: bool, reused: frozenset[str] = frozenset()) -> Any:
    """The body as Ollama's structs see it: top-level and message fields under their canonical names,
    whatever case the client used (Go matches them case-insensitively; the last variant wins, or, for
    a map field written twice, the maps merge: MAP_FIELDS; and in a field of `reused`, the route's
    dialect's REUSED_ELEMENTS, a later array is read into the earlier one's elements).

    Costs a set lookup per key when every key is already canonical (the usual case). When one is not and
    `value` came from orjson, `data` is decoded again to learn the order of the variants.
    """
    if not isinstance(value, dict):
        return value
    messages = value.get("messages")
    top = _needs_fold(value, TOP_FIELDS, _TOP_FOLDS)
    inner = isinstance(messages, list) and any(
        isinstance(m, dict) and _needs_fold(m, MESSAGE_FIELDS, _MESSAGE_FOLDS) for m in messages)
    # orjson keeps only the last of keys written alike ("options" twice, or once escaped): the raw
    # text tells whether a map field may be one of them.
    twice = any(name in value and _written_twice(data, name) for name in MAP_FIELDS | reused)
    if not top and not inner and not slow and not twice:
        return value
    if not slow:
        value = slow_loads(data)
    if not isinstance(value, dict):
        return value
    view = _struct(value, _TOP_FOLDS, MAP_FIELDS, reused)
    messages = view.get("messages")
    if isinstance(messages, list):
        view["messages"] = [_struct(m, _MESSAGE_FOLDS) if isinstance(m, dict) else m for m in messages]
    return view


def _overflow_in(value: Any) -> BigNumber | None:
    if isinstance(value, BigNumber):
        return value if value.overflow else None
    if isinstance(value, dict):
        items: Iterable[Any] = value.values()
    elif isinstance(value, list):
        items = value
    else:
        return None
    for item in items:
        found = _overflow_in(item)
        if found is not None:
            return found
    return None


def check_numbers(view: Any, struct: str = "", native: bool = True) -> None:
    """Raise GoJSONError when a number out of float64's range sits where Ollama decodes it (a known
    field); in fields Go skips (unknown ones) or keeps raw (`format`) it is harmless and kept. `struct`
    names the request's Go struct in the message (`GenerateRequest.options`); `native` False (the
    OpenAI and Anthropic routes) also skips `options`, which their structs do not have."""
    if not isinstance(view, dict):
        return
    for key, item in view.items():
        if key not in TOP_FIELDS or key in RAW_FIELDS or (key == "options" and not native):
            continue
        decoded = item
        if key == "messages" and isinstance(item, list):
            decoded = [{k: v for k, v in m.items() if k in MESSAGE_FIELDS} if isinstance(m, dict) else m
                       for m in item]
        found = _overflow_in(decoded)
        if found is not None:
            raise GoJSONError(f"json: cannot unmarshal number {found.text[:64]} into Go struct field "
                              f"{struct}.{key} of type float64")


def _default(value: Any) -> Any:
    if isinstance(value, BigNumber):
        return orjson.Fragment(value.text.encode())
    raise TypeError(f"cannot encode {type(value).__name__}")


def dumps(value: Any) -> bytes:
    """`value` as JSON that Go decodes to the same values (BigNumbers written as they were received).
    Strings never hold surrogates here (decoding replaced them), so the output is valid UTF-8.

    orjson writes at most 254 levels of nesting, and a body Go (and so the decoder here) accepts may
    nest deeper (a tool schema, a `format`): such a value is written by `_dumps_deep`, the same bytes.
    Raises orjson.JSONEncodeError for what orjson cannot encode for another reason (a non-str key, a
    type it does not know), and `RewriteTooLarge` (a GoJSONError and a 400 `invalid_request`) when a
    deep value is too large for `_dumps_deep`'s budget.

    The result is right-sized: orjson hands back a small output inside its 4 KiB working buffer, and a
    rewritten body is kept for as long as its request runs (10,000 open streams: 40 MB of slack)."""
    try:
        out = orjson.dumps(value, default=_default)
    except orjson.JSONEncodeError as exc:
        if not _too_deep(exc) or not isinstance(value, _CONTAINERS):
            raise
        return _dumps_deep(value)
    return bytes(memoryview(out)) if len(out) < _RIGHT_SIZE_BELOW else out


_RIGHT_SIZE_BELOW = 64 * 1024
_ORJSON_MAX_NESTING = 254
"""The deepest nesting orjson writes (254 arrays in one another); one more is "Recursion limit reached"."""
DEEP_BUDGET = 200_000
"""What `_dumps_deep` may scan in Python (containers it opens plus their elements) before it refuses."""
_MIN_REACH = 4
"""The least reach of a probe (`_reach`): a shallow branch (a message, a small schema) is written whole
at any depth; higher, more failed probes would write each byte of a deep spine's neighbours again."""
_CONTAINERS = (dict, list, tuple)


class RewriteTooLarge(GoJSONError, InvalidRequest):
    """A value nested deeper than orjson writes, with more in its deep part than `_dumps_deep` may walk.
    A GoJSONError for the encoder's callers and an InvalidRequest (400 `invalid_request`, in the route's
    dialect) wherever it leaves a step: a rewrite (`ctx.replace_json`) or a prompt count."""

    def __init__(self, message: str) -> None:
        InvalidRequest.__init__(self, message)


def _too_deep(exc: orjson.JSONEncodeError) -> bool:
    return "Recursion limit reached" in str(exc)


class DeepStats:
    """What the last `_dumps_deep` call in this process did (for tests and profiling; not thread-local,
    so only indicative under concurrency)."""

    scanned = 0
    """Containers opened in Python plus their elements."""
    probes = 0
    """orjson calls on a single subtree (each writes it whole, or fails because it is too deep)."""


def _reach(depth: int) -> int:
    """How many levels a probe of a container at `depth` lets orjson write. A failed probe wastes what
    it wrote; with the lowest set bit of the depth (a ruler sequence), at most ~_MIN_REACH + log2(254)
    failed probes above any byte reach it, where probing every level with orjson's full 254 would
    write a byte up to 254 times (a deep spine with a large array beside every level)."""
    if depth <= 1:  # nothing but the root (one failure, already paid) above: take all orjson writes
        return _ORJSON_MAX_NESTING
    return min(_ORJSON_MAX_NESTING, max(_MIN_REACH, depth & -depth))


def _dumps_deep(value: Any, budget: int = DEEP_BUDGET) -> bytes:
    """`dumps` for a value nested deeper than orjson writes, without recursion and byte for byte what
    orjson would write without its limit.

    Python opens only containers too deep for a probe: each container element of an open container is
    probed (one orjson call writes it whole when it is shallow enough, see `_reach`), and each run of
    other elements between them is written by one orjson call on a slice. So a large shallow part
    (a long message list, an array of numbers) costs one orjson call, and the Python work is bounded by
    the deep part: past `budget` (containers opened plus their elements) RewriteTooLarge is raised."""
    DeepStats.scanned = DeepStats.probes = 0
    chains: dict[int, tuple[list[Any], list[Any]]] = {}

    def probe(child: Any, depth: int) -> bytes | None:
        """The child written whole, or None when it nests deeper than its reach."""
        DeepStats.probes += 1
        wrap = _ORJSON_MAX_NESTING - _reach(depth)
        try:
            if not wrap:
                return orjson.dumps(child, default=_default)
            # Wrapped in `wrap` arrays, orjson refuses the child past its reach (one chain per reach,
            # built per call: dumps may run on several threads).
            chain = chains.get(wrap)
            if chain is None:
                inner: list[Any] = [None]
                outer = inner
                for _ in range(wrap - 1):
                    outer = [outer]
                chain = chains[wrap] = (outer, inner)
            chain[1][0] = child
            try:
                return orjson.dumps(chain[0], default=_default)[wrap:-wrap]
            finally:
                chain[1][0] = None
        except orjson.JSONEncodeError as exc:
            if _too_deep(exc):
                return None
            raise

    out = bytearray()
    stack: list[Any] = [(value, 0)]  # bytes to write, or (container to open, its depth)
    scanned = 0
    while stack:
        item = stack.pop()
        if type(item) is bytes:
            out += item
            continue
        node, depth = item
        scanned += 1 + len(node)
        if scanned > budget:
            DeepStats.scanned = scanned
            raise RewriteTooLarge(f"the body nests deeper than {_ORJSON_MAX_NESTING} levels and is too "
                                  f"large for the proxy to rewrite")
        is_dict = isinstance(node, dict)
        elements: Any = list(dict.items(node)) if is_dict else node
        values = dict.values(node) if is_dict else node
        # Where the containers are, found in C (no Python step per element).
        at = list(compress(count(), map(isinstance, values, repeat(_CONTAINERS))))
        groups: list[list[Any]] = []  # one per run or container element, in order; commas between
        start = 0
        for index in [*at, len(elements)]:
            if index > start:  # a run of other elements: one orjson call, its brackets dropped
                run = dict(elements[start:index]) if is_dict else elements[start:index]
                groups.append([orjson.dumps(run, default=_default)[1:-1]])
            if index == len(elements):
                break
            group: list[Any] = []
            if is_dict:
                key, child = elements[index]
                if not isinstance(key, str):
                    raise orjson.JSONEncodeError("Dict key must be str")
                group.append(orjson.dumps(key) + b":")
            else:
                child = elements[index]
            written = probe(child, depth + 1)
            group.append(written if written is not None else (child, depth + 1))
            groups.append(group)
            start = index + 1
        stack.append(b"}" if is_dict else b"]")
        for position in range(len(groups) - 1, -1, -1):
            stack.extend(reversed(groups[position]))
            if position:
                stack.append(b",")
        stack.append(b"{" if is_dict else b"[")
    DeepStats.scanned = scanned
    return bytes(out)
