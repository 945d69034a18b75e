"""Logging set-up: structlog, JSON lines by default, a readable console format for people.

Secrets never reach a log event: the request path logs certificate serial, fingerprint and
subject, never the certificate, a key or the ``X-USERINFO`` value.

Clients choose much of what is logged (a decoded path, a backend's reason), so no format
lets them start a line or speak to a terminal: JSON escapes every control and non-ASCII
character (``ensure_ascii``; ``accesslog``'s escaper for the access event, the same), and the
console format and the standard library's loggers write them as escapes (``escape``): C0 and
C1 controls, DEL, line and paragraph separators, bidirectional overrides, and the backslash
itself. Only a traceback keeps its line breaks.

The access event, one per request, is rendered by ``accesslog`` in either format, every
other event by structlog; ``access_writer`` chooses at configure time. ``loglines`` holds and
writes the lines. Both are compiled (``setup.py``); this module is not on the request path.
"""

from __future__ import annotations

import atexit
import io
import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from .accesslog import FIELDS, AccessLine, access_event
from .loglines import ATOMIC_WRITE as ATOMIC_WRITE
from .loglines import FLUSH_EVERY as FLUSH_EVERY
from .loglines import HOLD_SIZE as HOLD_SIZE
from .loglines import LineLogger as LineLogger


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
    writer = AccessLine(console, context, logger)
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
    1.23456,
    "/",
    "forwarded",
    "",
    None,
    True,
    "0a",
    "ab",
    "CN=x,O=y z",
    "s-1",
    0.2500001,
)


def _console_agrees(writer: AccessLine, context: list[tuple[str, Any]]) -> bool:
    """Whether ``writer`` writes the probe event as the configured structlog chain does."""
    event: Any = dict(context)
    event.update(access_event(_PROBE))
    event["event"] = "request"
    event["level"] = "info"
    now = 1764892800_250000  # microseconds
    event["timestamp"] = writer.render(_PROBE, now).split(" ", 1)[0]
    try:
        for processor in _renderers:
            event = processor(None, "info", event)
    except Exception:  # a renderer this module does not know: structlog renders, then
        return False
    return bool(event == writer.render(_PROBE, now))  # the renderer's line
