"""The relay's pool (proxy/fleet/wire.py) against real HTTP servers on loopback: keep-alive reuse, framing
(length, chunked, until close, HEAD, interim 1xx), flow control, failures before and after the head,
cancellation, the pool limit, idle expiry, and streamed uploads. The servers here are small asyncio
servers written for each behaviour, since the emulator (a well-behaved Ollama) cannot misbehave on cue;
the proxy's own relay through this pool is tested end to end in test_forwarding.py and the rest of the
suite."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from proxy.fleet.wire import ConnectFailed, UpstreamLost, WirePool
from tests.support.polling import until

Reply = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Replica:
    """An asyncio server on 127.0.0.1 that answers each request with `reply`, counting connections."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.connections = 0
        self.closed = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Replica:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while not reader.at_eof():
                await self.reply(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client left, or the test ended
        finally:
            self.closed += 1
            writer.close()


async def read_head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    line, *fields = head.split("\r\n")
    headers = {k.lower(): v for k, _, v in (f.partition(": ") for f in fields if f)}
    return line, headers


async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    _, headers = await read_head(reader)
    await reader.readexactly(int(headers.get("content-length", "0")))
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
                 b'{"ok":true}')
    await writer.drain()


async def read_all(response: object) -> bytes:
    chunks = []
    while chunk := await response.readany():  # type: ignore[attr-defined]
        chunks.append(chunk)
    return b"".join(chunks)


def pool(limit: int = 0, keepalive_s: float = 30.0) -> WirePool:
    return WirePool(limit=limit, keepalive_s=keepalive_s, connect_timeout_s=5.0)


async def test_keep_alive_reuses_one_connection() -> None:
    async with Replica(ok) as replica:
        wire = pool()
        for _ in range(5):
            response = await wire.request("127.0.0.1", replica.port, False, "POST", "/api/chat",
                                          "Host: r\r\n", b"{}")
            assert (response.status, response.reason) == (200, "OK")
            assert response.headers["content-type"] == "application/json"
            assert await read_all(response) == b'{"ok":true}'
            assert response.is_eof()
            response.release()
        assert replica.connections == 1
        assert (wire.in_use, wire.idle_count()) == (0, 1)
        await wire.close()


async def test_chunked_and_until_close_bodies_arrive_whole() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for line in (b'{"n":1}\n', b'{"n":2}\n'):
            writer.write(b"%x\r\n%b\r\n" % (len(line), line))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    async with Replica(chunked) as one, Replica(until_close) as two:
        wire = pool()
        response = await wire.request("127.0.0.1", one.port, False, "GET", "/", "Host: r\r\n", None)
        assert await read_all(response) == b'{"n":1}\n{"n":2}\n'
        response.release()
        response = await wire.request("127.0.0.1", two.port, False, "GET", "/", "Host: r\r\n", None)
        assert await read_all(response) == b"all of it"
        response.release()
        assert wire.idle_count() == 1  # the chunked one; `Connection: close` is not pooled
        await wire.close()


async def test_interim_answers_are_skipped_and_head_has_no_body() -> None:
    async def interim(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line, _ = await read_head(reader)
        if line.startswith("HEAD"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n"
                         b"\r\nok")
        await writer.drain()

    async with Replica(interim) as replica:
        wire = pool()
        response = await wire.request("127.0.0.1", replica.port, False, "GET", "/", "Host: r\r\n",
                                      None)
        assert response.status == 201 and await read_all(response) == b"ok"
        response.release()
        assert wire.idle_count() == 1
        response = await wire.request("127.0.0.1", replica.port, False, "HEAD", "/", "Host: r\r\n",
                                      None)
        assert response.status == 200 and response.headers["Content-Length"] == "1000"
        assert await response.readany() == b""
        response.release()
        # The announced body never comes: the connection goes back to the pool and carries the next
        # request, whose answer is read as its own (not as HEAD's 1000 bytes).
        assert wire.idle_count() == 1
        response = await wire.request("127.0.0.1", replica.port, False, "GET", "/", "Host: r\r\n",
                                      None)
        assert response.status == 201 and await read_all(response) == b"ok"
        response.release()
        assert replica.connections == 1 and replica.closed == 0
        await wire.close()


async def test_a_head_answer_without_length_is_not_reused() -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        await writer.drain()

    async with Replica(until_close) as replica:
        wire = pool()
        response = await wire.request("127.0.0.1", replica.port, False, "HEAD", "/", "Host: r\r\n",
                                      None)
        assert response.status == 200 and await response.readany() == b""
        response.release()
        # A GET's body would run until the close: llhttp does not call that keep-alive, nor do we.
        await until(lambda: wire.idle_count() == 0 and replica.closed == 1)
        await wire.close()


async def test_a_slow_reader_holds_the_replica_back() -> None:
    size = 64 * 1024 * 1024
    written = [0]

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"x" * 65536
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
            written[0] += len(block)

    async with Replica(flood) as replica:
        wire = pool()
        response = await wire.request("127.0.0.1", replica.port, False, "GET", "/", "Host: r\r\n",
                                      None)
        first = await response.readany()
        previous = -1
        for _ in range(200):  # until the replica's writes stop advancing
            await asyncio.sleep(0.02)
            if written[0] == previous:
                break
            previous = written[0]
        assert written[0] < size // 2, "reading did not pause: the whole body was buffered"
        total = len(first) + len(await read_all(response))
        assert total == size
        response.release()
        await wire.close()


async def test_failures_before_and_after_the_head() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.close()
        raise ConnectionError

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        writer.close()
        raise ConnectionError

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()

    async def huge_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * 70000 + b"\r\n\r\n")
        await writer.drain()

    async with (Replica(hang_up) as one, Replica(cut) as two, Replica(garbage) as three,
                Replica(huge_head) as four):
        wire = pool(limit=1)
        for replica in (one, three, four):
            with pytest.raises(UpstreamLost):
                await wire.request("127.0.0.1", replica.port, False, "GET", "/", "Host: r\r\n", None)
        response = await wire.request("127.0.0.1", two.port, False, "GET", "/", "Host: r\r\n", None)
        assert await response.readany() == b"partial"
        with pytest.raises(UpstreamLost):
            await response.readany()
        response.release()
        assert (wire.in_use, wire.idle_count()) == (0, 0)  # a limit of 1 and every permit back
        await wire.close()


async def test_connect_failures() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    wire = pool(limit=1)
    for _ in range(3):  # the permit comes back every time
        with pytest.raises(ConnectFailed) as failure:
            await wire.request("127.0.0.1", port, False, "GET", "/", "Host: r\r\n", None)
        assert not failure.value.timed_out
    assert wire.in_use == 0
    await wire.close()


async def test_the_limit_queues_and_cancellation_frees_the_connection() -> None:
    gate = asyncio.Event()

    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        eof = asyncio.ensure_future(reader.read(1))  # b"": the client closed while it waited
        opened = asyncio.ensure_future(gate.wait())
        await asyncio.wait((eof, opened), return_when=asyncio.FIRST_COMPLETED)
        if eof.done():
            opened.cancel()
            raise ConnectionError
        eof.cancel()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with Replica(held) as replica:
        wire = pool(limit=1)
        first = asyncio.ensure_future(wire.request("127.0.0.1", replica.port, False, "GET", "/",
                                                   "Host: r\r\n", None))
        await until(lambda: replica.connections == 1)
        second = asyncio.ensure_future(wire.request("127.0.0.1", replica.port, False, "GET", "/",
                                                    "Host: r\r\n", None))
        await asyncio.sleep(0.1)
        assert replica.connections == 1 and not second.done()  # waits for the one permit
        first.cancel()  # a client that left while its request waited for the head
        await until(lambda: replica.closed == 1)  # the cancel reached the replica
        await until(lambda: replica.connections == 2)  # and the permit went to the next
        gate.set()
        response = await second
        assert response.status == 200
        response.release()
        assert wire.in_use == 0
        await wire.close()


async def test_idle_connections_expire() -> None:
    async with Replica(ok) as replica:
        wire = pool(keepalive_s=0.2)
        response = await wire.request("127.0.0.1", replica.port, False, "GET", "/", "Host: r\r\n",
                                      None)
        await read_all(response)
        response.release()
        assert wire.idle_count() == 1
        await until(lambda: wire.idle_count() == 0 and replica.closed == 1)
        await wire.close()


async def test_streamed_upload_is_chunked_and_a_failed_upload_is_the_error() -> None:
    received: list[bytes] = []

    async def echo_length(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, headers = await read_head(reader)
        assert headers["transfer-encoding"] == "chunked"
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += data[:-2]
        received.append(body)
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async def blob() -> AsyncIterator[bytes]:
        for part in (b"a" * 100_000, b"", b"b" * 5):
            yield part

    async def broken() -> AsyncIterator[bytes]:
        yield b"start"
        raise TimeoutError  # what the forwarder's body iterator raises when the client stalls

    async with Replica(echo_length) as replica:
        wire = pool()
        response = await wire.request("127.0.0.1", replica.port, False, "POST", "/api/blobs/x",
                                      "Host: r\r\n", blob())
        assert response.status == 201 and received == [b"a" * 100_000 + b"b" * 5]
        response.release()
        with pytest.raises(TimeoutError):
            await wire.request("127.0.0.1", replica.port, False, "POST", "/api/blobs/y",
                               "Host: r\r\n", broken())
        assert wire.in_use == 0
        await wire.close()



async def test_a_hostile_head_or_trailer_is_bounded() -> None:
    """llhttp gathers a header line of any length before any callback: the pool counts the bytes
    that made no progress and gives up past 64 KiB, instead of buffering megabytes."""
    def endless(prefix: bytes) -> Reply:
        """A reply that sends `prefix`, then 4 MiB that never end the line it started."""
        async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_head(reader)
            writer.write(prefix)
            for _ in range(64):
                writer.write(b"a" * 65536)
                await writer.drain()
        return reply

    header = endless(b"HTTP/1.1 200 OK\r\nX-Long: ")
    trailer = endless(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: ")
    async with Replica(header) as one, Replica(trailer) as two:
        wire = pool()
        with pytest.raises(UpstreamLost, match="too large"):
            await wire.request("127.0.0.1", one.port, False, "GET", "/", "Host: r\r\n", None)
        response = await wire.request("127.0.0.1", two.port, False, "GET", "/", "Host: r\r\n", None)
        assert await response.readany() == b"ok"
        with pytest.raises(UpstreamLost):
            await read_all(response)
        response.close()
        assert wire.in_use == 0
        await wire.close()


async def test_a_reason_split_across_segments_arrives_whole() -> None:
    async def split(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 503 Service Un")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"available\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with Replica(split) as replica:
        wire = pool()
        response = await wire.request("127.0.0.1", replica.port, False, "GET", "/", "Host: r\r\n",
                                      None)
        assert (response.status, response.reason) == (503, "Service Unavailable")
        response.release()
        await wire.close()


async def test_a_close_delimited_body_cut_by_a_reset_is_an_error() -> None:
    """Only an orderly close (FIN from the replica) ends a body that has neither length nor chunks."""
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"partial":')
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # a reset
        raise ConnectionError

    async with Replica(reset) as replica:
        wire = pool()
        response = await wire.request("127.0.0.1", replica.port, False, "GET", "/", "Host: r\r\n",
                                      None)
        with pytest.raises(UpstreamLost):
            await read_all(response)
        assert not response.is_eof()
        response.close()
        await wire.close()


async def test_a_stale_pooled_connection_is_replaced_for_idempotent_requests_only() -> None:
    """The replica (or a balancer in front of it) drops an idle keep-alive connection just as the
    next request goes out: a GET is sent again on a new connection, a POST is not (it may have
    reached the replica), as aiohttp's client does."""
    served: list[int] = []

    async def one_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, headers = await read_head(reader)
        await reader.readexactly(int(headers.get("content-length", "0")))
        if served and served[-1] == id(writer):
            writer.transport.abort()  # the second request on a connection: gone without a byte
            raise ConnectionError
        served.append(id(writer))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    async with Replica(one_per_connection) as replica:
        wire = pool(limit=2)
        for _ in range(3):
            response = await wire.request("127.0.0.1", replica.port, False, "GET", "/api/tags",
                                          "Host: r\r\n", None)
            assert await read_all(response) == b"ok"
            response.release()
        assert replica.connections == 3  # each GET after the first needed a fresh connection
        with pytest.raises(UpstreamLost):
            await wire.request("127.0.0.1", replica.port, False, "POST", "/api/generate",
                               "Host: r\r\n", b"{}")
        assert wire.in_use == 0
        await wire.close()


@pytest.mark.parametrize("size", [64 << 10, 64 << 20], ids=["in-kernel-buffer", "unsent"])
async def test_giving_up_resets_the_connection(size: int) -> None:
    """A request given up before its answer (a first-byte timeout, a client gone) resets the
    connection: with bytes still unsent, a graceful close would wait behind them forever; with all of
    them in the kernel's buffer, the replica would read a whole request and then a FIN, and could start
    the work before it noticed."""
    outcome: list[str] = []
    reading = asyncio.Event()

    async def stalled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await reading.wait()  # read nothing until the client gave up
        total = 0
        try:
            while chunk := await reader.read(1 << 20):
                total += len(chunk)
            outcome.append(f"eof after {total}")
        except ConnectionResetError:
            outcome.append("reset")
        raise ConnectionError

    async with Replica(stalled) as replica:
        wire = pool(limit=1)
        body = b"x" * size
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await wire.request("127.0.0.1", replica.port, False, "POST", "/api/blobs/x",
                                   "Host: r\r\n", body)
        reading.set()
        await until(lambda: bool(outcome), what="the replica to see the end")
        assert outcome == ["reset"], outcome
        assert wire.in_use == 0
        await wire.close()


async def test_a_closed_pool_sends_nothing_more() -> None:
    """Closing the pool (the proxy stopping) fails what is in flight and what waits for a permit;
    neither is sent again on a new connection."""
    gate = asyncio.Event()
    heads: list[str] = []

    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line, headers = await read_head(reader)
        await reader.readexactly(int(headers.get("content-length", "0")))
        heads.append(line)
        await gate.wait()

    async with Replica(held) as replica:
        wire = pool(limit=1)
        in_flight = asyncio.ensure_future(wire.request("127.0.0.1", replica.port, False, "GET", "/a",
                                                       "Host: r\r\n", None))
        await until(lambda: len(heads) == 1, what="the first request")
        queued = asyncio.ensure_future(wire.request("127.0.0.1", replica.port, False, "POST", "/b",
                                                    "Host: r\r\n", b"{}"))
        await asyncio.sleep(0.05)
        await wire.close()
        for task in (in_flight, queued):
            with pytest.raises(UpstreamLost):
                await task
        await asyncio.sleep(0.1)
        assert heads == ["GET /a HTTP/1.1"] and replica.connections == 1
        assert wire.in_use == 0
        gate.set()
