"""The forwarder over real sockets: a front server calls ``UpstreamClient.forward`` for each
request and sends it to a real aiohttp upstream; the tests talk HTTP to the front server."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpRawServer
from yarl import URL

from sidecar.config import UpstreamConfig, UpstreamTimeouts
from sidecar.errors import UpstreamError
from sidecar.headers import HeaderRules, upstream_headers
from sidecar.upstream import BodyTooLarge, Forwarded, UpstreamClient

from .pki import make_ca, make_leaf

MiB = 1024 * 1024
RULES = HeaderRules("X-APP-CERTIFICATE", "X-USERINFO")
# The test client sends only what a test asks for, so the upstream's view is ours alone.
BARE = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def blob(size: int) -> bytes:
    block = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def eventually(check: Callable[[], bool]) -> None:
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met within 2 s")


async def pieces(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]
        await asyncio.sleep(0)


# ---- the upstream application ---------------------------------------------------------------


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    sha256: str
    length: int

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class Upstream:
    url: str
    seen: list[Seen] = field(default_factory=list)
    ws_handshakes: list[Seen] = field(default_factory=list)
    ws_closes: list[int | None] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def last(self) -> Seen:
        assert self.seen, "the upstream received no request"
        return self.seen[-1]


async def _record(request: web.BaseRequest) -> Seen:
    digest, size = hashlib.sha256(), 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
    return Seen(request.method, request.raw_path, headers, digest.hexdigest(), size)


class UpstreamApp:
    """Routes on the first path segment after an optional ``/app`` prefix."""

    def __init__(self) -> None:
        self.state: Upstream

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        segments = request.path.removeprefix("/app").split("/")
        handler = getattr(self, "do_" + segments[1].replace("-", "_"), self.do_echo)
        response: web.StreamResponse = await handler(request)
        return response

    async def do_echo(self, request: web.BaseRequest) -> web.StreamResponse:
        seen = await _record(request)
        self.state.seen.append(seen)
        return web.json_response(
            {"method": seen.method, "raw_path": seen.raw_path, "sha256": seen.sha256}
        )

    async def do_download(self, request: web.BaseRequest) -> web.StreamResponse:
        size = int(request.query["size"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if request.query.get("chunked") != "1":
            response.content_length = size
        await response.prepare(request)
        data = blob(size)
        for start in range(0, size, 256 * 1024):
            await response.write(data[start : start + 256 * 1024])
        await response.write_eof()
        return response

    async def do_slow(self, request: web.BaseRequest) -> web.StreamResponse:
        await asyncio.wait_for(self.state.release.wait(), 5)
        return web.Response(text="late")

    async def do_stall_body(self, request: web.BaseRequest) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 10_000
        await response.prepare(request)
        await response.write(b"x" * 1000)
        await asyncio.wait_for(self.state.release.wait(), 5)
        return response

    async def do_reset_headers(self, request: web.BaseRequest) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        return web.Response()  # never sent: the write fails and aiohttp lets it go

    async def do_reset_body(self, request: web.BaseRequest) -> web.StreamResponse:
        response = web.StreamResponse()
        if request.query.get("chunked") != "1":
            response.content_length = MiB
        await response.prepare(request)
        await response.write(b"y" * 100_000)
        await asyncio.sleep(0.1)  # let the headers and part of the body reach the proxy
        assert request.transport is not None
        request.transport.abort()
        return response

    async def do_cookies(self, request: web.BaseRequest) -> web.StreamResponse:
        headers = CIMultiDict(
            [
                ("Set-Cookie", "a=1; Path=/"),
                ("Set-Cookie", "b=2; Path=/; HttpOnly"),
                ("Connection", "X-Hop"),
                ("X-Hop", "secret"),
                ("Keep-Alive", "timeout=5"),
                ("X-Kept", "yes"),
                ("X-Request-ID", "the-upstream-own"),
            ]
        )
        return web.Response(text="cookies", headers=headers)

    async def do_head(self, request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(body=b"h" * 1234, content_type="text/plain")

    async def do_gzip(self, request: web.BaseRequest) -> web.StreamResponse:
        body = gzip.compress(b"hello " * 1000)
        return web.Response(
            body=body, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"}
        )

    async def do_ws(self, request: web.BaseRequest) -> web.StreamResponse:
        self.state.ws_handshakes.append(await _record(request))
        ws = web.WebSocketResponse(protocols=("chat.v2",))
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT and msg.data.startswith("close:"):
                await ws.close(code=int(msg.data[6:]), message=b"bye")
            elif msg.type is WSMsgType.TEXT and msg.data == "vanish":
                assert request.transport is not None
                request.transport.abort()
                break
            elif msg.type is WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        self.state.ws_closes.append(ws.close_code)
        return ws

    async def do_ws_refuse(self, request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(status=403, text="no WebSockets here")


@pytest.fixture
async def upstream(aiohttp_raw_server: AiohttpRawServer) -> AsyncIterator[Upstream]:
    app = UpstreamApp()
    server = await aiohttp_raw_server(app)
    app.state = Upstream(f"http://127.0.0.1:{server.port}")
    yield app.state
    app.state.release.set()  # let stalled handlers finish before the server closes


@pytest.fixture
async def tls_upstream(tmp_path: Path) -> AsyncIterator[tuple[Upstream, Path]]:
    """The same application over TLS, with a certificate from a CA no system trusts."""
    ca = make_ca("Upstream Test CA")
    cert, key = make_leaf(ca, "localhost", server=True).write(tmp_path, "upstream")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    ca_file = tmp_path / "upstream-ca.pem"
    ca_file.write_bytes(ca.pem)
    app = UpstreamApp()
    runner = web.ServerRunner(web.Server(app))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    app.state = Upstream(f"https://127.0.0.1:{runner.addresses[0][1]}")
    yield app.state, ca_file
    await runner.cleanup()


@pytest.fixture
async def garbage_upstream() -> AsyncIterator[str]:
    """Answers every request with bytes that are not HTTP."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.close()
    await server.wait_closed()


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A listener whose accept queue is full: new connections hang in SYN (Linux)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    yield f"http://127.0.0.1:{port}"
    for filler in fillers:
        filler.close()
    listener.close()


# ---- the front server that forwards --------------------------------------------------------


@dataclass
class Proxy:
    client: UpstreamClient
    base: str = ""
    errors: list[UpstreamError] = field(default_factory=list)
    forwarded: list[Forwarded] = field(default_factory=list)

    def url(self, raw: str) -> URL:
        return URL(self.base + raw, encoded=True)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        headers = upstream_headers(
            RULES,
            request.headers,
            client_ip=request.remote,
            trusted=False,
            request_id="rid-1",
            user=None,
            certificate_b64=None,
        )
        try:
            forwarded = await self.client.forward(request, headers)
        except UpstreamError as exc:
            self.errors.append(exc)
            return web.Response(status=504 if exc.kind == "timeout" else 502, text=exc.kind)
        except BodyTooLarge:
            return web.Response(status=413, text="too large")
        self.forwarded.append(forwarded)
        return forwarded.response


MakeProxy = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def make_proxy() -> AsyncIterator[MakeProxy]:
    clients: list[UpstreamClient] = []
    runners: list[web.ServerRunner] = []

    async def make(
        url: str,
        *,
        connect: float = 2.0,
        read: float = 5.0,
        max_body_size: int | None = None,
        max_connections: int = 16,
    ) -> Proxy:
        timeouts = UpstreamTimeouts(connect=connect, read=read)
        config = UpstreamConfig(url=url, timeout=timeouts, max_connections=max_connections)
        client = UpstreamClient(config, max_body_size=max_body_size)
        await client.start()
        clients.append(client)
        proxy = Proxy(client)
        # Like the sidecar's listener (and unlike aiohttp's TestServer), a client that goes
        # away does not cancel the handler.
        runner = web.ServerRunner(web.Server(proxy.handle, handler_cancellation=False))
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        proxy.base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return proxy

    yield make
    for runner in runners:
        await runner.cleanup()
    for client in clients:
        await client.close()


@pytest.fixture
async def proxy(make_proxy: MakeProxy, upstream: Upstream) -> Proxy:
    return await make_proxy(upstream.url + "/app")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        auto_decompress=False, skip_auto_headers=BARE, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        yield session


async def fetch(
    session: aiohttp.ClientSession, method: str, url: URL, **kwargs: Any
) -> tuple[int, CIMultiDict[str], bytes]:
    async with session.request(method, url, allow_redirects=False, **kwargs) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


# ---- methods, targets, headers --------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("GET", None),
        ("HEAD", None),
        ("POST", b"post body"),
        ("PUT", b"put body"),
        ("PATCH", b"patch body"),
        ("DELETE", None),
        ("OPTIONS", None),
        ("PROPFIND", b"<propfind/>"),
    ],
)
async def test_every_method_is_forwarded(
    proxy: Proxy,
    upstream: Upstream,
    session: aiohttp.ClientSession,
    method: str,
    body: bytes | None,
) -> None:
    status, headers, _ = await fetch(session, method, proxy.url("/echo/m"), data=body)
    assert status == 200
    assert headers["X-Request-ID"] == "rid-1"
    assert upstream.last.method == method
    assert upstream.last.sha256 == sha256(body or b"")
    assert proxy.forwarded[-1].status == 200
    assert proxy.forwarded[-1].upstream_seconds > 0


@pytest.mark.parametrize(
    "raw",
    [
        "/echo/a%2Fb/c%20d/%C3%A9/+plus?q=a+b%2Bc&a=1&a=2&empty=&flag&z=%3D%26",
        "/echo//double//slash/./dot/../up?b=2&a=1&b=3",
        "/echo/%7euser;v=1?x=%zz&%C3%A9=%c3%a9",
    ],
)
@pytest.mark.parametrize("prefix", ["/app", ""])
async def test_path_and_query_are_byte_exact(
    make_proxy: MakeProxy,
    upstream: Upstream,
    session: aiohttp.ClientSession,
    raw: str,
    prefix: str,
) -> None:
    proxy = await make_proxy(upstream.url + prefix)
    status, _, body = await fetch(session, "GET", proxy.url(raw))
    assert status == 200, body
    assert upstream.last.raw_path == prefix + raw


async def test_absolute_form_target_is_forwarded_as_its_path(
    proxy: Proxy, upstream: Upstream
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.url("/").port)
    writer.write(
        b"GET http://elsewhere.example/echo/abs?x=%20&y HTTP/1.1\r\n"
        b"Host: elsewhere.example\r\nConnection: close\r\n\r\n"
    )
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert upstream.last.raw_path == "/app/echo/abs?x=%20&y"
    assert upstream.last.header("Host") == ["elsewhere.example"]


async def test_expect_100_continue_is_answered(
    proxy: Proxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    # The client sends the body only after the interim 100 Continue.
    data = b"e" * 10_000
    status, _, _ = await fetch(
        session,
        "POST",
        proxy.url("/echo/expect"),
        data=data,
        expect100=True,
        timeout=aiohttp.ClientTimeout(total=5),
    )
    assert status == 200
    assert upstream.last.sha256 == sha256(data)
    assert upstream.last.header("Expect") == []


async def test_headers_are_sent_as_given(
    proxy: Proxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    headers = CIMultiDict([("X-Multi", "1"), ("X-Custom", "yes"), ("X-Multi", "2")])
    status, _, _ = await fetch(session, "POST", proxy.url("/echo/h"), data=b"x", headers=headers)
    assert status == 200
    seen = upstream.last
    # aiohttp adds none of its defaults, and Host is the client's, not the upstream's.
    for name in BARE:
        assert seen.header(name) == [], name
    assert seen.header("Host") == [proxy.url("/").raw_authority]
    assert seen.header("X-Multi") == ["1", "2"]
    assert seen.header("X-Custom") == ["yes"]
    assert seen.header("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.header("X-Request-ID") == ["rid-1"]
    assert seen.header("Content-Length") == ["1"]


# ---- bodies -----------------------------------------------------------------------------------


async def test_upload_with_content_length_keeps_it(
    proxy: Proxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(5 * MiB)
    status, _, _ = await fetch(session, "PUT", proxy.url("/echo/upload"), data=io.BytesIO(data))
    assert status == 200
    assert upstream.last.sha256 == sha256(data)
    assert upstream.last.header("Content-Length") == [str(len(data))]
    assert upstream.last.header("Transfer-Encoding") == []


async def test_chunked_upload_stays_chunked(
    proxy: Proxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    data = os.urandom(3 * MiB + 17)
    status, _, _ = await fetch(session, "POST", proxy.url("/echo/upload"), data=pieces(data))
    assert status == 200
    assert upstream.last.sha256 == sha256(data)
    assert upstream.last.header("Transfer-Encoding") == ["chunked"]
    assert upstream.last.header("Content-Length") == []


async def test_large_download_keeps_content_length(
    proxy: Proxy, session: aiohttp.ClientSession
) -> None:
    size = 20 * MiB
    async with session.get(proxy.url(f"/download?size={size}")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(size)
        assert "Transfer-Encoding" not in resp.headers
        digest = hashlib.sha256()
        async for chunk in resp.content.iter_any():
            digest.update(chunk)
    assert digest.hexdigest() == sha256(blob(size))


async def test_chunked_download_stays_chunked(proxy: Proxy, session: aiohttp.ClientSession) -> None:
    size = 3 * MiB + 5
    status, headers, body = await fetch(
        session, "GET", proxy.url(f"/download?size={size}&chunked=1")
    )
    assert status == 200
    assert headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in headers
    assert sha256(body) == sha256(blob(size))


async def test_head_has_no_body(proxy: Proxy) -> None:
    # One connection: a body sent after the HEAD response would corrupt the next response.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as one:
        status, headers, body = await fetch(one, "HEAD", proxy.url("/head"))
        assert (status, headers["Content-Length"], body) == (200, "1234", b"")
        status, headers, body = await fetch(one, "GET", proxy.url("/head"))
        assert (status, body) == (200, b"h" * 1234)


async def test_content_encoding_is_passed_unchanged(
    proxy: Proxy, session: aiohttp.ClientSession
) -> None:
    status, headers, body = await fetch(session, "GET", proxy.url("/gzip"))
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body) == b"hello " * 1000


async def test_set_cookies_kept_and_hop_by_hop_dropped(
    proxy: Proxy, session: aiohttp.ClientSession
) -> None:
    status, headers, _ = await fetch(session, "GET", proxy.url("/cookies"))
    assert status == 200
    assert headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/; HttpOnly"]
    assert headers["X-Kept"] == "yes"
    assert headers.getall("X-Request-ID") == ["rid-1"]  # ours, the one the upstream received
    assert "X-Hop" not in headers
    assert "Keep-Alive" not in headers
    assert "x-hop" not in headers.get("Connection", "").lower()


# ---- TLS to the upstream -------------------------------------------------------------------


async def test_https_upstream_verified_with_the_system_store(
    make_proxy: MakeProxy,
    tls_upstream: tuple[Upstream, Path],
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream, ca_file = tls_upstream
    # OpenSSL's default verify paths honour SSL_CERT_FILE: the test CA becomes "the system".
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    proxy = await make_proxy(upstream.url + "/app")
    status, _, _ = await fetch(session, "POST", proxy.url("/echo/tls?q=1"), data=b"over tls")
    assert status == 200
    assert upstream.last.raw_path == "/app/echo/tls?q=1"
    assert upstream.last.sha256 == sha256(b"over tls")
    async with session.ws_connect(proxy.url("/ws")) as ws:  # wss:// to the upstream
        await ws.send_str("secure")
        assert await ws.receive_str() == "secure"


async def test_https_upstream_with_untrusted_certificate_is_502(
    make_proxy: MakeProxy, tls_upstream: tuple[Upstream, Path], session: aiohttp.ClientSession
) -> None:
    upstream, _ = tls_upstream
    proxy = await make_proxy(upstream.url)
    status, _, _ = await fetch(session, "GET", proxy.url("/echo/tls"))
    assert status == 502
    assert proxy.errors[-1].kind == "connect"
    assert upstream.seen == []


# ---- failures before the response --------------------------------------------------------------


async def test_upstream_down_is_502(
    make_proxy: MakeProxy, session: aiohttp.ClientSession, closed_port: int
) -> None:
    proxy = await make_proxy(f"http://127.0.0.1:{closed_port}")
    status, _, _ = await fetch(session, "GET", proxy.url("/"))
    assert status == 502
    assert proxy.errors[-1].kind == "connect"


async def test_connect_timeout_is_502(
    make_proxy: MakeProxy, session: aiohttp.ClientSession, blackhole: str
) -> None:
    proxy = await make_proxy(blackhole, connect=0.3)
    status, _, _ = await fetch(session, "GET", proxy.url("/"))
    assert status == 502
    assert proxy.errors[-1].kind == "connect"


async def test_upstream_slower_than_read_timeout_is_504(
    make_proxy: MakeProxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(upstream.url, read=0.3)
    status, _, _ = await fetch(session, "GET", proxy.url("/slow"))
    assert status == 504
    assert proxy.errors[-1].kind == "timeout"


async def test_reset_before_headers_is_502(proxy: Proxy, session: aiohttp.ClientSession) -> None:
    status, _, _ = await fetch(session, "GET", proxy.url("/reset-headers"))
    assert status == 502
    assert proxy.errors[-1].kind == "reset"


async def test_garbage_is_502(
    make_proxy: MakeProxy, session: aiohttp.ClientSession, garbage_upstream: str
) -> None:
    proxy = await make_proxy(garbage_upstream)
    status, _, _ = await fetch(session, "GET", proxy.url("/"))
    assert status == 502
    assert proxy.errors[-1].kind == "protocol"


# ---- failures after the response started ---------------------------------------------------


@pytest.mark.parametrize("chunked", ["0", "1"])
async def test_reset_mid_body_truncates_the_client(
    proxy: Proxy, session: aiohttp.ClientSession, chunked: str
) -> None:
    async with session.get(proxy.url(f"/reset-body?chunked={chunked}")) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert proxy.forwarded[-1].status == 200


async def test_stalled_body_truncates_the_client(
    make_proxy: MakeProxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(upstream.url, read=0.3)
    async with session.get(proxy.url("/stall-body")) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


# ---- body size limit -----------------------------------------------------------------------------


async def test_content_length_over_limit_never_reaches_upstream(
    make_proxy: MakeProxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(upstream.url, max_body_size=1024)
    status, _, _ = await fetch(session, "POST", proxy.url("/echo/big"), data=b"z" * 1025)
    assert status == 413
    assert upstream.seen == []
    status, _, _ = await fetch(session, "POST", proxy.url("/echo/fits"), data=b"z" * 1024)
    assert status == 200
    assert [s.raw_path for s in upstream.seen] == ["/echo/fits"]


async def test_chunked_body_over_limit_is_413(
    make_proxy: MakeProxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(upstream.url, max_body_size=64 * 1024)
    data = b"c" * (128 * 1024)
    status, _, _ = await fetch(session, "POST", proxy.url("/echo/big"), data=pieces(data, 8192))
    assert status == 413
    assert upstream.seen == []
    small = b"c" * (64 * 1024)
    status, _, _ = await fetch(session, "POST", proxy.url("/echo/ok"), data=pieces(small, 8192))
    assert status == 200
    assert upstream.last.sha256 == sha256(small)


# ---- WebSockets -------------------------------------------------------------------------------


async def test_websocket_relays_both_ways(
    proxy: Proxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    async with session.ws_connect(
        proxy.url("/ws"), protocols=("chat.v1", "chat.v2"), autoping=False
    ) as ws:
        assert ws.protocol == "chat.v2"
        await ws.send_str("héllo")
        assert await ws.receive_str() == "héllo"
        await ws.send_bytes(b"\x00\x01\xff")
        assert await ws.receive_bytes() == b"\x00\x01\xff"
        await ws.ping(b"are you there")
        pong = await ws.receive()
        assert (pong.type, pong.data) == (WSMsgType.PONG, b"are you there")
        await ws.send_str("close:4001")
        closing = await ws.receive()
        assert (closing.type, closing.data, closing.extra) == (WSMsgType.CLOSE, 4001, "bye")
    assert ws.close_code == 4001
    handshake = upstream.ws_handshakes[-1]
    assert handshake.raw_path == "/app/ws"
    assert handshake.header("X-Forwarded-For") == ["127.0.0.1"]
    assert handshake.header("Host") == [proxy.url("/").raw_authority]
    assert len(handshake.header("Sec-WebSocket-Key")) == 1
    await eventually(lambda: bool(proxy.forwarded))
    assert proxy.forwarded[-1].status == 101


async def test_websocket_client_close_code_reaches_upstream(
    proxy: Proxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    async with session.ws_connect(proxy.url("/ws")) as ws:
        await ws.send_str("ping")
        assert await ws.receive_str() == "ping"
        await ws.close(code=4002)
    assert ws.close_code == 4002  # echoed by the proxy
    await eventually(lambda: bool(upstream.ws_closes))
    assert upstream.ws_closes == [4002]


async def test_websocket_upstream_vanishing_closes_the_client(
    proxy: Proxy, session: aiohttp.ClientSession
) -> None:
    async with session.ws_connect(proxy.url("/ws")) as ws:
        await ws.send_str("vanish")
        msg = await ws.receive()
        assert msg.type is WSMsgType.CLOSE
        assert msg.data == aiohttp.WSCloseCode.BAD_GATEWAY


async def test_open_websockets_do_not_use_up_the_pool(
    make_proxy: MakeProxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(upstream.url, max_connections=1, connect=0.5)
    async with session.ws_connect(proxy.url("/ws")) as ws:
        status, _, _ = await fetch(session, "GET", proxy.url("/echo/while-ws-open"))
        assert status == 200
        await ws.send_str("still here")
        assert await ws.receive_str() == "still here"


async def test_websocket_refused_by_upstream_is_an_error(
    proxy: Proxy, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await session.ws_connect(proxy.url("/ws-refuse"))
    assert refused.value.status == 502
    assert proxy.errors[-1].kind == "protocol"
