"""shared-ollama-client for TypeScript (clients/typescript) under node with the real ollama-js (and the
OpenAI Node SDK): its own `node --test` suite (the retry policy against a scripted server, then against
real proxies answering 429 from a tenant's requests_per_minute and 503 from a full queue, started here),
the type declarations checked by tsc, chunkText giving the same chunks as the Python chunk_text, and the
TypeScript examples run against an emulated fleet behind the proxy.

Needs node >= 18 and the npm packages: `npm ci --prefix clients/typescript && npm ci --prefix
examples/typescript`. Without them these tests fail (they are part of the contract), saying what to run.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from shared_ollama_client import (
    RetryPolicy,
    chunk_text,
    estimate_tokens,
    parse_limits,
    retry_delay,
    server_delay_s,
)

from tests.support.servers import Server, start_emulator, start_proxy

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "clients" / "typescript"
EXAMPLES = ROOT / "examples" / "typescript"
ADMIN, BURST, SLOW_REFILL = "sk-admin", "sk-burst", "sk-slow-refill"


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: install Node.js >= 18 (the TypeScript helper is tested under it)")
    version = subprocess.run([node, "--version"], check=True, capture_output=True, text=True).stdout
    assert int(version.strip().lstrip("v").split(".")[0]) >= 18, version
    return node


def _installed(directory: Path, *packages: str) -> None:
    missing = [p for p in packages if not (directory / "node_modules" / p / "package.json").exists()]
    if missing:
        pytest.fail(f"npm packages {missing} are missing in {directory.relative_to(ROOT)}: run "
                    f"`npm ci --prefix {directory.relative_to(ROOT)}`")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "SOP_", "OTEL_", "SOC_"))}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("client-typescript")


@pytest.fixture(scope="module")
def limited(tmp: Path) -> Iterator[Server]:
    emulator = start_emulator(tmp, decode_tokens_per_s=400, name="ts-emu")
    proxy = start_proxy(tmp, [emulator.url], {
        "admin": {"keys": [ADMIN]},
        "tenants": [{"name": "burst", "keys": [BURST], "requests_per_minute": 60},
                    {"name": "slow-refill", "keys": [SLOW_REFILL], "requests_per_minute": 3}]},
        name="ts-limited")
    yield proxy
    proxy.stop()
    emulator.stop()


@pytest.fixture(scope="module")
def queue_of_one(tmp: Path) -> Iterator[Server]:
    emulator = start_emulator(tmp, fixed_clock=False, decode_tokens_per_s=20, output_tokens="10,10",
                              name="ts-slow")
    proxy = start_proxy(tmp, [emulator.url], {"admin": {"keys": [ADMIN]},
                                              "chain": {"backpressure": {"max_queue_size": 1}}},
                        name="ts-bp")
    yield proxy
    proxy.stop()
    emulator.stop()


def test_node_suite_against_the_proxy(limited: Server, queue_of_one: Server) -> None:
    node = _node()
    _installed(PACKAGE, "ollama", "openai")
    done = subprocess.run(
        [node, "--test", "--test-reporter=tap", "test/"], cwd=PACKAGE, check=False, capture_output=True,
        text=True, timeout=170, env=_env(
            SOC_LIMITED_URL=limited.url, SOC_BURST_KEY=BURST, SOC_SLOW_REFILL_KEY=SLOW_REFILL,
            SOC_QUEUE_URL=queue_of_one.url, SOC_ADMIN_KEY=ADMIN))
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "# fail 0" in done.stdout and "# skipped 0" in done.stdout, done.stdout[-2000:]
    assert int(done.stdout.split("# pass ")[1].split()[0]) >= 21  # 16 policy tests and the 5 proxy tests


def test_declarations_type_check() -> None:
    _node()
    _installed(PACKAGE, "typescript", "ollama")
    done = subprocess.run([str(PACKAGE / "node_modules" / ".bin" / "tsc"), "-p", "tsconfig.json"],
                          cwd=PACKAGE, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_chunk_text_matches_python() -> None:
    """One algorithm in two languages: the same text gives the same chunks with the estimate."""
    node = _node()
    import argparse
    import inspect
    import textwrap

    text = "\n\n".join([inspect.getdoc(argparse) or "", inspect.getdoc(textwrap) or "",
                        "Één zin. Ünïcödé wörds — and CJK: 一二三。四五六\uff01七八九\uff1f",
                        "Tokenizers differ. Some count words! Others count bytes? " * 30, "y" * 700])
    cases = [(60, 0), (120, 30), (200, 10)]
    script = ("import { chunkText } from 'shared-ollama-client';"
              "let input = ''; for await (const c of process.stdin) input += c;"
              "const { text, cases } = JSON.parse(input);"
              "console.log(JSON.stringify(cases.map(([maxTokens, overlap]) =>"
              " chunkText(text, { maxTokens, overlap }))));")
    _installed(PACKAGE, "ollama")
    done = subprocess.run([node, "--input-type=module", "-e", script], cwd=PACKAGE, check=False,
                          input=json.dumps({"text": text, "cases": cases}), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    from_node = json.loads(done.stdout)
    from_python = [chunk_text(text, max_tokens, overlap) for max_tokens, overlap in cases]
    assert from_node == from_python
    assert all(len(chunks) > 3 for chunks in from_python)


def test_chunking_whitespace_matches_python() -> None:
    """Whitespace is Unicode's White_Space in both languages: a file's byte-order mark is a character
    to both (JavaScript's `\\s` and trim() took it as space, Python kept it), and \\x1c-\\x1f and NEL
    are whitespace to both or neither (Python's split() and strip() took \\x1c-\\x1f, JavaScript not)."""
    node = _node()
    texts = ["\ufeffHello world. This is a test.\n\nSecond paragraph here.",
             "alpha\x1cbeta gamma. delta\x85epsilon.\n\n\x1fend\x1e", "one\u200btwo\u3000three. x\u00a0y z",
             "\ufeff\n\n\ufeff", "a\u2028b\u2029c\u202fd\u205fe\u1680f"]
    script = ("import { chunkText, estimateTokens } from 'shared-ollama-client';"
              "let input = ''; for await (const c of process.stdin) input += c;"
              "console.log(JSON.stringify(JSON.parse(input).map((t) =>"
              " [estimateTokens(t), chunkText(t, { maxTokens: 4 })])));")
    _installed(PACKAGE, "ollama")
    done = subprocess.run([node, "--input-type=module", "-e", script], cwd=PACKAGE, check=False,
                          input=json.dumps(texts), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for text, from_node in zip(texts, json.loads(done.stdout), strict=True):
        assert [estimate_tokens(text), chunk_text(text, 4)] == from_node, repr(text)


RETRY_AFTER = ["5", " 5\t", "5.5", ".5", "0", "-0", "-1", "99999", "1e3", "1e400", "+5", "0x10", "0b11",
               "0o7", "1_000", "nan", "inf", "Infinity", "", "  ", "garbage", "soon 3", "5 seconds", "1,2",
               "3\u00a0", "Thu, 01 Jan 2026 00:00:30 GMT", "Wed, 31 Dec 2025 23:59:00 GMT",
               # RFC 9110's other two date forms (two-digit years around the 50-year pivot), and dates
               # each parser once read its own way: zones, no zone, lowercase, 31 Feb, second 60, year 0
               "Thursday, 01-Jan-26 00:00:30 GMT", "Friday, 01-Jan-76 00:00:30 GMT",
               "Saturday, 01-Jan-77 00:00:30 GMT", "Thu Jan  1 00:00:30 2026", "Thu Jan 01 00:00:30 2026",
               "Thu, 01 Jan 2026 00:00:30 +0000", "Thu, 01 Jan 2026 00:00:30 UTC",
               "Thu, 01 Jan 2026 00:00:30 -0100", "Thu, 01 Jan 2026 00:00:30 EST",
               "Thu, 01 Jan 2026 00:00:30", "Thu, 1 Jan 2026 00:00:30 GMT", "01 Jan 2026 00:00:30 GMT",
               "thu, 01 jan 2026 00:00:30 gmt", "Thu, 31 Feb 2026 00:00:30 GMT",
               "Thu, 01 Jan 2026 00:00:60 GMT", "Thu, 01 Jan 2026 24:00:00 GMT",
               "Sat, 01 Jan 0000 00:00:00 GMT", "Thu, 01 Jan 0099 00:00:30 GMT"]
SERVICE_LIMITS = [
    "v=1; max_body_bytes=100; max_prompt_tokens=4096.0; deadline_s=0.5; requests_per_minute=600",
    "v=2; max_body_bytes=100", "v=+1; a=1", "v= 1; a=1", "v=01; a=1", "v=1.0; a=1", "v=-1; a=1",
    "v=1_0; a=1", "v=1234567890123456; a=1", "V=1; a=1", "a=1; v=1", "v=1;max_body_bytes=100;;;", "garbage",
    "", "v=", "v=1", "v=1; max_body_bytes=nan; max_prompt_tokens=inf; deadline_s=1e999",
    "v=1; max_body_bytes=1_000; max_prompt_tokens=0x10; deadline_s=1.5e1; requests_per_minute=+600",
    "v=1; max_body_bytes=1.9; deadline_s=-5; future=abc; max_body_bytes=7; Bad_Key=1; x = 2",
    "v=1\u00a0; a=1", "v=1; deadline_s=3\u00a0"]
_TS_NAMES = {"maxBodyBytes": "max_body_bytes", "maxPromptTokens": "max_prompt_tokens",
             "deadlineS": "deadline_s", "requestsPerMinute": "requests_per_minute"}


def test_header_parsing_matches_python() -> None:
    """Retry-After, retry-after-ms and X-Service-Limits read alike in both languages: the same value
    gives the same wait and the same limits, garbage included (one number grammar, one version rule)."""
    node = _node()
    now_ms = 1_767_225_600_000  # 2026-01-01T00:00:00Z
    script = ("import { parseServiceLimits, serverDelayS } from 'shared-ollama-client';"
              "let input = ''; for await (const c of process.stdin) input += c;"
              "const { delays, limits, nowMs } = JSON.parse(input);"
              "console.log(JSON.stringify({"
              " seconds: delays.map((v) => serverDelayS(new Headers({ 'retry-after': v }), nowMs)),"
              " millis: delays.map((v) => serverDelayS(new Headers({ 'retry-after-ms': v,"
              " 'retry-after': '7' }), nowMs)),"
              " limits: limits.map((v) => parseServiceLimits(v)) }));")
    _installed(PACKAGE, "ollama")
    given = {"delays": RETRY_AFTER, "limits": SERVICE_LIMITS, "nowMs": now_ms}
    done = subprocess.run([node, "--input-type=module", "-e", script], cwd=PACKAGE, check=False,
                          input=json.dumps(given), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    from_node = json.loads(done.stdout)
    now = datetime.datetime.fromtimestamp(now_ms / 1000, datetime.UTC)
    for value, seconds, millis in zip(RETRY_AFTER, from_node["seconds"], from_node["millis"], strict=True):
        assert server_delay_s({"retry-after": value}, now) == seconds, value
        assert server_delay_s({"retry-after-ms": value, "retry-after": "7"}, now) == millis, value
    for value, limits in zip(SERVICE_LIMITS, from_node["limits"], strict=True):
        parsed = parse_limits(value)
        if limits is None:
            assert parsed is None, value
            continue
        assert parsed is not None, value
        typed = {_TS_NAMES[k]: v for k, v in limits.items() if k in _TS_NAMES}
        assert (parsed.version, parsed.understood, dict(parsed.raw)) == (
            limits["version"], limits["understood"], limits["raw"]), value
        assert {name: getattr(parsed, name) for name in _TS_NAMES.values()
                if getattr(parsed, name) is not None} == typed, value



SHOULD_RETRY = ["true", "false", " TRUE\t", "False", "", "yes", "false\u0085", "\u001cfalse", "false\u00a0",
                "true\u0085", "\u001ftrue", "\u00a0true", "tru e"]


def test_should_retry_header_read_alike() -> None:
    """`x-should-retry` decides alike in both languages: only spaces and tabs are padding (Python's
    strip() also took NEL and \\x1c-\\x1f, JavaScript's trim() NBSP but not those), so a server's
    `false` or `true` cannot mean one thing to one helper and another to the other."""
    node = _node()
    statuses = [429, 500]
    script = ("import { retryDelay } from 'shared-ollama-client';"
              "let input = ''; for await (const c of process.stdin) input += c;"
              "const { values, statuses } = JSON.parse(input);"
              "const policy = { maxAttempts: 5, maxTotalS: 120, maxRetryAfterS: 60, backoffBaseS: 0.5,"
              " backoffMaxS: 8, retryAfterJitter: 0.1, statuses: [429, 502, 503, 504],"
              " maxTimeoutRetries: 1 };"
              "console.log(JSON.stringify(values.map((v) => statuses.map((status) => retryDelay(policy, 1,"
              " new Response(null, { status, headers: { 'x-should-retry': v } }), () => 0.5) !== null))));")
    _installed(PACKAGE, "ollama")
    done = subprocess.run([node, "--input-type=module", "-e", script], cwd=PACKAGE, check=False,
                          input=json.dumps({"values": SHOULD_RETRY, "statuses": statuses}),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for value, from_node in zip(SHOULD_RETRY, json.loads(done.stdout), strict=True):
        headers = {"x-should-retry": value}
        python = [retry_delay(RetryPolicy(), 1, status, headers, random.Random(1)) is not None
                  for status in statuses]
        assert python == from_node, repr(value)


# --- the TypeScript examples, against an emulated fleet behind the proxy ---------------------------

@pytest.fixture(scope="module")
def fleet(tmp: Path) -> Iterator[tuple[Server, list[Server]]]:
    replicas = [start_emulator(tmp, decode_tokens_per_s=100, fixed_clock=False, name=f"ts-fleet-{i}",
                               seed=i) for i in range(2)]
    proxy = start_proxy(tmp, [r.url for r in replicas], {
        "tenants": [{"name": "examples", "keys": ["sk-examples"], "requests_per_minute": 60}]},
        name="ts-fleet")
    yield proxy, replicas
    proxy.stop()
    for replica in replicas:
        replica.stop()


def _run_example(name: str, fleet: tuple[Server, list[Server]]) -> str:
    node = _node()
    _installed(EXAMPLES, "ollama", "shared-ollama-client")
    done = subprocess.run([node, name], cwd=EXAMPLES, check=False, capture_output=True, text=True,
                          timeout=120, env=_env(OLLAMA_HOST=fleet[0].url, OLLAMA_API_KEY="sk-examples"))
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_typescript_quickstart(fleet: tuple[Server, list[Server]]) -> None:
    out = _run_example("quickstart.mjs", fleet)
    assert out.startswith("answer: ") and "answer tokens)" in out


def test_typescript_retry_after(fleet: tuple[Server, list[Server]]) -> None:
    out = _run_example("retry_after.mjs", fleet)
    assert "finished 70 of 70 jobs" in out
    assert int(out.split("the helper waited ")[1].split()[0]) >= 1, out


def test_typescript_streaming_abort(fleet: tuple[Server, list[Server]]) -> None:
    replicas = fleet[1]
    before = sum(int(r.stats()["cancelled"]) for r in replicas)
    out = _run_example("streaming_abort.mjs", fleet)
    assert "aborted the stream after" in out
    deadline = time.monotonic() + 10
    while sum(int(r.stats()["cancelled"]) for r in replicas) < before + 1:  # cancelled at the replica
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_typescript_rag(fleet: tuple[Server, list[Server]]) -> None:
    out = _run_example("rag.mjs", fleet)
    assert "retrieved: " in out and "\nanswer: " in out
    assert int(out.split("embedded ")[1].split()[0]) >= 3
