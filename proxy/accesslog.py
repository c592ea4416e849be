"""The access log (`proxy.access`): one line per request, written without the logging machinery when the
CLI's own handler is the one that would write it.

Why: `Logger.info` builds a LogRecord (a dozen attributes), walks the logger tree, takes the handler's
lock and formats through a Formatter: measured in the running proxy (issue 16, full chain at c=32), ~35 us
of a request's ~450, as much as encoding its seven spans. The line written here is byte for byte the one
the CLI's handler would write (`asctime levelname name [role] message`, asctime as logging.Formatter
renders it), to the same stream under the same lock.

Invariant: the direct path is taken only while logging is configured as the CLI left it (the access
logger has no handlers or filters of its own and propagates to a root whose only handler is the one
registered with `direct()`, without filters, and INFO is enabled). Anything else (a test's capture, an
embedding application's handlers, a raised level) gets an ordinary `Logger.info`, with the same message.
"""

from __future__ import annotations

import logging
import time
from typing import TextIO

__all__ = ["AccessLog"]


class AccessLog:
    """Writes access lines: `line(format, *args)`, the message as `Logger.info(format, *args)` makes it."""

    _handler: logging.StreamHandler[TextIO] | None = None
    _middle = ""
    """What follows asctime on a line of the direct path: ` INFO proxy.access ` and the role tag."""

    def __init__(self) -> None:
        self.logger = logging.getLogger("proxy.access")
        self._second = -1
        self._stamp = ""

    @classmethod
    def direct(cls, handler: logging.StreamHandler[TextIO], tag: str) -> None:
        """Register the CLI's root handler, whose format is `%(asctime)s %(levelname)s %(name)s
        {tag}%(message)s`; None of the other fields, so the direct path needs none of them."""
        cls._handler = handler
        cls._middle = f" INFO proxy.access {tag}"

    def _direct_handler(self) -> logging.StreamHandler[TextIO] | None:
        handler = self._handler
        if handler is None:
            return None
        logger = self.logger
        root = logging.root
        handlers = root.handlers
        if (logger.handlers or logger.filters or not logger.propagate or len(handlers) != 1
                or handlers[0] is not handler or root.filters or handler.filters
                or not logger.isEnabledFor(logging.INFO)):
            return None
        return handler

    def line(self, message: str, *args: object) -> None:
        """One access line. Every client-influenced field in `args` is escaped by the caller."""
        handler = self._direct_handler()
        if handler is None:
            self.logger.info(message, *args)
            return
        now = time.time()
        second = int(now)
        if second != self._second:
            # logging.Formatter's default asctime: local time to the second, then ",mmm".
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        text = f"{self._stamp},{int((now - second) * 1000):03d}{self._middle}{message % args}\n"
        handler.acquire()
        try:
            stream = handler.stream
            stream.write(text)
            stream.flush()
        except Exception:  # as StreamHandler.emit: a failing stream must not fail the request
            handler.handleError(logging.LogRecord("proxy.access", logging.INFO, "", 0, message,
                                                  args, None))
        finally:
            handler.release()
