"""The forwarder over real sockets: a front server calls ``UpstreamClient.forward`` for each
request and sends it to a real aiohttp upstream (or, where the exact bytes of an answer
matter, a scripted raw one); the tests talk HTTP to the front server."""

from __future__ import annotations

import asyncio
import contextlib
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

from sidecar.config import LimitsConfig, UpstreamConfig, UpstreamTimeouts
from sidecar.errors import UpstreamError
from sidecar.fallback.forward import FallbackForwarder as UpstreamClient
from sidecar.fallback.forward import Forwarded, header_lines
from sidecar.forwarder import BodyTooLarge
from sidecar.headers import HeaderRules

from .header_views import upstream_headers
from .pki import make_ca, make_leaf
from .servers import Scripted, StartScripted, answer_ok

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
    #: the client port of the connection each request came over (one port: one connection)
    peers: list[int] = field(default_factory=list)

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
        assert request.transport is not None
        self.state.peers.append(request.transport.get_extra_info("peername")[1])
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
        assert forwarded.response is not None  # forward() always hands its response back
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
        client = UpstreamClient(config, limits=LimitsConfig(max_body_size=max_body_size))
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


# ---- the connection pool ----------------------------------------------------------------------


async def test_sequential_requests_share_one_upstream_connection(
    proxy: Proxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    for i in range(5):
        status, _, _ = await fetch(session, "GET", proxy.url(f"/echo/{i}"))
        assert status == 200
    status, _, _ = await fetch(session, "POST", proxy.url("/echo/body"), data=b"x" * 1000)
    assert status == 200
    assert len(upstream.peers) == 6
    assert len(set(upstream.peers)) == 1


async def test_head_then_get_on_the_same_connection(
    proxy: Proxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    # The HEAD response announces 1234 bytes that never come: the next response must not be
    # taken for them.
    status, headers, body = await fetch(session, "HEAD", proxy.url("/head"))
    assert (status, headers["Content-Length"], body) == (200, "1234", b"")
    status, _, body = await fetch(session, "GET", proxy.url("/head"))
    assert (status, body) == (200, b"h" * 1234)
    status, _, body = await fetch(session, "HEAD", proxy.url("/head"))
    status, _, body = await fetch(session, "GET", proxy.url("/echo/after"))
    assert status == 200
    assert len(set(upstream.peers)) == 1


async def test_204_and_304_then_get_on_the_same_connection(
    make_proxy: MakeProxy, scripted: StartScripted, session: aiohttp.ClientSession
) -> None:
    async def answer(state: Scripted, n: int, head: bytes, w: asyncio.StreamWriter) -> bool:
        if head.startswith(b"GET /204 "):
            w.write(b"HTTP/1.1 204 No Content\r\nX-Kind: empty\r\n\r\n")
        elif head.startswith(b"GET /304 "):
            # The length of the representation the client has; no body follows (RFC 9110).
            w.write(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 1234\r\n\r\n')
        else:
            w.write(answer_ok(b"after %d" % n))
        return True

    up = await scripted(answer)
    proxy = await make_proxy(up.url)
    status, headers, body = await fetch(session, "GET", proxy.url("/204"))
    assert (status, headers["X-Kind"], body) == (204, "empty", b"")
    assert (await fetch(session, "GET", proxy.url("/x")))[::2] == (200, b"after 1")
    status, headers, body = await fetch(session, "GET", proxy.url("/304"))
    assert (status, headers["ETag"], body) == (304, '"v1"', b"")
    assert (await fetch(session, "GET", proxy.url("/x")))[::2] == (200, b"after 3")
    assert up.connections == 1


@pytest.mark.parametrize(
    "farewell", [b"", b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n"]
)
async def test_connection_closed_while_idle_is_not_used(
    make_proxy: MakeProxy, scripted: StartScripted, session: aiohttp.ClientSession, farewell: bytes
) -> None:
    async def answer(state: Scripted, n: int, head: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(answer_ok())
        await w.drain()
        await asyncio.sleep(0.05)  # then the upstream's keep-alive timeout strikes
        w.write(farewell)
        return False

    up = await scripted(answer)
    proxy = await make_proxy(up.url)
    for _ in range(3):
        status, _, body = await fetch(session, "GET", proxy.url("/"))
        assert (status, body) == (200, b"ok")
        await asyncio.sleep(0.2)
    assert up.connections == 3
    assert proxy.errors == []


@pytest.mark.parametrize("max_connections", [1, 16])
async def test_stale_connection_is_retried_for_a_request_without_body(
    make_proxy: MakeProxy,
    scripted: StartScripted,
    session: aiohttp.ClientSession,
    max_connections: int,
) -> None:
    # The race every keep-alive client meets: the upstream closes an idle connection just as
    # a request goes out on it. Here every connection's second request meets it.
    async def answer(state: Scripted, n: int, head: bytes, w: asyncio.StreamWriter) -> bool:
        if n == 1:
            return False  # closed without a byte of response
        response = answer_ok(b"answered")
        w.write(response[: -len(b"answered")] if head.startswith(b"HEAD ") else response)
        return True

    up = await scripted(answer)
    proxy = await make_proxy(up.url, max_connections=max_connections)
    assert (await fetch(session, "GET", proxy.url("/1")))[::2] == (200, b"answered")
    assert (await fetch(session, "GET", proxy.url("/2")))[::2] == (200, b"answered")
    assert (await fetch(session, "HEAD", proxy.url("/3")))[0] == 200
    assert up.methods() == ["GET", "GET", "GET", "HEAD", "HEAD"]
    assert up.connections == 3
    assert proxy.errors == []
    # A request with a body may have been acted on: it is never sent twice.
    status, _, _ = await fetch(session, "POST", proxy.url("/4"), data=b"pay once")
    assert status == 502
    assert proxy.errors[-1].kind == "reset"
    assert up.methods().count("POST") == 1


async def test_connection_close_response_is_not_reused(
    make_proxy: MakeProxy, scripted: StartScripted, session: aiohttp.ClientSession
) -> None:
    http10 = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
    # HTTP/1.0 with keep-alive: the version's own framing rules, not reused either
    http10_keep_alive = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"

    async def answer(state: Scripted, n: int, head: bytes, w: asyncio.StreamWriter) -> bool:
        if head.startswith(b"GET /http10 "):
            w.write(http10)
        elif head.startswith(b"GET /http10-keep-alive "):
            w.write(http10_keep_alive)
        elif head.startswith(b"GET /interim-then-http10 "):
            # the first bytes say HTTP/1.1; the final response's status line says 1.0
            w.write(b"HTTP/1.1 100 Continue\r\n\r\n" + http10_keep_alive)
        elif head.startswith(b"GET /split-http10 "):
            w.write(http10_keep_alive[:7])  # "HTTP/1.", the rest in a later read
            await w.drain()
            await asyncio.sleep(0.05)
            w.write(http10_keep_alive[7:])
        else:
            w.write(answer_ok(extra=b"Connection: close\r\n"))
        return True  # and the upstream would go on: only its word keeps us from reusing

    up = await scripted(answer)
    proxy = await make_proxy(up.url)
    paths = ("/close", "/http10", "/http10-keep-alive", "/interim-then-http10", "/split-http10")
    for path in paths * 2:
        status, headers, body = await fetch(session, "GET", proxy.url(path))
        assert (status, body) == (200, b"ok"), path
        assert headers.get("Connection", "").lower() != "close"  # hop by hop: not passed on
    assert up.connections == 2 * len(paths)


@pytest.mark.parametrize("version", [b"1.0", b"1.1"])
async def test_response_delimited_by_eof_arrives_intact(
    make_proxy: MakeProxy,
    scripted: StartScripted,
    session: aiohttp.ClientSession,
    version: bytes,
) -> None:
    data = blob(300_000)

    async def answer(state: Scripted, n: int, head: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/" + version + b" 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
        for start in range(0, len(data), 50_000):
            w.write(data[start : start + 50_000])
            await w.drain()
        return False

    up = await scripted(answer)
    proxy = await make_proxy(up.url)
    for _ in range(2):
        status, _, body = await fetch(session, "GET", proxy.url("/eof"))
        assert status == 200
        assert sha256(body) == sha256(data)
    assert up.connections == 2


async def test_answer_before_the_whole_body_reaches_the_client(
    make_proxy: MakeProxy, session: aiohttp.ClientSession
) -> None:
    # An upstream may refuse an upload on its head alone (RFC 9110 §15.5.14); the rest of the
    # body is then never sent, and the connection is out of step: it is not reused.
    connections, done = 0, asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Too Big\r\nContent-Length: 4\r\n\r\nnope")
        await writer.drain()
        await done.wait()  # without reading the body
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        proxy = await make_proxy(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        data = os.urandom(5 * MiB)
        for _ in range(2):
            status, _, body = await fetch(
                session, "POST", proxy.url("/upload"), data=io.BytesIO(data)
            )
            assert (status, body) == (413, b"nope")
        assert connections == 2
    finally:
        done.set()
        server.close()
        await server.wait_closed()


async def test_early_hints_are_skipped(
    make_proxy: MakeProxy, scripted: StartScripted, session: aiohttp.ClientSession
) -> None:
    async def answer(state: Scripted, n: int, head: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        await w.drain()
        await asyncio.sleep(0.05)
        w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        w.write(answer_ok(b"final", b"X-Final: yes\r\n"))
        return True

    up = await scripted(answer)
    proxy = await make_proxy(up.url)
    for _ in range(2):
        status, headers, body = await fetch(session, "GET", proxy.url("/hints"))
        assert (status, body, headers["X-Final"]) == (200, b"final", "yes")
        assert "Link" not in headers
    assert up.connections == 1


async def test_pool_bounds_connections_and_queues_the_rest(
    make_proxy: MakeProxy, scripted: StartScripted, session: aiohttp.ClientSession
) -> None:
    async def answer(state: Scripted, n: int, head: bytes, w: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.15)
        w.write(answer_ok(b"slow"))
        return True

    up = await scripted(answer)
    proxy = await make_proxy(up.url, max_connections=2)
    results = await asyncio.gather(*(fetch(session, "GET", proxy.url(f"/{i}")) for i in range(5)))
    assert [(status, body) for status, _, body in results] == [(200, b"slow")] * 5
    assert up.max_open <= 2
    assert up.connections == 2


async def test_pool_wait_is_bounded_by_the_connect_timeout(
    make_proxy: MakeProxy, upstream: Upstream, session: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(upstream.url, max_connections=1, connect=0.3)
    slow = asyncio.create_task(fetch(session, "GET", proxy.url("/slow")))
    await eventually(lambda: len(upstream.peers) == 1)
    status, _, _ = await fetch(session, "GET", proxy.url("/echo/waits"))
    assert status == 502
    assert proxy.errors[-1].kind == "connect"
    upstream.release.set()
    assert (await slow)[0] == 200
    assert (await fetch(session, "GET", proxy.url("/echo/then")))[0] == 200


async def test_response_head_split_across_many_segments(
    make_proxy: MakeProxy, scripted: StartScripted, session: aiohttp.ClientSession
) -> None:
    raw = (
        b"HTTP/1.1 200 Fine Thanks\r\nX-Long-Header-Name: "
        + b"v" * 300
        + b"\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
        + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )

    async def answer(state: Scripted, n: int, head: bytes, w: asyncio.StreamWriter) -> bool:
        for start in range(0, len(raw), 7):
            w.write(raw[start : start + 7])
            await w.drain()
            await asyncio.sleep(0.001)
        return True

    up = await scripted(answer)
    proxy = await make_proxy(up.url)
    for _ in range(2):
        async with session.get(proxy.url("/split")) as resp:
            assert (resp.status, resp.reason) == (200, "Fine Thanks")
            assert resp.headers["X-Long-Header-Name"] == "v" * 300
            assert resp.headers.getall("Set-Cookie") == ["a=1", "b=2"]
            assert await resp.read() == b"hello world"
    assert up.connections == 1


@pytest.mark.parametrize(
    ("size", "status"),
    [(60 * 1024, 200), (70 * 1024, 502)],
    ids=["60KiB-passes", "70KiB-refused"],
)
async def test_response_head_is_bounded_at_64_kib(
    make_proxy: MakeProxy, scripted: StartScripted, size: int, status: int
) -> None:
    cookie = "c=" + "k" * (size - 2)

    async def answer(state: Scripted, n: int, head: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(answer_ok(extra=f"Set-Cookie: {cookie}\r\n".encode()))
        return True

    up = await scripted(answer)
    proxy = await make_proxy(up.url)
    async with aiohttp.ClientSession(max_field_size=128 * 1024) as big:
        got, headers, body = await fetch(big, "GET", proxy.url("/cookie"))
    assert got == status
    if status == 200:
        assert headers["Set-Cookie"] == cookie
        assert body == b"ok"
    else:
        assert proxy.errors[-1].kind == "protocol"


async def test_endless_response_header_is_refused_without_waiting(
    make_proxy: MakeProxy, scripted: StartScripted, session: aiohttp.ClientSession
) -> None:
    async def answer(state: Scripted, n: int, head: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        with contextlib.suppress(ConnectionError):
            for _ in range(100):
                w.write(b"e" * 4096)
                await w.drain()
        return False

    up = await scripted(answer)
    proxy = await make_proxy(up.url, read=30)
    status, _, _ = await fetch(session, "GET", proxy.url("/"), timeout=aiohttp.ClientTimeout(5))
    assert status == 502
    assert proxy.errors[-1].kind == "protocol"


async def test_request_without_host_gets_the_upstreams(proxy: Proxy, upstream: Upstream) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.url("/").port)
    writer.write(b"GET /echo/old HTTP/1.0\r\n\r\n")
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.0 200 ")
    assert upstream.last.header("Host") == [URL(upstream.url).raw_authority]


def test_header_values_cannot_smuggle_a_request() -> None:
    headers = CIMultiDict([("X-Evil", "a\r\nContent-Length: 0\r\n\r\nGET /admin HTTP/1.1")])
    with pytest.raises(ValueError, match="CR or LF"):
        header_lines(headers)


def test_on_uvloop(tmp_path: Path) -> None:
    """The sidecar runs on uvloop, whose transports differ from asyncio's: a round trip of
    the main paths there (keep-alive, bodies both ways and their backpressure, HEAD, TLS)."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        app = UpstreamApp()
        runner = web.ServerRunner(web.Server(app))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        app.state = Upstream(f"http://127.0.0.1:{runner.addresses[0][1]}")
        timeouts = UpstreamTimeouts(connect=2.0, read=5.0)
        client = UpstreamClient(UpstreamConfig(url=app.state.url, timeout=timeouts))
        await client.start()
        proxy = Proxy(client)
        front = web.ServerRunner(web.Server(proxy.handle, handler_cancellation=False))
        await front.setup()
        await web.TCPSite(front, "127.0.0.1", 0).start()
        proxy.base = f"http://127.0.0.1:{front.addresses[0][1]}"
        data = os.urandom(3 * MiB)
        try:
            async with aiohttp.ClientSession(skip_auto_headers=BARE) as session:
                for _ in range(3):
                    assert (await fetch(session, "GET", proxy.url("/echo/a")))[0] == 200
                assert (await fetch(session, "HEAD", proxy.url("/head")))[::2] == (200, b"")
                status, _, _ = await fetch(
                    session, "PUT", proxy.url("/echo/u"), data=io.BytesIO(data)
                )
                assert (status, app.state.last.sha256) == (200, sha256(data))
                status, _, _ = await fetch(session, "POST", proxy.url("/echo/c"), data=pieces(data))
                assert (status, app.state.last.sha256) == (200, sha256(data))
                status, _, body = await fetch(
                    session, "GET", proxy.url(f"/download?size={5 * MiB}")
                )
                assert (status, sha256(body)) == (200, sha256(blob(5 * MiB)))
            assert len(set(app.state.peers)) == 1
        finally:
            await front.cleanup()
            await client.close()
            await runner.cleanup()

    uvloop.run(scenario())


@pytest.mark.parametrize("pieces", [1, 64], ids=["one-write", "in-pieces"])
async def test_response_head_larger_than_the_limit_is_a_protocol_error(
    make_proxy: MakeProxy, scripted: StartScripted, session: aiohttp.ClientSession, pieces: int
) -> None:
    fields = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 1000) for i in range(70))  # ~70 KiB
    raw = b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 2\r\n\r\nok"

    async def answer(state: Scripted, n: int, head: bytes, w: asyncio.StreamWriter) -> bool:
        size = len(raw) // pieces + 1
        for start in range(0, len(raw), size):
            w.write(raw[start : start + size])
            await w.drain()
        return False

    up = await scripted(answer)
    proxy = await make_proxy(up.url)
    status, _, _ = await fetch(session, "GET", proxy.url("/huge-head"))
    assert status == 502
    assert proxy.errors[-1].kind == "protocol"
    assert "larger than" in str(proxy.errors[-1])


async def test_trailers_larger_than_the_limit_truncate_the_response(
    make_proxy: MakeProxy, scripted: StartScripted, session: aiohttp.ClientSession
) -> None:
    trailers = b"".join(b"X-Trailer-%d: %s\r\n" % (i, b"t" * 1000) for i in range(70))

    async def answer(state: Scripted, n: int, head: bytes, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
        await w.drain()
        await asyncio.sleep(0.2)  # the response has started when the trailers come
        w.write(b"0\r\n" + trailers)  # and never the end of them
        await w.drain()
        await asyncio.sleep(1)
        return False

    up = await scripted(answer)
    proxy = await make_proxy(up.url)
    async with session.get(proxy.url("/huge-trailers")) as resp:
        assert resp.status == 200  # the response had started: it can only be cut short
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
