"""Slow clients must not hold upstream connections: ``limits.body_timeout`` and
``limits.send_timeout`` on every path.

A request body that pauses longer than ``body_timeout`` gets 408 and nothing more reaches the
upstream, whose connection is dropped. A client that stops taking a response is cut off
within ``send_timeout`` whichever protocol serves it, whether the answer is streamed or
written whole, and the upstream connection behind it goes back to the pool or is closed: a
pool of N connections with N stalled clients still serves the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from .conftest import ConfigDir, Running, SidecarFactory
from .servers import serve_app
from .test_limits import request
from .test_listener import App, connect, open_connections, req

MiB = 1024 * 1024


@pytest.fixture
async def upstream() -> AsyncIterator[App]:
    app = App(0)
    await app.start()
    yield app
    await app.stop()


# ---- an upstream that shows how much of a body reached it ---------------------------------


@dataclass
class BodyWatcher:
    """Reads each request's head and then its body as it comes, and records whether the
    connection ended before the whole body (the request aborted) or the body arrived."""

    port: int = 0
    heads: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    aborted: asyncio.Event = field(default_factory=asyncio.Event)
    completed: asyncio.Event = field(default_factory=asyncio.Event)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            match = re.search(rb"\r\ncontent-length: *([0-9]+)", head.lower())
            length = int(match.group(1)) if match else 0
            body = b""
            self.bodies.append(body)
            while len(body) < length:
                chunk = await reader.read(65536)
                if not chunk:
                    self.aborted.set()
                    return
                body += chunk
                self.bodies[-1] = body
            self.completed.set()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngot!")
            await writer.drain()
            await reader.read()  # until the sidecar closes its side
        except (ConnectionError, asyncio.IncompleteReadError):
            self.aborted.set()
        finally:
            writer.close()


@pytest.fixture
async def body_watcher() -> AsyncIterator[BodyWatcher]:
    watcher = BodyWatcher()
    server = await asyncio.start_server(watcher.serve, "127.0.0.1", 0)
    watcher.port = server.sockets[0].getsockname()[1]
    yield watcher
    server.close()
    await server.wait_closed()


async def start(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, port: int, **limits: str
) -> Running:
    data = config_dir.base(port)
    data["limits"] = limits
    running: Running = await start_sidecar(data)
    return running


# ---- body_timeout ------------------------------------------------------------------------


async def test_body_paused_past_body_timeout_is_408_and_aborted_upstream(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, body_watcher: BodyWatcher
) -> None:
    # streamed from its first byte (limits.body_buffer: 0), so that the upstream has a part
    # of it to see aborted (a body within body_buffer never reaches the upstream unfinished:
    # test_body_security)
    running = await start(
        start_sidecar, config_dir, body_watcher.port, body_timeout="1s", body_buffer="0"
    )
    async with connect(running) as conn:
        conn.send(req("POST", "/public/upload", "Content-Length: 100") + b"0123456789")
        started = time.monotonic()
        response = await conn.response(timeout=20)
        waited = time.monotonic() - started
        assert response.status == 408, response
        assert "close" in response.tokens("Connection")
        assert response.get("X-Request-ID")
        assert waited >= 0.9, waited  # the body had body_timeout to come
        # the upstream saw the request aborted after what had arrived, never the rest
        await asyncio.wait_for(body_watcher.aborted.wait(), 10)
        conn.send(b"x" * 90)
        await conn.ended(timeout=15)
    assert body_watcher.bodies == [b"0123456789"]
    assert not body_watcher.completed.is_set()
    assert len(body_watcher.heads) == 1


async def test_body_with_pauses_shorter_than_body_timeout_arrives_whole(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, body_watcher: BodyWatcher
) -> None:
    running = await start(start_sidecar, config_dir, body_watcher.port, body_timeout="3s")
    body = bytes(range(100))
    async with connect(running) as conn:
        conn.send(req("POST", "/public/upload", f"Content-Length: {len(body)}"))
        for i in range(0, len(body), 20):
            conn.send(body[i : i + 20])
            await asyncio.sleep(0.2)
        response = await conn.response(timeout=20)
    assert (response.status, response.body) == (200, b"got!")
    assert body_watcher.bodies == [body]


async def test_chunked_body_paused_past_body_timeout_is_408(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: App
) -> None:
    running = await start(start_sidecar, config_dir, upstream.port, body_timeout="1s")
    async with connect(running) as conn:
        conn.send(req("POST", "/public/chunked", "Transfer-Encoding: chunked") + b"5\r\nhello\r\n")
        response = await conn.response(timeout=20)
        assert response.status == 408
        assert "close" in response.tokens("Connection")
        conn.send(b"5\r\nworld\r\n0\r\n\r\n" + request("/public/next"))  # too late
        assert await conn.ended(timeout=15) == b""
    await asyncio.sleep(0.2)
    assert upstream.paths() == []  # the echo upstream records only whole bodies


# ---- send_timeout: a pool of N and N clients that stopped reading ---------------------------


@pytest.mark.parametrize("method", ["GET", "POST"], ids=["fast-path", "aiohttp"])
async def test_stalled_streamed_downloads_do_not_starve_the_pool(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: App, method: str
) -> None:
    data = config_dir.base(upstream.port)
    data["upstream"]["max_connections"] = 2
    data["upstream"]["timeout"] = {"connect": "10s", "read": "30s"}
    data["limits"] = {"send_timeout": "1s"}
    running: Running = await start_sidecar(data)
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(2):
            conn = await stack.enter_async_context(connect(running))
            body = b"x" if method == "POST" else b""
            conn.send(req(method, "/public/download/268435456", body=body))
            head = await conn.reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
        # both pooled connections carry a download nobody takes; the next request must
        # still get one once send_timeout has cut the stalled clients off
        async with connect(running) as conn:
            conn.send(request("/public/next"))
            response = await conn.response(timeout=30)
        assert (response.status, response.json()["path"]) == (200, "/public/next")
        assert open_connections(running) <= 2


def pipeline_without_reading(
    port: int, context: ssl.SSLContext, unit: bytes, stop: threading.Event
) -> str:
    """Pipeline ``unit`` again and again, reading nothing, until cut off (or ``stop``)."""
    chunk = unit * max(1, 64 * 1024 // len(unit))
    raw = socket.create_connection(("127.0.0.1", port))
    tls = context.wrap_socket(raw, server_hostname="localhost")
    tls.settimeout(0.5)
    try:
        while not stop.is_set():
            try:
                tls.send(chunk)
            except (TimeoutError, ssl.SSLWantWriteError):
                continue
    except (OSError, ssl.SSLError) as exc:
        return f"cut off: {type(exc).__name__}"
    finally:
        with contextlib.suppress(OSError):
            tls.close()
    return "not cut off"


async def test_whole_answers_to_a_client_that_stopped_reading_do_not_hold_the_pool(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: App
) -> None:
    """Answers that arrive whole from the upstream are written with aiohttp's ``write_eof``,
    which waits for the client to take them: that wait is bounded by send_timeout too."""
    data = config_dir.base(upstream.port)
    data["upstream"]["max_connections"] = 1
    data["upstream"]["timeout"] = {"connect": "10s", "read": "30s"}
    data["limits"] = {"send_timeout": "1s"}
    running: Running = await start_sidecar(data)
    context = ssl.create_default_context(cadata=running.certs.pki.server_ca.pem.decode())
    unit = req("POST", "/public/whole", body=b"x")  # a body: served by aiohttp
    stop = threading.Event()
    flood = asyncio.ensure_future(
        asyncio.to_thread(pipeline_without_reading, running.sidecar.port, context, unit, stop)
    )
    try:
        # until the client's writes back up: the sidecar stopped reading, its answers wait
        seen = -1
        while len(upstream.seen) != seen:
            seen = len(upstream.seen)
            await asyncio.sleep(0.5)
        async with connect(running) as conn:
            conn.send(request("/public/next"))
            response = await conn.response(timeout=30)
        assert response.status == 200, response.body[:300]
        assert response.json()["path"] == "/public/next"
        assert (await asyncio.wait_for(asyncio.shield(flood), 30)).startswith("cut off")
    finally:
        stop.set()
        await flood


@pytest.fixture
async def bursty() -> AsyncIterator[tuple[int, asyncio.Event]]:
    """An upstream whose ``/public/burst`` sends 64 MiB at once and ``/public/quiet`` 1 KiB,
    then nothing until released (the test's end)."""
    release = asyncio.Event()

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        if not request.path.startswith(("/public/burst", "/public/quiet")):
            return web.json_response({"path": request.path})
        response = web.StreamResponse()
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            if request.path.startswith("/public/burst"):
                for _ in range(64):
                    await response.write(b"b" * MiB)
            else:
                await response.write(b"q" * 1024)
            await asyncio.wait_for(release.wait(), 60)
            await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner, port = await serve_app(app, shutdown_timeout=0.1)
    yield port, release
    release.set()
    await runner.cleanup()


async def start_one_connection_pool(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, port: int
) -> Running:
    data = config_dir.base(port)
    data["upstream"]["max_connections"] = 1
    data["upstream"]["timeout"] = {"connect": "20s", "read": "60s"}
    data["limits"] = {"send_timeout": "1s"}
    running: Running = await start_sidecar(data)
    return running


async def served_soon(running: Running) -> None:
    """A request on a connection of its own gets the pool's one connection well before the
    pool's wait (20 s) would give up on it."""
    started = time.monotonic()
    async with connect(running) as conn:
        conn.send(request("/public/next"))
        response = await conn.response(timeout=30)
    assert response.status == 200, response.body[:300]
    assert response.json()["path"] == "/public/next"
    assert time.monotonic() - started < 15


@pytest.mark.parametrize("method", ["GET", "POST"], ids=["fast-path", "aiohttp"])
async def test_client_cut_off_while_the_upstream_is_quiet_frees_the_pool(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    bursty: tuple[int, asyncio.Event],
    method: str,
) -> None:
    running = await start_one_connection_pool(start_sidecar, config_dir, bursty[0])
    async with connect(running) as stalled:
        stalled.send(req(method, "/public/burst", body=b"x" if method == "POST" else b""))
        head = await stalled.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        await served_soon(running)


@pytest.mark.parametrize("method", ["GET", "POST"], ids=["fast-path", "aiohttp"])
async def test_client_leaving_a_quiet_stream_frees_its_upstream_connection_at_once(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    bursty: tuple[int, asyncio.Event],
    method: str,
) -> None:
    """Not when the upstream next sends a byte (within the test: never)."""
    running = await start_one_connection_pool(start_sidecar, config_dir, bursty[0])
    async with connect(running) as leaving:
        leaving.send(req(method, "/public/quiet", body=b"x" if method == "POST" else b""))
        head = await leaving.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        await leaving.reader.readexactly(1024 + 5)  # the first chunk, chunked
        leaving.abort()
    await served_soon(running)
