"""Forwarding the requests aiohttp's server parsed (upgrades: WebSockets, and an upgrade to
anything else as a plain request), on the forwarder's one way in (``Forwarder.send``) for plain
HTTP and through an aiohttp ``ClientSession`` for WebSockets, the answer streamed back through
aiohttp, as the application sent it.

Everything aiohttp-client specific on the request path stays in this module.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import WSCloseCode, hdrs, web
from multidict import CIMultiDict
from yarl import URL

from ..config import LimitsConfig, UpstreamConfig
from ..errors import UpstreamError
from ..forwarder import (
    BodyTooLarge,
    Forward,
    Forwarder,
    RequestBody,
    origin_form,
    upstream_error,
)
from ..headers import (
    DEFAULT_RESPONSE_RULES,
    Captured,
    ResponseRules,
    connection_tokens,
    lines_to_multidict,
)
from ..responses import SERVER
from .connection import last_on_connection, when_gone
from .websocket import relay

# Headers aiohttp would invent; the upstream must see only what the client (and we) sent.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
# aiohttp warns about ``enable_cleanup_closed`` on the Pythons that fixed the TLS leak.
_NEEDS_CLEANUP_CLOSED = sys.version_info < (3, 12, 8) or (3, 13, 0) <= sys.version_info < (3, 13, 1)


@dataclass(slots=True)  # not frozen: made per request, and a frozen one costs 4x as much
class Forwarded:
    """A request ``FallbackForwarder.forward`` forwarded."""

    #: already prepared and fully written (or the WebSocketResponse after close)
    response: web.StreamResponse
    #: the status sent to the client
    status: int
    #: from sending the request until the upstream's response head arrived
    upstream_seconds: float
    #: the report headers the upstream's response carried (taken out of it), or None
    reports: Captured | None = None


class FallbackForwarder(Forwarder):
    """The forwarder, with what the requests aiohttp's server parsed need besides: their
    bodies (``forward``) and WebSockets, which hold a connection of an aiohttp
    ``ClientSession`` each for their whole life (kept out of the pool, they cannot starve
    plain requests; the listener's connection limit bounds them)."""

    def __init__(
        self,
        config: UpstreamConfig,
        *,
        limits: LimitsConfig | None = None,
        responses: ResponseRules = DEFAULT_RESPONSE_RULES,
    ) -> None:
        super().__init__(config, limits=limits, responses=responses)
        base = URL(config.url)
        self._ws_base = ("wss" if self.https else "ws") + str(base.origin())[len(base.scheme) :]
        self._ws_base += self.prefix
        # aiohttp refuses a message as large as its max_msg_size: one byte more lets the
        # configured size itself through.
        self._ws_max_msg_size = self.limits.websocket_max_message + 1
        self._ws_session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        await super().start()
        tls = self.tls
        config = self.config
        connector = aiohttp.TCPConnector(
            limit=0,
            ttl_dns_cache=10,
            ssl=tls if tls is not None else True,
            enable_cleanup_closed=tls is not None and _NEEDS_CLEANUP_CLOSED,
        )
        self._ws_session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=config.timeout.connect,
                sock_connect=config.timeout.connect,
                sock_read=config.timeout.read,
            ),
            auto_decompress=False,
            # A shared jar would hand one client's cookies to the next.
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_SKIP_AUTO_HEADERS,
        )

    async def close(self) -> None:
        await super().close()
        if self._ws_session is not None:
            await self._ws_session.close()
        self._ws_session = None

    async def forward(self, request: web.BaseRequest, headers: CIMultiDict[str]) -> Forwarded:
        """Send ``request`` upstream with ``headers`` as given and stream the answer back.

        The response is prepared here, so it gets the ``X-Request-ID`` of ``headers`` (replacing
        any the upstream sent): it can have no other header added afterwards.

        Raises ``UpstreamError`` only before any byte of a response has gone to the client,
        ``BodyTooLarge`` when the body passes ``max_body_size`` before the upstream answered,
        and ``BodyTimeout`` when the client paused its body longer than ``body_timeout``
        before the upstream answered (the upstream connection is aborted then, never reused).
        """
        ws_session = self._ws_session
        if ws_session is None:
            raise RuntimeError("FallbackForwarder.start() has not been awaited")
        if is_websocket(request):
            return await self._forward_websocket(ws_session, request, headers)
        limits = self.limits
        limit = limits.max_body_size
        length = request.content_length
        if limit is not None and length is not None and length > limit:
            raise BodyTooLarge(f"Content-Length {length} exceeds {limit}")
        body: RequestBody | None = None
        if request.body_exists:
            await _continue(request)
            body = RequestBody(
                request.content,
                chunked=length is None,
                limit=limit,
                timeout=limits.body_timeout,
            )
        if "Expect" in headers:
            # Answered above, hop by hop; an upstream may rightly never send 100 Continue.
            headers = headers.copy()
            del headers["Expect"]
        forward = self.send(
            request.method, request.raw_path, header_lines(headers), "Host" in headers, body=body
        )
        try:
            await forward.response()
            return await _stream_response(request, forward, headers.get("X-Request-ID"))
        finally:
            forward.release()

    async def _forward_websocket(
        self, session: aiohttp.ClientSession, request: web.BaseRequest, headers: CIMultiDict[str]
    ) -> Forwarded:
        offered = _offered_protocols(request)
        # ws_connect makes its own key, version and protocol offer; extensions are not negotiated.
        outgoing = CIMultiDict(
            (name, value)
            for name, value in headers.items()
            if not name.lower().startswith("sec-websocket-")
            and name.lower() not in ("upgrade", "connection")
        )
        target = origin_form(request.raw_path)
        started = time.perf_counter()
        try:
            upstream = await session.ws_connect(
                URL(self._ws_base + target, encoded=True),
                protocols=offered,
                headers=outgoing,
                autoclose=False,
                autoping=False,
                compress=0,
                max_msg_size=self._ws_max_msg_size,
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
            max_msg_size=self._ws_max_msg_size,
        )
        if "X-Request-ID" in headers:
            client.headers["X-Request-ID"] = headers["X-Request-ID"]
        client.headers["Server"] = SERVER  # not aiohttp's banner, as on every other answer
        try:
            await client.prepare(request)
            await relay(client, upstream, self.limits.websocket_idle_timeout)
        finally:
            # Still open if the client vanished during the handshake, or we were cancelled.
            if not upstream.closed:
                await upstream.close(code=WSCloseCode.GOING_AWAY)
        return Forwarded(client, 101, upstream_seconds)


def header_lines(headers: CIMultiDict[str]) -> bytes:
    """Headers as aiohttp decoded them, as header lines again (the same bytes: aiohttp decodes
    with surrogateescape). A CR or LF in a name or value raises ``ValueError``: aiohttp's
    parser lets none through, and ours have none; one here would end the head early and start
    a request of the client's making."""
    lines = [f"{name}: {value}\r\n" for name, value in headers.items()]
    block = "".join(lines)
    if block.count("\n") != len(lines) or block.count("\r") != len(lines):
        raise ValueError("CR or LF in a request header")
    return block.encode("utf-8", "surrogateescape")


class _Relayed(web.StreamResponse):
    """The upstream's response as it sent it: aiohttp adds a ``Content-Type:
    application/octet-stream`` to a response with a body and none (RFC 9110 §8.3 lets a
    recipient guess; a proxy must not decide for it)."""

    async def _prepare_headers(self) -> None:  # aiohttp's (pinned below 3.15 in pyproject)
        typed = hdrs.CONTENT_TYPE in self.headers
        await super()._prepare_headers()
        if not typed:
            self.headers.popall(hdrs.CONTENT_TYPE, None)


class _WholeResponse(_Relayed):
    """A response that arrived whole with its head: aiohttp then sends head and body in one
    write (one TLS record, one syscall) instead of two. A streamed response must not wait:
    its client may be waiting for the head alone (server-sent events)."""

    _send_headers_immediately = False


class _Body:
    """``forwarder.Client`` over an aiohttp response being streamed."""

    __slots__ = ("_request", "_response")

    def __init__(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        self._request = request
        self._response = response

    async def write(self, data: bytes) -> None:
        await self._response.write(data)

    async def finish(self) -> None:
        with contextlib.suppress(ConnectionError):  # the client left after the last byte
            await self._response.write_eof()

    def abort(self) -> None:
        # Closing without the end of the framing (chunk terminator or the promised length)
        # tells the client the response is incomplete.
        transport = self._request.transport
        if transport is not None:
            transport.abort()

    def when_gone(self, callback: Callable[[], None] | None) -> None:
        when_gone(self._request, callback)


async def _stream_response(
    request: web.BaseRequest, forward: Forward, request_id: str | None
) -> Forwarded:
    """Stream the upstream's response to the client; abort the client if the upstream fails.

    Every write waits while the client is not taking the response; the fallback's protocol
    (``connection.FallbackConnection``) cuts a client off that takes nothing for
    ``send_timeout``, which ends the wait, and the exchange with it.
    """
    fields, _, reports = forward.head(request_id)
    headers = lines_to_multidict(fields)
    headers.setdefault("Server", SERVER)  # as on the listener's own path; not aiohttp's banner
    status = forward.status
    reason = forward.reason.decode("utf-8", "surrogateescape")
    complete = forward.complete
    kind = _WholeResponse if complete else _Relayed
    response = kind(status=status, reason=reason, headers=headers)
    forwarded = Forwarded(response, status, forward.upstream_seconds, reports)
    last_on_connection(request, response)
    try:
        await response.prepare(request)
        if complete:  # all of it arrived with the head: one write
            await response.write_eof(forward.take())
            return forwarded
    except ConnectionError:  # the client is gone
        return forwarded
    await forward.relay(_Body(request, response))
    return forwarded


async def _continue(request: web.BaseRequest) -> None:
    # The low-level server leaves ``Expect: 100-continue`` to us; the body is wanted now.
    expect = request.headers.get("Expect", "")
    if request.version == aiohttp.HttpVersion11 and expect.lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the response proper has not started


def is_websocket(request: web.BaseRequest) -> bool:
    """Whether ``request`` is a WebSocket handshake that can be accepted."""
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
    """Translate a failure of aiohttp's client before the response started."""
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, aiohttp.ConnectionTimeoutError | aiohttp.ClientConnectorError):
        return UpstreamError("connect", detail)
    if isinstance(exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
        return UpstreamError("protocol", detail)
    return upstream_error(exc)
