"""Emulated Anthropic Messages route `POST /v1/messages` (reference §8), streaming and not."""

from __future__ import annotations

import hashlib
from typing import Any

from aiohttp import web

from . import gojson, wire
from .engine import Engine, RunResult
from .native import RequestError
from .openai_compat import content_text

__all__ = ["AnthropicError", "AnthropicRoutes", "anthropic_error_type"]

_SSE_HEADERS = {"Cache-Control": "no-cache"}


class AnthropicError(RequestError):
    """An error rendered in Anthropic's shape."""


def anthropic_error_type(status: int) -> str:
    return {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 429: "rate_limit_error", 503: "overloaded_error",
            529: "overloaded_error"}.get(status, "api_error")


def _event(name: str, value: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: ".encode() + gojson.dumps_bytes(value) + b"\n\n"


class AnthropicRoutes:
    """Handler for `/v1/messages`, bound to one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sequence = 0

    def request_id(self) -> str:
        self._sequence += 1
        return "req_" + hashlib.sha256(f"req{self._sequence}".encode()).hexdigest()[:24]

    async def messages(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        model = body.get("model") or ""
        if not model:
            raise AnthropicError(400, "model is required")
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int) or max_tokens <= 0:
            raise AnthropicError(400, "max_tokens is required and must be positive")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise AnthropicError(400, "messages is required")
        entry = self.engine.store.get(model)
        if entry is None:
            raise AnthropicError(404, f"model '{model}' not found")
        engine = self.engine
        flat = [{"role": m.get("role"), "content": content_text(m.get("content"))} for m in messages
                if isinstance(m, dict)]
        if body.get("system"):
            flat.insert(0, {"role": "system", "content": content_text(body.get("system"))})
        options = {"num_predict": max_tokens}
        # Ollama runs this on its chat handler: an over-long prompt is cut as on /api/chat.
        prompt_tokens = engine.fit_chat(flat, engine.num_ctx_for(entry, options), True)
        result = RunResult()
        tokens = engine.generate(entry, engine.render_chat(flat), prompt_tokens, options, None, result)
        ident = "msg_" + hashlib.sha256(f"msg{self.request_id()}".encode()).hexdigest()[:24]
        if body.get("stream") is True:
            response = await wire.start_stream(request, wire.CT_SSE, _SSE_HEADERS)
            await response.write(_event("message_start", {"type": "message_start", "message": {
                "id": ident, "type": "message", "role": "assistant", "model": model, "content": [],
                "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}}))
            await response.write(_event("content_block_start", {
                "type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}))
            async for token in tokens:
                await response.write(_event("content_block_delta", {
                    "type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": token}}))
            await response.write(_event("content_block_stop",
                                        {"type": "content_block_stop", "index": 0}))
            await response.write(_event("message_delta", {
                "type": "message_delta", "delta": {"stop_reason": _stop(result)},
                "usage": {"input_tokens": result.prompt_eval_count,
                          "output_tokens": result.eval_count}}))
            await response.write(_event("message_stop", {"type": "message_stop"}))
            await response.write_eof()
            return response
        text = "".join([token async for token in tokens])
        value = {"id": ident, "type": "message", "role": "assistant", "model": model,
                 "content": [{"type": "text", "text": text}], "stop_reason": _stop(result),
                 "usage": {"input_tokens": result.prompt_eval_count,
                           "output_tokens": result.eval_count}}
        return await wire.send_json(request, value, content_type=wire.CT_JSON_PLAIN, newline=True)


def _stop(result: RunResult) -> str:
    return "max_tokens" if result.done_reason == "length" else "end_turn"
