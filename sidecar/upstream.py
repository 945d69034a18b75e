"""Forward one request to the upstream application and stream its answer back.

``UpstreamClient`` owns the pooled keep-alive ``ClientSession`` (and one for WebSockets);
``forward`` is its only hot-path call. A failure before the response has started raises
``UpstreamError`` (the handler answers 502 or 504); after it has started, the client connection
is aborted so that a truncated response can never pass for a complete one. WebSocket upgrades
are relayed frame by frame. Everything aiohttp-client specific stays in this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from .config import UpstreamConfig
from .errors import UpstreamError
from .headers import connection_tokens, response_headers

# Headers aiohttp would invent; the upstream must see only what the client (and we) sent.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
# Every response carries the request's id; the one sent upstream is the one the client gets.
_REQUEST_ID = "X-Request-ID"
# WebSocket messages are buffered whole by aiohttp, so they need a bound (aiohttp's default).
_WS_MAX_MESSAGE = 4 * 1024 * 1024
# Close codes that stand for a missing close frame or status; they may not be sent (RFC 6455).
_NO_STATUS = frozenset({0, 1005})  # aiohttp reports an empty close frame as 0
_ABNORMAL = frozenset({1006, 1015})
# aiohttp warns about ``enable_cleanup_closed`` on the Pythons that fixed the TLS leak.
_NEEDS_CLEANUP_CLOSED = sys.version_info < (3, 12, 8) or (3, 13, 0) <= sys.version_info < (3, 13, 1)

_Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


@dataclass(frozen=True, slots=True)
class Forwarded:
    #: already prepared and fully written (or the WebSocketResponse after close)
    response: web.StreamResponse
    #: the status sent to the client
    status: int
    #: from sending the request until the upstream's response headers arrived
    upstream_seconds: float


class BodyTooLarge(Exception):
    """The request body exceeded ``max_body_size`` before the upstream answered."""


class UpstreamClient:
    def __init__(self, config: UpstreamConfig, *, max_body_size: int | None = None) -> None:
        base = URL(config.url)
        self._https = base.scheme == "https"
        # Plain string concatenation with the client's raw target keeps it byte-exact.
        self._base = str(base.origin()) + base.raw_path.rstrip("/")
        self._ws_base = ("wss" if self._https else "ws") + self._base[len(base.scheme) :]
        self._max_connections = config.max_connections
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=config.timeout.connect,
            sock_connect=config.timeout.connect,
            sock_read=config.timeout.read,
        )
        self._max_body_size = max_body_size
        self._session: aiohttp.ClientSession | None = None
        # An open WebSocket holds its connection for its whole life: kept out of the pool, they
        # cannot starve plain requests. The listener's connection limit bounds them.
        self._ws_session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        tls = ssl.create_default_context() if self._https else None
        self._session = self._new_session(self._max_connections, tls)
        self._ws_session = self._new_session(0, tls)

    def _new_session(self, limit: int, tls: ssl.SSLContext | None) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=limit,
            ttl_dns_cache=10,
            ssl=tls if tls is not None else True,
            enable_cleanup_closed=tls is not None and _NEEDS_CLEANUP_CLOSED,
        )
        return aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            # A shared jar would hand one client's cookies to the next.
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_SKIP_AUTO_HEADERS,
        )

    async def close(self) -> None:
        for session in (self._session, self._ws_session):
            if session is not None:
                await session.close()
        self._session = self._ws_session = None

    async def forward(self, request: web.BaseRequest, headers: CIMultiDict[str]) -> Forwarded:
        """Send ``request`` upstream with ``headers`` as given and stream the answer back.

        The response is prepared here, so it gets the ``X-Request-ID`` of ``headers`` (replacing
        any the upstream sent) for the handler, which can no longer add headers.

        Raises ``UpstreamError`` only before any byte of a response has gone to the client, and
        ``BodyTooLarge`` when the body passes ``max_body_size`` before the upstream answered.
        """
        session, ws_session = self._session, self._ws_session
        if session is None or ws_session is None:
            raise RuntimeError("UpstreamClient.start() has not been awaited")
        target = _origin_form(request.raw_path)
        if _is_websocket(request):
            return await self._forward_websocket(ws_session, request, headers, target)
        limit = self._max_body_size
        length = request.content_length
        if limit is not None and length is not None and length > limit:
            raise BodyTooLarge(f"Content-Length {length} exceeds {limit}")
        body = None
        if request.body_exists:
            # Content-Length bodies are framed by the server's parser; only chunked ones can grow.
            body = _RequestBody(request, limit if length is None else None)
            await _continue(request)
        if "Expect" in headers:
            # Answered above, hop by hop; aiohttp would otherwise wait for the upstream's
            # 100 Continue without end, and an upstream may rightly never send one.
            headers = headers.copy()
            del headers["Expect"]
        started = time.perf_counter()
        try:
            upstream = await session.request(
                request.method,
                URL(self._base + target, encoded=True),
                headers=headers,
                data=body,
                allow_redirects=False,
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            if body is not None and body.too_large:
                raise BodyTooLarge(f"chunked body exceeds {limit}") from None
            raise _upstream_error(exc) from exc
        try:
            return await _stream_response(
                request, upstream, time.perf_counter() - started, headers.get(_REQUEST_ID)
            )
        finally:
            upstream.release()

    async def _forward_websocket(
        self,
        session: aiohttp.ClientSession,
        request: web.BaseRequest,
        headers: CIMultiDict[str],
        target: str,
    ) -> Forwarded:
        offered = _offered_protocols(request)
        # ws_connect makes its own key, version and protocol offer; extensions are not negotiated.
        outgoing = CIMultiDict(
            (name, value)
            for name, value in headers.items()
            if not name.lower().startswith("sec-websocket-")
            and name.lower() not in ("upgrade", "connection")
        )
        started = time.perf_counter()
        try:
            upstream = await session.ws_connect(
                URL(self._ws_base + target, encoded=True),
                protocols=offered,
                headers=outgoing,
                autoclose=False,
                autoping=False,
                compress=0,
                max_msg_size=_WS_MAX_MESSAGE,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10.0),
            )
        except aiohttp.WSServerHandshakeError as exc:
            raise UpstreamError(
                "protocol", f"WebSocket upgrade refused: {exc.status} {exc.message}"
            ) from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _upstream_error(exc) from exc
        upstream_seconds = time.perf_counter() - started
        client = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            autoclose=False,
            autoping=False,
            compress=False,
            max_msg_size=_WS_MAX_MESSAGE,
        )
        if _REQUEST_ID in headers:
            client.headers[_REQUEST_ID] = headers[_REQUEST_ID]
        try:
            await client.prepare(request)
            await _relay_websocket(client, upstream)
        finally:
            # Still open if the client vanished during the handshake, or we were cancelled.
            if not upstream.closed:
                await upstream.close(code=WSCloseCode.GOING_AWAY)
        return Forwarded(client, 101, upstream_seconds)


class _RequestBody:
    """The client's request body as it arrives, refused once it grows past ``limit``."""

    def __init__(self, request: web.BaseRequest, limit: int | None) -> None:
        self._content = request.content
        self._limit = limit
        self.too_large = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self._content.iter_any():
            seen += len(chunk)
            if self._limit is not None and seen > self._limit:
                # aiohttp wraps what we raise here; ``forward`` reads the flag instead.
                self.too_large = True
                raise BodyTooLarge(f"body exceeds {self._limit}")
            yield chunk


async def _stream_response(
    request: web.BaseRequest,
    upstream: aiohttp.ClientResponse,
    upstream_seconds: float,
    request_id: str | None,
) -> Forwarded:
    """Stream the upstream's response to the client; abort the client if the upstream fails."""
    headers = response_headers(upstream.headers)
    if request_id is not None:
        headers[_REQUEST_ID] = request_id
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    forwarded = Forwarded(response, upstream.status, upstream_seconds)
    try:
        await response.prepare(request)
    except ConnectionError:  # the client is gone
        upstream.close()
        return forwarded
    while True:
        try:
            chunk = await upstream.content.readany()
        except (TimeoutError, aiohttp.ClientError, OSError):
            upstream.close()
            _abort(request)
            return forwarded
        if not chunk:
            break
        try:
            await response.write(chunk)
        except ConnectionError:
            upstream.close()
            return forwarded
    with contextlib.suppress(ConnectionError):  # the client left after the last byte
        await response.write_eof()
    return forwarded


async def _continue(request: web.BaseRequest) -> None:
    # The low-level server leaves ``Expect: 100-continue`` to us; the body is wanted now.
    expect = request.headers.get("Expect", "")
    if request.version == aiohttp.HttpVersion11 and expect.lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the response proper has not started


def _abort(request: web.BaseRequest) -> None:
    # Closing without the end of the framing (chunk terminator or the promised length) tells
    # the client the response is incomplete.
    transport = request.transport
    if transport is not None:
        transport.abort()


async def _relay_websocket(
    client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse
) -> None:
    """Copy frames both ways until one side closes; answer it, then close the other alike.

    The side that closed first gets its own code echoed (RFC 6455 §5.5.1) and is released at
    once; the other side then gets the same code and reason. A side that vanished without a
    close frame makes the other one see 1014 (bad gateway) or 1001 (going away).
    """
    to_upstream = asyncio.ensure_future(_pump(client, upstream))
    to_client = asyncio.ensure_future(_pump(upstream, client))
    tasks = (to_upstream, to_client)
    first: _Socket
    second: _Socket
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if to_client.done():
            # Cancelling the server side's receive is harmless; the client side's would mark
            # the connection as failed, so that one is left to close(), which interrupts it.
            to_upstream.cancel()
            await asyncio.wait((to_upstream,))
            code, reason = to_client.result() or (WSCloseCode.BAD_GATEWAY, "")
            first, second = upstream, client
        else:
            code, reason = to_upstream.result() or (WSCloseCode.GOING_AWAY, "")
            first, second = client, upstream
        await first.close(code=_sendable(code), message=reason.encode())
        await second.close(code=_sendable(code), message=reason.encode())
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _pump(source: _Socket, sink: _Socket) -> tuple[int, str] | None:
    """Copy frames until ``source`` closes: its close code and reason, or None if it failed."""
    while True:
        msg = await source.receive()
        try:
            if msg.type is WSMsgType.TEXT:
                await sink.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await sink.send_bytes(msg.data)
            elif msg.type is WSMsgType.PING:
                await sink.ping(msg.data)
            elif msg.type is WSMsgType.PONG:
                await sink.pong(msg.data)
            elif msg.type is WSMsgType.CLOSE:
                return int(msg.data), msg.extra or ""
            else:  # CLOSING (we are closing it), CLOSED or ERROR
                return None
        except (ConnectionError, aiohttp.ClientError):
            return None


def _sendable(code: int) -> int:
    if code in _NO_STATUS:
        return WSCloseCode.OK
    if code in _ABNORMAL or not 1000 <= code <= 4999:
        return WSCloseCode.BAD_GATEWAY
    return code


def _origin_form(raw: str) -> str:
    if raw.startswith("/"):
        return raw
    # absolute-form ("http://host/p?q") keeps its path and query; asterisk-form becomes "/"
    target = URL(raw, encoded=True).raw_path_qs
    return target if target.startswith("/") else "/"


def _is_websocket(request: web.BaseRequest) -> bool:
    headers = request.headers
    if "upgrade" not in connection_tokens(headers):
        return False
    if headers.get("Upgrade", "").strip().lower() != "websocket":
        return False
    # A malformed upgrade (no key, wrong version) is forwarded as plain HTTP: a proxy may
    # ignore Upgrade (RFC 9110 §7.8), and the upstream answers it as it sees fit.
    probe = web.WebSocketResponse(protocols=_offered_protocols(request))
    return probe.can_prepare(request).ok


def _offered_protocols(request: web.BaseRequest) -> list[str]:
    return [
        token.strip()
        for value in request.headers.getall("Sec-WebSocket-Protocol", ())
        for token in value.split(",")
        if token.strip()
    ]


def _upstream_error(exc: BaseException) -> UpstreamError:
    """Translate an aiohttp failure before the response started into our vocabulary."""
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, aiohttp.ConnectionTimeoutError | aiohttp.ClientConnectorError):
        return UpstreamError("connect", detail)
    if isinstance(exc, TimeoutError):
        return UpstreamError("timeout", detail)
    if isinstance(exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
        return UpstreamError("protocol", detail)
    return UpstreamError("reset", detail)
