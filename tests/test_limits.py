"""Hostile clients: oversized heads, slow heads, ambiguous framing, too many connections."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from typing import Any

import pytest

from .conftest import ConfigDir, Running, SidecarFactory, Upstream
from .pki import Issued


async def raw_exchange(
    running: Running, payload: bytes, who: Issued | None = None, *, timeout: float = 5
) -> bytes:
    """Send raw bytes over TLS, read until the server closes or answers one response."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", running.sidecar.port, ssl=running.client_ssl(who), server_hostname="localhost"
    )
    try:
        writer.write(payload)
        await writer.drain()
        data = b""
        async with asyncio.timeout(timeout):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                data += chunk
                if b"\r\n\r\n" in data and _complete(data):
                    break
        return data
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def status_of(response: bytes) -> int:
    assert response[:9] in (b"HTTP/1.1 ", b"HTTP/1.0 "), response[:200]
    return int(response[9:12])


@pytest.fixture
async def limited(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> Running:
    data = config_dir.base(upstream.port)
    data["limits"] = {
        "max_request_line": 1024,
        "max_header_line": 2048,
        "max_headers": 20,
        "max_header_block": 4096,
        "header_timeout": "1s",
        "keepalive_timeout": "2s",
        "max_body_size": 1000,
        "max_connections": 50,
    }
    running: Running = await start_sidecar(data)
    return running


def request(path: str = "/public/x", *extra: str, body: bytes = b"") -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: localhost", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def test_header_block_too_large_is_431(limited: Running, upstream: Upstream) -> None:
    extra = [f"X-Filler-{i}: {'a' * 400}" for i in range(15)]  # each line fine, together > 4096
    response = await raw_exchange(limited, request("/public/x", *extra))
    assert status_of(response) == 431
    assert b"X-Request-ID" in response
    assert upstream.seen == []


async def test_one_header_too_long_is_431(limited: Running, upstream: Upstream) -> None:
    response = await raw_exchange(limited, request("/public/x", "X-Big: " + "b" * 3000))
    assert status_of(response) == 431
    assert upstream.seen == []


async def test_too_many_headers_is_431(limited: Running, upstream: Upstream) -> None:
    response = await raw_exchange(limited, request("/public/x", *[f"X-H{i}: v" for i in range(40)]))
    assert status_of(response) == 431
    assert upstream.seen == []


async def test_request_line_too_long(limited: Running, upstream: Upstream) -> None:
    response = await raw_exchange(limited, request("/public/" + "a" * 2000))
    assert status_of(response) == 414
    assert upstream.seen == []


async def test_request_line_too_long_with_equal_limits(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    data = config_dir.base(upstream.port)
    data["limits"] = {"max_request_line": 1024, "max_header_line": 1024}
    running = await start_sidecar(data)
    assert status_of(await raw_exchange(running, request("/public/" + "a" * 2000))) == 414
    assert (
        status_of(await raw_exchange(running, request("/public/x", "X-Big: " + "b" * 2000))) == 431
    )
    assert upstream.seen == []


@pytest.mark.parametrize(
    "framing",
    [
        ["Content-Length: 5", "Transfer-Encoding: chunked"],
        ["Transfer-Encoding: chunked", "Content-Length: 5"],
        ["Content-Length: 5", "Content-Length: 6"],
        ["Content-Length: 5, 6"],
        ["Transfer-Encoding: gzip"],
    ],
)
async def test_ambiguous_length_is_refused(
    limited: Running, upstream: Upstream, framing: list[str]
) -> None:
    raw = request("/public/x", *framing).replace(b"GET", b"POST", 1) + b"0\r\n\r\nhello"
    response = await raw_exchange(limited, raw)
    assert status_of(response) == 400
    assert upstream.seen == []


async def test_body_over_limit_is_413(limited: Running, upstream: Upstream) -> None:
    raw = request("/public/x", "Content-Length: 5000").replace(b"GET", b"POST", 1) + b"x" * 5000
    response = await raw_exchange(limited, raw)
    assert status_of(response) == 413
    assert upstream.seen == []


async def test_slow_header_client_is_cut_off_while_others_are_served(
    limited: Running, upstream: Upstream
) -> None:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", limited.sidecar.port, ssl=limited.client_ssl(None), server_hostname="localhost"
    )
    started = time.monotonic()
    closed_after: float | None = None
    served = 0

    async def trickle() -> None:
        nonlocal closed_after
        for byte in request("/public/slow"):
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except (ConnectionError, ssl.SSLError):
                break
            if reader.at_eof():
                break
            await asyncio.sleep(0.1)
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await asyncio.wait_for(reader.read(), timeout=5)
        closed_after = time.monotonic() - started

    async def others() -> None:
        nonlocal served
        for _ in range(5):
            response = await raw_exchange(limited, request("/public/fast"))
            assert status_of(response) == 200
            served += 1
            await asyncio.sleep(0.1)

    await asyncio.gather(trickle(), others())
    writer.close()
    assert served == 5
    assert closed_after is not None and closed_after < 4, (
        closed_after
    )  # the full head would take 3.5 s+
    assert all(s.raw_path != "/public/slow" for s in upstream.seen)


async def test_idle_keepalive_connection_is_closed(limited: Running) -> None:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", limited.sidecar.port, ssl=limited.client_ssl(None), server_hostname="localhost"
    )
    writer.write(request("/public/x"))
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    async with asyncio.timeout(6):
        rest = await reader.read()  # returns when the server closes the idle connection
        while rest:
            rest = await reader.read()
    writer.close()


async def test_connections_beyond_the_limit_are_closed(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    data = config_dir.base(upstream.port)
    data["limits"] = {"max_connections": 2}
    running = await start_sidecar(data)
    held: list[Any] = []
    for _ in range(2):
        r, w = await asyncio.open_connection(
            "127.0.0.1",
            running.sidecar.port,
            ssl=running.client_ssl(None),
            server_hostname="localhost",
        )
        held.append((r, w))
    await asyncio.sleep(0.1)
    try:
        response = await raw_exchange(running, request("/public/x"), timeout=3)
    except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
        response = b""
    assert response == b"", "a connection beyond the limit was served"
    for _, w in held:
        w.close()
    await asyncio.sleep(0.1)
    assert status_of(await raw_exchange(running, request("/public/x"))) == 200
