"""Logging set-up: structlog, JSON lines by default, a readable console format for people.

Secrets never reach a log event: the request path logs certificate serial, fingerprint and
subject, never the certificate, a key or the ``X-USERINFO`` value.

Clients choose much of what is logged (a decoded path, a backend's reason), so no format
lets them start a line or speak to a terminal: JSON escapes every control and non-ASCII
character (``ensure_ascii``; ``accesslog``'s escaper for the access event, the same), and the
console format and the standard library's loggers write them as escapes (``escape``): C0 and
C1 controls, DEL, line and paragraph separators, bidirectional overrides, and the backslash
itself. Only a traceback keeps its line breaks.

The access event, one per request, is rendered by ``accesslog`` (compiled) in either format,
and every other event by structlog; ``access_writer`` chooses at configure time.
"""

from __future__ import annotations

import asyncio
import atexit
import io
import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from .accesslog import FIELDS, AccessLine

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
    global _access_format, _console_colors, _line_logger, _renderers
    _access_format = fmt if _LEVELS[level] <= logging.INFO else None
    _line_logger = None
    last: list[Any]
    if fmt == "console":
        _console_colors = sys.stderr.isatty()
        last = [_escape_for_console, structlog.dev.ConsoleRenderer(colors=_console_colors)]
    else:
        # ensure_ascii (json's default): every control and non-ASCII character escaped
        last = [structlog.processors.JSONRenderer(ensure_ascii=True)]
    _renderers = last
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
ACCESS_FIELDS = FIELDS
#: the format of the access event's own writer: None when logs are not at info level
_access_format: str | None = None
_console_colors = False
#: the processors that render an event once it has its level and timestamp
_renderers: list[Any] = []
_line_logger: LineLogger | None = None


def access_writer() -> AccessLine | None:
    """A writer of access events (values in ``ACCESS_FIELDS`` order) that renders the same
    line structlog would (same keys, order, values, escapes, timestamp and context variables)
    at a fraction of the cost (``accesslog``), or None where it would not: logs above info
    level, or a console format that differs (colours on a terminal; a structlog whose console
    renderer writes values otherwise): use structlog then.

    Context variables bound before this call (a worker's index) are part of every event."""
    logger = _line_logger
    if _access_format is None or logger is None:
        return None
    context = list(structlog.contextvars.get_contextvars().items())
    console = _access_format == "console"
    writer = AccessLine(console, context, logger.info)
    if console and (_console_colors or not _console_agrees(writer, context)):
        return None
    return writer


#: values a console line is checked with before its own writer is used: each way of showing one
_PROBE = (
    "r-1",
    "2001:db8::1",
    "GET",
    "/a b/\\x'\"=\n\x1b\u2028\u00e9",
    200,
    1.5,
    "/",
    "forwarded",
    "",
    None,
    True,
    "0a",
    "ab",
    "CN=x,O=y z",
    "s-1",
    0.25,
)


def _console_agrees(writer: AccessLine, context: list[tuple[str, Any]]) -> bool:
    """Whether ``writer`` writes the probe event as the configured structlog chain does."""
    event: Any = dict(context)
    event.update(zip(ACCESS_FIELDS, _PROBE, strict=True))
    event["event"] = "request"
    event["level"] = "info"
    now = 1764892800.25
    event["timestamp"] = writer.render(_PROBE, now).split(" ", 1)[0]
    try:
        for processor in _renderers:
            event = processor(None, "info", event)
    except Exception:  # a renderer this module does not know: structlog renders, then
        return False
    return bool(event == writer.render(_PROBE, now))  # the renderer's line
