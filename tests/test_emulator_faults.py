"""Every emulator fault, switched at run time through `POST /_emulator/faults`, as a client sees it and as
`/_emulator/stats` counts it. The emulator runs from its command line, as tests and benches use it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.servers import Server, start_emulator

STREAM = {"model": "llama3.2", "prompt": "tell me", "options": {"num_predict": 20}}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp: Path = tmp_path_factory.mktemp("faults")
    server = start_emulator(tmp, decode_tokens_per_s=200, fixed_clock=False,
                            output_tokens="20,20", name="faulty")
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def clear(emulator: Server) -> Iterator[None]:
    httpx.delete(f"{emulator.url}/_emulator/faults")
    yield
    httpx.delete(f"{emulator.url}/_emulator/faults")


def _hits(emulator: Server) -> int:
    """How many requests the fault setting in force has touched, as /_emulator/stats reports it."""
    return int(emulator.stats()["faults"]["hits"])


def _set(emulator: Server, **faults: Any) -> dict[str, Any]:
    response = httpx.post(f"{emulator.url}/_emulator/faults", json=faults)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _lines(emulator: Server, body: dict[str, Any] | None = None, timeout: float = 5.0) -> list[bytes]:
    with httpx.stream("POST", f"{emulator.url}/api/generate", json=body or STREAM,
                      timeout=timeout) as response:
        assert response.status_code == 200
        return [line.encode() for line in response.iter_lines()]


def test_status_faults(emulator: Server) -> None:
    _set(emulator, status=503)
    busy = httpx.post(f"{emulator.url}/api/chat", json={"model": "llama3.2", "messages": []})
    assert busy.status_code == 503
    assert busy.json() == {"error": "server busy, please try again.  maximum pending requests exceeded"}
    _set(emulator, status=500, message="model runner has unexpectedly stopped")
    broken = httpx.post(f"{emulator.url}/api/generate", json=STREAM)
    assert (broken.status_code, broken.json()["error"]) == (500, "model runner has unexpectedly stopped")
    v1 = httpx.post(f"{emulator.url}/v1/chat/completions", json={"model": "llama3.2", "messages": []})
    assert v1.json()["error"]["type"] == "api_error"
    assert httpx.get(f"{emulator.url}/api/version").status_code == 200  # probes unaffected by default
    assert _hits(emulator) == 2


def test_a_status_fault_can_say_when_to_come_back(emulator: Server) -> None:
    """Ollama's own busy answer has no Retry-After; a setting can add one (`retry_after_s`), or a
    header of any text (`retry_after`: a date, or nothing a client can read)."""
    _set(emulator, status=503)
    assert "retry-after" not in httpx.post(f"{emulator.url}/api/generate", json=STREAM).headers
    _set(emulator, status=503, retry_after_s=7)
    busy = httpx.post(f"{emulator.url}/api/generate", json=STREAM)
    assert (busy.status_code, busy.headers["retry-after"]) == (503, "7")
    _set(emulator, status=503, retry_after="soon")
    assert httpx.post(f"{emulator.url}/api/generate", json=STREAM).headers["retry-after"] == "soon"


def test_count_and_paths(emulator: Server) -> None:
    _set(emulator, status=503, count=2, paths=["*"])
    statuses = [httpx.get(f"{emulator.url}/api/version").status_code for _ in range(3)]
    assert statuses == [503, 503, 200]
    assert httpx.get(f"{emulator.url}/_emulator/faults").json()["remaining"] == 0
    assert _hits(emulator) == 2


def test_refuse_connections(emulator: Server) -> None:
    _set(emulator, refuse_connections_s=3.0)
    deadline = time.monotonic() + 2.5  # it stops listening at once and for 3 s: poll inside that
    while True:
        try:
            httpx.get(f"{emulator.url}/api/version", timeout=2)
        except httpx.ConnectError:
            break
        except httpx.TransportError:
            pass  # accepted just before the listener closed, then dropped with the open connections
        assert time.monotonic() < deadline, "the emulator kept accepting connections"
        time.sleep(0.02)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            assert httpx.get(f"{emulator.url}/api/version", timeout=2).status_code == 200
            break
        except httpx.ConnectError:
            time.sleep(0.1)
    else:
        pytest.fail("the emulator did not listen again")


def test_reset_mid_stream(emulator: Server) -> None:
    before = emulator.stats()["cancelled"]
    _set(emulator, reset_after_chunks=3)
    received: list[bytes] = []
    with pytest.raises(httpx.HTTPError), httpx.stream(
            "POST", f"{emulator.url}/api/generate", json=STREAM, timeout=5) as response:
        for line in response.iter_lines():
            received.append(line.encode())
    assert len(received) <= 3
    assert emulator.stats()["cancelled"] == before + 1 and _hits(emulator) == 1


def test_hang_before_headers(emulator: Server) -> None:
    before = emulator.stats()["faults"]["abandoned"]
    _set(emulator, hang_before_headers=True)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{emulator.url}/api/generate", json=STREAM, timeout=0.5)
    deadline = time.monotonic() + 10
    while emulator.stats()["faults"]["abandoned"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert emulator.stats()["faults"]["abandoned"] == before + 1


def test_hang_mid_stream(emulator: Server) -> None:
    _set(emulator, hang_after_chunks=2)
    received: list[str] = []
    with pytest.raises(httpx.ReadTimeout), httpx.stream(
            "POST", f"{emulator.url}/api/generate", json=STREAM,
            timeout=httpx.Timeout(5, read=0.5)) as response:
        for line in response.iter_lines():
            received.append(line)
    assert len(received) == 2
    assert _hits(emulator) == 1


def test_slow_drip(emulator: Server) -> None:
    _set(emulator, slow_drip_s=0.1)
    start = time.monotonic()
    lines = _lines(emulator, {**STREAM, "options": {"num_predict": 5}})
    assert len(lines) == 6 and time.monotonic() - start >= 0.55
    assert _hits(emulator) == 1


def test_malformed_line(emulator: Server) -> None:
    _set(emulator, malformed_after_chunks=2)
    lines = _lines(emulator)
    json.loads(lines[0])
    json.loads(lines[1])
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[2])
    assert json.loads(lines[-1])["done"] is True
    assert _hits(emulator) == 1


def test_oversized_line(emulator: Server) -> None:
    _set(emulator, oversized_line_bytes=2_000_000)
    lines = _lines(emulator)
    assert len(lines[0]) >= 1_999_000 and json.loads(lines[0])["done"] is False
    assert _hits(emulator) == 1


def test_missing_done(emulator: Server) -> None:
    _set(emulator, missing_done=True)
    lines = _lines(emulator)
    assert len(lines) == 20 and not any(json.loads(line)["done"] for line in lines)
    assert _hits(emulator) == 1


def test_bad_fault_request_is_400(emulator: Server) -> None:
    response = httpx.post(f"{emulator.url}/_emulator/faults", json={"explode": True})
    assert response.status_code == 400 and "explode" in response.json()["error"]
    response = httpx.post(f"{emulator.url}/_emulator/faults", json={"status": 418})
    assert response.status_code == 400
