"""Routes about the whole fleet rather than one replica, answered by asking every replica.

Read routes are merged: `GET /api/tags` and `GET /v1/models` are the union over the serving replicas,
`GET /api/ps` the union with the holding replica named in each entry (`"replica"`). Management routes
(`pull`, `create`, `push`, `copy`, `delete`) go to every replica; the answer keeps Ollama's shape and adds
the per-replica results: a `replica` key on streamed progress lines and a final summary line
(`{"status": "success", "replicas": {...}}` or `{"error": ..., "replicas": {...}}`), a `replicas` object in
JSON bodies, and an `X-Replica-Results` header everywhere. A streamed call every replica refuses
before any progress is one JSON error under Ollama's status, as a call without `stream` is. A
replica that is not serving is reported as skipped. An admin sends a request to a single replica
with the `X-Ollama-Replica` header instead (the balancer forwards it byte for byte). With one replica
nothing is merged: every route is relayed as is.

Blob uploads (`/api/blobs/...`) are not fanned out: `create` from uploaded files needs the replica named.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from .context import RequestContext
from .errors import DeadlinePassed, UpstreamConnectFailure
from .fleet.client import FleetClient
from .ollama import classify
from .rendering import retry_headers, told_wait_s
from .upstreams import Upstream, UpstreamSet

__all__ = ["REPLICA_HEADER", "RESULTS_HEADER", "FanOut", "fleet_scope"]

REPLICA_HEADER = "X-Ollama-Replica"
"""Request header naming the one replica a request must go to (admin keys only)."""
RESULTS_HEADER = "X-Replica-Results"
_JSON = "application/json; charset=utf-8"
"""gin's c.JSON, what Ollama's native listings (`/api/tags`, `/api/ps`) answer with."""
_JSON_OPENAI = "application/json"
"""What Ollama's /v1 middleware sets on `/v1/models` (no charset; json.Encoder adds the newline)."""
_READ_TIMEOUT_S = 10.0
_RETRY_AFTER_S = 5.0
"""A busy replica's 429 or 503 relayed without a (valid) Retry-After: the forwarder's default wait."""
_BUSY = frozenset({429, 503})
_REFUSAL_BYTES = 64 * 1024
"""What is read of a replica's refusal of a streamed management call (Ollama's is one line)."""


def fleet_scope(method: str, path: str) -> str | None:
    """`tags`, `ps`, `models` or `manage` for routes that concern every replica, else None (the route
    table's `fleet_scope`, proxy/ollama.py)."""
    return classify(method, path).fleet_scope


class FanOut:
    """Sends one request to several replicas and merges what they answer."""

    def __init__(self, upstreams: UpstreamSet, fleet: FleetClient, idle_timeout_s: float,
                 on_managed: Callable[[Upstream], None] | None = None) -> None:
        self.upstreams = upstreams
        self.fleet = fleet
        self.idle_timeout_s = idle_timeout_s
        self.on_managed = on_managed

    async def handle(self, request: web.Request, ctx: RequestContext, scope: str,
                     targets: Sequence[Upstream]) -> web.StreamResponse:
        """Answer `request` (of `scope`, see fleet_scope) from `targets`."""
        if scope == "manage":
            return await self._manage(request, ctx, targets)
        serving = [u for u in targets if self.upstreams.is_serving(u)]
        # The request's deadline bounds the listing as it bounds one replica's answer through the
        # forwarder: a replica silent past it is left out of the merge (as past _READ_TIMEOUT_S).
        timeout_s = _READ_TIMEOUT_S
        if ctx.deadline_at is not None:
            timeout_s = min(timeout_s, ctx.deadline_at - time.monotonic())
        replies = await asyncio.gather(*(
            self.fleet.fetch_json(request.path, upstream=u, timeout_s=max(timeout_s, 0.001))
            for u in serving))
        answered = [(u, body) for u, body in zip(serving, replies, strict=True) if body is not None]
        if not answered:
            if ctx.deadline_at is not None and time.monotonic() >= ctx.deadline_at:
                raise DeadlinePassed(f"the request's deadline of {ctx.service_limits.get('deadline_s')}s "
                                     f"passed before any replica answered {request.path}")
            raise UpstreamConnectFailure(f"no replica answered {request.path}")
        results = ", ".join(f"{u.name}={'ok' if body is not None else 'failed'}"
                            for u, body in zip(serving, replies, strict=True))
        ctx.status = 200
        headers = {"Content-Type": _JSON, RESULTS_HEADER: results}
        if scope == "models":
            data = _union([(u, body.get("data")) for u, body in answered], "id")
            headers["Content-Type"] = _JSON_OPENAI
            return web.Response(body=orjson.dumps({"object": "list", "data": data or None}) + b"\n",
                                headers=headers)
        entries = _union([(u, body.get("models")) for u, body in answered], "name",
                         replica_key="replica" if scope == "ps" else None)
        order = "expires_at" if scope == "ps" else "modified_at"
        entries.sort(key=lambda m: str(m.get(order, "")), reverse=True)
        return web.Response(body=orjson.dumps({"models": entries}), headers=headers)

    # management --------------------------------------------------------------------------------------
    async def _manage(self, request: web.Request, ctx: RequestContext,
                      targets: Sequence[Upstream]) -> web.StreamResponse:
        skipped = {u.name: f"skipped: replica is {u.status}" for u in targets
                   if not self.upstreams.is_serving(u)}
        live = [u for u in targets if u.name not in skipped]
        if not live:
            raise UpstreamConnectFailure("no replica is serving; nothing was changed")
        try:
            if ctx.route.progress_stream and ctx.streaming:
                return await self._manage_stream(request, ctx, live, skipped)
            return await self._manage_once(request, ctx, live, skipped)
        finally:
            if self.on_managed is not None:
                for upstream in live:
                    self.on_managed(upstream)

    @staticmethod
    def _headers(request: web.Request) -> dict[str, str]:
        """What a management call passes on; the fleet client adds the replica's `Host`."""
        headers: dict[str, str] = {}
        if "Content-Type" in request.headers:
            headers["Content-Type"] = request.headers["Content-Type"]
        if "User-Agent" in request.headers:
            headers["User-Agent"] = request.headers["User-Agent"]
        return headers

    async def _manage_once(self, request: web.Request, ctx: RequestContext, live: Sequence[Upstream],
                           skipped: dict[str, str]) -> web.StreamResponse:
        """Single-answer management calls (copy, delete, and pull/create/push with stream:false)."""

        # The request's deadline bounds every replica's answer, as the forwarder bounds one replica's:
        # without it a replica that accepted the call and never answered held the request for ever.
        remaining = ctx.deadline_at - time.monotonic() if ctx.deadline_at is not None else None

        async def call(upstream: Upstream) -> tuple[int, bytes, float | None]:
            """The replica's status and body, and the wait its 429 or 503 asks for (None: none, or
            not a valid one). No answer by the request's deadline is that replica's 504."""
            bound = asyncio.timeout(remaining)
            try:
                async with bound, self.fleet.request(
                        upstream, request.method, request.raw_path, data=ctx.body or b"",
                        headers=self._headers(request)) as reply:
                    told = told_wait_s(reply.headers) if reply.status in _BUSY else None
                    return reply.status, await reply.read(), told
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                # Only the deadline's own expiry is a 504: aiohttp's connect timeout is also a
                # TimeoutError, and a replica that cannot be reached is a 502 like any refused connect.
                if bound.expired():
                    return 504, orjson.dumps({"error": f"no answer within the request's deadline of "
                                                       f"{ctx.deadline_s:g}s"}), None
                return 502, orjson.dumps({"error": f"cannot reach replica: {type(exc).__name__}"}), None

        answers = await asyncio.gather(*(call(u) for u in live))
        return self._one_answer(request, ctx, live, answers, skipped)

    @staticmethod
    def _one_answer(request: web.Request, ctx: RequestContext, live: Sequence[Upstream],
                    answers: Sequence[tuple[int, bytes, float | None]],
                    skipped: dict[str, str]) -> web.Response:
        """The one answer for every replica's (status, body, asked wait), in `live`'s order: Ollama's
        404 when no replica has the model, its empty 200 for copy and delete done where the model was,
        else a JSON body with the results per replica under the first failure's status."""
        results: dict[str, Any] = {}
        failures: list[tuple[str, int, str, float | None]] = []
        for upstream, (status, body, told) in zip(live, answers, strict=True):
            error = _error_text(body)
            results[upstream.name] = "success" if status == 200 else f"{status}: {error}"
            if status != 200:
                failures.append((upstream.name, status, error, told))
        results.update(skipped)
        header = ", ".join(f"{n}={'success' if r == 'success' else r.split(':')[0]}"
                           for n, r in results.items())
        statuses = {status for status, _, _ in answers}
        operation = request.path.rsplit("/", 1)[-1]
        if statuses == {404}:  # nowhere to be found: Ollama's own 404, from the first replica
            ctx.status = 404
            return web.Response(status=404, body=answers[0][1], headers={
                "Content-Type": "application/json; charset=utf-8", RESULTS_HEADER: header})
        if not ctx.route.progress_stream and statuses <= {200, 404}:  # copy, delete
            ctx.status = 200  # done wherever the model was; Ollama answers these with an empty body
            return web.Response(status=200, headers={RESULTS_HEADER: header})
        if not failures:
            ctx.status = 200
            return web.Response(body=orjson.dumps({"status": "success", "replicas": results}),
                                headers={"Content-Type": "application/json", RESULTS_HEADER: header})
        name, status, error, told = failures[0]
        ctx.status = status if status >= 400 else 502
        headers = {"Content-Type": _JSON, RESULTS_HEADER: header}
        if ctx.status in _BUSY:
            # Every 429 and 503 the proxy sends says when to come back, as the forwarder's do: the
            # wait the replica whose answer this is asked for, in the forwarder's bounds (at least
            # 1 s; at most 60, with `x-should-retry: false` past it), else the default (Ollama's own
            # busy answer carries none).
            headers.update(retry_headers(max(1.0, told) if told is not None else _RETRY_AFTER_S))
        return web.Response(status=ctx.status, body=orjson.dumps(
            {"error": f"{operation} failed on {name}: {error}", "replicas": results}),
            headers=headers)

    async def _manage_stream(self, request: web.Request, ctx: RequestContext,
                             live: Sequence[Upstream], skipped: dict[str, str]) -> web.StreamResponse:
        """Streamed progress from every replica, each line tagged with its replica, then a summary."""
        lines: asyncio.Queue[tuple[str, dict[str, Any] | None]] = asyncio.Queue()
        results: dict[str, Any] = {}
        loop = asyncio.get_running_loop()
        # Per replica: its refusal (status, body, asked wait) when it answered an error status instead
        # of progress, else None (it streams, or could not be reached).
        heads: dict[str, asyncio.Future[tuple[int, bytes, float | None] | None]] = {
            u.name: loop.create_future() for u in live}
        # The request's deadline bounds every replica's stream, as in _manage_once and the forwarder:
        # without it a replica that accepted the call and never answered held back the others'
        # progress (the stream waits for every head) until the idle timeout.
        remaining = ctx.deadline_at - time.monotonic() if ctx.deadline_at is not None else None

        async def follow(upstream: Upstream) -> None:
            last: dict[str, Any] = {}
            head = heads[upstream.name]
            bound = asyncio.timeout(remaining)
            try:
                async with bound, self.fleet.request(
                        upstream, request.method, request.raw_path, data=ctx.body or b"",
                        headers=self._headers(request),
                        timeout=aiohttp.ClientTimeout(  # replaces the session's: connect kept
                            sock_read=self.idle_timeout_s,
                            sock_connect=self.fleet.config.connect_timeout_s)) as reply:
                    if reply.status != 200:
                        # A refusal is one short JSON body: this replica's status and body if every
                        # replica refuses, an error line in the stream if another one streams.
                        body = b""
                        while len(body) < _REFUSAL_BYTES and (
                                chunk := await reply.content.read(_REFUSAL_BYTES - len(body))):
                            body += chunk  # read(n) returns what has arrived: up to the end or n
                        told = told_wait_s(reply.headers) if reply.status in _BUSY else None
                        head.set_result((reply.status, body, told))
                        last = {"error": _error_text(body) or f"HTTP {reply.status}"}
                        await lines.put((upstream.name, last))
                    else:
                        head.set_result(None)
                        async for raw in reply.content:
                            if not raw.strip():
                                continue
                            try:
                                line = orjson.loads(raw)
                            except orjson.JSONDecodeError:
                                continue
                            if isinstance(line, dict):
                                last = line
                                await lines.put((upstream.name, line))
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                if bound.expired():  # the deadline's own expiry (a connect timeout is the 502 below)
                    if not head.done():  # no head by then: this replica's answer is a 504
                        text = f"no answer within the request's deadline of {ctx.deadline_s:g}s"
                        head.set_result((504, orjson.dumps({"error": text}), None))
                    else:  # cut mid-stream, as the forwarder cuts one replica's stream
                        text = f"the request's deadline of {ctx.deadline_s:g}s passed"
                    last = {"error": text}
                else:
                    last = {"error": f"replica connection failed ({type(exc).__name__})"}
                await lines.put((upstream.name, last))
            finally:
                if not head.done():
                    head.set_result(None)
            results[upstream.name] = "success" if last.get("status") == "success" else \
                str(last.get("error") or "ended without success")
            await lines.put((upstream.name, None))

        tasks = [asyncio.create_task(follow(u)) for u in live]
        try:
            # Ollama refuses a call it cannot start (a push of a missing model, a create without
            # `from`, a busy daemon) with a status and one JSON body, not a 200 stream: when every
            # replica refused, the fleet answers as `_manage_once` does, with the status clients read
            # (and Retry-After on a 429 or 503) (before: a 200 stream of error lines).
            refusals = await asyncio.gather(*heads.values())
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        if all(refusal is not None for refusal in refusals):
            # Each has only its last line to queue. A client that leaves meanwhile cancels this wait
            # (and the tasks with it): its CancelledError goes on up, nothing is answered.
            await asyncio.gather(*tasks, return_exceptions=True)
            return self._one_answer(request, ctx, live, [r for r in refusals if r is not None], skipped)
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/x-ndjson"})
        ctx.status = 200
        try:
            await response.prepare(request)
            remaining = len(tasks)
            while remaining:
                name, line = await lines.get()
                if line is None:
                    remaining -= 1
                    continue
                await response.write(orjson.dumps({**line, "replica": name}) + b"\n")
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)
        results.update(skipped)
        failed = [(n, r) for n, r in results.items() if r != "success" and n not in skipped]
        if failed:
            operation = request.path.rsplit("/", 1)[-1]
            summary: dict[str, Any] = {"error": f"{operation} failed on {failed[0][0]}: {failed[0][1]}",
                                       "replicas": results}
        else:
            summary = {"status": "success", "replicas": results}
        await response.write(orjson.dumps(summary) + b"\n")
        await response.write_eof()
        return response


def _error_text(body: bytes) -> str:
    with contextlib.suppress(orjson.JSONDecodeError):
        value = orjson.loads(body) if body else None
        if isinstance(value, dict) and isinstance(value.get("error"), str):
            return str(value["error"])
    return body[:200].decode(errors="replace") if body else ""


def _union(lists: list[tuple[Upstream, Any]], key: str,
           replica_key: str | None = None) -> list[dict[str, Any]]:
    """Entries of every replica's list, once per `key` (first replica wins), or once per replica and
    key with the replica named under `replica_key`."""
    seen: set[Any] = set()
    out: list[dict[str, Any]] = []
    for upstream, entries in lists:
        if not isinstance(entries, list):
            continue  # a replica's odd answer (`"models": 5`) is its own, not the fleet's listing error
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            if replica_key is not None:
                out.append({**entry, replica_key: upstream.name})
                continue
            marker = entry.get(key)
            if not isinstance(marker, str | int | float | bool | None):
                marker = orjson.dumps(marker, option=orjson.OPT_SORT_KEYS)  # a list or object: hashable
            if marker in seen:
                continue
            seen.add(marker)
            out.append(entry)
    return out
