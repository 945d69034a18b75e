"""The access event's own renderer (``sidecar.accesslog``) writes exactly what structlog's
chain writes, in both formats, for every value a client or a backend can choose; its JSON
escaper is ``json.dumps(ensure_ascii=True)`` and its console values follow ``log.escape``'s
rules, checked on generated strings (surrogates, controls, separators, bidi marks included).
"""

from __future__ import annotations

import datetime
import io
import json
from typing import Any

import pytest
import structlog
from hypothesis import example, given
from hypothesis import strategies as st

from sidecar import log
from sidecar.accesslog import (
    FIELDS,
    AccessLine,
    _plain,
    console_value,
    json_string,
    json_value,
    milliseconds,
)
from sidecar.loglines import LineLogger

#: every code point, lone surrogates included (hypothesis leaves those out by default)
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()))
#: what the access event's values are: strings (chosen by clients and backends), numbers,
#: booleans and None
VALUE = st.one_of(
    ANY_TEXT,
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
)
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
NOW = 1764892800_000000  # 2025-12-05T00:00:00Z, in microseconds


@given(ANY_TEXT)
@example('"\\\x00\x1f\x7f\x80\u2028\u202e\ud800\U0001f600 \t\n\r\x08\x0c')
def test_json_string_is_json_dumps_ensure_ascii(text: str) -> None:
    assert json_string(text) == json.dumps(text, ensure_ascii=True)
    assert json_string(text).isascii() and json_string(text).isprintable()


@given(
    st.one_of(
        ANY_TEXT,
        st.text(st.characters(max_codepoint=0x7F)),  # ASCII: controls, quotes, backslashes
        st.text("0123456789abcdefABCDEFxyz"),  # letters and digits only: a request id's
        st.text("0123456789abcdef\u00e9\u0660\u00b2"),  # and not ASCII (isalnum's own)
    )
)
@example("")
@example("0bfcc20af97ec25b0000000000000001")
def test_plain_is_what_json_writes_as_it_is(text: str) -> None:
    """``_plain``'s shortcut for letters and digits says what its definition says."""
    written_as_is = json.dumps(text, ensure_ascii=True) == '"' + text + '"'
    assert _plain(text) == written_as_is


@given(VALUE)
def test_json_value_is_json_dumps(value: Any) -> None:
    assert json_value(value) == json.dumps(value, ensure_ascii=True)


@given(
    st.one_of(
        st.floats(),
        st.floats(-2e9, 2e9),
        st.floats(0, 1e5),
        st.floats(0, 2e6),
        st.integers(0, 2_000_000_000).map(lambda n: n / 2000),  # the ties of the thousandths
        st.none(),
    )
)
@example(0.0005)
@example(0.0625)  # 62.5 thousandths exactly: a tie, rounded to even
@example(0.0)
@example(-0.0)
@example(5e-324)
@example(999_999.9995)
@example(0.0015)
@example(-0.0004)
@example(2.0)
@example(999_999_999.9995)
def test_milliseconds_are_rounded_as_round_writes_them(value: float | None) -> None:
    """A duration is written as ``round(value, 3)`` was (by json and by repr), in fewer steps."""
    rounded = round(value, 3) if value is not None else None
    assert milliseconds(value, console=False) == json.dumps(rounded)
    assert milliseconds(value, console=True) == repr(rounded)


def _structlog_console(value: Any) -> str:
    """How the console chain writes ``key=value`` (``log._escape_for_console``, then
    structlog's renderer), cut to the value."""
    event = log._escape_for_console(None, "info", {"event": "e", "key": value})
    line: str = structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0)(None, "info", event)
    return line.split(" key=", 1)[1]


@given(VALUE)
@example("/a\nforged\x1b[2J")
@example("CN=x,O=y z")
@example("it's")
@example("\u2028")
@example("a\\b")
def test_console_value_is_the_console_chains(value: Any) -> None:
    rendered = console_value(value)
    assert rendered == _structlog_console(value)
    assert rendered.isprintable()  # no control, separator or bidi mark reaches a terminal


def _structlog_line(
    console: bool,
    values: tuple[Any, ...],
    context: dict[str, Any],
    timestamp: str = "2025-12-05T00:00:00Z",
) -> str:
    """The line structlog's chain (as ``log.configure`` sets it up) writes for the event."""
    event: Any = dict(zip(FIELDS, values, strict=True))
    for key in ("duration_ms", "upstream_ms"):  # as the gateway rounded them before
        if isinstance(event[key], float):
            event[key] = round(event[key], 3)
    event["event"] = "request"
    for key, value in context.items():  # merge_contextvars: a field of the same name wins
        event.setdefault(key, value)
    event["level"] = "info"
    event["timestamp"] = timestamp
    if console:
        event = log._escape_for_console(None, "info", event)
        return str(structlog.dev.ConsoleRenderer(colors=False)(None, "info", event))
    return str(structlog.processors.JSONRenderer(ensure_ascii=True)(None, "info", event))


@given(
    st.booleans(),
    st.lists(st.tuples(*[VALUE for _ in FIELDS]), min_size=1, max_size=4),
    st.dictionaries(st.sampled_from(["worker", "path", "pod"]), VALUE, max_size=3),
)
def test_the_lines_are_structlogs(
    console: bool, events: list[tuple[Any, ...]], context: dict[str, Any]
) -> None:
    """One writer, several events (each twice: the same objects again, as a connection's
    requests share their certificate's strings), each line what structlog writes."""
    stream = io.StringIO()
    line = AccessLine(console, list(context.items()), LineLogger(stream))
    for values in events:
        for _ in range(2):
            assert line.render(values, NOW) == _structlog_line(console, values, context)
    line.write(events[0])  # no event loop: written at once
    assert stream.getvalue().count("\n") == 1 and stream.getvalue().endswith("\n")


#: a duration as the gateway hands it over: milliseconds, mostly small, now and then odd
DURATION = st.one_of(
    st.floats(0, 5),
    st.floats(0, 2e6),
    st.integers(0, 20_000_000).map(lambda n: n / 2000),  # the ties of the thousandths
    VALUE,
)
#: a request's values as they come: ids and paths mostly printable, sometimes anything
PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)
EVENT = st.tuples(
    st.one_of(PRINTABLE, VALUE),
    st.sampled_from(["127.0.0.1", "2001:db8::1"]),
    st.sampled_from(["GET", "POST"]),
    st.one_of(PRINTABLE, VALUE),
    st.sampled_from([200, 403, 200000, -1]),
    DURATION,
    st.sampled_from(["/", "-", 'a "route"']),
    st.sampled_from(["forwarded", "denied"]),
    st.sampled_from(["", "no_certificate"]),
    st.sampled_from([None, "ok", "\u00e9"]),
    st.sampled_from([None, True]),
    st.one_of(st.none(), PRINTABLE),
    st.one_of(st.none(), PRINTABLE),
    st.one_of(st.none(), PRINTABLE, VALUE),
    st.one_of(st.none(), PRINTABLE),
    st.one_of(st.none(), DURATION),
)


@given(
    st.booleans(),
    st.lists(st.tuples(EVENT, st.integers(NOW, NOW + 3_000_000)), min_size=1, max_size=8),
)
def test_lines_in_a_row_are_structlogs(
    console: bool, events: list[tuple[tuple[Any, ...], int]]
) -> None:
    """Lines as a connection writes them, one after another: each field's last value kept,
    each new one written over it (a printable string as it is, a duration from its tables,
    anything else escaped), the timestamp's microseconds from theirs."""
    context = {"worker": 1}
    line = AccessLine(console, list(context.items()), LineLogger(io.StringIO()))
    for values, now in events:
        stamp = (EPOCH + datetime.timedelta(microseconds=now)).isoformat()
        expected = _structlog_line(console, values, context, stamp.replace("+00:00", "Z"))
        assert line.render(values, now) == expected


def test_a_line_that_cannot_be_written_leaves_nothing_behind() -> None:
    """A value JSON cannot write raises (the gateway makes none). The next line is whole:
    no field of it is left from the line that failed (here the client, written into its
    group before the route raised)."""
    line = AccessLine(False, [("worker", 1)], LineLogger(io.StringIO()))
    first: Any = ("r1", "10.0.0.1", "GET", "/", 200, 1.0, "/", "forwarded", "", *[None] * 7)
    line.render(first, NOW)
    broken = list(first)
    broken[1], broken[6] = "10.0.0.2", {(1,): 1}  # json.dumps: keys must be str
    with pytest.raises(TypeError):
        line.render(tuple(broken), NOW)
    after = list(first)
    after[1], after[6] = "10.0.0.2", "/next"
    assert line.render(tuple(after), NOW) == _structlog_line(False, tuple(after), {"worker": 1})
