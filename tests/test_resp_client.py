"""The state's pipelined Redis client (proxy/state/resp.py) against a real redis-server: answers matched to
their calls under concurrency, scripts loaded on demand, errors as redis-py raises them, a stalled
connection left for another, a frozen Redis given up, a killed one reconnected, AUTH and SELECT."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from proxy.state.resp import RespClient, encode, url_settings
from tests.support.redis_server import RedisServer
from tests.support.servers import free_port
from tests.support.stalling_relay import StallingRelay


@pytest.fixture()
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server this test may pause, kill or restart."""
    server = RedisServer(tmp_path)
    yield server
    server.stop()


async def test_concurrent_calls_get_their_own_answers(redis_server: RedisServer) -> None:
    client = RespClient(redis_server.url, connections=2)
    try:
        values = [f"v{i}-é" for i in range(500)]
        answers = await asyncio.gather(*(client.execute("ECHO", value) for value in values))
        assert answers == values
        assert await client.execute("INCRBY", "resp:n", 5) == 5
        assert await client.execute("INCRBYFLOAT", "resp:f", 0.25) == "0.25"
        assert await client.execute("GET", "resp:missing") is None
        assert await client.execute("DEL", "resp:n", "resp:f") == 2
    finally:
        await client.close()


async def test_scripts_run_and_load_themselves(redis_server: RedisServer) -> None:
    client = RespClient(redis_server.url)
    script = client.register_script("return {KEYS[1], ARGV[1], tonumber(ARGV[2]) * 2}")
    try:
        await client.execute("SCRIPT", "FLUSH")  # not loaded: EVALSHA says NOSCRIPT, EVAL runs it
        assert await script(keys=["k"], args=["a", 21]) == ["k", "a", 42]
        assert await client.execute("SCRIPT", "EXISTS", script.sha) == [1]  # EVAL cached it
        assert await script(keys=["k"], args=["b", 1.5]) == ["k", "b", 3]
        failing = client.register_script("return redis.error_reply('BUSYKEY nope')")
        with pytest.raises(ResponseError, match="BUSYKEY nope"):
            await failing()
        with pytest.raises(ResponseError, match="unknown command"):
            await client.execute("NOSUCHCOMMAND")
        assert await client.execute("PING") == "PONG"  # the connection goes on after errors
    finally:
        await client.close()


def test_arguments_are_encoded_as_redis_py_does() -> None:
    assert encode(["SET", "k", 1, 0.5, b"\x00"]) == (
        b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n1\r\n$3\r\n0.5\r\n$1\r\n\x00\r\n")
    with pytest.raises(TypeError):
        encode(["SET", "k", True])
    with pytest.raises(TypeError):
        encode(["SET", "k", None])


async def test_a_stalled_connection_is_left_for_another(redis_server: RedisServer) -> None:
    """One connection's answers held: later calls go to another connection and are answered; the held
    call gets its answer once released."""
    relay = await StallingRelay.start(redis_server.port)
    client = RespClient(f"redis://127.0.0.1:{relay.port}/0", connections=2)
    try:
        assert await client.execute("PING") == "PONG"
        relay.hold_next()
        held = asyncio.ensure_future(client.execute("ECHO", "late"))
        await asyncio.wait_for(relay.held.wait(), 10)
        assert await asyncio.wait_for(client.execute("ECHO", "now"), 5) == "now"
        assert not held.done()
        relay.release()
        assert await asyncio.wait_for(held, 5) == "late"
    finally:
        await client.close()
        await relay.close()


async def test_a_frozen_redis_is_given_up_and_found_again(own_redis: RedisServer) -> None:
    """Calls abandoned by their callers on a Redis that answers nothing: after twice the timeout the
    connection is closed (its other calls fail at once, not at their own timeouts), and the calls
    after the thaw are answered."""
    client = RespClient(own_redis.url, timeout_s=0.2, connections=1)
    try:
        assert await client.execute("PING") == "PONG"
        own_redis.pause()
        waiting = asyncio.ensure_future(client.execute("ECHO", "frozen"))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):  # past 2 x 0.2 s: the connection is given up
                await client.execute("PING")
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(waiting, 1)  # failed by the close, not left hanging
        own_redis.resume()
        deadline = time.monotonic() + 10
        while True:
            try:
                assert await asyncio.wait_for(client.execute("ECHO", "thawed"), 1) == "thawed"
                break
            except (TimeoutError, RedisConnectionError):
                assert time.monotonic() < deadline, "no answer after the thaw"
    finally:
        own_redis.resume()
        await client.close()


async def test_a_killed_redis_fails_calls_then_a_restarted_one_serves(own_redis: RedisServer) -> None:
    client = RespClient(own_redis.url, timeout_s=0.5)
    try:
        assert await client.execute("SET", "k", "v") == "OK"
        own_redis.kill()
        with pytest.raises((RedisConnectionError, OSError)):
            await asyncio.wait_for(client.execute("GET", "k"), 5)
        own_redis.restart()
        assert await asyncio.wait_for(client.execute("PING"), 5) == "PONG"
    finally:
        await client.close()
    with pytest.raises(RedisConnectionError):
        await client.execute("PING")  # closed for good


async def test_password_and_database_from_the_url(own_redis: RedisServer) -> None:
    admin = redis.Redis(port=own_redis.port)
    admin.config_set("requirepass", "s3cret")
    client = RespClient(f"redis://:s3cret@127.0.0.1:{own_redis.port}/3")
    wrong = RespClient(f"redis://:wrong@127.0.0.1:{own_redis.port}/0")
    try:
        assert await client.execute("SET", "in-db-3", "yes") == "OK"
        check = redis.Redis(port=own_redis.port, password="s3cret", db=3)
        assert check.get("in-db-3") == b"yes"
        with pytest.raises(ResponseError, match=r"WRONGPASS|invalid"):
            await wrong.execute("PING")
    finally:
        await client.close()
        await wrong.close()


def test_options_it_does_not_take_are_refused() -> None:
    with pytest.raises(ValueError, match="options"):
        RespClient("redis://127.0.0.1:6379/0?socket_timeout=3")


async def test_a_failed_connect_leaves_calls_on_the_open_connection(own_redis: RedisServer) -> None:
    """Redis refuses new connections (maxclients): a burst that wants more connections is carried by
    the one open, not failed by the connect (and the slot is not retried at once)."""
    admin = redis.Redis(port=own_redis.port)
    client = RespClient(own_redis.url, connections=4)
    try:
        assert await client.execute("PING") == "PONG"  # one connection open
        admin.config_set("maxclients", 2)  # admin's and the client's: no third
        for _ in range(5):
            values = [f"b{i}" for i in range(32)]
            assert await asyncio.gather(*(client.execute("ECHO", v) for v in values)) == values
    finally:
        admin.config_set("maxclients", 10000)
        await client.close()


async def test_closing_during_a_connect_fails_the_call_without_cancelling_it() -> None:
    """A server that accepts and never answers (the connect's PING waits): close() does not cancel the
    connect under its waiter, which gets an error, not a CancelledError it did not ask for."""
    silent = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    client = RespClient(f"redis://127.0.0.1:{port}/0", timeout_s=0.2, connect_timeout_s=0.5)
    try:
        call = asyncio.ensure_future(client.execute("PING"))
        await asyncio.sleep(0.1)
        await client.close()
        with pytest.raises((TimeoutError, RedisConnectionError)):
            await asyncio.wait_for(call, 5)
    finally:
        silent.close()


def _binary(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is required for this test (apt-get install {name})"
    return path


def _self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run([_binary("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def _tls_redis(directory: Path, cert: Path, key: Path, port: int) -> subprocess.Popen[bytes]:
    """A redis-server speaking TLS only, on `port`."""
    return subprocess.Popen(
        [_binary("redis-server"), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-auth-clients", "no",
         "--save", "", "--appendonly", "no", "--dir", str(directory)], stdout=subprocess.DEVNULL)


async def test_tls_with_a_private_ca_from_the_url(tmp_path: Path) -> None:
    """rediss:// to a redis-server on TLS whose certificate only `ssl_ca_certs` vouches for."""
    cert, key = _self_signed(tmp_path)
    port = free_port()
    server = _tls_redis(tmp_path, cert, key, port)
    try:
        trusting = RespClient(f"rediss://127.0.0.1:{port}/2?ssl_ca_certs={cert}", connect_timeout_s=5)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert await trusting.execute("SET", "over-tls", "1") == "OK"
                break
            except OSError:
                assert time.monotonic() < deadline, "redis-server on TLS did not come up"
                await asyncio.sleep(0.1)
        assert await trusting.execute("CLIENT", "INFO") is not None
        await trusting.close()
        untrusting = RespClient(f"rediss://127.0.0.1:{port}/0", connect_timeout_s=5)
        with pytest.raises(ssl.SSLCertVerificationError):
            await untrusting.execute("PING")
        await untrusting.close()
        unchecked = RespClient(f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=none", connect_timeout_s=5)
        assert await unchecked.execute("PING") == "PONG"
        await unchecked.close()
    finally:
        server.kill()
        server.wait(10)


def test_url_options_are_taken_or_refused_by_name() -> None:
    settings = url_settings("rediss://u:p@h:7/1?ssl_ca_certs=/ca.pem&ssl_check_hostname=false")
    assert settings["ssl_ca_certs"] == "/ca.pem" and settings["tls"] and settings["db"] == 1
    with pytest.raises(ValueError, match="socket_timeout"):
        url_settings("redis://127.0.0.1:6379/0?socket_timeout=3")
    with pytest.raises(ValueError, match="ssl_ca_certs"):
        url_settings("redis://127.0.0.1:6379/0?ssl_ca_certs=/ca.pem")  # TLS options need rediss://
    with pytest.raises(ValueError, match="ssl_cert_reqs"):
        url_settings("rediss://h/0?ssl_cert_reqs=maybe")


async def test_calls_about_one_thing_stay_in_order_behind_an_unanswered_take(
        redis_server: RedisServer) -> None:
    """A call that takes (`takes=True`) and is unanswered keeps the calls with its `order` key behind
    it on its connection, whatever the other connections' load; answered, it lets them go anywhere.
    The memory of unanswered takes is bounded."""
    from proxy.state import resp

    client = RespClient(redis_server.url, connections=4)
    try:
        await client.execute("DEL", "ordered")
        await asyncio.gather(*(client.execute("PING") for _ in range(16)))  # several connections
        # A take that Redis holds for 0.3 s (BLPOP blocks its connection, not Redis).
        taking = asyncio.ensure_future(client.execute("BLPOP", "nothing", "0.3", order="k",
                                                      takes=True))
        await asyncio.sleep(0)
        pinned = client._behind["k"][0]
        behind = asyncio.ensure_future(client.execute("RPUSH", "ordered", "after", order="k"))
        await asyncio.sleep(0)
        assert client._after("k") is pinned
        await client.execute("RPUSH", "ordered", "other")  # no key: another connection, at once
        assert await taking is None and await behind == 2
        assert "k" not in client._behind
        assert await client.execute("LRANGE", "ordered", 0, -1) == ["other", "after"]
        for i in range(resp._MAX_BEHIND + 10):
            client._remember(f"old-{i}", pinned, 0)  # answered long ago: pruned
        assert len(client._behind) <= resp._MAX_BEHIND
    finally:
        await client.close()
