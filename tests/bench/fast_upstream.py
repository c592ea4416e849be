"""A fast fake Ollama for `make bench`: canned answers from a raw asyncio protocol on uvloop.

The emulator simulates Ollama (scheduling, tokens, timings) and costs a few hundred microseconds of CPU per
request; on two shared cores that would cap what the bench can show of the proxy. This upstream answers
`POST /api/chat` and `/api/generate` (unary: one JSON object with Ollama's fields and durations that show no
queueing; streaming: `--chunks` NDJSON lines, chunked) and the probes the proxy sends (`/api/version`,
`/api/tags`, `/api/ps`, `/api/show`) with pre-encoded bytes, over HTTP/1.1 keep-alive, in a few
microseconds. It serves benchmarks only: it parses what a well-behaved client sends, no more.

    python -m tests.bench.fast_upstream --port-file F [--chunks 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path
from typing import cast

from proxy.serving import write_port_file

_MODEL = {"name": "llama3.2:latest", "model": "llama3.2:latest", "size": 2019393189,
          "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
          "details": {"format": "gguf", "family": "llama", "families": ["llama"],
                      "parameter_size": "3.2B", "quantization_level": "Q4_K_M"}}
_DONE = {"done": True, "done_reason": "stop", "total_duration": 1_200_000, "load_duration": 100_000,
         "prompt_eval_count": 8, "prompt_eval_duration": 600_000, "eval_count": 1,
         "eval_duration": 500_000}
_CREATED = "2026-12-02T00:00:00.000000000Z"


def _json(status: str, body: object) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def _stream(lines: list[bytes]) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + b"".join(b"%x\r\n%s\r\n" % (len(line), line) for line in lines) + b"0\r\n\r\n"


def responses(chunks: int) -> dict[tuple[bytes, bytes, bool], bytes]:
    """(method, path, streaming) -> the whole response."""
    chat = {"model": "llama3.2", "created_at": _CREATED,
            "message": {"role": "assistant", "content": "pong"}, **_DONE}
    generate = {"model": "llama3.2", "created_at": _CREATED, "response": "pong", **_DONE}
    piece = {"model": "llama3.2", "created_at": _CREATED, "response": "tok", "done": False}
    lines = [json.dumps(piece, separators=(",", ":")).encode() + b"\n"] * chunks
    lines.append(json.dumps({**generate, "response": "", "eval_count": chunks},
                            separators=(",", ":")).encode() + b"\n")
    ps = {"models": [{**_MODEL, "expires_at": "2099-01-01T00:00:00Z", "size_vram": 0,
                      "context_length": 4096}]}
    table = {
        (b"POST", b"/api/chat", False): _json("200 OK", chat),
        (b"POST", b"/api/generate", False): _json("200 OK", generate),
        (b"POST", b"/api/generate", True): _stream(lines),
        (b"GET", b"/api/version", False): _json("200 OK", {"version": "0.12.6"}),
        (b"GET", b"/api/tags", False): _json("200 OK", {"models": [_MODEL]}),
        (b"GET", b"/api/ps", False): _json("200 OK", ps),
        (b"POST", b"/api/show", False): _json("200 OK", {
            "details": _MODEL["details"], "capabilities": ["completion"],
            "model_info": {"llama.context_length": 131072}}),
    }
    table[(b"HEAD", b"/", False)] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    table[(b"GET", b"/", False)] = _json("200 OK", "Ollama is running")
    return table


_NOT_FOUND = _json("404 Not Found", {"error": "not found"})


class _Connection(asyncio.Protocol):
    """One keep-alive connection: requests are parsed from a byte buffer and answered in order."""

    def __init__(self, table: dict[tuple[bytes, bytes, bool], bytes]) -> None:
        self.table = table
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        stream = table[(b"POST", b"/api/generate", True)]
        first = stream.index(b"\r\n\r\n") + 4
        self.hold_prefix = stream.index(b"\r\n", stream.index(b"\r\n", first) + 2) + 2
        """The bytes of a stream's head and first chunk."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end])
            lines = head.split(b"\r\n")
            method, target, _ = lines[0].split(b" ", 2)
            length = 0
            chunked = False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
            start = end + 4
            if chunked:
                # The body ends with the zero-size chunk.
                tail = self.buffer.find(b"\r\n0\r\n\r\n", start - 2)
                if tail < 0:
                    return
                body = bytes(self.buffer[start:tail + 7])
                del self.buffer[:tail + 7]
            else:
                if len(self.buffer) < start + length:
                    return
                body = bytes(self.buffer[start:start + length])
                del self.buffer[:start + length]
            if b'"prompt":"hold"' in body.replace(b" ", b""):
                # A stream that never ends (the memory run): its head and first line, then silence
                # until the client leaves.
                assert self.transport is not None
                self.transport.write(self.table[(b"POST", b"/api/generate", True)][:self.hold_prefix])
                continue
            # Ollama streams unless told `"stream": false`.
            streaming = method == b"POST" and b'"stream":false' not in body.replace(b" ", b"")
            path = target.split(b"?", 1)[0]
            answer = self.table.get((method, path, streaming)) or self.table.get((method, path, False))
            assert self.transport is not None
            self.transport.write(answer or _NOT_FOUND)


async def _serve(port_file: Path, chunks: int, host: str) -> None:
    table = responses(chunks)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(table), host, 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    write_port_file(str(port_file), port)
    stopped = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    await stopped.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--chunks", type=int, default=200, help="NDJSON lines per streamed answer")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    import uvloop

    uvloop.run(_serve(args.port_file, args.chunks, args.host))


if __name__ == "__main__":
    main()
