"""Forged log lines: what a client sends must never start a line of the sidecar's log.

A path with ``%0a`` is decoded for the access event: in the console format that wrote a line
of the client's making. Requests go through real TLS to a sidecar whose logging is set up
as ``sidecar run`` sets it up (``log.configure``), in both formats, on the listener's path
and on aiohttp's; the log is read back as written.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Callable, Iterator

import pytest
import structlog

from sidecar import log

from .conftest import ConfigDir, Running, SidecarFactory, Upstream
from .test_listener import read_response

#: (target, decoded path, how the console line must show it: quoted and escaped, as Python
#: writes a string, and as structlog shows values with spaces): LF and CR (the issue's;
#: structlog >= 25 quotes such values, 24 wrote them as they were); ESC (a terminal colour),
#: U+2028 and NEL (line breaks to Python's splitlines and to some log viewers) alone, which
#: no structlog version quotes; a tab, and a backslash to keep the escapes unambiguous
TARGETS = [
    (
        "/public/a%0aforged%0d%1b[31mred%09z%5cw",
        "/public/a\nforged\r\x1b[31mred\tz\\w",
        "path='/public/a\\nforged\\r\\x1b[31mred\\tz\\\\w'",
    ),
    (
        "/public/a%1b[2Jb%e2%80%a8forged%c2%85y",
        "/public/a\x1b[2Jb\u2028forged\x85y",
        "path='/public/a\\x1b[2Jb\\u2028forged\\x85y'",
    ),
]


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], io.StringIO]]:
    """``log.configure`` writing to a string (and restored afterwards)."""
    out = io.StringIO()
    monkeypatch.setattr(log, "_stderr", lambda: out)
    monkeypatch.setattr(log, "_access_format", None)
    monkeypatch.setattr(log, "_line_logger", None)

    def configure(fmt: str) -> io.StringIO:
        log.configure(fmt, "info")
        # Loggers made now must not keep this set-up for the tests after this one.
        structlog.configure(cache_logger_on_first_use=False)
        return out

    yield configure
    structlog.reset_defaults()


async def send(running: Running, method: str, target: str) -> int:
    body = b"x" if method == "POST" else b""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", running.sidecar.port, ssl=running.client_ssl(), server_hostname="localhost"
    )
    try:
        head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        if body:
            head += f"Content-Length: {len(body)}\r\n"
        writer.write((head + "\r\n").encode() + body)
        async with asyncio.timeout(10):
            return (await read_response(reader, method)).status
    finally:
        writer.close()


def written(out: io.StringIO) -> list[str]:
    assert log._line_logger is not None
    log._line_logger.flush()
    # splitlines: every line break a reader may honour (\r, \x85, \u2028, ...), not only \n
    return out.getvalue().splitlines()


@pytest.mark.parametrize(("target", "decoded", "shown"), TARGETS, ids=["crlf", "esc-u2028"])
@pytest.mark.parametrize("method", ["GET", "POST"], ids=["listener", "aiohttp"])
@pytest.mark.parametrize("fmt", ["console", "json"])
async def test_control_characters_in_the_path_cannot_forge_a_log_line(
    logs: Callable[[str], io.StringIO],
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
    fmt: str,
    method: str,
    target: str,
    decoded: str,
    shown: str,
) -> None:
    out = logs(fmt)
    running = await start_sidecar(config_dir.base(upstream.port))
    written(out)
    out.seek(0)
    out.truncate()
    assert await send(running, method, target) == 400  # refused, and logged
    lines = written(out)
    assert len(lines) == 1, lines
    [line] = lines
    assert line.isprintable(), repr(line)
    if fmt == "json":
        event = json.loads(line)
        assert event["event"] == "request" and event["path"] == decoded
    else:
        assert shown in line, line


def test_every_value_of_a_console_event_is_escaped(
    logs: Callable[[str], io.StringIO],
) -> None:
    out = logs("console")
    structlog.get_logger("t").warning(
        "odd\nevent",
        reason="a\r\nb",
        items=["x\ny"],
        raw=b"\x1b",
        number=3,
        flag=None,
    )
    [line] = written(out)
    assert line.isprintable(), repr(line)
    assert "odd\\nevent" in line and "reason='a\\r\\nb'" in line and "number=3" in line


def test_a_traceback_keeps_its_lines_but_not_its_controls(
    logs: Callable[[str], io.StringIO],
) -> None:
    out = logs("console")
    try:
        raise ValueError("bad\x1b[2Jvalue\rforged")
    except ValueError as exc:
        structlog.get_logger("t").error("failed", exc_info=exc)
    text = out.getvalue()
    assert "\x1b" not in text and "\r" not in text
    assert "Traceback" in text and text.count("\n") > 2  # still readable, line by line


def test_the_stdlib_loggers_lines_are_escaped(logs: Callable[[str], io.StringIO]) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(log.EscapingFormatter("%(message)s"))
    logger = logging.getLogger("aiohttp.test-escaping")
    logger.addHandler(handler)
    try:
        logger.warning("peer said %s", "x\ny\x1b")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "peer said x\\ny\\x1b\n"
