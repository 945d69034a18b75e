"""The access event's line: one per request, rendered without structlog's processor chain.

structlog builds a dictionary, runs five processors and ``json.dumps`` for every event: on
the request path that was most of what the access log cost. ``AccessLine`` writes the same
line (the same keys, order, values and escapes, in JSON or the console format) from a tuple
of values in ``FIELDS`` order (durations in milliseconds, unrounded: written rounded to 3
decimals), with the constant parts made once and the timestamp's date and time formatted
once per second. Compiled with mypyc (``setup.py``); ``log``
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
from time import time_ns  # compiled, time.time_ns() reads the attribute each time
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

#: the fields written in milliseconds, rounded to 3 decimals: ``duration_ms``, ``upstream_ms``
_MILLISECONDS: Final = (5, 15)
#: the fields whose value changes with every request: the request id and the durations
_VOLATILE: Final = (0, 5, 15)
#: keys the event itself sets: a context variable of the same name does not reach the line
_RESERVED: Final = frozenset([*FIELDS, "event", "level", "timestamp"])
#: the console format's level and event columns (structlog pads the event to 30)
_CONSOLE_COLUMNS: Final = " [info     ] request                        "
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
    # The common case, a printable ASCII string (_plain says how it is told cheaply).
    if _plain(text):
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


def milliseconds(value: object, console: bool) -> str:
    """A duration field as written: ``round(value, 3)`` in either format. Its ``repr`` is the
    value with 3 decimals, trailing zeros dropped, wherever a thousandth is far above a
    double's resolution and ``repr`` writes no exponent: made from the integer number of
    thousandths below 1e6 (a float formatting cost as much as the rest of the line's
    fields), formatted below 1e9; elsewhere rounded and written."""
    if type(value) is float:
        pair = _duration(value)
        if pair is not None:
            return pair[0] + pair[1]
    if type(value) is float and -1e9 < value < 1e9:
        text = f"{value:.3f}".rstrip("0")
        return text + "0" if text.endswith(".") else text
    if type(value) is float:
        value = round(value, 3)
    return console_value(value) if console else json_value(value)


def access_event(values: tuple[object, ...]) -> dict[str, object]:
    """The access event for structlog (where ``AccessLine`` is not used): its fields by
    name, in order, the durations rounded as ``AccessLine`` writes them."""
    event = dict(zip(FIELDS, values, strict=True))
    for index in _MILLISECONDS:
        value = values[index]
        if type(value) is float:
            event[FIELDS[index]] = round(value, 3)
    return event


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


#: "000" to "999": the thousandths of a duration, the halves of a timestamp's microseconds
_DIGITS3: Final = tuple(str(1000 + n)[1:] for n in range(1000))
#: "0" to "999": a duration's whole milliseconds
_WHOLE: Final = tuple(str(n) for n in range(1000))
#: ".0", ".001" ... ".5" ... ".999": thousandths as ``repr`` ends a rounded float (zeros dropped)
_FRACTIONS: Final = tuple("." + (_DIGITS3[n].rstrip("0") or "0") for n in range(1000))


def _duration(value: float) -> tuple[str, str] | None:
    """A duration as ``milliseconds`` writes it, in two parts taken from tables (whole
    milliseconds, thousandths), or None where it takes the long way."""
    if 0.0 < value < 1e6:  # NaN compares false; -0.0 is not here
        # In integers: the product's error (below 1e9 * 2**-53) cannot move the nearest
        # thousandth unless the fraction sits within it of one half; those go the long way.
        scaled = value * 1000.0
        whole = int(scaled)
        fraction = scaled - whole
        if fraction < 0.499999 or fraction > 0.500001:
            if fraction > 0.5:
                whole += 1
            units = whole // 1000
            return (
                _WHOLE[units] if units < 1000 else str(units),
                _FRACTIONS[whole - units * 1000],
            )
    return None


class Stamps:
    """structlog's ``TimeStamper(fmt="iso", utc=True)``: ISO 8601 in UTC with microseconds
    (none when 0), from the clock's microseconds (``datetime.now`` floors them too); the date
    and time made once per second, the microseconds from a table."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""
        self._dotted = ""

    def at(self, micros: int) -> str:
        """The stamp of ``micros`` microseconds after the epoch."""
        parts = ["", "", ""]
        self.into(parts, 0, micros)
        return "".join(parts) + "Z"

    def into(self, parts: list[str], at: int, micros: int) -> None:
        """The stamp, without its "Z", in ``parts[at:at + 3]``: the date and time, then the
        microseconds in two halves (or nothing), each a string already made."""
        second = micros // 1_000_000
        # the remainder, not micros - second * 1_000_000: compiled, a product of an operand
        # above 2**30 takes the long integers' way (about 800 instructions)
        micro = micros % 1_000_000
        if second != self._second:
            self._second = second
            self._prefix = datetime.datetime.fromtimestamp(second, datetime.UTC).strftime(
                "%Y-%m-%dT%H:%M:%S"
            )
            self._dotted = self._prefix + "."
        if not micro:
            parts[at] = self._prefix
            parts[at + 1] = parts[at + 2] = ""
            return
        thousands = micro // 1000
        parts[at] = self._dotted
        parts[at + 1] = _DIGITS3[thousands]
        parts[at + 2] = _DIGITS3[micro - thousands * 1000]


class AccessLine:
    """Renders access events as ``log``'s structlog set-up would and hands each line to
    ``lines`` to hold. ``context`` is the context variables bound
    before (a worker's index): part of every line, after the fields, as structlog merges
    them (a field of the same name wins; ``event``, ``level`` and ``timestamp`` are the
    event's own, and only ``worker`` is ever bound).

    A line is one ``join`` of a list kept from line to line (``_parts``). The fields that
    change with every request (``_VOLATILE``: the request id, the durations) are three
    strings of it each (what comes before the value, the value, what comes after), and so is
    the timestamp; each run of the other fields is one string, the join of its fields' own
    three strings each (``_groups``), joined again only when one of its values changed. A
    value is written only when it is not the last value of its field (the same object, or
    an equal string or integer): the route's label, the decision, the connection's
    certificate strings and address are not escaped again, and their group not joined
    again. The usual changing values (the request id, a printable string; the durations;
    the timestamp) are written from strings already made, so a line whose other fields did
    not change costs one allocation, its own, and a join of 16 strings (JSON)."""

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
        # Each field shown: its index in FIELDS (-1: a context variable's, constant) and the
        # text before its value. JSON: the fields in order, then "event", the context,
        # "level" and "timestamp" (the tail); console: timestamp, level and event in columns,
        # then every key sorted.
        slots: list[int]
        prefixes: list[str]
        parts: list[str]
        if console:
            names = sorted([*FIELDS, *(key for key, _ in extra)])
            constant = {key: f"{key}={console_value(value)}" for key, value in extra}
            slots = [FIELDS.index(name) if name in FIELDS else -1 for name in names]
            prefixes = [
                ("" if i == 0 else " ") + (name + "=" if name in FIELDS else constant[name])
                for i, name in enumerate(names)
            ]
            # the stamp (3), its "Z" and the columns, then the fields
            parts = ["", "", "", "Z" + _CONSOLE_COLUMNS]
            self._stamp_at = 0
        else:
            slots = list(range(len(FIELDS)))
            prefixes = [
                ("{" if i == 0 else ", ") + json_string(name) + ": "
                for i, name in enumerate(FIELDS)
            ]
            parts = []
        # Where each field's three strings are: in the line's parts (group -1) or in a
        # group's, at this index.
        groups: list[list[str]] = []
        group_at: list[int] = []
        field_group: list[int] = []
        field_at: list[int] = []
        run: list[str] | None = None
        for slot, prefix in zip(slots, prefixes, strict=True):
            if slot in _VOLATILE:
                field_group.append(-1)
                field_at.append(len(parts))
                parts += [prefix, "", ""]
                run = None
                continue
            if run is None:
                run = []
                groups.append(run)
                group_at.append(len(parts))
                parts.append("")
            field_group.append(len(groups) - 1)
            field_at.append(len(run))
            run += [prefix, "", ""]
        for group, at in zip(groups, group_at, strict=True):
            parts[at] = "".join(group)  # a run of context variables alone stays this
        if not console:
            tail = (
                ', "event": "request"'
                + "".join(f", {json_string(key)}: {json_value(value)}" for key, value in extra)
                + ', "level": "info", "timestamp": "'
            )
            self._stamp_at = len(parts) + 1
            parts += [tail, "", "", "", 'Z"}']
        self._slots = slots
        self._prefixes = prefixes
        #: each field's prefix with JSON's opening quote: a printable string goes in as it is
        self._quoted = [prefix + '"' for prefix in prefixes]
        #: the last value each field showed: the reference held here keeps it alive, so no
        #: other object can be taken for it
        self._last: list[object] = [_NOTHING] * len(slots)
        self._parts = parts
        self._groups = groups
        self._group_at = group_at
        self._field_group = field_group
        self._field_at = field_at

    def write(self, values: tuple[object, ...]) -> None:
        self._lines.hold(self.render(values, time_ns() // 1000))

    def render(self, values: tuple[object, ...], micros: int) -> str:
        """The line of an event at ``micros`` microseconds after the epoch."""
        parts = self._parts
        self._stamps.into(parts, self._stamp_at, micros)
        console = self.console
        slots = self._slots
        last = self._last
        groups = self._groups
        field_group = self._field_group
        field_at = self._field_at
        changed = 0  # the groups to join again, a bit each
        try:
            for i in range(len(slots)):
                index = slots[i]
                if index >= 0:
                    value = values[index]
                    old = last[i]
                    # the same object, or an equal string or integer (an address, a path, a
                    # subject, a status again)
                    if value is not old and not (
                        type(value) is type(old)
                        and (type(value) is str or type(value) is int)
                        and value == old
                    ):
                        last[i] = value
                        group = field_group[i]
                        if group < 0:
                            self._show(parts, field_at[i], i, index, value, console)
                        else:
                            self._show(groups[group], field_at[i], i, index, value, console)
                            changed |= 1 << group
        except BaseException:
            # A value JSON cannot write (the gateway makes none): the groups written so far
            # are not joined, so nothing of this line is remembered and the next one writes
            # every field again, none left from this one.
            for i in range(len(last)):
                last[i] = _NOTHING
            raise
        if changed:
            group_at = self._group_at
            for group in range(len(groups)):
                if changed >> group & 1:
                    parts[group_at[group]] = "".join(groups[group])
        line = "".join(parts)
        return line.rstrip(" ") if console else line

    def _show(
        self, parts: list[str], at: int, i: int, index: int, value: object, console: bool
    ) -> None:
        """Writes ``value``, field ``index``'s, into ``parts[at:at + 3]``."""
        if type(value) is float and index in _MILLISECONDS:
            pair = _duration(value)
            if pair is not None:
                parts[at] = self._prefixes[i]
                parts[at + 1] = pair[0]
                parts[at + 2] = pair[1]
                return
        if type(value) is str and (console or _plain(value)):
            parts[at] = self._quoted[i] if not console else self._prefixes[i]
            parts[at + 1] = value if not console else console_value(value)
            parts[at + 2] = '"' if not console else ""
            return
        if index in _MILLISECONDS:
            text = milliseconds(value, console)
        else:
            text = console_value(value) if console else json_value(value)
        parts[at] = self._prefixes[i]
        parts[at + 1] = text
        parts[at + 2] = ""


def _plain(text: str) -> bool:
    """Whether JSON writes ``text`` as it is, between quotes. Letters and digits only, the
    usual case (a request id), are told from the ASCII bytes' own table (``bytes.isalnum``,
    a few instructions a character, where ``str.isprintable`` looks each character up in
    the Unicode database: about 1,500 instructions for a request id)."""
    if not text.isascii():  # a flag of the string: no pass over it
        return False
    if text.encode("ascii").isalnum():
        return True
    return text.isprintable() and '"' not in text and "\\" not in text
