"""WebSockets through the real listener: an idle timeout, and a bound on message size.

``limits.websocket_idle_timeout``: a WebSocket on which no frame has passed either way for
that long is closed on both sides with 1001 (Going Away). ``limits.websocket_max_message``:
a larger message closes its sender's side with 1009 (Message Too Big) before it is buffered
whole, and the other side with 1001; it never reaches the other side.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import WSMsgType, web

from .conftest import ConfigDir, Running, SidecarFactory
from .servers import serve_app
from .test_listener import Conn, connect, req

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
GOING_AWAY, MESSAGE_TOO_BIG = 1001, 1009


def frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A client's frame (masked), any size (RFC 6455 §5.2)."""
    size = len(payload)
    if size < 126:
        length = bytes([0x80 | size])
    elif size < 1 << 16:
        length = bytes([0x80 | 126]) + size.to_bytes(2, "big")
    else:
        length = bytes([0x80 | 127]) + size.to_bytes(8, "big")
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([(0x80 if fin else 0) | opcode]) + length + mask + masked


async def read_frame(conn: Conn, timeout: float = 10) -> tuple[int, bytes]:
    async with asyncio.timeout(timeout):
        first, second = await conn.reader.readexactly(2)
        assert not second & 0x80, "a server must not mask its frames"
        size = second & 0x7F
        if size == 126:
            size = int.from_bytes(await conn.reader.readexactly(2), "big")
        elif size == 127:
            size = int.from_bytes(await conn.reader.readexactly(8), "big")
        return first & 0x0F, await conn.reader.readexactly(size)


async def read_close(conn: Conn, timeout: float = 10) -> int:
    """Frames until a close frame; its code."""
    while True:
        opcode, payload = await read_frame(conn, timeout)
        if opcode == OP_CLOSE:
            return int.from_bytes(payload[:2], "big")


@dataclass
class WSUpstream:
    """A WebSocket application: echoes text, and on ``send:N`` sends an N-byte message.
    Records the sizes of the messages it received and the close code of each socket."""

    port: int = 0
    received: list[int] = field(default_factory=list)
    closes: list[int | None] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=0)  # no limit here: the sidecar's is tested
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                self.received.append(len(msg.data))
                if msg.data.startswith("send:"):
                    await ws.send_bytes(b"u" * int(msg.data[5:]))
                else:
                    await ws.send_str("echo:" + msg.data)
            elif msg.type is WSMsgType.BINARY:
                self.received.append(len(msg.data))
                await ws.send_str(f"got {len(msg.data)}")
        self.closes.append(ws.close_code)
        self.closed.set()
        return ws


@pytest.fixture
async def ws_upstream() -> AsyncIterator[WSUpstream]:
    state = WSUpstream()
    app = web.Application()
    app.router.add_get("/{tail:.*}", state.handle)
    runner, state.port = await serve_app(app, shutdown_timeout=0.5)
    yield state
    await runner.cleanup()


async def start(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: WSUpstream, **limits: str
) -> Running:
    data = config_dir.base(upstream.port)
    data["limits"] = limits
    running: Running = await start_sidecar(data)
    return running


async def upgrade(conn: Conn) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    conn.send(
        req(
            "GET",
            "/public/ws",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        )
    )
    switched = await conn.response()
    assert switched.status == 101, switched
    digest = hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
    assert switched.one("Sec-WebSocket-Accept") == base64.b64encode(digest).decode()
    conn.send(frame(OP_TEXT, b"hello"))
    assert await read_frame(conn) == (OP_TEXT, b"echo:hello")


# ---- idle timeout ----------------------------------------------------------------------------


async def test_idle_websocket_is_closed_with_1001_on_both_sides(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, ws_upstream: WSUpstream
) -> None:
    running = await start(start_sidecar, config_dir, ws_upstream, websocket_idle_timeout="1s")
    async with connect(running) as conn:
        await upgrade(conn)
        quiet_since = time.monotonic()
        assert await read_close(conn, timeout=20) == GOING_AWAY
        assert time.monotonic() - quiet_since >= 0.9
        conn.send(frame(OP_CLOSE, GOING_AWAY.to_bytes(2, "big")))  # the client's answer
        await conn.ended(timeout=15)
    await asyncio.wait_for(ws_upstream.closed.wait(), 15)
    assert ws_upstream.closes == [GOING_AWAY]


@pytest.mark.parametrize("activity", ["client-pings", "client-messages", "upstream-messages"])
async def test_any_frame_either_way_keeps_a_websocket_open(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    ws_upstream: WSUpstream,
    activity: str,
) -> None:
    running = await start(start_sidecar, config_dir, ws_upstream, websocket_idle_timeout="1500ms")
    async with connect(running) as conn:
        await upgrade(conn)
        if activity == "upstream-messages":
            # one frame to the upstream, then only the upstream's frames pass for a while
            conn.send(frame(OP_TEXT, b"send:10"))
            assert await read_frame(conn) == (OP_BINARY, b"u" * 10)
        for i in range(10):  # 3 s in all, twice the idle timeout
            await asyncio.sleep(0.3)
            if activity == "client-pings":
                conn.send(frame(OP_PING, b"p%d" % i))
                assert await read_frame(conn) == (OP_PONG, b"p%d" % i)
            else:
                conn.send(frame(OP_TEXT, b"m%d" % i))
                assert await read_frame(conn) == (OP_TEXT, b"echo:m%d" % i)
        # then quiet: closed after the timeout
        assert await read_close(conn, timeout=20) == GOING_AWAY


# ---- message size ----------------------------------------------------------------------------


@pytest.mark.parametrize("fragmented", [False, True], ids=["one-frame", "fragments"])
async def test_client_message_over_the_limit_closes_with_1009(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    ws_upstream: WSUpstream,
    fragmented: bool,
) -> None:
    running = await start(start_sidecar, config_dir, ws_upstream, websocket_max_message="1024")
    async with connect(running) as conn:
        await upgrade(conn)
        conn.send(frame(OP_BINARY, b"a" * 1024))  # at the limit: passes
        assert await read_frame(conn) == (OP_TEXT, b"got 1024")
        if fragmented:
            conn.send(frame(OP_BINARY, b"b" * 600, fin=False) + frame(OP_CONT, b"b" * 600))
        else:
            conn.send(frame(OP_BINARY, b"b" * 1025))
        assert await read_close(conn) == MESSAGE_TOO_BIG
        conn.send(frame(OP_CLOSE, MESSAGE_TOO_BIG.to_bytes(2, "big")))
        await conn.ended(timeout=15)
    await asyncio.wait_for(ws_upstream.closed.wait(), 15)
    assert ws_upstream.closes == [GOING_AWAY]
    assert ws_upstream.received == [5, 1024]  # the large message never reached it


async def test_upstream_message_over_the_limit_closes_with_1009(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, ws_upstream: WSUpstream
) -> None:
    running = await start(start_sidecar, config_dir, ws_upstream, websocket_max_message="1024")
    async with connect(running) as conn:
        await upgrade(conn)
        conn.send(frame(OP_TEXT, b"send:1024"))
        assert await read_frame(conn) == (OP_BINARY, b"u" * 1024)
        conn.send(frame(OP_TEXT, b"send:5000"))
        assert await read_close(conn) == GOING_AWAY  # the large message never reached it
        conn.send(frame(OP_CLOSE, GOING_AWAY.to_bytes(2, "big")))
        await conn.ended(timeout=15)
    await asyncio.wait_for(ws_upstream.closed.wait(), 15)
    assert ws_upstream.closes == [MESSAGE_TOO_BIG]


async def test_default_message_limit_is_1_mib(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, ws_upstream: WSUpstream
) -> None:
    running = await start(start_sidecar, config_dir, ws_upstream)
    async with connect(running) as conn:
        await upgrade(conn)
        conn.send(frame(OP_BINARY, b"c" * (1 << 20)))
        assert await read_frame(conn) == (OP_TEXT, b"got 1048576")
        conn.send(frame(OP_BINARY, b"c" * ((1 << 20) + 1)))
        assert await read_close(conn) == MESSAGE_TOO_BIG
