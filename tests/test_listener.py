"""The TLS listener's own HTTP/1.1 path (``sidecar.listener``) over real TLS sockets.

Every connection starts on ``ClientConnection`` (bodiless requests) and is handed over to
aiohttp at the first request it does not serve. These tests speak raw bytes to the whole
sidecar, read the raw answers with a strict HTTP/1.x response reader, and check what the
upstream application received: pipelining, the hand-over in the middle of a connection,
framing of every kind of response, header stripping, smuggling attempts, deadlines, the
connection limit, graceful shutdown, clients that leave early, and every way a request served
without a task can end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from yarl import URL

from sidecar import config as config_mod
from sidecar.app import Sidecar
from sidecar.errors import CertificateError
from sidecar.http1.client import ClientConnection
from sidecar.metrics import Metrics

from .conftest import BOB_SUB, ConfigDir, Running, Seen, SidecarFactory, Upstream, decode_userinfo
from .pki import Issued
from .servers import Scripted, StartScripted, answer_ok, serve_app
from .test_limits import raw_exchange, request

MiB = 1024 * 1024
_BLOCK = hashlib.sha256(b"listener").digest() * 2048  # 64 KiB


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob(size: int) -> bytes:
    return (_BLOCK * (size // len(_BLOCK) + 1))[:size]


def piece(i: int) -> bytes:
    """The i-th piece of a ``/stream/N`` body (1 KiB, different for every i)."""
    return (b"%08d" % i) * 128


def stream_body(count: int) -> bytes:
    return b"".join(piece(i) for i in range(count))


def req(
    method: str,
    path: str,
    *extra: str,
    body: bytes = b"",
    version: str = "1.1",
    host: str | None = "localhost",
) -> bytes:
    """A raw request; a body gets a Content-Length unless ``extra`` frames it already."""
    lines = [f"{method} {path} HTTP/{version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += extra
    framed = any(h.lower().startswith(("content-length:", "transfer-encoding:")) for h in extra)
    if body and not framed:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# ---- the upstream application ---------------------------------------------------------------


@dataclass
class App(Upstream):
    """conftest's echo upstream (``seen`` records every request in arrival order) with the
    endpoints these tests need, by the first path segment after an optional /public or /admin:

    ``download/N``: N bytes with a Content-Length; ``stream/N``: N pieces of 1 KiB without a
    length (chunked to the sidecar), the first ones apart in time; ``head``: a 1234-byte body;
    ``status/N``: an empty answer with that status; ``slow``: answers "late" once ``release``
    is set; ``reset/length`` and ``reset/chunked``: part of a body, then a reset; ``ws``: a
    WebSocket echo; anything else: JSON describing the request.
    """

    release: asyncio.Event = field(default_factory=asyncio.Event)
    #: requests waiting in ``slow`` for ``release``
    slow_waiting: int = 0
    runner: web.AppRunner | None = None

    def paths(self) -> list[str]:
        return [seen.raw_path for seen in self.seen]

    async def start(self) -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner, self.port = await serve_app(app, shutdown_timeout=0.5)

    async def stop(self) -> None:
        self.release.set()  # let stalled handlers finish before the server closes
        if self.runner is not None:
            await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        self.seen.append(Seen(request.method, request.raw_path, headers, digest.hexdigest(), size))
        segments = [s for s in request.path.split("/") if s]
        if segments and segments[0] in ("public", "admin"):
            segments = segments[1:]
        kind, arg = [*segments, "", ""][:2]
        if kind == "download":
            return await self._download(request, int(arg))
        if kind == "stream":
            return await self._stream(request, int(arg))
        if kind == "head":
            return web.Response(body=b"h" * 1234, content_type="text/plain")
        if kind == "status":
            return web.Response(status=int(arg))
        if kind == "slow":
            self.slow_waiting += 1
            await asyncio.wait_for(self.release.wait(), 10)
            return web.Response(text="late")
        if kind == "reset":
            return await self._reset(request, chunked=arg == "chunked")
        if kind == "ws":
            return await self._websocket(request)
        return web.json_response(
            {
                "method": request.method,
                "path": request.raw_path,
                "sha256": digest.hexdigest(),
                "length": size,
            }
        )

    async def _download(self, request: web.Request, size: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        sent = 0
        while sent < size:
            part = _BLOCK[: min(len(_BLOCK), size - sent)]
            await response.write(part)
            sent += len(part)
        await response.write_eof()
        return response

    async def _stream(self, request: web.Request, count: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        if request.method != "HEAD":
            for i in range(count):
                await response.write(piece(i))
                if i < 3:  # the head goes out alone: the length is unknown to the sidecar
                    await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    async def _reset(self, request: web.Request, *, chunked: bool) -> web.StreamResponse:
        """Part of a 1 MiB body, then the connection is reset."""
        response = web.StreamResponse()
        if not chunked:
            response.content_length = MiB
        await response.prepare(request)
        await response.write(b"y" * 100_000)
        await asyncio.sleep(0.1)  # the head and part of the body reach the sidecar
        assert request.transport is not None
        request.transport.abort()
        return response

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws


@pytest.fixture
async def upstream() -> AsyncIterator[App]:
    """Overrides conftest's ``upstream`` for this module (``running`` uses this one)."""
    app = App(0)
    await app.start()
    yield app
    await app.stop()


class RawUpstream:
    """An upstream that shows exactly which bytes reached it: it records every request head
    (and body) it receives and answers each with ``200 ok``. It accepts what a strict server
    would refuse (a second Host, say), so that a refusal can only have come from the sidecar."""

    def __init__(self) -> None:
        self.port = 0
        self.received = bytearray()
        self.heads: list[bytes] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()
        await asyncio.sleep(0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.received += head
                self.heads.append(head)
                lower = head.lower()
                length = re.search(rb"\r\ncontent-length: *([0-9]+)", lower)
                if length:
                    self.received += await reader.readexactly(int(length.group(1)))
                elif b"\r\ntransfer-encoding: chunked" in lower:
                    self.received += await reader.readuntil(b"\r\n0\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    upstream = RawUpstream()
    await upstream.start()
    yield upstream
    await upstream.stop()


@pytest.fixture
async def raw_running(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, raw_upstream: RawUpstream
) -> Running:
    running: Running = await start_sidecar(config_dir.base(raw_upstream.port))
    return running


async def start_with_limits(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: App, **limits: Any
) -> Running:
    data = config_dir.base(upstream.port)
    data["limits"] = limits
    running: Running = await start_sidecar(data)
    return running


# ---- a strict HTTP/1.x client ---------------------------------------------------------------

_STATUS_LINE = re.compile(rb"(HTTP/1\.[01]) ([1-5][0-9][0-9]) ([\t \x21-\x7e\x80-\xff]*)")
_FIELD_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*(.*?)[ \t]*")
_CHUNK_SIZE = re.compile(rb"[0-9a-fA-F]{1,16}")


@dataclass
class Response:
    version: str
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    #: how the body was delimited: "none" (HEAD, 1xx, 204, 304), "length", "chunked", "close"
    framing: str

    def get(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def one(self, name: str) -> str:
        values = self.get(name)
        assert len(values) == 1, (name, self.headers)
        return values[0]

    def tokens(self, name: str) -> set[str]:
        return {t.strip().lower() for v in self.get(name) for t in v.split(",") if t.strip()}

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response(reader: asyncio.StreamReader, method: str = "GET") -> Response:
    """One response, validated on the way: status line, field lines, and the body framing
    (RFC 9112 §6.3); a chunked body is checked byte for byte."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head[:-4].split(b"\r\n")
    match = _STATUS_LINE.fullmatch(status_line)
    assert match, f"not a status line: {head[:200]!r}"
    headers: list[tuple[str, str]] = []
    for line in lines:
        field_match = _FIELD_LINE.fullmatch(line)
        assert field_match, f"malformed field line {line!r} in {head!r}"
        value = field_match.group(2)
        assert not re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", value), f"control byte in {line!r}"
        headers.append((field_match.group(1).decode("ascii"), value.decode("latin-1")))
    response = Response(match.group(1).decode(), int(match.group(2)), headers, b"", "none")
    if method == "HEAD" or response.status < 200 or response.status in (204, 304):
        return response
    if response.get("Transfer-Encoding"):
        assert response.get("Transfer-Encoding") == ["chunked"], response.headers
        assert not response.get("Content-Length"), "both Content-Length and Transfer-Encoding"
        response.body, response.framing = await _read_chunked(reader), "chunked"
    elif response.get("Content-Length"):
        length = int(response.one("Content-Length"))
        response.body, response.framing = await reader.readexactly(length), "length"
    else:
        response.body, response.framing = await reader.read(), "close"
    return response


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = b""
    while True:
        line = await reader.readuntil(b"\r\n")
        assert _CHUNK_SIZE.fullmatch(line[:-2]), f"bad chunk-size line {line!r}"
        size = int(line[:-2], 16)
        if size == 0:
            assert await reader.readuntil(b"\r\n") == b"\r\n", "trailer fields"
            return body
        body += await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n", "chunk data not followed by CRLF"


class Conn:
    """A raw TLS connection to the sidecar."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def response(self, method: str = "GET", *, timeout: float = 5) -> Response:
        async with asyncio.timeout(timeout):
            return await read_response(self.reader, method)

    async def ended(self, *, timeout: float = 5) -> bytes:
        """Wait for the server to close the connection; the bytes that came before."""
        data = b""
        async with asyncio.timeout(timeout):
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                while chunk := await self.reader.read(65536):
                    data += chunk
        return data

    def abort(self) -> None:
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


@contextlib.asynccontextmanager
async def connect(running: Running, who: Issued | None = None) -> AsyncIterator[Conn]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        running.sidecar.port,
        ssl=running.client_ssl(who),
        server_hostname="localhost",
        limit=1 << 20,
    )
    conn = Conn(reader, writer)
    try:
        yield conn
    finally:
        await conn.close()


def open_connections(running: Running) -> int:
    listener = running.sidecar._listener
    assert listener is not None
    return listener.open_connections


async def eventually(check: Callable[[], bool], what: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.01)


# ---- WebSocket frames, as a client sends and reads them (RFC 6455 §5) ----------------------

OP_TEXT, OP_BINARY, OP_CLOSE = 1, 2, 8
_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ws_frame(opcode: int, payload: bytes) -> bytes:
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


async def read_ws_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    async with asyncio.timeout(5):
        first, second = await reader.readexactly(2)
        assert first & 0x80, "a fragmented frame"
        assert not second & 0x80, "a server must not mask its frames"
        size = second & 0x7F
        if size == 126:
            size = int.from_bytes(await reader.readexactly(2), "big")
        elif size == 127:
            size = int.from_bytes(await reader.readexactly(8), "big")
        return first & 0x0F, await reader.readexactly(size)


# ---- 1. pipelining ----------------------------------------------------------------------


async def test_pipelined_gets_are_answered_in_order(running: Running, upstream: App) -> None:
    paths = [f"/public/p{i}?n={i}" for i in range(5)]
    # one answer in the middle is the sidecar's own (no certificate on an /admin/ route)
    payload = b"".join(request(p) for p in paths[:3]) + request("/admin/x")
    payload += b"".join(request(p) for p in paths[3:])
    async with connect(running) as conn:
        conn.send(payload)  # one write
        responses = [await conn.response() for _ in range(6)]
    assert [r.status for r in responses] == [200, 200, 200, 401, 200, 200]
    forwarded = responses[:3] + responses[4:]
    assert [r.json()["path"] for r in forwarded] == paths
    assert all(r.framing == "length" and r.version == "HTTP/1.1" for r in responses)
    assert all(r.get("Date") and r.get("Server") for r in responses)
    ids = [r.one("X-Request-ID") for r in responses]
    assert len(set(ids)) == 6
    assert upstream.paths() == paths
    assert [s.header("X-Request-ID") for s in upstream.seen] == [
        [r.one("X-Request-ID")] for r in forwarded
    ]


async def test_pipeline_larger_than_the_read_buffer(running: Running, upstream: App) -> None:
    """More pipelined bytes than the listener holds while a request is in flight (256 KiB):
    it stops reading for a while, and still answers every request, in order."""
    count = 300
    pad = "X-Pad: " + "p" * 1000
    payload = b"".join(request(f"/public/many/{i}", pad) for i in range(count))
    assert len(payload) > 300 * 1024
    async with connect(running) as conn:
        conn.send(payload)
        responses = [await conn.response(timeout=15) for _ in range(count)]
    assert [r.json()["path"] for r in responses] == [f"/public/many/{i}" for i in range(count)]
    assert upstream.paths() == [f"/public/many/{i}" for i in range(count)]


async def test_connection_close_request_is_the_last(running: Running, upstream: App) -> None:
    async with connect(running) as conn:
        conn.send(request("/public/last", "Connection: close") + request("/public/never"))
        response = await conn.response()
        assert response.status == 200 and "close" in response.tokens("Connection")
        assert await conn.ended() == b""
    assert upstream.paths() == ["/public/last"]


# ---- 2. a request with a body in the middle of a connection: the hand-over ---------------


@pytest.mark.parametrize("pipelined", [False, True], ids=["one-by-one", "one-write"])
async def test_get_post_get_on_one_connection(
    running: Running, upstream: App, pipelined: bool
) -> None:
    alice = running.certs.alice
    body = os.urandom(300_000)
    parts = [
        request("/admin/one"),
        req("POST", "/admin/two?x=1", "Content-Type: application/octet-stream", body=body),
        request("/admin/three"),
    ]
    responses: list[Response] = []
    async with connect(running, alice) as conn:
        if pipelined:
            conn.send(b"".join(parts))
            responses = [await conn.response() for _ in parts]
        else:
            for part in parts:
                conn.send(part)
                responses.append(await conn.response())
    assert [r.status for r in responses] == [200, 200, 200]
    assert [r.json()["path"] for r in responses] == ["/admin/one", "/admin/two?x=1", "/admin/three"]
    assert (responses[1].json()["sha256"], responses[1].json()["length"]) == (
        sha256(body),
        len(body),
    )
    assert upstream.paths() == ["/admin/one", "/admin/two?x=1", "/admin/three"]
    assert [s.method for s in upstream.seen] == ["GET", "POST", "GET"]
    assert (upstream.seen[1].body_sha256, upstream.seen[1].body_len) == (sha256(body), len(body))
    # the peer's identity goes along with the connection
    for seen in upstream.seen:
        [info] = seen.header("X-USERINFO")
        assert decode_userinfo(info)["username"] == "alice"
    assert len({r.one("X-Request-ID") for r in responses}) == 3


async def test_body_arriving_after_its_head(running: Running, upstream: App) -> None:
    body = bytes(range(256)) * 400
    async with connect(running) as conn:
        conn.send(request("/public/a"))
        assert (await conn.response()).status == 200
        conn.send(req("POST", "/public/b", f"Content-Length: {len(body)}"))  # the head alone
        await asyncio.sleep(0.05)
        conn.send(body[:40_000])
        await asyncio.sleep(0.05)
        conn.send(body[40_000:])
        posted = await conn.response()
        conn.send(request("/public/c"))
        after = await conn.response()
    assert (posted.status, posted.json()["sha256"]) == (200, sha256(body))
    assert (after.status, after.json()["path"]) == (200, "/public/c")
    assert upstream.paths() == ["/public/a", "/public/b", "/public/c"]
    assert upstream.seen[1].body_sha256 == sha256(body)


async def test_expect_continue_after_a_fast_path_request(running: Running, upstream: App) -> None:
    body = b"continued " * 1000
    async with connect(running) as conn:
        conn.send(request("/public/a"))
        assert (await conn.response()).status == 200
        conn.send(req("POST", "/public/b", f"Content-Length: {len(body)}", "Expect: 100-continue"))
        interim = await conn.response()
        assert interim.status == 100
        conn.send(body)
        final = await conn.response()
        conn.send(request("/public/c"))
        after = await conn.response()
    assert (final.status, final.json()["sha256"]) == (200, sha256(body))
    assert after.json()["path"] == "/public/c"
    assert upstream.paths() == ["/public/a", "/public/b", "/public/c"]
    assert upstream.seen[1].header("Expect") == []  # hop by hop: answered by the sidecar


# ---- 3. a WebSocket upgrade after a plain request ---------------------------------------


@pytest.mark.parametrize("pipelined", [False, True], ids=["one-by-one", "one-write"])
async def test_websocket_upgrade_after_a_get(
    running: Running, upstream: App, pipelined: bool
) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    upgrade = req(
        "GET",
        "/ws",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    )
    async with connect(running, running.certs.bob) as conn:
        conn.send(request("/app/first") + (upgrade if pipelined else b""))
        first = await conn.response()
        assert (first.status, first.json()["path"]) == (200, "/app/first")
        if not pipelined:
            conn.send(upgrade)
        switched = await conn.response()
        assert switched.status == 101, switched
        accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        assert switched.one("Sec-WebSocket-Accept") == accept
        assert "upgrade" in switched.tokens("Connection")
        assert switched.one("Upgrade").lower() == "websocket"
        assert switched.one("Server") == "sidecar"  # neither aiohttp's banner nor Python's
        conn.send(ws_frame(OP_TEXT, b"hello"))
        assert await read_ws_frame(conn.reader) == (OP_TEXT, b"echo:hello")
        conn.send(ws_frame(OP_BINARY, b"\x00\x01binary"))
        assert await read_ws_frame(conn.reader) == (OP_BINARY, b"\x00\x01binary")
        conn.send(ws_frame(OP_CLOSE, (1000).to_bytes(2, "big")))
        opcode, payload = await read_ws_frame(conn.reader)
        assert (opcode, payload[:2]) == (OP_CLOSE, (1000).to_bytes(2, "big"))
    assert upstream.paths() == ["/app/first", "/ws"]
    for seen in upstream.seen:
        assert decode_userinfo(seen.header("X-USERINFO")[0])["sub"] == BOB_SUB


# ---- 4. HTTP/1.0 ------------------------------------------------------------------------


async def test_http10_without_keep_alive_is_answered_and_closed(
    running: Running, upstream: App
) -> None:
    async with connect(running) as conn:
        conn.send(req("GET", "/public/old", version="1.0", host=None) + request("/public/never"))
        response = await conn.response()
        assert response.version == "HTTP/1.0"
        assert (response.status, response.framing) == (200, "length")
        assert response.json()["path"] == "/public/old"
        assert "keep-alive" not in response.tokens("Connection")
        assert await conn.ended() == b""  # closed; the request behind it is not answered
    assert upstream.paths() == ["/public/old"]
    # a request without Host gets the upstream's own
    assert upstream.last.header("Host") == [URL(f"http://127.0.0.1:{upstream.port}").raw_authority]


async def test_http10_keep_alive_is_honoured(running: Running, upstream: App) -> None:
    keep = "Connection: keep-alive"
    async with connect(running) as conn:
        for path in ("/public/a", "/public/b"):
            conn.send(req("GET", path, keep, version="1.0"))
            response = await conn.response()
            assert (response.version, response.status) == ("HTTP/1.0", 200)
            assert response.framing == "length" and response.json()["path"] == path
            assert "keep-alive" in response.tokens("Connection")
        # a body: aiohttp serves the rest of the connection, still HTTP/1.0 and kept alive
        conn.send(req("POST", "/public/c", keep, body=b"payload", version="1.0"))
        posted = await conn.response()
        assert (posted.version, posted.status) == ("HTTP/1.0", 200)
        assert posted.json()["sha256"] == sha256(b"payload")
        assert "keep-alive" in posted.tokens("Connection")
        conn.send(req("GET", "/public/d", keep, version="1.0"))
        last = await conn.response()
        assert (last.version, last.status, last.json()["path"]) == ("HTTP/1.0", 200, "/public/d")
    assert upstream.paths() == ["/public/a", "/public/b", "/public/c", "/public/d"]


async def test_http10_keep_alive_after_the_hand_over(running: Running, upstream: App) -> None:
    """The same, on a connection aiohttp serves (a body came first)."""
    keep = "Connection: keep-alive"
    async with connect(running) as conn:
        conn.send(req("POST", "/public/a", keep, body=b"payload", version="1.0"))
        posted = await conn.response()
        assert (posted.version, posted.status) == ("HTTP/1.0", 200)
        assert posted.json()["sha256"] == sha256(b"payload")
        assert "keep-alive" in posted.tokens("Connection")
        conn.send(req("GET", "/public/b", keep, version="1.0"))
        last = await conn.response()
        assert (last.version, last.status, last.json()["path"]) == ("HTTP/1.0", 200, "/public/b")
        assert "keep-alive" in last.tokens("Connection")
    assert upstream.paths() == ["/public/a", "/public/b"]


# ---- 5. HEAD and bodiless statuses ---------------------------------------------------------


async def test_head_sends_no_body_and_keeps_the_length(running: Running, upstream: App) -> None:
    async with connect(running) as conn:
        # pipelined: a single stray body byte would garble the response after it
        conn.send(
            req("HEAD", "/public/head")
            + request("/public/head")
            + req("HEAD", "/public/stream/3")
            + request("/public/x")
        )
        head = await conn.response("HEAD")
        get = await conn.response()
        head_unknown = await conn.response("HEAD")
        last = await conn.response()
        conn.send(req("HEAD", "/public/head"))
        again = await conn.response("HEAD")
        conn.send(request("/public/y"))
        after = await conn.response()
    assert (head.status, head.one("Content-Length")) == (200, "1234")
    assert not head.get("Transfer-Encoding")
    assert (get.body, get.one("Content-Length")) == (b"h" * 1234, "1234")
    assert head_unknown.status == 200
    assert (last.status, last.json()["path"]) == (200, "/public/x")
    assert again.one("Content-Length") == "1234"
    assert (after.status, after.json()["path"]) == (200, "/public/y")
    assert [s.method for s in upstream.seen] == ["HEAD", "GET", "HEAD", "GET", "HEAD", "GET"]


async def test_no_body_statuses_have_no_body(running: Running, upstream: App) -> None:
    async with connect(running) as conn:
        conn.send(
            request("/public/status/204") + request("/public/status/304") + request("/public/x")
        )
        no_content = await conn.response()
        not_modified = await conn.response()
        last = await conn.response()
    assert no_content.status == 204 and not no_content.get("Transfer-Encoding")
    assert no_content.get("Content-Length") in ([], ["0"])
    assert not_modified.status == 304 and not not_modified.get("Transfer-Encoding")
    assert (last.status, last.json()["path"]) == (200, "/public/x")


# ---- 6. a response of unknown length -------------------------------------------------------


async def test_unknown_length_is_chunked_to_http11(running: Running, upstream: App) -> None:
    async with connect(running) as conn:
        conn.send(request("/public/stream/40") + request("/public/after"))
        streamed = await conn.response()
        after = await conn.response()
    assert (streamed.status, streamed.framing) == (200, "chunked")
    assert streamed.body == stream_body(40)
    assert (after.status, after.json()["path"]) == (200, "/public/after")


@pytest.mark.parametrize("keep_alive", [False, True], ids=["plain", "keep-alive"])
async def test_unknown_length_is_close_delimited_to_http10(
    running: Running, upstream: App, keep_alive: bool
) -> None:
    extra = ["Connection: keep-alive"] if keep_alive else []
    async with connect(running) as conn:
        conn.send(req("GET", "/public/stream/40", *extra, version="1.0"))
        streamed = await conn.response()  # "close" framing: read until the server closes
    assert (streamed.version, streamed.status, streamed.framing) == ("HTTP/1.0", 200, "close")
    assert not streamed.get("Transfer-Encoding")
    assert "keep-alive" not in streamed.tokens("Connection")
    assert streamed.body == stream_body(40)


# ---- 7. header stripping on the fast path --------------------------------------------------


async def test_client_identity_and_forwarding_headers_are_stripped(
    running: Running, upstream: App
) -> None:
    forged = base64.b64encode(
        json.dumps({"sub": "admin", "username": "admin", "roles": ["administrator"]}).encode()
    ).decode()
    spoof = [
        f"X-USERINFO: {forged}",
        f"x-userinfo: {forged}",
        f"X_USERINFO: {forged}",
        f"x_UserInfo: {forged}",
        "X-APP-CERTIFICATE: Zm9yZ2Vk",
        "X_App_Certificate: Zm9yZ2Vk",
        "Connection: keep-alive, X-Named-Hop",
        "Connection: X-Other-Hop",
        "X-Named-Hop: 1",
        "X-Other-Hop: 2",
        "X-Forwarded-For: 6.6.6.6",
        "X-Forwarded-For: 7.7.7.7",
        "X_Forwarded_For: 8.8.8.8",
        "X-Forwarded-Proto: http",
        "X-Forwarded-Host: evil.example",
        "Forwarded: for=6.6.6.6;proto=http",
        "X-Real-IP: 6.6.6.6",
        "X-Request-ID: attacker-chosen",
        "Keep-Alive: timeout=1",
        "Proxy-Connection: keep-alive",
        "TE: trailers",
        "X-Kept: yes",
    ]
    bob = running.certs.bob
    async with connect(running, bob) as conn:
        conn.send(request("/app/x", *spoof))
        response = await conn.response()
    assert response.status == 200
    seen = upstream.last

    def named(*names: str) -> list[tuple[str, str]]:
        return [(k, v) for k, v in seen.headers if k.lower().replace("_", "-") in names]

    [(_, info)] = named("x-userinfo")
    assert decode_userinfo(info)["sub"] == BOB_SUB
    [(_, cert)] = named("x-app-certificate")
    assert base64.b64decode(cert) == bob.der
    assert named("x-named-hop", "x-other-hop", "connection", "keep-alive") == []
    assert named("proxy-connection", "te", "forwarded") == []
    assert [v for _, v in named("x-forwarded-for")] == ["127.0.0.1"]
    assert seen.header("X-Forwarded-Proto") == ["https"]
    assert seen.header("X-Forwarded-Host") == ["localhost"]
    assert seen.header("X-Real-IP") == ["127.0.0.1"]
    assert seen.header("X-Request-ID") == [response.one("X-Request-ID")]
    assert response.one("X-Request-ID") != "attacker-chosen"
    assert seen.header("X-Kept") == ["yes"]
    # without a certificate, on a public route: the upstream sees an anonymous request
    async with connect(running) as conn:
        conn.send(request("/public/anon", *spoof))
        assert (await conn.response()).status == 200
    assert upstream.last.raw_path == "/public/anon"
    assert [
        k for k, _ in upstream.last.headers if "userinfo" in k.lower() or "certificate" in k.lower()
    ] == []


async def test_identity_headers_stripped_after_many_header_spellings(
    running: Running, upstream: App
) -> None:
    """Header names are classified once per spelling, in a bounded cache: a client that fills
    it with made-up names first must not get a new spelling of an identity header through."""
    async with connect(running) as conn:
        for batch in range(15):  # 1,350 different names
            conn.send(request("/public/fill", *[f"X-Fill-{batch}-{i}: 1" for i in range(90)]))
            assert (await conn.response()).status == 200
        conn.send(
            request(
                "/public/late",
                "x_uSeRiNfO: forged",
                "X-App-CERTIFICATE: Zm9yZ2Vk",
                "Connection: X-Late-Hop",
                "X-Late-Hop: 1",
                "x_FORWARDED_for: 6.6.6.6",
            )
        )
        assert (await conn.response()).status == 200
    late = upstream.last
    assert late.raw_path == "/public/late"
    names = {k.lower().replace("_", "-") for k, _ in late.headers}
    assert not names & {"x-userinfo", "x-app-certificate", "x-late-hop", "connection"}
    assert [v for k, v in late.headers if k.lower().replace("_", "-") == "x-forwarded-for"] == [
        "127.0.0.1"
    ]


# ---- 8. request smuggling ----------------------------------------------------------------

_SMUGGLED = request("/public/smuggled")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


_AMBIGUOUS: dict[str, bytes] = {
    "cl-and-te": req(
        "POST",
        "/public/carrier",
        f"Content-Length: {len(b'0' + _SMUGGLED) + 4}",
        "Transfer-Encoding: chunked",
    )
    + b"0\r\n\r\n"
    + _SMUGGLED,
    "te-and-cl": req(
        "POST", "/public/carrier", "Transfer-Encoding: chunked", f"Content-Length: {len(_SMUGGLED)}"
    )
    + b"0\r\n\r\n"
    + _SMUGGLED,
    "two-lengths": req(
        "POST", "/public/carrier", "Content-Length: 0", f"Content-Length: {len(_SMUGGLED)}"
    )
    + _SMUGGLED,
    "obs-fold-te": req("GET", "/public/carrier", "X-Fold: a", " Transfer-Encoding: chunked")
    + b"0\r\n\r\n"
    + _SMUGGLED,
    "obs-fold-cl": req("GET", "/public/carrier", "X-Fold: a", f"\tContent-Length: {len(_SMUGGLED)}")
    + _SMUGGLED,
    "bare-lf-in-head": req("GET", "/public/carrier", f"X-Lf: a\nContent-Length: {len(_SMUGGLED)}")
    + _SMUGGLED,
    "bare-cr-in-head": req("GET", "/public/carrier", f"X-Cr: a\rContent-Length: {len(_SMUGGLED)}")
    + _SMUGGLED,
    "nul-in-value": req("GET", "/public/carrier", "X-Nul: a\x00b") + _SMUGGLED,
    "space-before-colon": req(
        "POST",
        "/public/carrier",
        "Transfer-Encoding : chunked",
        f"Content-Length: {len(_SMUGGLED)}",
    )
    + _SMUGGLED,
    "te-not-chunked": req("POST", "/public/carrier", "Transfer-Encoding: xchunked")
    + b"0\r\n\r\n"
    + _SMUGGLED,
    "chunked-twice": req("POST", "/public/carrier", "Transfer-Encoding: chunked, chunked")
    + b"0\r\n\r\n"
    + _SMUGGLED,
    "chunk-size-overflow": req("POST", "/public/carrier", "Transfer-Encoding: chunked")
    + b"10000000000000000000001\r\n"
    + _SMUGGLED,
    "negative-length": req("POST", "/public/carrier", "Content-Length: -1") + _SMUGGLED,
}


@pytest.mark.parametrize("attack", list(_AMBIGUOUS), ids=list(_AMBIGUOUS))
async def test_ambiguous_request_after_a_fast_path_one_is_refused(
    raw_running: Running, raw_upstream: RawUpstream, attack: str
) -> None:
    async with connect(raw_running) as conn:
        conn.send(request("/public/first") + _AMBIGUOUS[attack] + request("/public/after"))
        first = await conn.response()
        refused = await conn.response()
        rest = await conn.ended()
    assert (first.status, first.body) == (200, b"ok")
    assert refused.status == 400, refused
    assert rest == b"", "the connection went on after a request it could not frame"
    assert len(raw_upstream.heads) == 1 and raw_upstream.heads[0].startswith(b"GET /public/first ")
    assert b"carrier" not in raw_upstream.received and b"smuggled" not in raw_upstream.received


async def test_http09_line_does_not_merge_with_the_next_request(
    raw_running: Running, raw_upstream: RawUpstream
) -> None:
    """An HTTP/0.9 request line ("GET /path" CRLF) ends its message at once: the head that
    follows it is another message, never more of the same one."""
    async with connect(raw_running) as conn:
        conn.send(request("/public/first") + b"GET /public/nine\r\n" + _SMUGGLED)
        first = await conn.response()
        data = await conn.ended()
    assert first.status == 200
    assert re.match(rb"HTTP/1\.[01] 400 ", data) or data == b"", data[:200]
    assert len(raw_upstream.heads) == 1
    assert b"nine" not in raw_upstream.received and b"smuggled" not in raw_upstream.received


@pytest.mark.parametrize(
    ("method", "framing"),
    [("POST", "chunked"), ("GET", "chunked"), ("POST", "length")],
)
async def test_body_holding_a_request_is_one_request(
    running: Running, upstream: App, method: str, framing: str
) -> None:
    if framing == "chunked":
        carrier = req(method, "/public/carrier", "Transfer-Encoding: chunked")
        carrier += _chunk(_SMUGGLED) + b"0\r\n\r\n"
    else:
        carrier = req(method, "/public/carrier", body=_SMUGGLED)
    async with connect(running) as conn:
        conn.send(request("/public/first") + carrier + request("/public/after"))
        responses = [await conn.response() for _ in range(3)]
    assert [r.status for r in responses] == [200, 200, 200]
    assert responses[1].json()["sha256"] == sha256(_SMUGGLED)
    assert responses[2].json()["path"] == "/public/after"
    assert upstream.paths() == ["/public/first", "/public/carrier", "/public/after"]
    assert upstream.seen[1].body_sha256 == sha256(_SMUGGLED)


# RFC 9112 §3.2: an HTTP/1.1 request with no Host or more than one is answered 400, on
# either path (the fast path hands such heads to aiohttp, which refuses them).
@pytest.mark.parametrize(
    ("fields", "method"),
    [
        pytest.param(
            ["Host: localhost", "Host: evil.example"],
            "GET",
            id="two-hosts-fast-path",
        ),
        pytest.param(["Host: localhost", "Host: evil.example"], "POST", id="two-hosts-handed-over"),
        pytest.param(
            [],
            "GET",
            id="no-host-fast-path",
        ),
        pytest.param([], "POST", id="no-host-handed-over"),
    ],
)
async def test_host_field_must_be_there_once(
    raw_running: Running, raw_upstream: RawUpstream, fields: list[str], method: str
) -> None:
    body = b"x" if method == "POST" else b""
    async with connect(raw_running) as conn:
        conn.send(req(method, "/public/host", *fields, body=body, host=None))
        response = await conn.response()
    assert response.status == 400
    assert raw_upstream.heads == []


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_upstream_failing_mid_body_truncates_the_response(
    running: Running, upstream: App, framing: str
) -> None:
    """A response cut short upstream must not pass for complete: no final chunk, fewer bytes
    than the Content-Length, and the connection closed (the request behind is not served)."""
    async with connect(running) as conn:
        conn.send(request(f"/public/reset/{framing}") + request("/public/after"))
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError, ssl.SSLError)):
            await conn.response()
        assert await conn.ended() == b""
    assert upstream.paths() == [f"/public/reset/{framing}"]


# ---- 9. deadlines ---------------------------------------------------------------------------


async def _open_then(conn: Conn, before: str) -> None:
    """Put the connection in the state named: fresh, after a fast-path GET, handed over."""
    if before == "get":
        conn.send(request("/public/first"))
        assert (await conn.response()).status == 200
    elif before == "post":
        conn.send(req("POST", "/public/first", body=b"x" * 100))
        assert (await conn.response()).status == 200


@pytest.mark.parametrize("before", ["nothing", "get", "post"])
async def test_half_a_head_then_silence_is_cut_off(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: App, before: str
) -> None:
    running = await start_with_limits(
        start_sidecar, config_dir, upstream, header_timeout="500ms", keepalive_timeout="30s"
    )
    async with connect(running) as conn:
        await _open_then(conn, before)
        conn.send(b"GET /public/half HTTP/1.1\r\nHost: loc")
        started = time.monotonic()
        data = await conn.ended(timeout=10)
        waited = time.monotonic() - started
    assert waited < 4, f"the connection stayed open {waited:.1f} s with a 0.5 s header timeout"
    assert not data.startswith(b"HTTP/1.1 2"), data[:200]
    assert "/public/half" not in upstream.paths()


@pytest.mark.parametrize("before", ["get", "post"])
async def test_dribbled_head_is_cut_off(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: App, before: str
) -> None:
    running = await start_with_limits(
        start_sidecar, config_dir, upstream, header_timeout="500ms", keepalive_timeout="30s"
    )
    head = request("/public/dribble")  # one byte every 0.1 s: more than 4 s for all of it
    async with connect(running) as conn:
        await _open_then(conn, before)

        async def dribble() -> None:
            for byte in head:
                conn.send(bytes([byte]))
                await asyncio.sleep(0.1)

        sender = asyncio.create_task(dribble())
        started = time.monotonic()
        try:
            data = await conn.ended(timeout=10)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, ssl.SSLError):
                await sender
        waited = time.monotonic() - started
    assert waited < 3, f"a dribbling client kept its connection {waited:.1f} s"
    assert not data.startswith(b"HTTP/1.1 2"), data[:200]
    assert "/public/dribble" not in upstream.paths()


@pytest.mark.parametrize("before", ["get", "post"])
async def test_idle_connection_lasts_the_keepalive_timeout(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: App, before: str
) -> None:
    running = await start_with_limits(
        start_sidecar, config_dir, upstream, header_timeout="300ms", keepalive_timeout="1500ms"
    )
    async with connect(running) as conn:
        await _open_then(conn, before)
        await asyncio.sleep(0.8)  # idle longer than the header timeout: still open
        conn.send(request("/public/second"))
        second = await conn.response()
        assert (second.status, second.json()["path"]) == (200, "/public/second")
        started = time.monotonic()
        assert await conn.ended(timeout=10) == b""
        waited = time.monotonic() - started
    assert waited < 5, f"an idle connection stayed open {waited:.1f} s with a 1.5 s keep-alive"


# ---- 10. the connection limit across the hand-over -----------------------------------------


async def test_connection_slots_are_counted_across_the_hand_over(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: App
) -> None:
    running = await start_with_limits(start_sidecar, config_dir, upstream, max_connections=2)

    async def refused() -> bool:
        try:
            response = await raw_exchange(running, request("/public/extra"), timeout=3)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            response = b""
        return response == b""

    async with connect(running) as fast, connect(running) as handed:
        fast.send(request("/public/a"))
        assert (await fast.response()).status == 200
        handed.send(req("POST", "/public/b", body=b"body"))  # now aiohttp's connection
        assert (await handed.response()).status == 200
        assert open_connections(running) == 2
        assert await refused()
        await handed.close()
        await eventually(lambda: open_connections(running) == 1, "the handed-over slot freed")
        async with connect(running) as again:
            again.send(req("POST", "/public/c", body=b"body"))
            assert (await again.response()).status == 200
            assert await refused()
        await eventually(lambda: open_connections(running) == 1, "the third slot freed")
        fast.send(request("/public/d"))
        assert (await fast.response()).status == 200
    await eventually(lambda: open_connections(running) == 0, "every slot freed")
    assert "/public/extra" not in upstream.paths()


# ---- 11. graceful shutdown ------------------------------------------------------------------


async def test_shutdown_finishes_in_flight_requests_and_closes_idle_connections(
    running: Running, upstream: App
) -> None:
    sidecar = running.sidecar
    port = sidecar.port
    async with (
        connect(running) as busy,
        connect(running) as busy_handed,
        connect(running) as idle,
    ):
        idle.send(request("/public/idle"))
        assert (await idle.response()).status == 200
        busy.send(request("/public/slow") + request("/public/behind"))
        busy_handed.send(req("POST", "/public/slow", body=b"x"))  # aiohttp serves this one
        await eventually(lambda: upstream.slow_waiting == 2, "both slow requests upstream")
        stop = asyncio.create_task(sidecar.stop(grace=5))
        assert await idle.ended(timeout=3) == b""
        assert not stop.done()
        upstream.release.set()
        for conn in (busy, busy_handed):
            late = await conn.response()
            assert (late.status, late.body) == (200, b"late")
            assert "close" in late.tokens("Connection")  # on aiohttp's path too
            assert await conn.ended() == b""
        await asyncio.wait_for(stop, 5)
    assert "/public/behind" not in upstream.paths()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_shutdown_closes_an_idle_handed_over_connection_at_once(
    running: Running, upstream: App
) -> None:
    async with connect(running) as handed:
        handed.send(req("POST", "/public/handed", body=b"x"))
        assert (await handed.response()).status == 200
        started = time.monotonic()
        await asyncio.wait_for(running.sidecar.stop(grace=5), 10)
        took = time.monotonic() - started
        assert await handed.ended(timeout=1) == b""
    assert took < 2, f"stop() waited {took:.1f} s of its 5 s grace for an idle connection"


async def test_shutdown_grace_bounds_an_in_flight_request(running: Running, upstream: App) -> None:
    async with connect(running) as busy:
        busy.send(request("/public/slow"))
        await eventually(lambda: upstream.slow_waiting == 1, "the slow request upstream")
        started = time.monotonic()
        await asyncio.wait_for(running.sidecar.stop(grace=0.3), 5)
        assert time.monotonic() - started < 3
        data = await busy.ended()
    assert not data.startswith(b"HTTP/1.1 200"), "answered after the grace period"


# ---- 12. a client that leaves in the middle of a response -----------------------------------


@pytest.mark.parametrize("how", ["abort", "close"])
@pytest.mark.parametrize(
    "path", ["/public/download/268435456", "/public/stream/262144"], ids=["length", "chunked"]
)
async def test_client_leaving_mid_download(
    running: Running, upstream: App, path: str, how: str
) -> None:
    async with connect(running) as conn:
        conn.send(request(path))
        head = await conn.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        received = 0
        while received < 2 * MiB:
            chunk = await conn.reader.read(65536)
            assert chunk
            received += len(chunk)
        if how == "abort":
            conn.abort()
    # the sidecar goes on: new connections, correct answers over the upstream pool
    for i in range(3):
        async with connect(running) as conn:
            conn.send(request(f"/public/after/{i}") + request("/public/download/3000000"))
            after = await conn.response()
            download = await conn.response()
        assert (after.status, after.json()["path"]) == (200, f"/public/after/{i}")
        assert (download.status, download.body) == (200, blob(3_000_000))
    await eventually(lambda: open_connections(running) == 0, "every connection closed")


# ---- the same paths on uvloop, the production event loop -----------------------------------


def test_main_paths_on_uvloop(config_dir: ConfigDir) -> None:
    """uvloop's TLS transport differs from asyncio's (and ``set_protocol`` moves a connection
    to aiohttp in the middle): the tests above that need only ``running`` and ``upstream``,
    once more on uvloop."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        app = App(0)
        await app.start()
        path = config_dir.write(config_dir.base(app.port))
        sidecar = Sidecar(config_mod.load(path), config_path=path, metrics=Metrics())
        await sidecar.start()
        running = Running(sidecar, config_dir, config_dir.certs)
        try:
            assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
            await test_pipelined_gets_are_answered_in_order(running, app)
            for pipelined in (False, True):
                app.seen.clear()
                await test_get_post_get_on_one_connection(running, app, pipelined)
                app.seen.clear()
                await test_websocket_upgrade_after_a_get(running, app, pipelined)
            for test in (
                test_body_arriving_after_its_head,
                test_http10_without_keep_alive_is_answered_and_closed,
                test_http10_keep_alive_after_the_hand_over,
                test_head_sends_no_body_and_keeps_the_length,
                test_unknown_length_is_chunked_to_http11,
                test_client_identity_and_forwarding_headers_are_stripped,
            ):
                app.seen.clear()
                await test(running, app)
            app.seen.clear()
            await test_unknown_length_is_close_delimited_to_http10(running, app, False)
            app.seen.clear()
            await test_body_holding_a_request_is_one_request(running, app, "POST", "chunked")
            app.seen.clear()
            await test_client_leaving_mid_download(running, app, "/public/stream/262144", "abort")
        finally:
            await sidecar.stop(grace=1)
            await app.stop()

    uvloop.run(scenario())


# ---- a certificate OpenSSL accepted but the sidecar cannot read ------------------------------


@pytest.fixture
def unreadable_certificates(running: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    # No certificate that OpenSSL verifies and cryptography refuses is at hand: the parser's
    # refusal is what is simulated here, the connection and the requests are real.
    def refuse(ssl_obj: object) -> None:
        raise CertificateError("cannot parse the peer certificate")

    monkeypatch.setattr(running.sidecar.peer_certs, "from_ssl_object", refuse)


@pytest.mark.usefixtures("unreadable_certificates")
async def test_unreadable_certificate_is_no_identity_and_the_last_request(
    running: Running, upstream: App
) -> None:
    async with connect(running) as conn:
        conn.send(request("/needs-identity") + request("/public/never"))
        response = await conn.response()
        assert response.status == 401  # as without a certificate
        assert "close" in response.tokens("Connection")
        assert await conn.ended() == b""
    assert upstream.paths() == []


@pytest.mark.usefixtures("unreadable_certificates")
async def test_unreadable_certificate_is_not_handed_over(running: Running, upstream: App) -> None:
    async with connect(running) as conn:
        conn.send(req("POST", "/needs-identity", body=b"payload"))
        assert await conn.ended() == b""  # closed: never served as anyone
    assert upstream.paths() == []
    await eventually(lambda: open_connections(running) == 0, "the connection to be released")


async def test_unfinished_head_past_the_header_block_limit_is_refused_at_once(
    running: Running, upstream: App
) -> None:
    # 40 KiB of header lines that never end (limits.max_header_block is 32 KiB by default):
    # answered 431 as soon as the limit is passed, not held until the header deadline.
    lines = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 400) for i in range(100))
    async with connect(running) as conn:
        conn.send(b"GET /public/x HTTP/1.1\r\nHost: localhost\r\n" + lines)
        started = time.monotonic()
        response = await conn.response()
        assert response.status == 431
        assert "close" in response.tokens("Connection")
        assert await conn.ended() == b""
    assert time.monotonic() - started < 2
    assert upstream.paths() == []


async def test_request_line_too_long_without_its_end_is_414(running: Running) -> None:
    async with connect(running) as conn:
        conn.send(b"GET /" + b"a" * 20000)  # no line end yet (max_request_line: 8190)
        response = await conn.response()
        assert response.status == 414


@pytest.mark.parametrize("method", ["GET", "POST"], ids=["fast-path", "handed-over"])
async def test_client_that_stops_reading_is_dropped_after_send_timeout(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: App, method: str
) -> None:
    running = await start_with_limits(start_sidecar, config_dir, upstream, send_timeout="1s")
    async with connect(running) as conn:
        conn.send(req(method, "/public/download/268435456", body=b"x" if method == "POST" else b""))
        head = await conn.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        # Read nothing more: the sidecar's writes back up, then it must let go of the client
        # and of the upstream connection behind it.
        await eventually(
            lambda: open_connections(running) == 0, "the stalled client to be dropped", timeout=15
        )
    async with connect(running) as conn:  # and it goes on serving
        conn.send(request("/public/after"))
        assert (await conn.response()).status == 200


@pytest.mark.parametrize("method", ["GET", "POST"], ids=["fast-path", "handed-over"])
@pytest.mark.parametrize(
    "host", ["a b", "evil.example/admin", "user@evil.example", "a:b:c", "[::1", "h\u00e9.example"]
)
async def test_invalid_host_value_is_400(
    running: Running, upstream: App, method: str, host: str
) -> None:
    async with connect(running) as conn:
        conn.send(req(method, "/public/h", host=host, body=b"x" * (method == "POST")))
        response = await conn.response()
    assert response.status == 400
    assert upstream.paths() == []


@pytest.mark.parametrize(
    "host",
    ["localhost", "localhost:8443", "[::1]:8443", "my_app", "10.0.0.1:80", "xn--bcher-kva.ch"],
)
async def test_valid_host_values_pass_as_sent(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: App, host: str
) -> None:
    # A Host must name a host served (issue #12 item 7: otherwise 421) and, when the client
    # sent a TLS server name, that one: these names are served, and no SNI is sent.
    data = config_dir.base(upstream.port)
    data["listen"]["server_names"] = ["localhost", "::1", "my_app", "10.0.0.1", "xn--bcher-kva.ch"]
    running = await start_sidecar(data)
    context = running.client_ssl()
    context.check_hostname = False
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", running.sidecar.port, ssl=context, server_hostname=""
    )
    conn = Conn(reader, writer)
    try:
        conn.send(req("GET", "/public/h", host=host))
        response = await conn.response()
    finally:
        await conn.close()
    assert response.status == 200
    assert upstream.seen[-1].header("Host") == [host]
    assert upstream.seen[-1].header("X-Forwarded-Host") == [host]


# ---- requests served without a task (ClientConnection._start and _on_upstream) -------------
# A request that needs no waiting on our side (its verdict is cached or not needed, and the
# upstream pool has an idle connection) is written upstream straight from the event loop, and
# its response relayed from the upstream connection's notice. Every way such an exchange can go
# other than "the whole response at once" must end exactly as on the task's path: a read
# timeout is a 504, a stale pooled connection is sent again, a streamed body is relayed to its
# end, garbage is a 502, a client that leaves costs nothing, and shutdown waits for it.
#
# Each test first warms the pool with one request, then checks (white-box, so that the test
# cannot silently stop covering this path) that the connection under test never needed a task.


def clients(running: Running) -> set[ClientConnection]:
    listener = running.sidecar._listener
    assert listener is not None
    return set(listener.clients)


async def warm(running: Running) -> set[ClientConnection]:
    """One request on a connection of its own: the upstream pool then has an idle one.
    Returns the client connections open after it (``the_client`` finds the next one)."""
    async with connect(running) as conn:
        conn.send(request("/public/warm"))
        assert (await conn.response()).status == 200
    return clients(running)


def taskless(conn: ClientConnection) -> bool:
    return conn._task is None


async def start_with_read_timeout(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, port: int, read: str = "5s"
) -> Running:
    data = config_dir.base(port)
    data["upstream"]["timeout"]["read"] = read
    running: Running = await start_sidecar(data)
    return running


async def the_client(running: Running, before: set[ClientConnection]) -> ClientConnection:
    new: set[ClientConnection] = set()

    def arrived() -> bool:
        new.update(clients(running) - before)
        return bool(new)

    await eventually(arrived, "the connection under test")
    assert len(new) == 1
    return new.pop()


async def test_warm_requests_need_no_task(running: Running, upstream: App) -> None:
    before = await warm(running)
    async with connect(running) as conn:
        for i in range(3):
            conn.send(request(f"/public/n/{i}"))
            answer = await conn.response()
            assert (answer.status, answer.json()["path"]) == (200, f"/public/n/{i}")
        assert taskless(await the_client(running, before))


async def test_read_timeout_is_504(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: App
) -> None:
    running = await start_with_read_timeout(start_sidecar, config_dir, upstream.port, read="300ms")
    before = await warm(running)
    async with connect(running) as conn:
        conn.send(request("/public/slow"))
        await eventually(lambda: upstream.slow_waiting == 1, "the request upstream")
        client = await the_client(running, before)
        assert taskless(client)
        answer = await conn.response()
        assert answer.status == 504
        assert answer.json()["status"] == 504
        assert not taskless(client)  # the task took the failed exchange over
        upstream.release.set()
        conn.send(request("/public/after"))  # and the connection goes on
        after = await conn.response()
        assert (after.status, after.json()["path"]) == (200, "/public/after")


async def test_stale_pooled_connection_is_sent_again(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    scripted: StartScripted,
) -> None:
    # The upstream closes each connection when a second request arrives on it, without a
    # byte of answer: the race of a keep-alive timeout with a request on its way.
    async def answer(state: Scripted, n: int, head: bytes, w: asyncio.StreamWriter) -> bool:
        if n == 1:
            return False
        w.write(answer_ok(b"answered"))
        return True

    up = await scripted(answer)
    running = await start_with_read_timeout(start_sidecar, config_dir, up.port)
    before = await warm(running)
    async with connect(running) as conn:
        conn.send(request("/public/again"))
        answer_ = await conn.response()
        assert (answer_.status, answer_.body) == (200, b"answered")
        assert not taskless(await the_client(running, before))  # sent again by the task
    paths = [r.split(b" ", 2)[1] for r in up.requests]
    assert paths == [b"/public/warm", b"/public/again", b"/public/again"]
    assert up.connections == 2


async def test_a_body_that_keeps_coming_is_streamed(running: Running, upstream: App) -> None:
    await warm(running)
    async with connect(running) as conn:
        conn.send(request("/public/stream/64") + request("/public/next"))
        streamed = await conn.response()
        assert (streamed.status, streamed.framing) == (200, "chunked")
        assert streamed.body == stream_body(64)
        following = await conn.response()
        assert following.json()["path"] == "/public/next"


async def test_garbage_from_the_upstream_is_502(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    scripted: StartScripted,
) -> None:
    async def answer(state: Scripted, n: int, head: bytes, w: asyncio.StreamWriter) -> bool:
        if b" /public/garbage " in head:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: x2\r\n\r\nok")
        else:
            w.write(answer_ok())
        return True

    up = await scripted(answer)
    running = await start_with_read_timeout(start_sidecar, config_dir, up.port)
    before = await warm(running)
    async with connect(running) as conn:
        conn.send(request("/public/garbage"))
        assert (await conn.response()).status == 502
        conn.send(request("/public/fine"))
        assert (await conn.response()).body == b"ok"
        assert not taskless(await the_client(running, before))  # the 502 came from the task


@pytest.mark.parametrize("how", ["abort", "close"])
async def test_client_leaving_while_its_request_is_upstream(
    running: Running, upstream: App, how: str
) -> None:
    before = await warm(running)
    async with connect(running) as conn:
        conn.send(request("/public/slow"))
        await eventually(lambda: upstream.slow_waiting == 1, "the request upstream")
        assert taskless(await the_client(running, before))
        if how == "abort":
            conn.abort()
        else:
            await conn.close()
    await eventually(lambda: open_connections(running) == 0, "the connection counted out")
    upstream.release.set()
    # the late answer ends the request: not counted in flight for ever, and logged once
    await eventually(lambda: running.sidecar.metrics.in_flight == 0, "no request in flight")
    for i in range(2):  # the pool and the listener go on
        async with connect(running) as conn:
            conn.send(request(f"/public/then/{i}"))
            assert (await conn.response()).json()["path"] == f"/public/then/{i}"


async def test_shutdown_waits_for_a_request_without_a_task(running: Running, upstream: App) -> None:
    before = await warm(running)
    async with connect(running) as conn:
        conn.send(request("/public/slow"))
        await eventually(lambda: upstream.slow_waiting == 1, "the request upstream")
        client = await the_client(running, before)
        assert taskless(client)
        stop = asyncio.create_task(running.sidecar.stop(grace=5))
        await asyncio.sleep(0.2)
        assert not stop.done(), "stop() did not wait for the request in flight"
        upstream.release.set()
        late = await conn.response()
        assert (late.status, late.body) == (200, b"late")
        assert "close" in late.tokens("Connection")
        assert await conn.ended() == b""
        await asyncio.wait_for(stop, 5)


async def test_client_and_upstream_connections_have_nodelay(running: Running) -> None:
    """Nagle's algorithm would hold a response's last segment for the client's delayed ACK
    (40 ms a request). The event loop's TCP transports set TCP_NODELAY on every connection,
    accepted and dialled (asyncio's and uvloop's alike), so the sidecar does not set it again:
    both ends are checked here, on the loop the suite runs on."""
    import gc
    import socket

    from sidecar.http1.upstream import UpstreamConnection

    async with connect(running) as conn:
        conn.send(request("/public/nodelay"))
        assert (await conn.response()).status == 200
        (client,) = clients(running)
        ends = [client._transport]
        # the pool's open connection (earlier tests may have left closed ones for the GC)
        ends += [c._transport for c in gc.get_objects() if isinstance(c, UpstreamConnection)]
        sockets = [t.get_extra_info("socket") for t in ends if t is not None and not t.is_closing()]
        sockets = [sock for sock in sockets if sock is not None and sock.fileno() >= 0]
        assert len(sockets) >= 2
        for sock in sockets:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
