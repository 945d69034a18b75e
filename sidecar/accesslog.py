"""The access event's line: one per request, rendered without structlog's processor chain.

structlog builds a dictionary, runs five processors and ``json.dumps`` for every event: on
the request path that was most of what the access log cost. ``AccessLine`` writes the same
line (the same keys, order, values and escapes, in JSON or the console format) from a tuple
of values in ``FIELDS`` order, with the constant parts made once and the timestamp's
date and time formatted once per second. Compiled with mypyc (``setup.py``); ``log``
chooses it at configure time and keeps structlog for every other event.

The JSON escaper is as strict as ``json.dumps(ensure_ascii=True)`` (the same output for every
string: every control and non-ASCII character, the quote and the backslash escaped); the
console one writes a value as structlog's console renderer does after ``log.escape``'s rules:
quoted with Python's ``repr`` (controls escaped) when it holds a control, a space, a quote or
"=". ``tests/test_accesslog.py`` checks both against those implementations on generated
strings.
"""

from __future__ import annotations

import datetime
import json
import math
import time
from typing import Final

from .loglines import LineLogger

#: the fields of the access event, in the order they are logged (JSON)
FIELDS: Final = (
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

#: keys the event itself sets: a context variable of the same name does not reach the line
_RESERVED: Final = frozenset([*FIELDS, "event", "level", "timestamp"])
_HEX: Final = "0123456789abcdef"
#: no value of any event: what ``AccessLine`` remembers before the first
_NOTHING: Final = object()
#: json's short escapes; every other control is written \u00XX
_JSON_SHORT: Final = {
    '"': '\\"',
    "\\": "\\\\",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\b": "\\b",
    "\f": "\\f",
}
#: what makes structlog's console renderer quote a printable string
_CONSOLE_QUOTED: Final = (" ", "=", '"', "'")


def _u4(code: int) -> str:
    return (
        "\\u"
        + _HEX[(code >> 12) & 15]
        + _HEX[(code >> 8) & 15]
        + _HEX[(code >> 4) & 15]
        + _HEX[code & 15]
    )


def json_string(text: str) -> str:
    """``text`` as ``json.dumps(text, ensure_ascii=True)`` writes it: quoted, with the quote,
    the backslash, every control (DEL included) and every non-ASCII character escaped
    (beyond U+FFFF as a surrogate pair)."""
    # The common case, a printable ASCII string (isascii is a flag, isprintable one pass).
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return '"' + text + '"'
    out: list[str] = ['"']
    for char in text:
        code = ord(char)
        if 0x20 <= code < 0x7F and char != '"' and char != "\\":
            out.append(char)
        elif char in _JSON_SHORT:
            out.append(_JSON_SHORT[char])
        elif code < 0x10000:
            out.append(_u4(code))
        else:
            code -= 0x10000
            out.append(_u4(0xD800 | (code >> 10)))
            out.append(_u4(0xDC00 | (code & 0x3FF)))
    out.append('"')
    return "".join(out)


def json_value(value: object) -> str:
    """A value of the access event as structlog's JSON renderer writes it."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return json_string(value)
    if value is True:
        return "true"
    if value is False:
        return "false"
    if type(value) is int:
        return str(value)
    if type(value) is float and math.isfinite(value):
        return repr(value)
    # anything else (not on the request path): as structlog would, through json
    return json.dumps(value, default=repr)


def console_value(value: object) -> str:
    """A value as the console format writes it (``log._escape_for_console``, then structlog's
    ``ConsoleRenderer``): a string as it is, unless it holds a control or anything Python
    does not call printable (then ``repr``, escaped), a space, a quote or "=" (``repr``);
    any other value with ``repr``."""
    if isinstance(value, str):
        if not value.isprintable():
            return repr(value)
        for char in _CONSOLE_QUOTED:
            if char in value:
                return repr(value)
        return value
    return repr(value)


class Stamps:
    """structlog's ``TimeStamper(fmt="iso", utc=True)``: ISO 8601 in UTC with microseconds
    (none when 0), the date and time made once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def at(self, now: float) -> str:
        second = int(now)
        micro = round((now - second) * 1_000_000)
        if micro >= 1_000_000:
            second, micro = second + 1, 0
        if second != self._second:
            self._second = second
            self._prefix = datetime.datetime.fromtimestamp(second, datetime.UTC).strftime(
                "%Y-%m-%dT%H:%M:%S"
            )
        if not micro:
            return self._prefix + "Z"
        digits = str(micro)
        return self._prefix + "." + "0" * (6 - len(digits)) + digits + "Z"


class AccessLine:
    """Renders access events as ``log``'s structlog set-up would and hands each line to
    ``lines`` to hold. ``context`` is the context variables bound
    before (a worker's index): part of every line, after the fields, as structlog merges
    them (a field of the same name wins; ``event``, ``level`` and ``timestamp`` are the
    event's own, and only ``worker`` is ever bound)."""

    def __init__(
        self,
        console: bool,
        context: list[tuple[str, object]],
        lines: LineLogger,
    ) -> None:
        self.console = console
        self._lines = lines
        self._stamps = Stamps()
        extra = [(key, value) for key, value in context if key not in _RESERVED]
        # JSON: the fields in order, then "event", the context, "level", "timestamp"
        self._keys = [
            ("{" if i == 0 else ", ") + json_string(n) + ": " for i, n in enumerate(FIELDS)
        ]
        self._tail = (
            ', "event": "request"'
            + "".join(f", {json_string(key)}: {json_value(value)}" for key, value in extra)
            + ', "level": "info", "timestamp": "'
        )
        # console: timestamp, level and event in columns, then every key sorted; each key's
        # place among the fields (-1: a context variable's, made once)
        names = sorted([*FIELDS, *(key for key, _ in extra)])
        constant = {key: f"{key}={console_value(value)}" for key, value in extra}
        self._order = [FIELDS.index(name) if name in FIELDS else -1 for name in names]
        self._labels = [
            ("" if i == 0 else " ") + (name + "=" if name in FIELDS else constant[name])
            for i, name in enumerate(names)
        ]
        self._last: list[object] = [_NOTHING] * len(FIELDS)
        self._shown: list[str] = [""] * len(FIELDS)

    def write(self, values: tuple[object, ...]) -> None:
        self._lines.hold(self.render(values, time.time()))

    def render(self, values: tuple[object, ...], now: float) -> str:
        stamp = self._stamps.at(now)
        if self.console:
            return self._console(values, stamp)
        out: list[str] = []
        keys = self._keys
        for i in range(len(keys)):
            out.append(keys[i])
            out.append(self._value(i, values[i]))
        out.append(self._tail)
        out.append(stamp)
        out.append('"}')
        return "".join(out)

    def _console(self, values: tuple[object, ...], stamp: str) -> str:
        out: list[str] = [stamp, " [info     ] request                        "]
        order = self._order
        labels = self._labels
        for i in range(len(order)):
            out.append(labels[i])
            index = order[i]
            if index >= 0:
                out.append(self._value(index, values[index]))
        return "".join(out).rstrip(" ")

    def _value(self, index: int, value: object) -> str:
        """The field's value as written; the last one of each field is kept, so that the same
        object as the last request's (the route's label, the decision, the connection's
        certificate and address) is not escaped again. It is kept alive by the reference
        held here, so no other object can be taken for it; strings are immutable."""
        if value is self._last[index]:
            return self._shown[index]
        shown = console_value(value) if self.console else json_value(value)
        self._last[index] = value
        self._shown[index] = shown
        return shown
