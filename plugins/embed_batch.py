"""embed_batch: coalesces concurrent embedding requests for one model into one upstream /api/embed batch.

Slot `before_backpressure`: each request has passed limits and quotas under its own tenant (its tokens
reserved there) and holds no queue slot yet. Requests for the same model and output options
(/api/embed and /v1/embeddings, float or base64) that arrive within `window_s` of the first are sent
together, identical inputs once, as one /api/embed sub-request through the chain: one queue slot, one
upstream call. Each request is answered in its own route's shape with its own vectors in order and
charged its own share of the batch's prompt tokens, split by each input's count by the model's
tokenizer (its `usage`, which quotas settle its reservation with). A request alone in its window,
and every request of a batch that failed, go on through the chain by themselves: a bad input gets
its own route's error and fails nobody else. A request that leaves (client gone, deadline passed:
504) after its batch was sent is charged its prompt, since the replica embeds its inputs anyway.
/api/embeddings is left alone: its vectors are not normalised, so /api/embed cannot produce them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import attrs
import orjson
from aiohttp import web
from opentelemetry.metrics import CallbackOptions, Observation

from proxy.embeddings import Answer, Ask, apportion, parse_ask, read_answer, render, respond, to_base64
from proxy.errors import DeadlinePassed
from proxy.offload import OFFLOAD_BYTES, off_loop
from proxy.ollama import Usage
from proxy.plugin import Plugin, PluginConfig, PluginServices, shadowing
from proxy.tokens import Tokenizer

if TYPE_CHECKING:
    from proxy.context import RequestContext

__all__ = ["PLUGIN", "EmbedBatch", "EmbedBatchConfig"]

log = logging.getLogger("plugins.embed_batch")


def _positive(instance: Any, attribute: Any, value: float) -> None:
    del instance
    if value <= 0:
        raise ValueError(f"{attribute.name}: must be > 0")


def _window(instance: Any, attribute: Any, value: float) -> None:
    del instance
    if not 0 < value <= 1:
        raise ValueError(f"{attribute.name}: must be > 0 and <= 1")


@attrs.frozen(kw_only=True)
class EmbedBatchConfig(PluginConfig):
    """plugins[]: {name: embed_batch, ...}."""

    window_s: float = attrs.field(default=0.002, validator=_window)
    """How long the first request of a batch waits for others (the latency every batched request may
    add, bounded by this)."""
    max_batch_inputs: int = attrs.field(default=64, validator=_positive)
    """Inputs in one upstream batch (after de-duplication); a full batch leaves at once. A request with
    more inputs than this goes on by itself."""
    max_batch_bytes: int = attrs.field(default=1_048_576, validator=_positive)
    """Bytes of input text in one upstream batch; same rules as `max_batch_inputs`."""
    tenant: str = "anonymous"
    """The tenant batches are sent upstream as: give it no quotas (each caller already paid for its own
    inputs on its own request) and the lane the batches should queue in. Must be a configured tenant
    or `anonymous`."""
    timeout_s: float = attrs.field(default=120.0, validator=_positive)
    """Bound on one batch's sub-request; past it its requests go on by themselves."""


@attrs.define
class _Waiter:
    ask: Ask
    future: asyncio.Future[tuple[list[bytes], int, int, int] | int | None]
    """Its vectors, tokens, batch size and duration; None: go on alone; an int (shadow mode only):
    the number of requests its batch would have held, nothing having been sent for it."""
    counts: dict[str, int] | None = None
    """Each distinct input's token count by the model's own tokenizer (None: only the estimate)."""
    sent: bool = False
    """Its inputs went upstream in a batch: the replica works for it whether it stays or not."""
    batch: _Sent | None = None
    """The batch it went upstream in (once sent)."""
    shadow: bool = False
    """The plugin shadows this request: it meets the others of its window (which says what would have
    happened) but its inputs are not sent, since its answer would be discarded and the request served
    upstream by itself all the same (the replica would embed them twice)."""


@attrs.define
class _Sent:
    """A batch on its way upstream: its sub-request's task and the requests it answers."""

    waiters: list[_Waiter]
    task: asyncio.Task[None] | None = None

    def left(self) -> None:
        """One of its requests left (client gone, deadline passed): when none is waiting any more, the
        sub-request is cancelled, as the forwarder's call is when its client leaves (otherwise it kept
        a queue slot and the replica for nobody, up to `timeout_s`)."""
        if self.task is not None and all(waiter.future.done() for waiter in self.waiters):
            self.task.cancel()


@attrs.define
class _Batch:
    group: tuple[str, bytes, bytes]
    texts: dict[str, None] = attrs.field(factory=dict)
    size_bytes: int = 0
    waiters: list[_Waiter] = attrs.field(factory=list)
    timer: asyncio.TimerHandle | None = None


class EmbedBatch(Plugin):
    """See the module docstring."""

    name = "embed_batch"
    slot = "before_backpressure"
    config_class = EmbedBatchConfig

    def __init__(self, config: PluginConfig, services: PluginServices) -> None:
        super().__init__(config, services)
        assert isinstance(config, EmbedBatchConfig)
        self.config: EmbedBatchConfig = config
        self._open: dict[tuple[str, bytes, bytes], _Batch] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches: Counter[str] = Counter()
        self.inputs: Counter[str] = Counter()
        self.requests = 0
        names = services.telemetry.names
        meter = services.telemetry.meter
        meter.create_observable_counter(
            names.metric_embed_batch_batches, callbacks=[self._observe_batches], unit="{batch}",
            description="Embedding batches sent upstream, by result (ok, failed).")
        meter.create_observable_counter(
            names.metric_embed_batch_requests, callbacks=[self._observe_requests], unit="{request}",
            description="Embedding requests answered from a batch.")
        meter.create_observable_counter(
            names.metric_embed_batch_inputs, callbacks=[self._observe_inputs], unit="{input}",
            description="Inputs of batched requests, by whether they were sent or deduplicated.")

    def _observe_batches(self, options: CallbackOptions) -> Iterable[Observation]:
        del options
        for result in ("ok", "failed"):
            yield Observation(self.batches[result], {"result": result})

    def _observe_requests(self, options: CallbackOptions) -> Iterable[Observation]:
        del options
        yield Observation(self.requests)

    def _observe_inputs(self, options: CallbackOptions) -> Iterable[Observation]:
        del options
        for sent in ("yes", "deduplicated"):
            yield Observation(self.inputs[sent], {"sent": sent})

    async def stop(self) -> None:
        for batch in list(self._open.values()):
            self._flush(batch)
        for task in list(self._tasks):
            task.cancel()

    async def on_request(self, request: web.Request, ctx: RequestContext,
                         decide: Callable[[str], None]) -> web.StreamResponse | None:
        if ctx.route.operation != "embeddings" or request.path == "/api/embeddings":
            decide("not_applicable")
            return None
        ask = parse_ask(request.path, ctx.json())
        if ask is None or not self.services.knows_model(ask.model):
            decide("not_applicable")
            return None
        texts = dict.fromkeys(ask.inputs)
        size = sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)
        if len(texts) > self.config.max_batch_inputs or size > self.config.max_batch_bytes:
            decide("too_large")
            return None
        started = time.monotonic()
        counts = await self._count(ask.model, texts, size)
        waiter = _Waiter(ask, asyncio.get_running_loop().create_future(), counts, shadow=shadowing())
        self._join(waiter, texts, size)
        # Cancelled here (the client left) or past the request's deadline: the future is cancelled and
        # the batch leaves its inputs out if it has not gone yet; nothing is held meanwhile. If it had
        # gone, the replica computes them all the same: the request counts as abandoned after it was
        # sent, and quotas and the fair queue charge its prompt, as the forwarder's path does
        # (RequestContext.served_tokens). Otherwise leaving just after the batch left would have the
        # fleet embed inputs for free, past tokens_per_minute.
        remaining = None if ctx.deadline_at is None else max(0.0, ctx.deadline_at - time.monotonic())
        try:
            result = await asyncio.wait_for(waiter.future, remaining)
        except TimeoutError:
            self._abandon(ctx, waiter)
            raise DeadlinePassed(f"the request's deadline of {ctx.service_limits.get('deadline_s')}s "
                                 "passed (waiting for an embedding batch)") from None
        except asyncio.CancelledError:
            self._abandon(ctx, waiter)
            raise
        if result is None:
            decide("alone")
            return None
        if isinstance(result, int):
            decide("batched")
            ctx.response_headers["X-Embed-Batch"] = f"requests={result}"
            # A stand-in for the answer it would have had, which tells the chain it would have
            # answered (X-Shadow-Decision); shadow mode discards it unsent.
            return web.Response(status=200)
        vectors, tokens, requests, total_duration_ns = result
        del total_duration_ns
        self.requests += 1
        ctx.exchange.usage = Usage(input_tokens=tokens, response_model=ask.model)  # its own share, for quotas
        ctx.response_headers["X-Embed-Batch"] = f"requests={requests}"
        decide("batched")
        body, content_type = render(ask, vectors, tokens,
                                    int((time.monotonic() - started) * 1e9) or 1)
        return respond(ctx, body, content_type)

    async def _count(self, model: str, texts: dict[str, None], size: int) -> dict[str, int] | None:
        """Each input's tokens by the model's tokenizer, what a batch's count is split by; None when
        only the estimate is known (bytes / 3: splitting by bytes is the same). Counted again rather
        than taken from limits, which keeps totals only; the tokenizer's segment cache makes the
        second count cheap, and a large body is counted in a worker as limits does."""
        tokenizer = await self.services.tokenizer_for(model)
        if tokenizer.method == "estimate":
            return None
        offload = size > OFFLOAD_BYTES
        return await off_loop(offload, _count_all, tokenizer, texts, offload)

    @staticmethod
    def _abandon(ctx: RequestContext, waiter: _Waiter) -> None:
        if waiter.sent and ctx.exchange.first_byte_at is None:
            ctx.exchange.abandoned = True
        if waiter.batch is not None:
            waiter.batch.left()

    def _join(self, waiter: _Waiter, texts: dict[str, None], size: int) -> None:
        ask = waiter.ask
        group = (ask.model, ask.variant, orjson.dumps(dict(ask.upstream), option=orjson.OPT_SORT_KEYS))
        batch = self._open.get(group)
        if batch is not None:
            new = [text for text in texts if text not in batch.texts]
            new_size = sum(len(text.encode("utf-8", "surrogatepass")) for text in new)
            if (len(batch.texts) + len(new) > self.config.max_batch_inputs
                    or batch.size_bytes + new_size > self.config.max_batch_bytes):
                self._flush(batch)
                batch = None
            else:
                size = new_size
                texts = dict.fromkeys(new)
        if batch is None:
            batch = _Batch(group)
            self._open[group] = batch
            batch.timer = asyncio.get_running_loop().call_later(self.config.window_s, self._flush, batch)
        batch.texts.update(texts)
        batch.size_bytes += size
        batch.waiters.append(waiter)
        if (len(batch.texts) >= self.config.max_batch_inputs
                or batch.size_bytes >= self.config.max_batch_bytes):
            self._flush(batch)

    def _flush(self, batch: _Batch) -> None:
        """Close `batch` to newcomers and send it (or let a lone request go on by itself)."""
        if self._open.get(batch.group) is batch:
            del self._open[batch.group]
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        live = [waiter for waiter in batch.waiters if not waiter.future.done()]
        if len(live) <= 1:
            for waiter in live:
                waiter.future.set_result(None)
            return
        for waiter in live:
            if waiter.shadow:  # would have gone with the others; its request goes upstream alone
                waiter.future.set_result(len(live))
        live = [waiter for waiter in live if not waiter.shadow]
        if len(live) <= 1:
            for waiter in live:
                waiter.future.set_result(None)
            return
        sent = _Sent(live)
        for waiter in live:
            waiter.sent = True  # from here the batch goes upstream with its inputs, whoever stays
            waiter.batch = sent
        task = asyncio.get_running_loop().create_task(self._send(live))
        sent.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, waiters: list[_Waiter]) -> None:
        """One upstream call for `waiters`; every future is resolved whatever happens (None: go on
        alone)."""
        try:
            first = waiters[0].ask
            texts = list(dict.fromkeys(text for waiter in waiters for text in waiter.ask.inputs))
            asked = sum(len(waiter.ask.inputs) for waiter in waiters)
            status, raw = await self.services.subrequests.post_raw(
                "/api/embed", {"model": first.model, "input": texts, **first.upstream},
                tenant=self.config.tenant, timeout_s=self.config.timeout_s)
            answer = read_answer("/api/embed", raw) if status == 200 else None
            if answer is None or len(answer.vectors) != len(texts):
                self.batches["failed"] += 1
                log.info("embed_batch: a batch of %d requests failed upstream (status %d); they go on "
                         "one by one", len(waiters), status)
                return
            self.batches["ok"] += 1
            self.inputs["yes"] += len(texts)
            self.inputs["deduplicated"] += asked - len(texts)
            self._split(waiters, texts, answer)
        except asyncio.CancelledError:
            # Every request of the batch left (or the plugin stops): nobody to answer.
            self.batches["failed"] += 1
            log.info("embed_batch: every request of a batch of %d left; its call was cancelled",
                     len(waiters))
            raise
        except Exception as exc:  # fail open: the requests go on by themselves
            self.batches["failed"] += 1
            log.warning("embed_batch: a batch failed in the proxy (%s); its requests go on one by one",
                        type(exc).__name__)
        finally:
            for waiter in waiters:
                if not waiter.future.done():
                    waiter.future.set_result(None)

    @staticmethod
    def _split(waiters: list[_Waiter], texts: list[str], answer: Answer) -> None:
        counts: dict[str, int] = {}
        for waiter in waiters:
            counts.update(waiter.counts or {})
        tokens = [counts[text] for text in texts] if all(text in counts for text in texts) else None
        shares = dict(zip(texts, apportion(answer.tokens, texts, tokens), strict=True))
        vectors = dict(zip(texts, answer.vectors, strict=True))
        encoded: dict[str, bytes] = {}
        for waiter in waiters:
            if waiter.future.done():
                continue
            ask = waiter.ask
            if ask.kind == "b64":
                mine = [encoded.get(t) or encoded.setdefault(t, to_base64(vectors[t])) for t in ask.inputs]
            else:
                mine = [vectors[text] for text in ask.inputs]
            waiter.future.set_result((mine, sum(shares[text] for text in ask.inputs), len(waiters),
                                      answer.total_duration_ns))


def _count_all(tokenizer: Tokenizer, texts: dict[str, None], offload: bool) -> dict[str, int]:
    count = tokenizer.count_offloadable if offload else tokenizer.count
    return {text: count(text) for text in texts}


PLUGIN = EmbedBatch
