"""Faults an emulated replica can be told to show, switchable at run time (`POST /_emulator/faults`).

    refuse_connections_s   stop listening (and drop open connections) for this long: ECONNREFUSED
    status                 answer 500 or 503 before doing any work (`message` overrides the text)
    cloud_status           answer requests for cloud models (`*:cloud`, `*-cloud`) as ollama.com does when
                           it refuses them, relayed by the daemon: 429 (usage limit reached) or 503
                           (`Server overloaded, please retry shortly (ref: <uuid>)`), or 502 (the daemon
                           cannot reach ollama.com); local models are untouched and `count` counts
                           cloud requests only (`message` overrides the text)
    retry_after_s          with cloud_status or status: send this `Retry-After` (ollama.com itself, and
                           Ollama's own busy or failed answers, send none)
    retry_after            with cloud_status or status: send `Retry-After` with exactly this text (an
                           HTTP date, or a value no client can read), instead of retry_after_s
    hang_before_headers    accept the request and never answer (until the client leaves)
    reset_after_chunks     abort the connection after N body writes of a stream
    hang_after_chunks      stop sending after N body writes, keeping the connection open
    slow_drip_s            wait this long before every body write of a stream
    malformed_after_chunks write a line that is not JSON after N writes, then go on
    oversized_line_bytes   write one valid line of this many bytes first, then go on
    missing_done           leave out the final `done` line (the stream just ends)
    count                  how many requests the faults apply to (null: until cleared)
    paths                  which paths they apply to (default: the inference routes; ["*"] for all)

`GET` shows the active faults, `DELETE` clears them. Requests that hung and were abandoned by their
client are counted in `/_emulator/stats` under `faults.abandoned`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import attrs
import cattrs
from aiohttp import web

__all__ = ["FAULTS", "FAULT_KEY", "INFERENCE_PATHS", "FaultBox", "Faults", "FaultyStream",
           "ListenerControl"]

INFERENCE_PATHS = ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/v1/chat/completions",
                   "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages")


@attrs.frozen
class Faults:
    """One fault setting; see the module docstring."""

    refuse_connections_s: float = 0.0
    status: int | None = attrs.field(default=None, validator=attrs.validators.optional(
        attrs.validators.in_((500, 502, 503))))
    message: str | None = None
    cloud_status: int | None = attrs.field(default=None, validator=attrs.validators.optional(
        attrs.validators.in_((429, 502, 503))))
    retry_after_s: int | None = attrs.field(default=None, validator=attrs.validators.optional(
        attrs.validators.ge(0)))
    retry_after: str | None = None
    hang_before_headers: bool = False
    reset_after_chunks: int | None = None
    hang_after_chunks: int | None = None
    slow_drip_s: float = 0.0
    malformed_after_chunks: int | None = None
    oversized_line_bytes: int = 0
    missing_done: bool = False
    count: int | None = None
    paths: tuple[str, ...] = INFERENCE_PATHS

    @property
    def retry_after_header(self) -> str | None:
        """The `Retry-After` a refusal (`status`, `cloud_status`) carries, None: none."""
        if self.retry_after is not None:
            return self.retry_after
        return None if self.retry_after_s is None else str(self.retry_after_s)

    def applies_to(self, path: str) -> bool:
        return "*" in self.paths or path in self.paths

    @property
    def shapes_streams(self) -> bool:
        return bool(self.reset_after_chunks is not None or self.hang_after_chunks is not None
                    or self.slow_drip_s or self.malformed_after_chunks is not None
                    or self.oversized_line_bytes or self.missing_done)


_CONVERTER = cattrs.Converter(forbid_extra_keys=True)


class FaultBox:
    """The faults in force on one emulated daemon, and how often they were used."""

    def __init__(self) -> None:
        self.current: Faults | None = None
        self.remaining: int | None = None
        self.hits = 0
        self.abandoned = 0

    def set(self, data: dict[str, Any]) -> Faults:
        """Replace the faults (raises ValueError/cattrs errors on bad input)."""
        faults = _CONVERTER.structure(data, Faults)
        self.current = faults
        self.remaining = faults.count
        self.hits = 0  # requests this setting has touched
        return faults

    def clear(self) -> None:
        self.current = None
        self.remaining = None

    def take(self, path: str, cloud: bool = False) -> Faults | None:
        """The faults that apply to this request (`cloud`: it names a cloud model), consuming one use
        of `count`. A `cloud_status` setting applies to cloud requests only."""
        faults = self.current
        if faults is None or not faults.applies_to(path):
            return None
        if faults.cloud_status is not None and not cloud:
            return None
        if self.remaining is not None:
            if self.remaining <= 0:
                return None
            self.remaining -= 1
        self.hits += 1
        return faults

    def as_dict(self) -> dict[str, Any]:
        return {"active": None if self.current is None else _CONVERTER.unstructure(self.current),
                "remaining": self.remaining, "hits": self.hits, "abandoned": self.abandoned}


class FaultyStream(web.StreamResponse):
    """A streaming response that misbehaves as its Faults say, one body write at a time."""

    def __init__(self, faults: Faults, box: FaultBox, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._faults = faults
        self._box = box
        self._writes = 0

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        faults = self._faults
        if faults.missing_done and b'"done":true' in bytes(data):
            return
        if faults.oversized_line_bytes and self._writes == 0:
            filler = "x" * max(0, faults.oversized_line_bytes - 64)
            await super().write(b'{"model":"oversized","response":"' + filler.encode()
                                + b'","done":false}\n')
        self._writes += 1
        if faults.slow_drip_s:
            await asyncio.sleep(faults.slow_drip_s)
        if faults.reset_after_chunks is not None and self._writes > faults.reset_after_chunks:
            if self._req is not None and self._req.transport is not None:
                self._req.transport.abort()
            # From the handler's side this is exactly a vanished peer.
            raise asyncio.CancelledError
        if faults.hang_after_chunks is not None and self._writes > faults.hang_after_chunks:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self._box.abandoned += 1
                raise
        if faults.malformed_after_chunks is not None and \
                self._writes == faults.malformed_after_chunks + 1:
            await super().write(b'{"model":"broken","response":\n')
        await super().write(data)


FAULTS: web.AppKey[FaultBox] = web.AppKey("emulator_faults", FaultBox)
FAULT_KEY: web.RequestKey[Faults] = web.RequestKey("emulator_fault", Faults)


class ListenerControl:
    """Lets the refuse-connections fault stop and restart the emulator's listening socket."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self._runner = runner
        self._host = host
        self._port = port
        self._site: web.TCPSite | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The port listened on: the one the system chose once started, when asked for port 0."""
        return self._port

    async def start(self) -> None:
        self._site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
        await self._site.start()
        if self._port == 0:
            # Port 0 is chosen anew on each bind: keep the first choice, so that listening again after
            # a refuse-connections fault brings the replica back where its clients expect it.
            for address in self._runner.addresses:
                if isinstance(address, tuple) and len(address) >= 2:
                    self._port = int(address[1])
                    break

    def refuse_for(self, seconds: float) -> None:
        """Stop accepting (and drop open connections) now, listen again after `seconds`."""
        self._task = asyncio.get_running_loop().create_task(self._refuse(seconds))

    async def _refuse(self, seconds: float) -> None:
        await asyncio.sleep(0.05)  # let the admin response that asked for it go out first
        if self._site is not None:
            await self._site.stop()
            self._site = None
        server = self._runner.server
        if server is not None:
            for connection in server.connections:
                connection.force_close()
                with contextlib.suppress(Exception):
                    if connection.transport is not None:
                        connection.transport.abort()
        await asyncio.sleep(seconds)
        await self.start()
