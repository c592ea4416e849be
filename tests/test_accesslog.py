"""The access log's direct path (proxy/accesslog.py) against the logging machinery it stands in for: the
same line, byte for byte but the clock, while the CLI's handler is the one writing; logging itself as soon
as anything else is configured."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator

import pytest

from proxy.accesslog import AccessLog
from proxy.escaping import withheld

_FORMAT = "%(asctime)s %(levelname)s %(name)s [worker 2] %(message)s"
_STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")
_MESSAGE = '%s %s "%s %s" %d %s %.3fs tenant=%s'
_ARGS = ("1-a-7", "127.0.0.1", "POST", "/api/chat", 200, "ok", 0.0123, "t\\x0a1")


@pytest.fixture()
def cli_logging() -> Iterator[io.StringIO]:
    """Root logging as the CLI configures it (cli._configure_logging), onto a string stream."""
    root = logging.root
    saved = (root.handlers[:], root.level, AccessLog._handler, AccessLog._middle)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    AccessLog.direct(handler, "[worker 2] ")
    try:
        yield stream
    finally:
        root.handlers[:], level, AccessLog._handler, AccessLog._middle = saved
        root.setLevel(level)


def test_the_direct_line_is_the_one_logging_writes(cli_logging: io.StringIO) -> None:
    access = AccessLog()
    access.line(_MESSAGE, *_ARGS)
    access.logger.info(_MESSAGE, *_ARGS)  # the same line through the logging machinery
    direct, logged = cli_logging.getvalue().splitlines(keepends=True)
    assert _STAMP.match(direct) and _STAMP.match(logged)
    assert direct[23:] == logged[23:] == (
        ' INFO proxy.access [worker 2] 1-a-7 127.0.0.1 "POST /api/chat" 200 ok 0.012s '
        "tenant=t\\x0a1\n")
    assert direct[:19] <= logged[:19]  # the same clock, to the second


def test_anything_else_configured_gets_logging_itself(cli_logging: io.StringIO,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A capture on the access logger (here pytest's, on the root) or a raised level: the direct path
    steps aside."""
    access = AccessLog()
    with caplog.at_level(logging.INFO, logger="proxy.access"):
        access.line(_MESSAGE, *_ARGS)
    assert [record.getMessage() for record in caplog.records] == [_MESSAGE % _ARGS]
    assert cli_logging.getvalue().count("\n") == 1  # and the CLI's handler wrote it once, via logging
    caplog.clear()
    logging.getLogger("proxy.access").setLevel(logging.WARNING)
    try:
        access.line(_MESSAGE, *_ARGS)
    finally:
        logging.getLogger("proxy.access").setLevel(logging.NOTSET)
    assert cli_logging.getvalue().count("\n") == 1 and not caplog.records  # INFO is off: no line


def test_an_exception_in_a_log_line_keeps_its_frames_but_no_client_text() -> None:
    """What the ingress and the edge log for an unexpected exception: its type and where it was raised,
    never its message, which may quote a client's text (a parser's raw bytes, int() of a field)."""
    secret = "sk-client-secret-in-a-message"

    def parse_field() -> int:
        return int(secret)

    try:
        parse_field()
    except ValueError as exc:
        line = withheld(exc)
    assert secret not in line
    assert line.startswith("ValueError (message withheld)")
    assert "parse_field" in line and "return int(secret)" in line
