"""The `limits` step: guardrails at the edge, before a request costs the fleet anything.

Request phase, for inference routes:
- canonical options: load-time options (num_ctx, num_batch, num_gpu, ...) and keep_alive are rewritten to
  the model's configured values, other load-time options removed, so no tenant makes Ollama reload a
  model for everyone; every change is reported in `X-Options-Rewritten` and on the span. A model with
  no configured num_ctx gets the context it is loaded with (/api/ps), else Ollama's default (4096);
- context guard: the limit is also at most the context the request runs with, minus one (Ollama cuts a
  prompt of num_ctx tokens or more; an embedding input fits the whole context);
- prompt limit: the prompt is counted with the model's own tokenizer (proxy/tokens.py) against the
  smallest of the tenant's, the model's and the chain's `max_prompt_tokens`; policy `reject` answers 400
  `prompt_too_long` with both numbers, `truncate` keeps the system prompt and the newest turns that fit
  (chat) or cuts the front of the prompt (generate), `summarize` has the summarize_history plugin
  replace the oldest turns (the front of a generate prompt) by a summary (`truncate` without it);
- deadline: the tenant's (or the chain's) deadline, lowered, never raised, by a client's `X-Deadline-S`;
- bodies: what Ollama's Go decoder refuses is answered with its 400 here, and an inference body that is
  not an object or names no model is refused (fail closed; no model is answered with the route's own
  404 or 400, as Ollama's handler answers it): nothing the chain cannot read goes through.
A model no replica lists (`UpstreamSet.tracks`) gets no prompt limit: the replica's own 404 answers it.
The deadline and the body checks apply in every mode, `off` included (`runs_when_off`): `off` drops the
prompt and option limits only. Every response carries `X-Service-Limits` (v=1). Response phase: when
Ollama's `prompt_eval_count` is well below our count, it truncated the prompt silently: a span event
and `<prefix>.limits.truncations`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import attrs
from aiohttp import web

from proxy.chain import Handler, Step
from proxy.context import DEADLINE_REQUEST_HEADER, RequestContext
from proxy.errors import InvalidRequest, ModelNotFound, PromptTooLong
from proxy.offload import large, off_loop, parsed_json
from proxy.ollama import model_key
from proxy.prompts import canonicalize, count_prompt, int_option, truncate_prompt
from proxy.schema import Mode, ModelConfig, PromptPolicy, RolloutConfig, positive
from proxy.telemetry import semconv
from proxy.telemetry.metrics import COUNT_BUCKETS_S
from proxy.telemetry.setup import Telemetry
from proxy.tokens import Tokenizer, TokenizerRegistry
from proxy.upstreams import DEFAULT_NUM_CTX, UpstreamSet

__all__ = ["DEADLINE_HEADER", "LimitsConfig", "LimitsStep", "Summarizer"]


@attrs.frozen
class LimitsConfig:
    """chain.limits: guardrails at the edge."""

    mode: Mode = "enforce"
    rollout: RolloutConfig = attrs.field(factory=RolloutConfig)
    """Canary for `enforce`: who it enforces for; the other tenants get shadow (see RolloutConfig)."""
    max_prompt_tokens: int = attrs.field(default=4096, validator=positive)
    """Default prompt limit in tokens (Ollama's default context is 4096)."""
    prompt_policy: PromptPolicy = "reject"
    deadline_s: float = attrs.field(default=120.0, validator=positive)
    """Default deadline of a request, first byte to last."""
    strip_load_options: bool = True
    """Remove load-time options (num_ctx, num_batch, ...) a model has no canonical value for."""
    upstream_truncation: Literal["allow", "refuse"] = "allow"
    """What Ollama may do with a prompt longer than the context it runs: `allow` (its default: it cuts the
    front silently; the proxy detects and reports it) or `refuse` (the proxy sends `truncate: false`,
    so Ollama answers 400 instead of cutting)."""
    truncation_tolerance_tokens: int = attrs.field(default=16, validator=attrs.validators.ge(0))
    """How far below our count Ollama's prompt_eval_count may be before we call it a silent truncation
    (chat templates differ a little between our count and the model's)."""


Summarizer = Callable[[RequestContext, dict[str, Any], Tokenizer, int], Awaitable[str | None]]
"""Makes a prompt fit a limit (rewriting ctx's body); returns its decision, None when it changed nothing."""

_PROMPT_EVAL = re.compile(rb'"(?:prompt_eval_count|prompt_tokens|input_tokens)":(\d+)')
"""The prompt tokens Ollama evaluated, as each dialect's answer names them: `prompt_eval_count` (native),
`usage.prompt_tokens` (OpenAI chat and completions), `usage.input_tokens` (Responses, Anthropic)."""
DEADLINE_HEADER = DEADLINE_REQUEST_HEADER
"""Kept here for existing imports; ingress reads it (proxy/ingress.py)."""
_GO_TYPES = {str: "string", bool: "bool", int: "number", float: "number", list: "array", dict: "object"}


def _no_model(ctx: RequestContext) -> InvalidRequest | ModelNotFound:
    """The refusal of a body that names no model, as Ollama's handler for the route answers it: 404
    `model '' not found` on generate and embed (and the /v1 routes Ollama runs on them), else 400."""
    if ctx.route.missing_model_not_found:
        return ModelNotFound("model '' not found")
    return InvalidRequest("model is required")


class LimitsStep(Step):
    """Prompt, option and deadline limits; see the module docstring."""

    name = "limits"
    runs_when_off = True
    """`off` drops the prompt and option limits; the deadline and the body checks stay."""

    def __init__(self, config: LimitsConfig, models: dict[str, ModelConfig],
                 tokenizers: TokenizerRegistry, telemetry: Telemetry,
                 upstreams: UpstreamSet | None = None) -> None:
        super().__init__(config.mode, telemetry, config.rollout)
        self.config = config
        self.models = {model_key(name): model for name, model in models.items()}
        self.tokenizers = tokenizers
        self.upstreams = upstreams
        """The fleet: which models are real (no /api/show for others), what context each is loaded
        with. None (a step built alone in a test): every model is treated as real, none as loaded."""
        self.summarizer: Summarizer | None = None
        """`prompt_policy: summarize`'s summarizer (the summarize_history plugin's, bound by app.py);
        None: that policy truncates."""
        self.truncations = telemetry.meter.create_counter(
            telemetry.names.metric_limits_truncations, unit="{request}",
            description="Responses whose prompt_eval_count shows Ollama silently truncated the prompt.")
        self.count_seconds = telemetry.meter.create_histogram(
            telemetry.names.metric_limits_count_duration, unit="s",
            description="Time spent counting prompt tokens.",
            explicit_bucket_boundaries_advisory=COUNT_BUCKETS_S)

    def reconfigure(self, config: LimitsConfig, models: dict[str, ModelConfig] | None = None) -> None:
        super().reconfigure(config)
        self.config = config
        if models is not None:
            self.models = {model_key(name): model for name, model in models.items()}

    @staticmethod
    def check_body(request: web.Request, ctx: RequestContext) -> None:
        """Refuse, with Ollama's 400 and Go's text, a body Ollama's decoder would refuse; on an inference
        route also one that is absent, not an object, or names no model as a string (fail closed: the
        chain could not apply its limits to it); no model is Ollama's 404 or 400 for the route
        (`_no_model`). Raised in every mode."""
        inference = ctx.route.operation is not None
        # Non-inference routes whose body Ollama decodes as JSON: a body Go refuses is answered here too.
        if not inference and not ctx.route.json_body:
            return
        error = ctx.body_error
        if error is not None:
            raise InvalidRequest(error)
        if not inference:
            return
        body = ctx.json()
        if body is None and not ctx.body:
            raise InvalidRequest("missing request body")
        if not isinstance(body, dict):
            if body is None:  # `null` decodes to the zero struct: no model
                raise _no_model(ctx)
            raise InvalidRequest(f"json: cannot unmarshal {_GO_TYPES.get(type(body), 'number')} into "
                                 f"Go value of type {ctx.route.go_type}")
        model = body.get("model")
        if model is None or model == "":
            raise _no_model(ctx)
        if not isinstance(model, str):
            raise InvalidRequest(f"json: cannot unmarshal {_GO_TYPES.get(type(model), 'number')} into "
                                 f"Go struct field {ctx.route.go_struct}.model of type string")

    async def handle(self, request: web.Request, ctx: RequestContext,
                     handler: Handler) -> web.StreamResponse:
        deadline_s = ctx.deadline_s  # set by ingress, whatever this step's mode
        await parsed_json(ctx)  # a large body in a worker: the event loop keeps serving others
        self.check_body(request, ctx)
        if self.mode == "off":
            ctx.service_limits["deadline_s"] = deadline_s
            self.record(ctx, "off")
            return await handler(request)
        body = ctx.json()
        model = ctx.model
        if ctx.route.management and model:
            self.tokenizers.invalidate(model)  # the name may mean another model afterwards
        model_config = self.models.get(model_key(model)) if model else None
        limit = min(v for v in (ctx.tenant.max_prompt_tokens,
                                model_config.max_prompt_tokens if model_config else None,
                                self.config.max_prompt_tokens) if v is not None)
        ctx.service_limits.update(max_prompt_tokens=limit, deadline_s=deadline_s)
        if ctx.route.operation is None or not isinstance(body, dict) or not model:
            self.record(ctx, "not_applicable")
            return await handler(request)
        if self.upstreams is not None and not self.upstreams.tracks(model):
            # No replica lists the model: Ollama answers its own 404 `model not found` without reading
            # the prompt. A prompt_too_long counted with the estimate would tell a client who misspelt
            # the name to shorten a prompt (and not to retry) instead.
            self.record(ctx, "unknown_model",
                        **{semconv.ATTR_GEN_AI_REQUEST_MODEL: semconv.request_model(model)})
            return await handler(request)
        with self.span(**{semconv.ATTR_GEN_AI_REQUEST_MODEL: semconv.request_model(model),
                               self.telemetry.names.limits_max_prompt_tokens: limit}) as span:
            if ctx.route.dialect == "ollama":  # native options; /v1 bodies have none
                body = self._canonical_options(ctx, span, body, model, model_config)
            context = self._context_tokens(ctx, body, model)
            # Ollama runs the request with this context whatever the configured limit says (on /v1 it
            # ignores options.num_ctx), and cuts a prompt of `context` tokens or more (not only a longer
            # one: llm/llama_server.go), so the longest prompt it evaluates whole is the limit. An
            # embedding input is cut only past the context (its BOS and EOS included, as counted).
            fits = context if ctx.route.prompt_shape == "embed" else context - 1 if context else None
            if fits is not None and fits < limit:
                limit = fits
                ctx.service_limits["max_prompt_tokens"] = limit
                span.set_attribute(self.telemetry.names.limits_max_prompt_tokens, limit)
            ctx.prompt.context_tokens = context
            if self.config.upstream_truncation == "refuse" and ctx.route.dialect == "ollama" \
                    and body.get("truncate") is not False:  # in every mode, like the canonical options
                body = {**body, "truncate": False}
                ctx.replace_json(body)
            tokenizer = await self._tokenizer(model)
            started = time.perf_counter()
            offload = large(ctx)  # a large prompt is mostly unseen text: counted in a worker
            counted = await off_loop(offload, count_prompt, ctx.route, body, tokenizer, offload)
            self.count_seconds.record(time.perf_counter() - started, {"method": tokenizer.method})
            span.set_attribute(self.telemetry.names.limits_count_method, tokenizer.method)
            if counted is None:
                self.decide(ctx, span, "allowed")
            else:
                ctx.prompt.tokens = counted.total
                span.set_attribute(self.telemetry.names.limits_prompt_tokens, counted.total)
                measured = counted.largest if ctx.route.prompt_shape == "embed" else counted.total
                if measured <= limit:
                    self.decide(ctx, span, "allowed")
                else:
                    await self._over_limit(request, ctx, span, body, tokenizer, measured, limit,
                                           model_config)
        if not ctx.streaming:
            ctx.header_hooks.append(self._report_before_headers)
        response = await handler(request)
        self._check_silent_truncation(ctx, model)
        return response

    def _context_tokens(self, ctx: RequestContext, body: dict[str, Any], model: str) -> int | None:
        """The context the request will run with, when it is known: the request's own num_ctx on native
        routes (after the canonical rewrite), else the context the model is loaded with (/api/ps), which
        is what /v1 routes always get. None: not known (the model is loaded nowhere yet)."""
        if ctx.route.dialect == "ollama":
            # As Ollama reads it: `512.0` is a context of 512 to it, so it is one to the guard too,
            # else the prompt passes and is cut.
            num_ctx = int_option(body.get("options"), "num_ctx")
            if num_ctx is not None and num_ctx > 0:
                return num_ctx
        return self.upstreams.loaded_context(model) if self.upstreams is not None else None

    def _truncated_upstream(self, ctx: RequestContext, evaluated: int, *, certain: bool = False) -> bool:
        """Did Ollama cut the prompt? Certain: the fingerprint of its context shift on a prompt longer than
        the context it ran (about num_ctx/2 + 2 tokens evaluated). Likely (not `certain`): its count is
        well below ours, which a prompt cache hit can also explain (Ollama does not count cached tokens),
        so that only goes to the span and the metric, never to the client's headers."""
        counted = ctx.prompt.tokens
        if counted is None:
            return False
        tolerance = self.config.truncation_tolerance_tokens
        context = ctx.prompt.context_tokens
        if (context is not None and counted >= context
                and abs(evaluated - (context // 2 + 2)) <= tolerance):
            return True
        return not certain and evaluated + tolerance < counted

    def _report_before_headers(self, ctx: RequestContext, first_chunk: bytes) -> None:
        """A non-streaming answer is whole in its first chunk (usually): its count of the prompt
        evaluated (`_PROMPT_EVAL`, in every dialect) tells, before the headers go out, whether Ollama cut
        the prompt: say so in X-Prompt-Truncated-Upstream."""
        found = _PROMPT_EVAL.findall(first_chunk[-4096:])
        if found and self._truncated_upstream(ctx, int(found[-1]), certain=True):
            ctx.response_headers["X-Prompt-Truncated-Upstream"] = (
                f"prompt_tokens={ctx.prompt.tokens}; evaluated={int(found[-1])}")

    async def _tokenizer(self, model: str) -> Tokenizer:
        """The model's own tokenizer; the estimate, without asking any replica, for a name the fleet
        does not have (the registry's `tracks`: random names cost no /api/show and no entry)."""
        return await self.tokenizers.for_model(model)

    def _default_num_ctx(self, body: dict[str, Any], model: str) -> int | None:
        """The num_ctx to hold a model without a configured one to: the context it is loaded with, else
        Ollama's default. None when the request may stay as it is (it sets none, and the default is
        what the model is loaded with or would be)."""
        loaded = self.upstreams.loaded_context(model) if self.upstreams is not None else None
        target = loaded or DEFAULT_NUM_CTX
        options = body.get("options")
        asked = isinstance(options, dict) and "num_ctx" in options
        return target if asked or target != DEFAULT_NUM_CTX else None

    def _canonical_options(self, ctx: RequestContext, span: Any, body: dict[str, Any], model: str,
                           model_config: ModelConfig | None) -> dict[str, Any]:
        canonical = dict(model_config.options) if model_config is not None else {}
        if self.config.strip_load_options and "num_ctx" not in canonical:
            # Reload protection for every model, configured or not: one tenant's num_ctx must not make
            # Ollama reload the runner everybody shares.
            num_ctx = self._default_num_ctx(body, model)
            if num_ctx is not None:
                canonical["num_ctx"] = num_ctx
        if not canonical and not self.config.strip_load_options:
            return body
        rewritten, changes = canonicalize(body, canonical, self.config.strip_load_options)
        if changes:
            ctx.replace_json(rewritten)
            ctx.response_headers["X-Options-Rewritten"] = ", ".join(changes)
            span.set_attribute(self.telemetry.names.limits_options_rewritten, changes)
            return rewritten
        return body

    async def _over_limit(self, request: web.Request, ctx: RequestContext, span: Any,
                          body: dict[str, Any], tokenizer: Any, measured: int, limit: int,
                          model_config: ModelConfig | None) -> None:
        policy = (model_config.prompt_policy if model_config and model_config.prompt_policy
                  else self.config.prompt_policy)
        error = PromptTooLong(
            f"prompt is {measured} tokens, more than the limit of {limit} tokens "
            f"(counted with the model's {'tokenizer' if tokenizer.method != 'estimate' else 'estimate'})")
        if policy == "summarize" and ctx.route.prompt_shape != "embed":
            # The summarize_history plugin's summarizer (it trims when no summary is ready in time);
            # without one configured, `summarize` acts as `truncate` (docs/PLUGINS.md), and so it
            # does for a plugin's own sub-request (a summary's transcript: no summary of a summary).
            # The request's own mode: a tenant outside the step's rollout is only reported on.
            mode = self.mode_of(ctx)
            if self.summarizer is not None and mode == "enforce" and not ctx.internal:
                decision = await self.summarizer(ctx, body, tokenizer, limit)
                recount = count_prompt(ctx.route, ctx.json(), tokenizer) if decision else None
                if recount is not None and recount.total <= limit:
                    ctx.prompt.tokens = recount.total
                    self.decide(ctx, span, decision or "summarized")
                    return
                rewritten = ctx.json()
                if decision and isinstance(rewritten, dict):
                    # Its cut stands, and its header says so: truncation goes on from there, so that
                    # the headers together say what reaches the replica (cutting the client's body
                    # again threw the trim away and left its header claiming it).
                    body = rewritten
            elif mode != "enforce":
                ctx.response_headers.add("X-Shadow-Decision", f"{self.name}=summarize")
                self.decide(ctx, span, "shadow_summarize")
                return
            policy = "truncate"
        if policy == "truncate" and ctx.route.prompt_shape != "embed":
            cut = await off_loop(large(ctx), truncate_prompt, ctx.route, body, tokenizer, limit)
            if cut is not None:
                if self.mode_of(ctx) == "enforce":
                    new_body, what = cut
                    ctx.replace_json(new_body)
                    recount = count_prompt(ctx.route, new_body, tokenizer)
                    ctx.prompt.tokens = recount.total if recount else ctx.prompt.tokens
                    ctx.response_headers["X-Prompt-Truncated"] = what
                    span.set_attribute(self.telemetry.names.limits_truncated, what)
                    self.decide(ctx, span, "truncated")
                else:
                    ctx.response_headers.add("X-Shadow-Decision", f"{self.name}=truncate")
                    self.decide(ctx, span, "shadow_truncate")
                return
        self.decide(ctx, span, "rejected", error)

    def _check_silent_truncation(self, ctx: RequestContext, model: str) -> None:
        usage = ctx.exchange.usage
        counted = ctx.prompt.tokens
        if usage is None or usage.input_tokens is None or counted is None:
            return
        if self._truncated_upstream(ctx, usage.input_tokens):
            label = self.upstreams.label(model) if self.upstreams is not None else model_key(model)
            self.truncations.add(1, {semconv.ATTR_GEN_AI_REQUEST_MODEL: label})
            if ctx.root_span is not None:
                ctx.root_span.add_event(semconv.SILENT_TRUNCATION_EVENT, {
                    self.telemetry.names.limits_prompt_tokens: counted,
                    semconv.ATTR_GEN_AI_USAGE_INPUT: usage.input_tokens})
