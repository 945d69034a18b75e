"""The access event's own renderer writes exactly the line structlog would."""

from __future__ import annotations

import datetime
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from sidecar import log, loglines
from sidecar.accesslog import Stamps

VALUES = (
    "r-1",
    "2001:db8::1",
    "GET",
    '/caf\u00e9/"quoted"\n\\',
    200,
    1.5,
    "/",
    "forwarded",
    "allowed",
    "allow",
    True,
    "0a1b",
    "ab" * 32,
    "CN=Zo\u00eb \u2603,O=Example",
    None,
    0.001,
)


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    out = io.StringIO()
    monkeypatch.setattr(log, "_stderr", lambda: out)
    # configure() sets these: restored afterwards, so later tests log through structlog again
    monkeypatch.setattr(log, "_access_format", None)
    monkeypatch.setattr(log, "_line_logger", None)
    log.configure("json", "info")
    structlog.contextvars.bind_contextvars(worker=2)
    yield out
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def test_access_event_matches_structlog(captured: io.StringIO) -> None:
    access = log.access_writer()
    assert access is not None
    log.get_logger("sidecar").info("request", **dict(zip(log.ACCESS_FIELDS, VALUES, strict=True)))
    access.write(VALUES)
    assert log._line_logger is not None
    log._line_logger.flush()
    ours, theirs = (json.loads(line) for line in reversed(captured.getvalue().splitlines()))
    ours_text, theirs_text = captured.getvalue().splitlines()[::-1]
    # Same keys in the same order, same values; the timestamps differ by the time between.
    assert list(ours) == list(theirs)
    assert ours.pop("timestamp").endswith("Z") and theirs.pop("timestamp").endswith("Z")
    assert ours == theirs
    assert ours["worker"] == 2 and ours["path"] == VALUES[3]
    # Byte for byte once the timestamps are set aside.
    assert ours_text.rsplit('"timestamp"', 1)[0] == theirs_text.rsplit('"timestamp"', 1)[0]


MICROSECOND = datetime.timedelta(microseconds=1)


@pytest.mark.parametrize("micro", [0, 1, 999_999, 500_000])
def test_timestamp_is_structlogs_iso_utc(micro: int, monkeypatch: pytest.MonkeyPatch) -> None:
    instant = datetime.datetime(2026, 11, 25, 21, 0, 7, micro, tzinfo=datetime.UTC)
    expected = instant.isoformat().replace("+00:00", "Z")  # what TimeStamper(fmt="iso") writes
    micros = (instant - datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)) // MICROSECOND
    stamps = Stamps()
    assert stamps.at(micros) == expected
    assert stamps.at(micros) == expected  # and again, from the second's cache


def test_no_writer_above_info_or_with_colours(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log, "_stderr", io.StringIO)
    monkeypatch.setattr(log, "_access_format", None)
    monkeypatch.setattr(log, "_line_logger", None)
    try:
        log.configure("console", "info")
        writer = log.access_writer()
        assert writer is not None and writer.console  # stderr is no terminal here
        log.configure("json", "warning")
        assert log.access_writer() is None
        log.configure("console", "info")
        monkeypatch.setattr(log, "_console_colors", True)  # a terminal: structlog's colours
        assert log.access_writer() is None
    finally:
        structlog.reset_defaults()


class _Recorder(io.StringIO):
    """A text stream that records what each flush() pushed out (one write(2) each)."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []
        self._mark = 0

    def flush(self) -> None:
        value = self.getvalue()
        if len(value) > self._mark:
            self.flushed.append(value[self._mark :])
            self._mark = len(value)


def test_held_lines_go_out_whole_in_pipe_atomic_writes() -> None:
    stream = _Recorder()
    logger = log.LineLogger(stream)
    lines = [f'{{"n": {i}, "pad": "{"x" * (i % 700)}"}}' for i in range(300)]
    lines.insert(150, "y" * 9000)  # longer than one atomic write: it goes alone
    for line in lines:
        logger.info(line)  # no event loop here: written at once...
    assert stream.getvalue() == "".join(line + "\n" for line in lines)
    held = log.LineLogger(stream2 := _Recorder())
    held._held = list(lines)  # ... so hold them as a running loop would, then flush once
    held.flush()
    assert "".join(stream2.flushed) == "".join(line + "\n" for line in lines)
    assert len(stream2.flushed) > 1
    for write in stream2.flushed:
        assert write.endswith("\n"), "a write ended mid-line"
        assert len(write) <= log.ATOMIC_WRITE or write.count("\n") == 1
    # a warning goes out at once, after what was held before it
    held._held = ["first"]
    held.warning("second")
    assert stream2.getvalue().endswith("first\nsecond\n")


def test_a_regular_file_takes_larger_writes_a_pipe_atomic_ones(tmp_path: Path) -> None:
    """stderr redirected to a file gets writes of up to 64 KiB (a local file system takes
    each whole); a pipe, a terminal or a stream with no file keeps PIPE_BUF's 4 KiB."""
    lines = [f'{{"n": {i}, "pad": "{"x" * 300}"}}' for i in range(1000)]
    with open(tmp_path / "log", "w") as file:
        logger = log.LineLogger(file)
        assert logger._write_size == loglines.FILE_WRITE
        logger._held = list(lines)
        logger.flush()
    assert (tmp_path / "log").read_text() == "".join(line + "\n" for line in lines)
    read, write = os.pipe()
    with open(read, "rb"), open(write, "w") as pipe:
        assert log.LineLogger(pipe)._write_size == log.ATOMIC_WRITE
    assert log.LineLogger(io.StringIO())._write_size == log.ATOMIC_WRITE
    recorder = _Recorder()
    held = log.LineLogger(recorder)
    held._write_size = loglines.FILE_WRITE
    held._held = list(lines)
    held.flush()
    assert [len(write) for write in recorder.flushed[:-1]] == [
        len(write) for write in recorder.flushed[:-1] if 60_000 < len(write) <= 65536
    ]
    assert "".join(recorder.flushed) == "".join(line + "\n" for line in lines)


def test_lines_are_held_until_the_flush_or_the_bound() -> None:
    stream = _Recorder()
    logger = log.LineLogger(stream)
    logger._scheduled = True  # as if a flush were already due on the loop
    line = "x" * 99  # 100 characters with its end of line
    count = log.HOLD_SIZE // 100  # 655 lines: just below the bound
    for _ in range(count):
        logger.info(line)
    assert stream.getvalue() == ""
    logger.info(line)  # the one that reaches HOLD_SIZE
    assert stream.getvalue().count("\n") == count + 1
    logger.info("held again")
    assert stream.getvalue().count("\n") == count + 1


def test_no_console_writer_where_structlog_would_write_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A structlog whose console renderer lays a line out otherwise (structlog 24 quoted no
    value; another padding) keeps the console's access events on structlog: the writer is
    checked against the configured chain before it is used."""
    monkeypatch.setattr(log, "_stderr", io.StringIO)
    monkeypatch.setattr(log, "_access_format", None)
    monkeypatch.setattr(log, "_line_logger", None)
    try:
        log.configure("console", "info")
        assert log.access_writer() is not None
        other = structlog.dev.ConsoleRenderer(colors=False, pad_event_to=12)
        monkeypatch.setattr(log, "_renderers", [log._escape_for_console, other])
        assert log.access_writer() is None
    finally:
        structlog.reset_defaults()
