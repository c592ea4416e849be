"""Emulated OpenAI-compatible routes (reference §7): chat completions, completions, embeddings, models.

Bodies end with `\n` and carry `Content-Type: application/json` (Go's json.Encoder); errors use OpenAI's
shape; streams are SSE `data: {...}\n\n` events ending with `data: [DONE]`.
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

from aiohttp import web

from . import gojson, wire
from .catalog import display_name
from .engine import Engine, RunResult
from .gotypes import base64_error, go_dynamic_type
from .native import RequestError

__all__ = ["OpenAIError", "OpenAIRoutes", "chat_messages", "content_text", "openai_error_type"]


class OpenAIError(RequestError):
    """An error rendered in OpenAI's shape."""


def openai_error_type(status: int) -> str:
    return {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")


def _event(value: Any) -> bytes:
    return b"data: " + gojson.dumps_bytes(value) + b"\n\n"


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


class OpenAIRoutes:
    """Handlers for `/v1/*` OpenAI compatibility, bound to one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sequence = 0

    def _id(self, prefix: str) -> str:
        self._sequence = (self._sequence + 1) % 999
        return f"{prefix}-{self._sequence}"

    def _entry(self, model: str, capability: str) -> Any:
        entry = self.engine.store.get(model) if model else None
        if entry is None:
            raise OpenAIError(404, f"model '{model}' not found")
        if capability not in entry.capabilities:
            raise OpenAIError(400, f'"{model}" does not support {capability}')
        return entry

    @staticmethod
    def _options(body: dict[str, Any]) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if isinstance(body.get("max_tokens"), int):
            options["num_predict"] = body["max_tokens"]
        if isinstance(body.get("seed"), int):
            options["seed"] = body["seed"]
        return options

    async def chat_completions(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise OpenAIError(400, "[] is too short - 'messages'")
        flat = chat_messages(messages)
        model = body.get("model") or ""
        if not model:  # Ollama runs it on /api/chat, whose answer this is
            raise OpenAIError(400, "model is required")
        entry = self._entry(model, "completion")
        engine = self.engine
        result = RunResult()
        options = self._options(body)
        # Ollama runs this on its chat handler: an over-long prompt is cut as on /api/chat.
        prompt_tokens = engine.fit_chat(flat, engine.num_ctx_for(entry, options), True)
        tokens = engine.generate(entry, engine.render_chat(flat), prompt_tokens, options, None, result)
        ident = self._id("chatcmpl")
        created = engine.now_ns() // 1_000_000_000
        base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": "fp_ollama"}
        if body.get("stream") is True:
            response: web.StreamResponse | None = None
            first = True
            async for token in tokens:
                if response is None:
                    response = await wire.start_stream(request, wire.CT_SSE)
                delta: dict[str, Any] = {"role": "assistant", "content": token} if first else {
                    "content": token}
                first = False
                await response.write(_event({**base, "choices": [
                    {"index": 0, "delta": delta, "finish_reason": None}]}))
            if response is None:
                response = await wire.start_stream(request, wire.CT_SSE)
            await response.write(_event({**base, "choices": [
                {"index": 0, "delta": {}, "finish_reason": _finish(result.done_reason)}]}))
            stream_options = body.get("stream_options")
            if isinstance(stream_options, dict) and stream_options.get("include_usage"):
                await response.write(_event({**base, "choices": [], "usage": _usage(result)}))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        text = "".join([token async for token in tokens])
        value = {"id": ident, "object": "chat.completion", "created": created, "model": model,
                 "system_fingerprint": "fp_ollama",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                              "finish_reason": _finish(result.done_reason)}],
                 "usage": _usage(result)}
        return await wire.send_json(request, value, content_type=wire.CT_JSON_PLAIN, newline=True)

    async def completions(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        model = body.get("model") or ""
        prompt = body.get("prompt") or ""
        stop = body.get("stop")
        if isinstance(stop, list):
            for item in stop:
                if not isinstance(item, str):
                    raise OpenAIError(400, f"invalid type for 'stop' field: {go_dynamic_type(item)}")
        entry = self._entry(model, "completion")
        engine = self.engine
        result = RunResult()
        options = self._options(body)
        # Ollama runs this on its generate handler: an over-long prompt is cut as on /api/generate.
        prompt_tokens = engine.fit_tokens(engine.count_prompt(prompt), engine.num_ctx_for(entry, options),
                                          True)
        tokens = engine.generate(entry, prompt, prompt_tokens, options, None, result)
        ident = self._id("cmpl")
        if body.get("stream") is True:
            stream_options = body.get("stream_options")
            include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))
            response = await wire.start_stream(request, wire.CT_SSE)
            pending: str | None = None

            def chunk(text: str, reason: str | None) -> dict[str, Any]:
                value: dict[str, Any] = {
                    "id": ident, "object": "text_completion", "created": engine.now_ns() // 10**9,
                    "choices": [{"text": text, "index": 0, "finish_reason": reason}],
                    "model": model, "system_fingerprint": "fp_ollama"}
                if include_usage:
                    value["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
                return value

            async for token in tokens:
                if pending is not None:
                    await response.write(_event(chunk(pending, None)))
                pending = token
            await response.write(_event(chunk(pending or "", _finish(result.done_reason))))
            if include_usage:
                await response.write(_event({
                    "id": ident, "object": "text_completion", "created": engine.now_ns() // 10**9,
                    "choices": [], "model": model, "system_fingerprint": "fp_ollama",
                    "usage": _usage(result)}))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        text = "".join([token async for token in tokens])
        value = {"id": ident, "object": "text_completion", "created": engine.now_ns() // 10**9,
                 "model": model, "system_fingerprint": "fp_ollama",
                 "choices": [{"text": text, "index": 0, "finish_reason": _finish(result.done_reason)}],
                 "usage": _usage(result)}
        return await wire.send_json(request, value, content_type=wire.CT_JSON_PLAIN, newline=True)

    async def embeddings(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        model = body.get("model") or ""
        raw = body.get("input")
        encoding = body.get("encoding_format") or "float"
        if encoding.lower() not in ("float", "base64"):  # Go's strings.EqualFold
            raise OpenAIError(400, f"Invalid value for 'encoding_format' = {encoding}. "
                                   "Supported values: ['float', 'base64'].")
        encoding = encoding.lower()
        if raw is None or raw == []:
            raise OpenAIError(400, "invalid input")
        if not model:  # Ollama runs it on /api/embed, whose answer this is
            raise OpenAIError(404, "model '' not found")
        entry = self.engine.store.get(model)
        if entry is None:
            raise OpenAIError(404, f'model "{model}" not found, try pulling it first')
        # The body goes on to /api/embed, which takes a string or an array of strings.
        texts = [raw] if isinstance(raw, str) else raw
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise OpenAIError(400, "invalid input type")
        dimensions = body.get("dimensions")
        vectors, result = await self.engine.embed(
            entry, texts, None, normalize=True,
            dimensions=dimensions if isinstance(dimensions, int) else None)
        data = []
        for index, vector in enumerate(vectors):
            embedding: Any = vector
            if encoding == "base64":
                embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "embedding": embedding, "index": index})
        value = {"object": "list", "data": data, "model": model,
                 "usage": {"prompt_tokens": result.prompt_eval_count,
                           "total_tokens": result.prompt_eval_count}}
        return await wire.send_json(request, value, content_type=wire.CT_JSON_PLAIN, newline=True)

    async def responses(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        """The Responses API: non-streaming object, or named SSE events ending in response.completed."""
        model = body.get("model") or ""
        if not model:  # Ollama runs it on /api/chat, whose answer this is
            raise OpenAIError(400, "model is required")
        entry = self._entry(model, "completion")
        raw_input = body.get("input")
        if isinstance(raw_input, str):
            messages = [{"role": "user", "content": raw_input}]
        elif isinstance(raw_input, list):
            messages = [{"role": str(m.get("role") or "user"), "content": content_text(m.get("content"))}
                        for m in raw_input if isinstance(m, dict)]
        else:
            raise OpenAIError(400, "input is required")
        if isinstance(body.get("instructions"), str):
            messages.insert(0, {"role": "system", "content": body["instructions"]})
        engine = self.engine
        options: dict[str, Any] = {}
        if isinstance(body.get("max_output_tokens"), int):
            options["num_predict"] = body["max_output_tokens"]
        result = RunResult()
        prompt_tokens = engine.fit_chat(messages, engine.num_ctx_for(entry, options), True)  # as /api/chat
        tokens = engine.generate(entry, engine.render_chat(messages), prompt_tokens, options, None, result)
        response_id, message_id = self._id("resp").replace("-", "_"), self._id("msg").replace("-", "_")
        created = engine.now_ns() // 10**9

        def envelope(status: str, text: str | None) -> dict[str, Any]:
            output = [] if text is None else [{
                "id": message_id, "type": "message", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}]
            value: dict[str, Any] = {"id": response_id, "object": "response", "created_at": created,
                                     "status": status, "model": model, "output": output}
            if status == "completed":
                value["usage"] = {"input_tokens": result.prompt_eval_count,
                                  "output_tokens": result.eval_count,
                                  "total_tokens": result.prompt_eval_count + result.eval_count}
            return value

        if body.get("stream") is not True:
            text = "".join([token async for token in tokens])
            return await wire.send_json(request, envelope("completed", text),
                                        content_type=wire.CT_JSON_PLAIN, newline=True)
        response = await wire.start_stream(request, wire.CT_SSE, {"Cache-Control": "no-cache"})
        sequence = 0

        async def emit(kind: str, **fields: Any) -> None:
            nonlocal sequence
            value = {"type": kind, "sequence_number": sequence, **fields}
            sequence += 1
            await response.write(f"event: {kind}\ndata: ".encode() + gojson.dumps_bytes(value) + b"\n\n")

        item = {"id": message_id, "type": "message", "status": "in_progress", "role": "assistant",
                "content": []}
        await emit("response.created", response=envelope("in_progress", None))
        await emit("response.in_progress", response=envelope("in_progress", None))
        await emit("response.output_item.added", output_index=0, item=item)
        await emit("response.content_part.added", item_id=message_id, output_index=0, content_index=0,
                   part={"type": "output_text", "text": "", "annotations": []})
        pieces: list[str] = []
        async for token in tokens:
            pieces.append(token)
            await emit("response.output_text.delta", item_id=message_id, output_index=0,
                       content_index=0, delta=token)
        text = "".join(pieces)
        await emit("response.output_text.done", item_id=message_id, output_index=0, content_index=0,
                   text=text)
        await emit("response.content_part.done", item_id=message_id, output_index=0, content_index=0,
                   part={"type": "output_text", "text": text, "annotations": []})
        await emit("response.output_item.done", output_index=0,
                   item={**item, "status": "completed",
                         "content": [{"type": "output_text", "text": text, "annotations": []}]})
        await emit("response.completed", response=envelope("completed", text))
        await response.write_eof()
        return response

    async def transcriptions(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        """Multipart `model` + `file`; `{"text": ...}` or plain text with `response_format=text`."""
        del body
        form = await request.post()
        model = str(form.get("model") or "")
        if not model:
            raise OpenAIError(400, "model is required")
        if "file" not in form:
            raise OpenAIError(400, "file is required")
        entry = self._entry(model, "completion")
        result = RunResult()
        tokens = self.engine.generate(entry, f"transcribe with {model}", 64, {}, None, result)
        text = "".join([token async for token in tokens])
        if form.get("response_format") == "text":
            return await wire.send_bytes(request, 200, text.encode(), "text/plain; charset=utf-8")
        return await wire.send_json(request, {"text": text}, content_type=wire.CT_JSON_PLAIN,
                                    newline=True)

    async def models(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        del body
        entries = self.engine.store.by_recency()
        data = [{"id": e.name, "object": "model", "created": e.modified_ns // 10**9,
                 "owned_by": e.namespace} for e in entries] or None
        return await wire.send_json(request, {"object": "list", "data": data},
                                    content_type=wire.CT_JSON_PLAIN, newline=True)

    async def model(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        del body
        name = request.match_info["model"]
        entry = self.engine.store.get(name)
        if entry is None:
            raise OpenAIError(404, f"model '{display_name(name)}' not found")
        value = {"id": name, "object": "model", "created": entry.modified_ns // 10**9,
                 "owned_by": entry.namespace}
        return await wire.send_json(request, value, content_type=wire.CT_JSON_PLAIN, newline=True)


def content_text(content: Any) -> str:
    """The text of a message's content: a string, or the string `text` of its parts (OpenAI and
    Anthropic); anything else contributes nothing."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part["text"] for part in content
                       if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


_IMAGE_PREFIXES = ("data:;base64,",
                   *(f"data:image/{kind};base64," for kind in ("jpeg", "jpg", "png", "webp")))


def _image_url(url: str) -> None:
    """Ollama's decodeImageURL checks, with its texts."""
    if url.startswith(("http://", "https://")):
        raise OpenAIError(400, "image URLs are not currently supported, please use base64 encoded data "
                               "instead")
    prefix = next((p for p in _IMAGE_PREFIXES if url.startswith(p)), None)
    if prefix is None or base64_error(url[len(prefix):]) is not None:
        raise OpenAIError(400, "invalid image input")


def _tool_call_arguments(tool_calls: Any) -> None:
    for call in tool_calls or []:
        arguments = ((call or {}).get("function") or {}).get("arguments") or ""
        try:
            parsed = json.loads(arguments)
        except ValueError:
            parsed = []
        if parsed is not None and not isinstance(parsed, dict):
            raise OpenAIError(400, "invalid tool call arguments")


def chat_messages(messages: list[Any]) -> list[dict[str, str]]:
    """Chat Completions messages as Ollama's FromChatRequest converts them: one message per string
    content or content part, with its 400s (`invalid message format`, `invalid message content type:
    <Go type>`, ...) for parts it cannot read. The decoder has already checked the field types."""
    out: list[dict[str, str]] = []
    for given in messages:
        message = given or {}
        role = message.get("role") or ""
        content = message.get("content")
        tool_calls = message.get("tool_calls")
        if isinstance(content, str):
            _tool_call_arguments(tool_calls)
            out.append({"role": role, "content": content})
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    raise OpenAIError(400, "invalid message format")
                kind = part.get("type")
                if kind == "text":
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise OpenAIError(400, "invalid message format")
                    out.append({"role": role, "content": text})
                elif kind == "image_url":
                    image = part.get("image_url")
                    url = image.get("url") if isinstance(image, dict) else image
                    if not isinstance(url, str):
                        raise OpenAIError(400, "invalid message format")
                    _image_url(url)
                    out.append({"role": role, "content": ""})
                elif kind == "input_audio":
                    audio = part.get("input_audio")
                    if not isinstance(audio, dict):
                        raise OpenAIError(400, "invalid input_audio format")
                    data = audio.get("data")
                    if not isinstance(data, str):
                        raise OpenAIError(400, "invalid input_audio format: missing data")
                    error = base64_error(data)
                    if error is not None:
                        raise OpenAIError(400, f"invalid input_audio base64 data: {error}")
                    out.append({"role": role, "content": ""})
                else:
                    raise OpenAIError(400, "invalid message format")
            if out and tool_calls:
                _tool_call_arguments(tool_calls)
        else:
            if tool_calls is None:  # content is optional only beside tool calls
                raise OpenAIError(400, f"invalid message content type: {go_dynamic_type(content)}")
            _tool_call_arguments(tool_calls)
            out.append({"role": role, "content": ""})
    return out


def _usage(result: RunResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_eval_count, "completion_tokens": result.eval_count,
            "total_tokens": result.prompt_eval_count + result.eval_count}
