"""Logging set-up: structlog, JSON lines by default, a readable console format for people.

Secrets never reach a log event: the request path logs certificate serial, fingerprint and
subject, never the certificate, a key or the ``X-USERINFO`` value.

Clients choose much of what is logged (a decoded path, a backend's reason), so no format
lets them start a line or speak to a terminal: JSON escapes every control and non-ASCII
character (``ensure_ascii``, in the access event's own writer too), and the console format
and the standard library's loggers write them as escapes (``escape``): C0 and C1 controls,
DEL, line and paragraph separators, bidirectional overrides, and the backslash itself. Only
a traceback keeps its line breaks.
"""

from __future__ import annotations

import asyncio
import atexit
import datetime
import io
import json
import logging
import math
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import structlog

#: info and debug lines reach the stream at most this late (like nginx's access_log flush=)
FLUSH_EVERY = 0.5
#: ... or as soon as this many are held (about 0.5 MiB of access events)
HOLD_LINES = 1024
#: the most one write(2) of held lines carries: POSIX's smallest PIPE_BUF (Linux: 4096)
ATOMIC_WRITE = 4096


class LineLogger:
    """Writes rendered events, one per line. Info and debug lines are held and written
    together within ``FLUSH_EVERY`` seconds (or once ``HOLD_LINES`` are held, and at exit):
    one write per request was a fifth of the request path's cost, and one text-stream write
    per line still about 5 us. Warnings and errors are written at once, after what is held."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._held: list[str] = []
        self._scheduled = False

    def _buffered(self, message: str) -> None:
        held = self._held
        held.append(message)
        if len(held) >= HOLD_LINES:
            self.flush()
            return
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (start-up, CLI): nothing would flush later
            self.flush()
            return
        self._scheduled = True
        loop.call_later(FLUSH_EVERY, self._on_timer)

    def _at_once(self, message: str) -> None:
        self._held.append(message)
        self.flush()

    def _on_timer(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        """Write what is held, in whole lines of at most ``ATOMIC_WRITE`` characters per write
        (bytes, for JSON lines: they are ASCII). Workers share stderr, and a pipe keeps such
        a write in one piece (PIPE_BUF), so the lines of two workers never interleave
        mid-line; a longer line goes alone."""
        held, self._held = self._held, []
        stream = self._stream
        chunk: list[str] = []
        size = 0
        for line in held:
            if chunk and size + len(line) >= ATOMIC_WRITE:
                chunk.append("")  # the last line's end
                stream.write("\n".join(chunk))
                stream.flush()
                chunk, size = [], 0
            chunk.append(line)
            size += len(line) + 1
        if chunk:
            chunk.append("")
            stream.write("\n".join(chunk))
        stream.flush()

    debug = info = msg = log = _buffered
    warning = warn = error = err = critical = fatal = exception = failure = _at_once


def _stderr() -> TextIO:
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced stderr (tests): use it as it is
        return sys.stderr
    raw = io.FileIO(fd, "w", closefd=False)
    return io.TextIOWrapper(io.BufferedWriter(raw, 1 << 16), encoding="utf-8", errors="replace")


_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def escape(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every character Python does not call printable (controls, DEL, C1,
    U+2028/2029, bidi and other format characters, non-ASCII spaces) and the backslash
    written as an escape (``\\n``, ``\\x1b``, ``\\u2028``), so it is one line that
    shows what was there; ``keep_newlines`` leaves LF (a traceback's own lines)."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for char in text:
        if (char.isprintable() and char != "\\") or (char == "\n" and keep_newlines):
            out.append(char)
        elif char in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[char])
        else:
            code = ord(char)
            out.append(
                f"\\x{code:02x}"
                if code < 0x100
                else f"\\u{code:04x}"
                if code < 0x10000
                else f"\\U{code:08x}"
            )
    return "".join(out)


class _Quoted:
    """A value the console shows as Python writes a string: quoted, controls escaped (as
    structlog shows a value with spaces)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return repr(self.text)


def _escape_for_console(
    _: Any, __: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Before the console renderer, which writes a string value as it is unless it holds a
    space, a quote, "=" or CR/LF (structlog 25+; 24: always): no other control gets there
    raw. Other values it writes with repr, which escapes them already."""
    for key, value in event.items():
        if isinstance(value, str) and not value.isprintable():
            if key == "event":
                event[key] = escape(value)
            elif key == "exception":
                event[key] = escape(value, keep_newlines=True)
            else:
                event[key] = _Quoted(value)
    return event


class EscapingFormatter(logging.Formatter):
    """For the standard library's loggers (aiohttp's): the message escaped; a traceback keeps
    its lines, not its other controls."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return escape(super().formatException(ei), keep_newlines=True)


_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure(fmt: str = "json", level: str = "info") -> None:
    """Configure structlog (and the stdlib loggers aiohttp uses) once per process."""
    global _access_json, _line_logger
    _access_json = fmt == "json" and _LEVELS[level] <= logging.INFO
    _line_logger = None
    last: list[Any]
    if fmt == "console":
        last = [_escape_for_console, structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    else:
        # ensure_ascii (json's default): every control and non-ASCII character escaped
        last = [structlog.processors.JSONRenderer(ensure_ascii=True)]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            *last,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=_factory(),
        cache_logger_on_first_use=True,
    )
    # aiohttp logs through the stdlib: keep its noise at warning and route it to stderr.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter("%(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("aiohttp.access").setLevel(logging.CRITICAL)


def _factory() -> Any:
    global _line_logger
    stream = _stderr()
    logger = _line_logger = LineLogger(stream)
    atexit.register(logger.flush)

    def factory(*_: Any) -> LineLogger:
        return logger

    return factory


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


# ---- the access event: one per request, rendered without structlog's processor chain --------

#: the fields of the access event, in the order they are logged
ACCESS_FIELDS = (
    "request_id",
    "client",
    "method",
    "path",
    "status",
    "duration_ms",
    "route",
    "decision",
    "reason",
    "verdict",
    "stale",
    "cert_serial",
    "cert_sha256",
    "cert_subject",
    "sub",
    "upstream_ms",
)
_access_json = False
_line_logger: LineLogger | None = None
_encode_str: Callable[[str], str] = json.encoder.encode_basestring_ascii
_KEYS = tuple(f'"{name}": ' for name in ACCESS_FIELDS)


def access_writer() -> Callable[[tuple[Any, ...]], None] | None:
    """A writer of access events (values in ``ACCESS_FIELDS`` order) that renders the same JSON
    line structlog would (same keys, order, values, timestamp and context variables) at a
    fraction of the cost, or None when logs are not JSON at info level (use structlog then).

    Context variables bound before this call (a worker's index) are part of every event."""
    logger = _line_logger
    if not _access_json or logger is None:
        return None
    extra = "".join(
        f", {_encode_str(str(key))}: {_json(value)}"
        for key, value in structlog.contextvars.get_contextvars().items()
    )
    tail = f', "event": "request"{extra}, "level": "info", "timestamp": '
    write = logger.info
    keys = _KEYS

    def access(values: tuple[Any, ...]) -> None:
        body = ", ".join([key + _json(value) for key, value in zip(keys, values, strict=True)])
        write(f'{{{body}{tail}"{_timestamp()}"}}')

    return access


def _json(value: Any) -> str:
    if value is None:
        return "null"
    kind = type(value)
    if kind is str:
        return _encode_str(value)
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return int.__repr__(value)
    if kind is float and math.isfinite(value):
        return float.__repr__(value)
    return json.dumps(value, default=repr)


_stamp_second = -1
_stamp_prefix = ""


def _timestamp() -> str:
    """structlog's TimeStamper(fmt="iso", utc=True): ISO 8601 in UTC, microseconds unless 0."""
    global _stamp_second, _stamp_prefix
    now = time.time()
    second = int(now)
    micro = round((now - second) * 1_000_000)
    if micro >= 1_000_000:
        second, micro = second + 1, 0
    if second != _stamp_second:
        _stamp_second = second
        _stamp_prefix = datetime.datetime.fromtimestamp(second, datetime.UTC).strftime(
            "%Y-%m-%dT%H:%M:%S"
        )
    return f"{_stamp_prefix}.{micro:06d}Z" if micro else f"{_stamp_prefix}Z"
