"""Ollama's request structs as Go's encoding/json decodes them, with the error texts it gives.

gin's ShouldBindJSON decodes a body into the route's struct (`api.GenerateRequest`,
`openai.ChatCompletionRequest`, ...). A value of the wrong JSON type for a field is refused with an
`UnmarshalTypeError`: `json: cannot unmarshal <kind> into Go struct field <Struct>.<path> of type <type>`,
where <Struct> is the innermost struct holding the field, <path> the field names from the root, and
<kind> `string`, `number`, `bool`, `array` or `object` (`number <literal>` when the target is numeric).
Go keeps decoding after such an error and reports the first one; an error from a type's own
UnmarshalJSON (keep_alive's Duration, think's ThinkValue, api.Message through its `Alias`) stops it at
once and wins. `check` reproduces that on an already-parsed body (see wire.decode_body), so the handlers
only ever see the types Ollama's handlers see.

Numbers: `float` values may be a `Literal` carrying the text they were written with (`5.0`, `1e30`),
which Go prints in its messages; BigNumber (proxy.gojson) holds numbers out of float64's range.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import Any, ClassVar

import attrs

from proxy.gojson import BigNumber, go_fold

from .durations import KeepAliveError, parse_go_duration

__all__ = ["SCHEMAS", "GoTypeError", "Literal", "Struct", "check"]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_FLOAT32_MAX = 3.4028234663852886e38
_THINK_LEVELS = ("high", "medium", "low", "max")
_BASE64 = re.compile(r"[A-Za-z0-9+/]")


class Literal(float):
    """A JSON float that remembers how it was written (Go quotes the literal in its messages)."""

    __slots__ = ("text",)
    text: str

    def __new__(cls, text: str) -> Literal:
        value = super().__new__(cls, text)
        value.text = text
        return value


@attrs.define
class UnmarshalTypeError:
    """Go's json.UnmarshalTypeError: the JSON kind, the Go type, and where (struct, field path)."""

    value: str
    go_type: str
    struct: str = ""
    field: str = ""

    def __str__(self) -> str:
        if self.struct or self.field:
            return (f"json: cannot unmarshal {self.value} into Go struct field {self.struct}.{self.field} "
                    f"of type {self.go_type}")
        return f"json: cannot unmarshal {self.value} into Go value of type {self.go_type}"


class GoTypeError(Exception):
    """A body Go's decoder refuses for its types; `str()` is Go's error text (Ollama answers 400)."""


class _Stop(Exception):
    def __init__(self, error: UnmarshalTypeError | str) -> None:
        super().__init__(str(error))
        self.error = error


def kind(value: Any) -> str:
    """The JSON kind Go names in a type error."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, str):
        return "string"
    if isinstance(value, int | float | BigNumber):
        return "number"
    if isinstance(value, list):
        return "array"
    return "object"


def literal(value: Any) -> str:
    """A number as it was written (as near as the parse kept it)."""
    if isinstance(value, BigNumber | Literal):
        return value.text
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return repr(value)
    return str(value)


def go_dynamic_type(value: Any) -> str:
    """Go's `%T` of a value decoded into `any`."""
    if value is None:
        return "<nil>"
    return {"bool": "bool", "string": "string", "number": "float64", "array": "[]interface {}",
            "object": "map[string]interface {}"}[kind(value)]


class _Walk:
    """One decode (Go's decodeState): the innermost struct, the field path, the first saved error."""

    def __init__(self) -> None:
        self.struct = ""
        self.fields: list[str] = []
        self.saved: UnmarshalTypeError | str | None = None

    def context(self, error: UnmarshalTypeError | str) -> UnmarshalTypeError | str:
        """Go's addErrorContext: the current struct, and the path with the error's own field appended."""
        if isinstance(error, UnmarshalTypeError) and (self.struct or self.fields):
            path = [*self.fields, error.field] if error.field else self.fields
            return UnmarshalTypeError(error.value, error.go_type, self.struct, ".".join(path))
        return error

    def save(self, error: UnmarshalTypeError | str) -> None:
        if self.saved is None:
            self.saved = self.context(error)

    def stop(self, error: UnmarshalTypeError | str) -> _Stop:
        return _Stop(self.context(error))


class GoType:
    """A Go type a JSON value is decoded into."""

    go: str = ""

    def walk(self, w: _Walk, value: Any) -> None:
        raise NotImplementedError


@attrs.frozen
class Scalar(GoType):
    """string, bool, int (int64), float64 or float32."""

    go: str

    def walk(self, w: _Walk, value: Any) -> None:
        if value is None:
            return
        go = self.go
        if go == "string":
            ok = isinstance(value, str)
        elif go == "bool":
            ok = isinstance(value, bool)
        elif kind(value) != "number":
            ok = False
        elif go == "int":
            ok = isinstance(value, int) and _INT64_MIN <= value <= _INT64_MAX
        else:
            ok = not (isinstance(value, BigNumber) and value.overflow) and not (
                go == "float32" and abs(float(literal(value))) > _FLOAT32_MAX)
        if not ok:
            numeric = go not in ("string", "bool") and kind(value) == "number"
            w.save(UnmarshalTypeError(f"number {literal(value)}" if numeric else kind(value), go))


@attrs.frozen
class AnyValue(GoType):
    """`any` (interface{}): anything, but a number must fit a float64."""

    go: str = "interface {}"

    def walk(self, w: _Walk, value: Any) -> None:
        pending = [value]  # depth-first in document order, without recursion (Go nests 10000 deep)
        while pending:
            item = pending.pop()
            if isinstance(item, BigNumber) and item.overflow:
                w.save(UnmarshalTypeError(f"number {item.text}", "float64"))
                return
            if isinstance(item, list):
                pending.extend(reversed(item))
            elif isinstance(item, dict):
                pending.extend(reversed(list(item.values())))


@attrs.frozen
class Raw(GoType):
    """json.RawMessage: kept as written, never converted."""

    go: str = "json.RawMessage"

    def walk(self, w: _Walk, value: Any) -> None:
        del w, value


@attrs.frozen
class _Elements(GoType):
    """A slice or a map: null is its zero value, another JSON kind a type error, and every element is
    walked as `elem` (map keys add nothing to Go's field path)."""

    elem: GoType
    go: str
    container: ClassVar[type] = list

    def walk(self, w: _Walk, value: Any) -> None:
        if value is None:
            return
        elements = value.values() if isinstance(value, dict) else value if isinstance(value, list) \
            else None
        if elements is None or not isinstance(value, self.container):
            w.save(UnmarshalTypeError(kind(value), self.go))
            return
        for item in elements:
            self.elem.walk(w, item)


@attrs.frozen
class Slice(_Elements):
    container = list


@attrs.frozen
class Map(_Elements):
    container = dict


@attrs.frozen
class Struct(GoType):
    """A struct: fields by JSON name (matched case-insensitively, as Go does); unknown keys skipped."""

    name: str
    fields: dict[str, GoType]
    go: str
    folded: dict[str, tuple[str, GoType]] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        folded = {go_fold(name): (name, t) for name, t in self.fields.items()}
        object.__setattr__(self, "folded", folded)

    def walk(self, w: _Walk, value: Any) -> None:
        if value is None:
            return
        if not isinstance(value, dict):
            w.save(UnmarshalTypeError(kind(value), self.go))
            return
        outer_struct, depth = w.struct, len(w.fields)
        for key, item in value.items():
            found = self.folded.get(go_fold(key))
            if found is None:
                continue
            w.fields.append(found[0])
            w.struct = self.name
            found[1].walk(w, item)
            del w.fields[depth:]
            w.struct = outer_struct


@attrs.frozen
class Custom(GoType):
    """A type with its own UnmarshalJSON: `check(w, value)` raises `w.stop(...)` for what it refuses."""

    check: Callable[[_Walk, Any], None]
    go: str

    def walk(self, w: _Walk, value: Any) -> None:
        self.check(w, value)


def _nested(w: _Walk, value: Any, into: GoType) -> None:
    """A json.Unmarshal inside an UnmarshalJSON: its first error stops the outer decode, re-placed."""
    inner = _Walk()
    try:
        into.walk(inner, value)
    except _Stop as stop:
        raise w.stop(stop.error) from None
    if inner.saved is not None:
        raise w.stop(inner.saved)


def _duration(w: _Walk, value: Any) -> None:
    """api.Duration (keep_alive): seconds as a number or a Go duration string."""
    if value is None:
        return
    _nested(w, value, ANY)
    if isinstance(value, str):
        try:
            parse_go_duration(value)
        except KeepAliveError as exc:
            raise w.stop(str(exc)) from None
    elif kind(value) != "number":
        raise w.stop(f"Unsupported type: '{go_dynamic_type(value)}'")


def _think(w: _Walk, value: Any) -> None:
    """api.ThinkValue: a bool or one of the level strings."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        if value not in _THINK_LEVELS:
            raise w.stop(f"invalid think value: {go_quote(value)} (must be \"high\", \"medium\", \"low\", "
                         "\"max\", true, or false)")
        return
    raise w.stop('think must be a boolean or string ("high", "medium", "low", "max", true, or false)')


def go_quote(text: str) -> str:
    """Go's `%q` for the common cases (quotes and backslashes escaped, control characters as escapes)."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif char == "\r":
            out.append("\\r")
        elif not char.isprintable():
            out.append(f"\\u{ord(char):04x}" if ord(char) < 0x10000 else f"\\U{ord(char):08x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def base64_error(text: str) -> str | None:
    """Go's base64.StdEncoding error for `text` (`illegal base64 data at input byte N`), or None."""
    stripped = text.replace("\r", "").replace("\n", "")
    try:
        base64.b64decode(stripped, validate=True)
        return None
    except (binascii.Error, ValueError):
        pass
    for index, char in enumerate(text):
        if char in "\r\n":
            continue
        if char == "=":
            break
        if not _BASE64.match(char):
            return f"illegal base64 data at input byte {index}"
    return f"illegal base64 data at input byte {max(0, len(text) - len(text) % 4 or len(text) - 4)}"


def _image(w: _Walk, value: Any) -> None:
    """api.ImageData ([]byte): a base64 string."""
    if value is None:
        return
    if not isinstance(value, str):
        w.save(UnmarshalTypeError(kind(value), "api.ImageData"))
        return
    error = base64_error(value)
    if error is not None:
        w.save(error)


STRING, BOOL, INT, FLOAT64, FLOAT32 = (Scalar("string"), Scalar("bool"), Scalar("int"), Scalar("float64"),
                                       Scalar("float32"))
ANY, RAW = AnyValue(), Raw()
STRINGS = Slice(STRING, "[]string")
OPTIONS = Map(ANY, "map[string]interface {}")
DURATION = Custom(_duration, "api.Duration")
THINK = Custom(_think, "api.ThinkValue")
IMAGES = Slice(Custom(_image, "api.ImageData"), "[]api.ImageData")

TOOL = Struct("Tool", {
    "type": STRING, "items": ANY,
    "function": Struct("ToolFunction", {
        "name": STRING, "description": STRING,
        "parameters": Struct("ToolFunctionParameters", {
            "type": STRING, "$defs": ANY, "items": ANY, "required": STRINGS, "properties": RAW},
            "api.ToolFunctionParameters")}, "api.ToolFunction")}, "api.Tool")
TOOL_CALL = Struct("ToolCall", {
    "id": STRING,
    "function": Struct("ToolCallFunction", {"index": INT, "name": STRING, "arguments": RAW},
                       "api.ToolCallFunction")}, "api.ToolCall")
MESSAGE_ALIAS = Struct("Alias", {
    "role": STRING, "content": STRING, "thinking": STRING, "images": IMAGES,
    "tool_calls": Slice(TOOL_CALL, "[]api.ToolCall"), "tool_name": STRING, "tool_call_id": STRING},
    "api.Alias")


def _message(w: _Walk, value: Any) -> None:
    """api.Message decodes itself through `type Alias Message` (to lower-case its role): its errors name
    the Alias type and stop the decode."""
    if value is not None:
        _nested(w, value, MESSAGE_ALIAS)


MESSAGES = Slice(Custom(_message, "api.Message"), "[]api.Message")

_ANTHROPIC_RAW = ('struct { Role string "json:\\"role\\""; Content json.RawMessage '
                  '"json:\\"content\\"" }')
_CONTENT_BLOCK = Struct("ContentBlock", {"type": STRING, "text": STRING, "thinking": STRING,
                                         "id": STRING, "name": STRING, "tool_use_id": STRING},
                        "anthropic.ContentBlock")


def _anthropic_message(w: _Walk, value: Any) -> None:
    """anthropic.MessageParam: `content` a string or a list of content blocks; a missing one fails."""
    _nested(w, value, Struct("", {"role": STRING, "content": RAW}, _ANTHROPIC_RAW))
    content = value.get("content") if isinstance(value, dict) else None
    if (isinstance(value, dict) and "content" not in value) or value is None:
        raise w.stop("unexpected end of JSON input")
    if content is None or isinstance(content, str):
        return
    _nested(w, content, Slice(_CONTENT_BLOCK, "[]anthropic.ContentBlock"))


def _responses_input(w: _Walk, value: Any) -> None:
    """openai.ResponsesInput: a string or an array of input items."""
    if value is None or isinstance(value, str | list):
        return
    raise w.stop("input must be a string or array: json: cannot unmarshal "
                 f"{kind(value)} into Go value of type []json.RawMessage")


STREAM_OPTIONS = Struct("StreamOptions", {"include_usage": BOOL}, "openai.StreamOptions")

_NATIVE: dict[str, dict[str, GoType]] = {
    "GenerateRequest": {
        "model": STRING, "prompt": STRING, "suffix": STRING, "system": STRING, "template": STRING,
        "context": Slice(INT, "[]int"), "stream": BOOL, "raw": BOOL, "format": RAW,
        "keep_alive": DURATION, "images": IMAGES, "options": OPTIONS, "think": THINK, "truncate": BOOL,
        "shift": BOOL, "_debug_render_only": BOOL, "logprobs": BOOL, "top_logprobs": INT},
    "ChatRequest": {
        "model": STRING, "messages": MESSAGES, "stream": BOOL, "format": RAW, "keep_alive": DURATION,
        "tools": Slice(TOOL, "api.Tools"), "options": OPTIONS, "think": THINK, "truncate": BOOL,
        "shift": BOOL, "_debug_render_only": BOOL, "logprobs": BOOL, "top_logprobs": INT},
    "EmbedRequest": {
        "model": STRING, "input": ANY, "keep_alive": DURATION, "truncate": BOOL, "dimensions": INT,
        "options": OPTIONS},
    "EmbeddingRequest": {"model": STRING, "prompt": STRING, "keep_alive": DURATION, "options": OPTIONS},
    "ShowRequest": {"model": STRING, "name": STRING, "system": STRING, "template": STRING,
                    "verbose": BOOL, "options": OPTIONS},
    "PullRequest": {"model": STRING, "name": STRING, "insecure": BOOL, "username": STRING,
                    "password": STRING, "stream": BOOL},
    "PushRequest": {"model": STRING, "name": STRING, "insecure": BOOL, "username": STRING,
                    "password": STRING, "stream": BOOL},
    "CreateRequest": {"model": STRING, "stream": BOOL, "quantize": STRING, "from": STRING,
                      "files": Map(STRING, "map[string]string"),
                      "adapters": Map(STRING, "map[string]string"), "template": STRING,
                      "license": ANY, "system": STRING, "parameters": OPTIONS, "messages": MESSAGES},
    "DeleteRequest": {"model": STRING, "name": STRING},
    "CopyRequest": {"source": STRING, "destination": STRING},
}

_OPENAI_MESSAGE = Struct("Message", {
    "role": STRING, "content": ANY, "reasoning": STRING,
    "tool_calls": Slice(Struct("ToolCall", {
        "id": STRING, "index": INT, "type": STRING,
        "function": Struct("", {"name": STRING, "arguments": STRING},
                           'struct { Name string "json:\\"name\\""; Arguments string '
                           '"json:\\"arguments\\"" }')}, "openai.ToolCall"), "[]openai.ToolCall"),
    "name": STRING, "tool_call_id": STRING}, "openai.Message")

_COMPAT: dict[str, dict[str, GoType]] = {
    "openai.ChatCompletionRequest": {
        "model": STRING, "messages": Slice(_OPENAI_MESSAGE, "[]openai.Message"), "stream": BOOL,
        "stream_options": STREAM_OPTIONS, "max_tokens": INT, "seed": INT, "stop": ANY,
        "temperature": FLOAT64, "frequency_penalty": FLOAT64, "presence_penalty": FLOAT64,
        "top_p": FLOAT64,
        "response_format": Struct("ResponseFormat", {
            "type": STRING,
            "json_schema": Struct("JsonSchema", {"schema": RAW}, "openai.JsonSchema")},
            "openai.ResponseFormat"),
        "tools": Slice(TOOL, "[]api.Tool"),
        "reasoning": Struct("Reasoning", {"effort": STRING}, "openai.Reasoning"),
        "reasoning_effort": STRING, "logprobs": BOOL, "top_logprobs": INT, "_debug_render_only": BOOL},
    "openai.CompletionRequest": {
        "model": STRING, "prompt": STRING, "frequency_penalty": FLOAT32, "max_tokens": INT,
        "presence_penalty": FLOAT32, "seed": INT, "stop": ANY, "stream": BOOL,
        "stream_options": STREAM_OPTIONS, "temperature": FLOAT32, "top_p": FLOAT32, "suffix": STRING,
        "logprobs": INT, "_debug_render_only": BOOL},
    "openai.EmbedRequest": {"input": ANY, "model": STRING, "dimensions": INT, "encoding_format": STRING},
    "openai.ResponsesRequest": {
        "model": STRING, "background": BOOL, "conversation": RAW, "include": STRINGS,
        "input": Custom(_responses_input, "openai.ResponsesInput"), "instructions": STRING,
        "max_output_tokens": INT, "temperature": FLOAT64, "top_p": FLOAT64, "stream": BOOL},
    "anthropic.MessagesRequest": {
        "model": STRING, "max_tokens": INT,
        "messages": Slice(Custom(_anthropic_message, "anthropic.MessageParam"),
                          "[]anthropic.MessageParam"),
        "system": ANY, "stream": BOOL, "temperature": FLOAT64, "top_p": FLOAT64, "top_k": INT,
        "stop_sequences": STRINGS},
}


def _schemas() -> dict[str, Struct]:
    out = {name: Struct(name, fields, f"api.{name}") for name, fields in _NATIVE.items()}
    for qualified, fields in _COMPAT.items():
        out[qualified] = Struct(qualified.rpartition(".")[2], fields, qualified)
    return out


SCHEMAS: dict[str, Struct] = _schemas()
"""Each route's request struct by its Go name (`GenerateRequest`, `openai.ChatCompletionRequest`)."""


def check(value: Any, struct: Struct) -> None:
    """Raise GoTypeError with Go's text when decoding `value` (a parsed body) into `struct` fails."""
    w = _Walk()
    try:
        struct.walk(w, value)
    except _Stop as stop:
        raise GoTypeError(str(stop.error)) from None
    if w.saved is not None:
        raise GoTypeError(str(w.saved))
