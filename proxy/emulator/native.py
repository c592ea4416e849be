"""Emulated native inference routes: `/api/generate`, `/api/chat`, `/api/embed`, `/api/embeddings`.

Validation order, error texts and statuses follow reference §4, §5 and §9; response field order follows
Go's struct declaration order (§4.3). Streams are NDJSON, one flushed line per token, then one `done` object.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.schema import OLLAMA_BOOL_OPTIONS, OLLAMA_FLOAT_OPTIONS, OLLAMA_INT_OPTIONS

from . import gojson, wire
from .catalog import ModelEntry, valid_name
from .durations import KeepAliveError, parse_keep_alive
from .engine import ContextOverflow, Engine, RunResult

__all__ = ["NativeRoutes", "RequestError"]

_THINK_LEVELS = ("high", "medium", "low", "max")


class RequestError(Exception):
    """A request Ollama refuses before any output: status and message for `{"error": ...}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def canonical(entry: ModelEntry) -> str:
    """`registry.ollama.ai/library/llama3.2:latest`, as capability errors spell it."""
    name = entry.name
    if "/" not in name.split(":", 1)[0]:
        return f"registry.ollama.ai/library/{name}"
    if name.count("/") == 1:
        return f"registry.ollama.ai/{name}"
    return name


def _keep_alive(body: dict[str, Any]) -> int | None:
    try:
        return parse_keep_alive(body.get("keep_alive"))
    except KeepAliveError as exc:
        raise RequestError(400, str(exc)) from None


def _think(body: dict[str, Any], entry: ModelEntry, model: str) -> bool:
    """Whether the run thinks; raises Ollama's 400s for bad or unsupported values."""
    think = body.get("think")
    if isinstance(think, str) and think not in _THINK_LEVELS:
        raise RequestError(400, f'invalid think value: "{think}" (must be "high", "medium", "low", '
                                '"max", true, or false)')
    supports = "thinking" in entry.capabilities
    if think not in (None, False) and not supports:
        raise RequestError(400, f'"{model}" does not support thinking')
    return supports and think is not False


def _top_logprobs(body: dict[str, Any]) -> None:
    top = body.get("top_logprobs")
    if isinstance(top, int) and not 0 <= top <= 20:
        raise RequestError(400, "top_logprobs must be between 0 and 20")


_FLOAT_OPTIONS = OLLAMA_FLOAT_OPTIONS
_INT_OPTIONS = OLLAMA_INT_OPTIONS
_BOOL_OPTIONS = OLLAMA_BOOL_OPTIONS


def _options(body: dict[str, Any]) -> dict[str, Any]:
    """The request's options as Ollama's Options.FromMap reads them (reference §4.2): a JSON number
    is a float64, and an integer option takes its integer part (`num_predict: 5.0` is 5); a value of
    the wrong type fails the run with Ollama's 500 `option "x" must be of type ...`. Unknown keys are
    ignored. (The decoder has already made `options` an object of float64-sized values.)"""
    options = body.get("options")
    if not isinstance(options, dict):
        return {}
    options = dict(options)
    for key in _FLOAT_OPTIONS:
        value = options.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise RequestError(500, f'option "{key}" must be of type float32')
    for key in _INT_OPTIONS:
        value = options.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RequestError(500, f'option "{key}" must be of type integer')
        options[key] = int(value)  # Go's int64(float64): the integer part
    for key in _BOOL_OPTIONS:
        value = options.get(key)
        if value is not None and not isinstance(value, bool):
            raise RequestError(500, f'option "{key}" must be of type boolean')
    stop = options.get("stop")
    if stop is not None:
        if not isinstance(stop, list):
            raise RequestError(500, 'option "stop" must be of type array')
        if not all(isinstance(item, str) for item in stop):
            raise RequestError(500, 'option "stop" must be of an array of strings')
    return options


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """`messages` as api.Message values: a `null` entry is an empty message, roles lower-cased, missing
    strings empty (the decoder has checked every type)."""
    out = []
    for given in body.get("messages") or []:
        message = dict(given or {})
        message["role"] = (message.get("role") or "").lower()
        message["content"] = message.get("content") or ""
        out.append(message)
    return out


class NativeRoutes:
    """Handlers for the native inference API, bound to one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _lookup(self, model: str, not_found: str) -> ModelEntry:
        if not valid_name(model):
            raise RequestError(400, "invalid model name")
        entry = self.engine.store.get(model)
        if entry is None:
            raise RequestError(404, not_found)
        return entry

    # /api/generate -----------------------------------------------------------------------------------
    async def generate(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        model = body.get("model") or ""
        keep_alive = _keep_alive(body)
        if not model:
            raise RequestError(404, "model '' not found")
        entry = self._lookup(model, f"model '{model}' not found")
        if body.get("raw") and (body.get("template") or body.get("system") or body.get("context")):
            raise RequestError(400, "raw mode does not support template, system, or context")
        if "completion" not in entry.capabilities:
            raise RequestError(400, f'"{model}" does not support generate')
        if body.get("suffix") and "insert" not in entry.capabilities:
            raise RequestError(400, f"{canonical(entry)} does not support insert")
        thinks = _think(body, entry, model)
        _top_logprobs(body)
        options = _options(body)
        prompt = body.get("prompt") or ""
        engine = self.engine
        if not prompt:
            return await self._load_or_unload(request, entry, model, keep_alive, options,
                                              {"response": ""})
        text = (body.get("system") or "") + prompt
        counted = engine.count_prompt(text) if not body.get("raw") else (
            engine.vocabulary.count(prompt) + 1)
        try:
            prompt_tokens = engine.fit_tokens(counted, engine.num_ctx_for(entry, options),
                                              body.get("truncate") is not False)
        except ContextOverflow as exc:
            raise RequestError(400, str(exc)) from None
        result = RunResult()
        tokens = engine.generate(entry, text, prompt_tokens, options, keep_alive,
                                 result, truncate=body.get("truncate") is not False)
        think_count = 0
        stream = body.get("stream") is not False
        if stream:
            response: web.StreamResponse | None = None
            index = 0
            async for token in tokens:
                if response is None:
                    response = await wire.start_stream(request, wire.CT_NDJSON)
                    think_count = _thinking_share(result, thinks)
                chunk: dict[str, Any] = {"model": model, "created_at": wire.go_time(engine.now_ns()),
                                         "response": "" if index < think_count else token}
                if index < think_count:
                    chunk["thinking"] = token
                chunk["done"] = False
                await response.write(gojson.dumps_bytes(chunk, newline=True))
                index += 1
            if response is None:
                response = await wire.start_stream(request, wire.CT_NDJSON)
            final = self._generate_final(model, engine, result, "", "", text, body)
            await response.write(gojson.dumps_bytes(final, newline=True))
            await response.write_eof()
            return response
        pieces = [token async for token in tokens]
        think_count = _thinking_share(result, thinks, len(pieces))
        final = self._generate_final(model, engine, result, "".join(pieces[think_count:]),
                                     "".join(pieces[:think_count]), text, body)
        return await wire.send_json(request, final)

    def _generate_final(self, model: str, engine: Engine, result: RunResult, response_text: str,
                        thinking: str, prompt_text: str, body: dict[str, Any]) -> dict[str, Any]:
        final: dict[str, Any] = {"model": model, "created_at": wire.go_time(engine.now_ns()),
                                 "response": response_text}
        if thinking:
            final["thinking"] = thinking
        final["done"] = True
        final["done_reason"] = result.done_reason
        if not body.get("raw"):
            final["context"] = engine.vocabulary.encode(prompt_text)[-256:]
        final.update(result.metrics())
        return final

    async def _load_or_unload(self, request: web.Request, entry: ModelEntry, model: str,
                              keep_alive: int | None, options: dict[str, Any],
                              empty: dict[str, Any]) -> web.StreamResponse:
        engine = self.engine
        if keep_alive == 0:
            engine.scheduler.unload_when_idle(entry)
            reason = "unload"
        else:
            await engine.load(entry, engine.num_ctx_for(entry, options), keep_alive)
            reason = "load"
        value: dict[str, Any] = {"model": model, "created_at": wire.go_time(engine.now_ns()), **empty,
                                 "done": True, "done_reason": reason}
        return await wire.send_json(request, value)

    # /api/chat ---------------------------------------------------------------------------------------
    async def chat(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        model = body.get("model") or ""
        keep_alive = _keep_alive(body)
        if not model:
            raise RequestError(400, "model is required")
        entry = self._lookup(model, f"model '{model}' not found")
        if "completion" not in entry.capabilities:
            raise RequestError(400, f'"{model}" does not support chat')
        if body.get("tools") and "tools" not in entry.capabilities:
            raise RequestError(400, f"{canonical(entry)} does not support tools")
        thinks = _think(body, entry, model)
        _top_logprobs(body)
        options = _options(body)
        messages = _messages(body)
        engine = self.engine
        if not messages:
            return await self._load_or_unload(request, entry, model, keep_alive, options,
                                              {"message": {"role": "assistant", "content": ""}})
        try:
            prompt_tokens = engine.fit_chat(messages, engine.num_ctx_for(entry, options),
                                            body.get("truncate") is not False)
        except ContextOverflow as exc:
            raise RequestError(400, str(exc)) from None
        result = RunResult()
        tokens = engine.generate(entry, engine.render_chat(messages), prompt_tokens, options, keep_alive,
                                 result, truncate=body.get("truncate") is not False)
        tool_calls = _tool_calls(body.get("tools"), engine, model)
        stream = body.get("stream") is not False
        if stream:
            response: web.StreamResponse | None = None
            index = 0
            think_count = 0
            async for token in tokens:
                if response is None:
                    response = await wire.start_stream(request, wire.CT_NDJSON)
                    think_count = _thinking_share(result, thinks)
                message: dict[str, Any] = {"role": "assistant",
                                           "content": "" if index < think_count else token}
                if index < think_count:
                    message["thinking"] = token
                chunk = {"model": model, "created_at": wire.go_time(engine.now_ns()),
                         "message": message, "done": False}
                await response.write(gojson.dumps_bytes(chunk, newline=True))
                index += 1
            if response is None:
                response = await wire.start_stream(request, wire.CT_NDJSON)
            final = _chat_final(model, engine, result, "", "", tool_calls)
            await response.write(gojson.dumps_bytes(final, newline=True))
            await response.write_eof()
            return response
        pieces = [token async for token in tokens]
        think_count = _thinking_share(result, thinks, len(pieces))
        content = "" if tool_calls else "".join(pieces[think_count:])
        final = _chat_final(model, engine, result, content, "".join(pieces[:think_count]), tool_calls)
        return await wire.send_json(request, final)

    # /api/embed --------------------------------------------------------------------------------------
    async def embed(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        model = body.get("model") or ""
        keep_alive = _keep_alive(body)
        if not model:
            raise RequestError(404, "model '' not found")
        entry = self._lookup(model, f'model "{model}" not found, try pulling it first')
        raw_input = body.get("input")
        options = _options(body)
        num_ctx = self.engine.num_ctx_for(entry, options)
        if raw_input is None or raw_input in ("", []):
            await self.engine.load(entry, num_ctx, keep_alive)
            return await wire.send_json(request, {"model": model, "embeddings": []})
        if isinstance(raw_input, str):
            texts = [raw_input]
        elif isinstance(raw_input, list) and all(isinstance(item, str) for item in raw_input):
            texts = list(raw_input)
        else:
            raise RequestError(400, "invalid input type")
        if body.get("truncate") is False and any(
                self.engine.vocabulary.count(text) + 2 > num_ctx for text in texts):
            raise RequestError(400, "the input length exceeds the context length")
        dimensions = body.get("dimensions")
        vectors, result = await self.engine.embed(
            entry, texts, keep_alive, normalize=True, options=options,
            dimensions=dimensions if isinstance(dimensions, int) else None)
        value: dict[str, Any] = {"model": model, "embeddings": vectors}
        value.update({k: v for k, v in (("total_duration", result.total_duration),
                                        ("load_duration", result.load_duration),
                                        ("prompt_eval_count", result.prompt_eval_count)) if v})
        return await wire.send_json(request, value)

    # /api/embeddings (legacy) ------------------------------------------------------------------------
    async def embeddings(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        model = body.get("model") or ""
        keep_alive = _keep_alive(body)
        if not model:
            raise RequestError(400, "model is required")
        entry = self._lookup(model, f'model "{model}" not found, try pulling it first')
        prompt = body.get("prompt") or ""
        options = _options(body)
        if not prompt:
            await self.engine.load(entry, self.engine.num_ctx_for(entry, options), keep_alive)
            return await wire.send_json(request, {"embedding": []})
        vectors, _ = await self.engine.embed(entry, [prompt], keep_alive, normalize=False,
                                             options=options)
        return await wire.send_json(request, {"embedding": vectors[0]})


def _thinking_share(result: RunResult, thinks: bool, total: int | None = None) -> int:
    """How many leading tokens a thinking model spends on `thinking` (a third of the run)."""
    del result
    if not thinks:
        return 0
    return max(1, (total if total is not None else 12) // 3)


def _tool_calls(tools: Any, engine: Engine, model: str) -> list[dict[str, Any]]:
    """A call to the first offered tool, with each required string argument filled deterministically."""
    if not isinstance(tools, list) or not tools or not isinstance(tools[0], dict):
        return []
    function = tools[0].get("function") or {}
    parameters = function.get("parameters") or {}
    properties = parameters.get("properties")  # kept raw by the decoder: any JSON value
    required = parameters.get("required") or (list(properties)[:1] if isinstance(properties, dict) else [])
    name = function.get("name") or ""
    rng = engine.rng(model, "tool", name)
    arguments = {name: rng.choice(["Paris", "Berlin", "Tokyo", "Lima"]) for name in required
                 if isinstance(name, str)}
    call_id = "call_" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))
    return [{"id": call_id, "function": {"index": 0, "name": name,
                                         "arguments": arguments}}]


def _chat_final(model: str, engine: Engine, result: RunResult, content: str, thinking: str,
                tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if thinking:
        message["thinking"] = thinking
    if tool_calls:
        message["tool_calls"] = tool_calls
    final: dict[str, Any] = {"model": model, "created_at": wire.go_time(engine.now_ns()),
                             "message": message, "done": True, "done_reason": result.done_reason}
    final.update(result.metrics())
    return final
