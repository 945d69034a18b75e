"""Logging set-up: structlog, JSON lines by default, a readable console format for people.

Secrets never reach a log event: the request path logs certificate serial, fingerprint and
subject, never the certificate, a key or the ``X-USERINFO`` value.
"""

from __future__ import annotations

import asyncio
import atexit
import io
import logging
import sys
from typing import Any, TextIO

import structlog

#: info and debug lines reach the stream at most this late (like nginx's access_log flush=)
FLUSH_EVERY = 0.5


class LineLogger:
    """Writes rendered events, one per line. Info and debug lines are buffered and flushed
    within ``FLUSH_EVERY`` seconds (and at exit): one write per request was a fifth of the
    request path's cost. Warnings and errors are flushed at once."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._scheduled = False

    def _buffered(self, message: str) -> None:
        self._stream.write(message + "\n")
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (start-up, CLI): nothing would flush later
            self._stream.flush()
            return
        self._scheduled = True
        loop.call_later(FLUSH_EVERY, self.flush)

    def _at_once(self, message: str) -> None:
        self._stream.write(message + "\n")
        self._stream.flush()

    def flush(self) -> None:
        self._scheduled = False
        self._stream.flush()

    debug = info = msg = log = _buffered
    warning = warn = error = err = critical = fatal = exception = failure = _at_once


def _stderr() -> TextIO:
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced stderr (tests): use it as it is
        return sys.stderr
    raw = io.FileIO(fd, "w", closefd=False)
    return io.TextIOWrapper(io.BufferedWriter(raw, 1 << 16), encoding="utf-8", errors="replace")


_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure(fmt: str = "json", level: str = "info") -> None:
    """Configure structlog (and the stdlib loggers aiohttp uses) once per process."""
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=_factory(),
        cache_logger_on_first_use=True,
    )
    # aiohttp logs through the stdlib: keep its noise at warning and route it to stderr.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.CRITICAL)


def _factory() -> Any:
    stream = _stderr()
    logger = LineLogger(stream)
    atexit.register(stream.flush)

    def factory(*_: Any) -> LineLogger:
        return logger

    return factory


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
