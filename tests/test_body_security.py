"""Request bodies on the listener's own path, against clients that send them slowly or
greedily (issue #12 round 2, finding 3; issue #19 item 5), over real TLS.

- Slow bodies must not pin the upstream pool: a body up to ``limits.body_buffer`` is read
  whole before an upstream connection is taken, a longer one must keep
  ``limits.body_min_rate`` once ``limits.body_timeout`` has passed (else 408), and one client
  address streams at most ``limits.max_body_streams_per_address`` bodies upstream at once
  (else 429).
- ``Expect: 100-continue`` is answered only for a request that will be forwarded.
- The application's answer passes unchanged (no ``Content-Type`` added).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator

import pytest

from .conftest import ConfigDir, Running, SidecarFactory
from .servers import Scripted, StartScripted, answer_ok, keep_alive_ok
from .test_listener import Conn, connect, req

KiB = 1024


async def start(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Scripted,
    *,
    pool: int = 4,
    **limits: object,
) -> Running:
    data = config_dir.base(upstream.port)
    data["upstream"]["max_connections"] = pool
    data["upstream"]["timeout"] = {"connect": "2s", "read": "20s"}
    if limits:
        data["limits"] = limits
    running: Running = await start_sidecar(data)
    return running


@contextlib.asynccontextmanager
async def connect_from(running: Running, source: str) -> AsyncIterator[Conn]:
    """A TLS connection from another loopback address (127.0.0.0/8 is all this machine's)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        running.sidecar.port,
        ssl=running.client_ssl(),
        server_hostname="localhost",
        local_addr=(source, 0),
    )
    conn = Conn(reader, writer)
    try:
        yield conn
    finally:
        await conn.close()


async def get_hello(running: Running) -> int:
    """Another client's request, on a connection of its own: its status."""
    async with connect(running) as conn:
        conn.send(req("GET", "/public/hello"))
        response = await conn.response(timeout=15)
    return response.status


# ---- finding 3: trickling bodies and the upstream pool ------------------------------------


async def test_trickling_bodies_do_not_pin_the_upstream_pool(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, scripted: StartScripted
) -> None:
    """The attacker's scenario, scaled down: as many trickling bodies as the pool has
    connections (one byte each so far, a byte now and then) and every other client is still
    served. Before: each body held a pooled connection while it streamed; everyone else got
    502 "all 4 upstream connections stayed busy"."""
    upstream = await scripted(keep_alive_ok)
    running = await start(start_sidecar, config_dir, upstream)
    async with contextlib.AsyncExitStack() as stack:
        holders = [await stack.enter_async_context(connect(running)) for _ in range(4)]
        for conn in holders:
            conn.send(req("POST", "/public/upload", "Content-Length: 100000") + b"x")
        for _ in range(3):
            await asyncio.sleep(0.5)
            for conn in holders:
                conn.send(b"x")  # well within body_timeout
            assert await get_hello(running) == 200
    assert upstream.methods() == ["GET"] * 3  # no trickling body reached the upstream


async def test_a_body_below_the_minimum_rate_is_408_and_frees_its_upstream_connection(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, scripted: StartScripted
) -> None:
    """A body longer than body_buffer is streamed: it holds an upstream connection, so it
    must keep body_min_rate bytes per second once body_timeout (the grace) has passed."""
    upstream = await scripted(keep_alive_ok)
    running = await start(
        start_sidecar,
        config_dir,
        upstream,
        pool=1,
        body_buffer=KiB,
        body_timeout="1s",
        body_min_rate=4 * KiB,
    )
    async with connect(running) as slow:
        slow.send(req("POST", "/public/upload", "Content-Length: 100000") + b"s" * 4 * KiB)
        started = time.monotonic()

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                for _ in range(100):
                    await asyncio.sleep(0.3)  # a byte well within body_timeout, each time
                    slow.send(b"s")

        trickling = asyncio.create_task(trickle())
        try:
            refused = await slow.response(timeout=20)
        finally:
            trickling.cancel()
        waited = time.monotonic() - started
        assert refused.status == 408, refused
        assert "close" in refused.tokens("Connection")
    # 1 s of grace plus 4 KiB at 4 KiB/s: due after about 2 s
    assert 1.5 < waited < 10, waited
    assert await get_hello(running) == 200  # the one pooled connection is free again
    assert upstream.methods() == ["GET"]  # the upstream never saw the body complete


async def test_one_address_streams_a_bounded_number_of_bodies(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, scripted: StartScripted
) -> None:
    """Bodies past body_buffer from one client address hold at most
    max_body_streams_per_address upstream connections; the next one gets 429 and the pool
    stays open to others."""
    upstream = await scripted(keep_alive_ok)
    running = await start(
        start_sidecar,
        config_dir,
        upstream,
        pool=4,
        body_buffer=KiB,
        max_body_streams_per_address=2,
    )
    async with contextlib.AsyncExitStack() as stack:
        streams = [
            await stack.enter_async_context(connect_from(running, "127.0.0.2")) for _ in range(3)
        ]
        for conn in streams[:2]:
            conn.send(req("POST", "/public/upload", "Content-Length: 100000") + b"a" * 2 * KiB)
        await asyncio.sleep(0.5)
        streams[2].send(req("POST", "/public/upload", "Content-Length: 100000") + b"a" * 2 * KiB)
        refused = await streams[2].response(timeout=10)
        assert refused.status == 429, refused
        assert refused.get("Retry-After")
        assert "close" in refused.tokens("Connection")
        assert await get_hello(running) == 200  # another address
        assert upstream.methods() == ["GET"]  # the streams are in flight, not complete


async def test_a_body_within_body_buffer_is_sent_whole(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, scripted: StartScripted
) -> None:
    """A small chunked body is read whole before the upstream is asked, and sent with its
    length (as nginx sends a body it buffered): chunk extensions and trailers stay behind."""
    upstream = await scripted(keep_alive_ok)
    running = await start(start_sidecar, config_dir, upstream)
    async with connect(running) as conn:
        conn.send(req("POST", "/public/small", "Transfer-Encoding: chunked"))
        await asyncio.sleep(0.2)
        conn.send(b"5;name=value\r\nhello\r\n")
        await asyncio.sleep(0.2)
        assert upstream.requests == []  # not before the body is here
        conn.send(b"6\r\n world\r\n0\r\nX-Trailer: dropped\r\n\r\n")
        response = await conn.response(timeout=10)
    assert response.status == 200
    [sent] = upstream.requests
    head, body = sent.split(b"\r\n\r\n", 1)
    assert body == b"hello world"
    assert b"\r\nContent-Length: 11" in head
    assert b"chunked" not in head.lower() and b"trailer" not in sent.lower()


# ---- Expect: 100-continue --------------------------------------------------------------------


async def test_a_refused_request_gets_no_100_continue(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, scripted: StartScripted
) -> None:
    upstream = await scripted(keep_alive_ok)
    running = await start(start_sidecar, config_dir, upstream)
    async with connect(running) as conn:  # no certificate: /app/ is not public
        conn.send(req("POST", "/app/x", "Content-Length: 5", "Expect: 100-continue"))
        refused = await conn.response(timeout=10)
        assert refused.status == 401
        assert "close" in refused.tokens("Connection")  # the body was never read
        assert await conn.ended() == b""
    assert upstream.requests == []


async def test_100_continue_then_the_body_then_the_next_request(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, scripted: StartScripted
) -> None:
    upstream = await scripted(keep_alive_ok)
    running = await start(start_sidecar, config_dir, upstream)
    body = b"b" * 50 * KiB
    async with connect(running) as conn:
        conn.send(req("POST", "/public/x", f"Content-Length: {len(body)}", "Expect: 100-continue"))
        interim = await conn.response(timeout=10)
        assert interim.status == 100
        conn.send(body + req("GET", "/public/after"))
        assert (await conn.response(timeout=10)).status == 200
        assert (await conn.response(timeout=10)).status == 200
    assert upstream.methods() == ["POST", "GET"]
    assert upstream.requests[0].endswith(body)
    assert b"expect" not in upstream.requests[0].lower()


# ---- the application's answer passes unchanged -----------------------------------------------


async def test_an_answer_to_a_post_gets_no_content_type_added(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, scripted: StartScripted
) -> None:
    async def bare(state: Scripted, n: int, head: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(answer_ok(b"bare"))  # no Content-Type
        return True

    upstream = await scripted(bare)
    running = await start(start_sidecar, config_dir, upstream)
    async with connect(running) as conn:
        conn.send(req("POST", "/public/x", body=b"payload"))
        response = await conn.response(timeout=10)
    assert (response.status, response.body) == (200, b"bare")
    assert response.get("Content-Type") == []


@pytest.mark.parametrize("length", [b"bare", b"b" * 200_000])  # whole, and streamed
async def test_an_answer_through_aiohttps_path_gets_no_content_type_added(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, scripted: StartScripted, length: bytes
) -> None:
    """An upgrade that is not a WebSocket is still aiohttp's to serve (as a plain request):
    the application's answer passes as it sent it there too."""

    async def bare(state: Scripted, n: int, head: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(answer_ok(length))  # no Content-Type
        return True

    upstream = await scripted(bare)
    running = await start(start_sidecar, config_dir, upstream)
    async with connect(running) as conn:
        conn.send(req("GET", "/public/x", "Connection: Upgrade", "Upgrade: example/1"))
        response = await conn.response(timeout=10)
    assert (response.status, response.body) == (200, length)
    assert response.get("Content-Type") == []


@pytest.mark.parametrize(
    ("framing", "body"),
    [
        ("chunked", b"5 \r\nhello\r\n0\r\n\r\n"),  # space after the size
        ("chunked", b"5\nhello\r\n0\r\n\r\n"),  # bare LF
        ("chunked", b"0x5\r\nhello\r\n0\r\n\r\n"),
        ("chunked", b"5\r\nhelloX\r\n0\r\n\r\n"),  # data not followed by CRLF
        ("chunked", b"5;a=b c\r\nhello\r\n0\r\n\r\n"),  # a space in an extension value
        ("chunked", b"5\r\nhello\r\n0\r\nX-T 1\r\n\r\n"),  # a trailer that is no field line
        ("chunked", b"5\r\nhello\r\n0\r\n X-T: 1\r\n\r\n"),  # a folded trailer
    ],
)
async def test_a_malformed_chunked_body_is_400_and_never_completes_upstream(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    scripted: StartScripted,
    framing: str,
    body: bytes,
) -> None:
    upstream = await scripted(keep_alive_ok)
    running = await start(start_sidecar, config_dir, upstream)
    async with connect(running) as conn:
        conn.send(req("POST", "/public/x", "Transfer-Encoding: chunked") + body)
        response = await conn.response(timeout=10)
        assert response.status == 400
        assert await conn.ended() == b""
    assert upstream.requests == []
