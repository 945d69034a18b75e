"""Forward one request to the upstream application and stream its answer back.

``UpstreamClient.forward`` is the only hot-path call. Plain HTTP goes over pooled keep-alive
connections (``http1.pool``) with the request head written as given and the body streamed;
WebSocket upgrades go through an aiohttp ``ClientSession`` and are relayed frame by frame, with
an idle timeout and a bound on message size. A failure before the response has started raises
``UpstreamError`` (the handler answers 502 or 504); after it has started, the client
connection is aborted so that a truncated response can never pass for a complete one. A
request is sent a second time only when it is idempotent and met a reused connection that
failed before any byte of answer. Everything aiohttp-client specific stays in this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from aiohttp import WebSocketError, WSCloseCode, WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from .config import LimitsConfig, UpstreamConfig
from .errors import UpstreamError
from .headers import connection_tokens, lines_to_multidict, response_fields
from .http1.pool import Pool
from .http1.upstream import (
    BodyTimeout,
    BodyTooLarge,
    RequestBody,
    UpstreamConnection,
    head_from_lines,
    request_head,
)
from .responses import SERVER
from .server import last_on_connection, when_gone

# Headers aiohttp would invent; the upstream must see only what the client (and we) sent.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
# Every response carries the request's id; the one sent upstream is the one the client gets.
_REQUEST_ID = "X-Request-ID"
# Methods that may be sent again when a reused connection fails before any byte of answer:
# the application cannot have acted on them in a way that matters (RFC 9110 §9.2.2; nginx's
# proxy_next_upstream never retries POST, LOCK or PATCH; PUT and DELETE are not retried here
# either, since applications often implement them with side effects that are not idempotent).
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# Close codes that stand for a missing close frame or status; they may not be sent (RFC 6455).
_NO_STATUS = frozenset({0, 1005})  # aiohttp reports an empty close frame as 0
_ABNORMAL = frozenset({1006, 1015})
# aiohttp warns about ``enable_cleanup_closed`` on the Pythons that fixed the TLS leak.
_NEEDS_CLEANUP_CLOSED = sys.version_info < (3, 12, 8) or (3, 13, 0) <= sys.version_info < (3, 13, 1)

_Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse

__all__ = ["BodyTimeout", "BodyTooLarge", "Downstream", "Forwarded", "Sent", "UpstreamClient"]


class Downstream(Protocol):
    """The client side of ``UpstreamClient.relay``: it frames the response for its client."""

    def respond(
        self,
        status: int,
        reason: bytes,
        fields: bytes,
        flags: int,
        body: bytes,
        complete: bool,
    ) -> None:
        """Send the response head (header lines ``fields`` as from ``headers.response_fields``,
        with its ``flags``) and ``body``: all of it if ``complete``, else the rest follows."""
        ...

    def send(self, data: bytes) -> None:
        """More of the body."""
        ...

    async def drain(self) -> None:
        """Wait while the client is not taking what we send; ConnectionError once it is gone
        (it is cut off when it takes nothing for ``limits.send_timeout``)."""
        ...

    def when_gone(self, callback: Callable[[], None] | None) -> None:
        """Have ``callback`` called if the client connection ends (None: no longer)."""
        ...

    def finish(self) -> None:
        """The body is complete."""
        ...

    def abort(self) -> None:
        """The body cannot be completed: close so that the client sees it truncated."""
        ...


@dataclass(slots=True)  # not frozen: made per request, and a frozen one costs 4x as much
class Sent:
    """A request ``UpstreamClient.send_now`` wrote, its response still to come."""

    conn: UpstreamConnection
    head: bytes
    head_only: bool
    started: float
    #: the method is idempotent: the request may be sent again (see ``_await_head``)
    retry: bool


@dataclass(slots=True)  # not frozen: made per request, and a frozen one costs 4x as much
class Forwarded:
    #: already prepared and fully written (or the WebSocketResponse after close); None when
    #: the response went to a ``Downstream``
    response: web.StreamResponse | None
    #: the status sent to the client
    status: int
    #: from sending the request until the upstream's response headers arrived
    upstream_seconds: float


class UpstreamClient:
    def __init__(self, config: UpstreamConfig, *, limits: LimitsConfig | None = None) -> None:
        base = URL(config.url)
        self._https = base.scheme == "https"
        self._host = base.raw_host or ""
        self._port = base.port or (443 if self._https else 80)
        # For clients that sent none (HTTP/1.0): what any client of the upstream would send.
        self._host_header = base.host_port_subcomponent or self._host
        self._host_bytes = self._host_header.encode("ascii")  # yarl gives it IDNA-encoded
        # Plain string concatenation with the client's raw target keeps it byte-exact.
        self._prefix = base.raw_path.rstrip("/")
        self._ws_base = (
            ("wss" if self._https else "ws") + str(base.origin())[len(base.scheme) :] + self._prefix
        )
        self._config = config
        limits = limits if limits is not None else LimitsConfig()
        self._max_body_size = limits.max_body_size
        self._body_timeout = limits.body_timeout
        self._ws_idle_timeout = limits.websocket_idle_timeout
        # aiohttp refuses a message as large as its max_msg_size: one byte more lets the
        # configured size itself through.
        self._ws_max_msg_size = limits.websocket_max_message + 1
        self._pool: Pool | None = None
        # An open WebSocket holds its connection for its whole life: kept out of the pool, they
        # cannot starve plain requests. The listener's connection limit bounds them.
        self._ws_session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        tls = ssl.create_default_context() if self._https else None
        config = self._config
        self._pool = Pool(
            self._host,
            self._port,
            tls=tls,
            connect_timeout=config.timeout.connect,
            read_timeout=config.timeout.read,
            max_connections=config.max_connections,
        )
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
        if self._pool is not None:
            await self._pool.close()
        if self._ws_session is not None:
            await self._ws_session.close()
        self._pool = self._ws_session = None

    async def forward(self, request: web.BaseRequest, headers: CIMultiDict[str]) -> Forwarded:
        """Send ``request`` upstream with ``headers`` as given and stream the answer back.

        The response is prepared here, so it gets the ``X-Request-ID`` of ``headers`` (replacing
        any the upstream sent) for the handler, which can no longer add headers.

        Raises ``UpstreamError`` only before any byte of a response has gone to the client,
        ``BodyTooLarge`` when the body passes ``max_body_size`` before the upstream answered,
        and ``BodyTimeout`` when the client paused its body longer than ``body_timeout``
        before the upstream answered (the upstream connection is aborted then, never reused).
        An idempotent request without a body that meets a closed keep-alive connection (no
        response byte received) is sent once more on a new connection; nothing else is ever
        retried.
        """
        pool, ws_session = self._pool, self._ws_session
        if pool is None or ws_session is None:
            raise RuntimeError("UpstreamClient.start() has not been awaited")
        target = _origin_form(request.raw_path)
        if _is_websocket(request):
            return await self._forward_websocket(ws_session, request, headers, target)
        limit = self._max_body_size
        length = request.content_length
        if limit is not None and length is not None and length > limit:
            raise BodyTooLarge(f"Content-Length {length} exceeds {limit}")
        has_body = request.body_exists
        if has_body:
            await _continue(request)
        chunked = has_body and length is None
        body = (
            RequestBody(request.content, chunked=chunked, limit=limit, timeout=self._body_timeout)
            if has_body
            else None
        )
        if "Expect" in headers:
            # Answered above, hop by hop; an upstream may rightly never send 100 Continue.
            headers = headers.copy()
            del headers["Expect"]
        head = request_head(
            request.method, self._prefix + target, headers, self._host_header, chunked
        )
        out, rest = [head], None
        if body is not None:
            first, done = body.buffered()  # may be too large already: nothing is sent then
            out += first
            rest = None if done else body
        conn, sender, upstream_seconds = await self._exchange(
            out,
            rest,
            head_only=request.method == "HEAD",
            retry=body is None and request.method in _IDEMPOTENT,
        )
        try:
            return await _stream_response(request, conn, upstream_seconds, headers.get(_REQUEST_ID))
        finally:
            _cancel(sender)  # the upstream answered before it took the whole body
            pool.release(conn, reuse=True)

    async def relay(
        self,
        client: Downstream,
        method: str,
        raw_target: str,
        block: bytes,
        has_host: bool,
        request_id: str,
    ) -> Forwarded:
        """Send a request without a body upstream and relay the answer to ``client``.

        The listener's own path (see ``listener``): the same exchange as ``forward``, on the
        header lines of ``headers.request_fields``, with the response head filtered as bytes
        and handed to ``client`` to frame. Errors as for ``forward``.
        """
        head = self._relay_head(method, raw_target, block, has_host)
        conn, _, upstream_seconds = await self._exchange(
            [head], None, head_only=method == "HEAD", retry=method in _IDEMPOTENT
        )
        return await self._relay_response(client, conn, request_id, upstream_seconds)

    def send_now(
        self,
        method: str,
        raw_target: str,
        block: bytes,
        has_host: bool,
        notify: Callable[[], None],
    ) -> Sent | None:
        """``relay`` without a task, when a pooled connection is idle (else None: use
        ``relay``). The request is written now; ``notify`` is called from the event loop once
        the response head is here or the exchange failed, and then ``relay_whole`` or, when it
        cannot, ``finish_relay`` takes it from there."""
        pool = self._pool
        if pool is None:
            raise RuntimeError("UpstreamClient.start() has not been awaited")
        head = self._relay_head(method, raw_target, block, has_host)
        conn = pool.take_idle()
        if conn is None:
            return None
        head_only = method == "HEAD"
        conn.begin(head_only=head_only, sending=False)
        conn.writelines([head])
        conn.notify(notify)
        return Sent(conn, head, head_only, time.perf_counter(), method in _IDEMPOTENT)

    def relay_whole(self, client: Downstream, sent: Sent, request_id: str) -> Forwarded | None:
        """After ``send_now``'s notice: relay the response if all of it is here and nothing
        failed, and give the connection back; else None (``finish_relay`` does the rest)."""
        conn = sent.conn
        if not conn.complete or conn.failed:
            return None
        assert self._pool is not None
        try:
            self._respond_whole(client, conn, request_id)
        finally:
            self._pool.release(conn, reuse=True)
        return Forwarded(None, conn.status, time.perf_counter() - sent.started)

    async def finish_relay(self, client: Downstream, sent: Sent, request_id: str) -> Forwarded:
        """The rest of ``relay`` for a request ``send_now`` sent: a failure (a stale
        connection's idempotent request is sent again, as ``relay`` does), or a body still
        coming."""
        conn, upstream_seconds = await self._await_head(
            sent.conn,
            None,
            [sent.head],
            head_only=sent.head_only,
            retry=sent.retry,
            started=sent.started,
        )
        return await self._relay_response(client, conn, request_id, upstream_seconds)

    def _relay_head(self, method: str, raw_target: str, block: bytes, has_host: bool) -> bytes:
        target = raw_target if raw_target.startswith("/") else _origin_form(raw_target)
        return head_from_lines(
            method,
            self._prefix + target,
            block,
            None if has_host else self._host_bytes,
        )

    def _respond_whole(self, client: Downstream, conn: UpstreamConnection, request_id: str) -> None:
        fields, flags = response_fields(conn.raw_headers)
        fields += b"X-Request-ID: " + request_id.encode("ascii") + b"\r\n"
        client.respond(conn.status, conn.reason, fields, flags, conn.take(), True)

    async def _relay_response(
        self, client: Downstream, conn: UpstreamConnection, request_id: str, upstream_seconds: float
    ) -> Forwarded:
        assert self._pool is not None
        status = conn.status
        try:
            if conn.complete:  # all of it arrived with the head: one write
                self._respond_whole(client, conn, request_id)
                return Forwarded(None, status, upstream_seconds)
            fields, flags = response_fields(conn.raw_headers)
            fields += b"X-Request-ID: " + request_id.encode("ascii") + b"\r\n"
            client.respond(status, conn.reason, fields, flags, b"", False)
            # A client that leaves (or is cut off for send_timeout) ends the exchange at once,
            # not at the upstream's next byte.
            client.when_gone(conn.abandon)
            while True:
                try:
                    chunk = await conn.read()
                except Exception:  # timeout, reset, malformed body: the client must see it
                    client.abort()  # truncated
                    break
                if not chunk:
                    client.finish()
                    break
                client.send(chunk)
                try:
                    await client.drain()
                except ConnectionError:  # the client is gone
                    break
            return Forwarded(None, status, upstream_seconds)
        finally:
            client.when_gone(None)
            self._pool.release(conn, reuse=True)

    async def _exchange(
        self, out: list[bytes], rest: RequestBody | None, *, head_only: bool, retry: bool
    ) -> tuple[UpstreamConnection, asyncio.Task[None] | None, float]:
        """Send a request on a pooled connection and wait for its response head.

        Returns the connection and the task still sending the body (the caller releases and
        cancels them) and the seconds the head took. ``retry``: the request may be sent once
        more if a reused connection turns out to be closed (only idempotent requests without a
        body: any other may have been acted on).
        """
        pool = self._pool
        if pool is None:
            raise RuntimeError("UpstreamClient.start() has not been awaited")
        started = time.perf_counter()
        conn = pool.take_idle() or await pool.acquire()  # no coroutine when one is idle
        sender = _send(conn, out, rest, head_only)
        conn, seconds = await self._await_head(
            conn, sender, out, head_only=head_only, retry=retry, started=started
        )
        return conn, sender, seconds

    async def _await_head(
        self,
        conn: UpstreamConnection,
        sender: asyncio.Task[None] | None,
        out: list[bytes],
        *,
        head_only: bool,
        retry: bool,
        started: float,
    ) -> tuple[UpstreamConnection, float]:
        """Wait for the response head of the request sent on ``conn``; the connection it came
        on (another one if the request was sent again) and the seconds since ``started``."""
        pool = self._pool
        assert pool is not None
        try:
            try:
                await conn.head()
            except OSError as exc:
                stale = retry and conn.reused and conn.received == 0
                if isinstance(exc, TimeoutError) or not stale:
                    raise
                # The upstream closed an idle keep-alive connection as we sent: every proxy
                # sends such a request again, on a connection that cannot be stale.
                pool.release(conn, reuse=False)
                conn = await pool.acquire(fresh=True)
                sender = _send(conn, out, None, head_only)
                await conn.head()
        except (OSError, TimeoutError, UpstreamError) as exc:
            _cancel(sender)
            pool.release(conn, reuse=False)
            raise _upstream_error(exc) from exc
        except BaseException:  # BodyTooLarge, BodyTimeout, or we were cancelled
            _cancel(sender)
            pool.release(conn, reuse=False)
            raise
        return conn, time.perf_counter() - started

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
        if _REQUEST_ID in headers:
            client.headers[_REQUEST_ID] = headers[_REQUEST_ID]
        client.headers["Server"] = SERVER  # not aiohttp's banner, as on every other answer
        try:
            await client.prepare(request)
            await _relay_websocket(client, upstream, self._ws_idle_timeout)
        finally:
            # Still open if the client vanished during the handshake, or we were cancelled.
            if not upstream.closed:
                await upstream.close(code=WSCloseCode.GOING_AWAY)
        return Forwarded(client, 101, upstream_seconds)


def _send(
    conn: UpstreamConnection, out: list[bytes], rest: RequestBody | None, head_only: bool
) -> asyncio.Task[None] | None:
    """Start the exchange with the head and what is here of the body; a task sends the rest."""
    conn.begin(head_only=head_only, sending=rest is not None)
    conn.writelines(out)
    if rest is None:
        return None
    return asyncio.get_running_loop().create_task(rest.send_rest(conn))


def _cancel(sender: asyncio.Task[None] | None) -> None:
    if sender is not None and not sender.done():
        sender.cancel()


class _WholeResponse(web.StreamResponse):
    """A response that arrived whole with its head: aiohttp then sends head and body in one
    write (one TLS record, one syscall) instead of two. A streamed response must not wait:
    its client may be waiting for the head alone (server-sent events)."""

    _send_headers_immediately = False


async def _stream_response(
    request: web.BaseRequest,
    conn: UpstreamConnection,
    upstream_seconds: float,
    request_id: str | None,
) -> Forwarded:
    """Stream the upstream's response to the client; abort the client if the upstream fails.

    Every write waits while the client is not taking the response; the listener's protocol
    (``server.Connection``) cuts a client off that takes nothing for ``send_timeout``, which
    ends the wait, and the exchange with it.
    """
    headers = lines_to_multidict(response_fields(conn.raw_headers)[0])
    if request_id is not None:
        headers[_REQUEST_ID] = request_id
    headers.setdefault("Server", SERVER)  # as on the listener's own path; not aiohttp's banner
    status = conn.status
    reason = conn.reason.decode("utf-8", "surrogateescape")
    kind = _WholeResponse if conn.complete else web.StreamResponse
    response = kind(status=status, reason=reason, headers=headers)
    forwarded = Forwarded(response, status, upstream_seconds)
    last_on_connection(request, response)
    try:
        await response.prepare(request)
        if conn.complete:  # all of it arrived with the head: one write
            await response.write_eof(conn.take())
            return forwarded
    except ConnectionError:  # the client is gone
        return forwarded
    when_gone(request, conn.abandon)  # not at the upstream's next byte
    try:
        while True:
            try:
                chunk = await conn.read()
            except Exception:  # timeout, reset, malformed body: the client must see it truncated
                _abort(request)
                return forwarded
            if not chunk:
                break
            try:
                await response.write(chunk)
            except ConnectionError:
                return forwarded
        with contextlib.suppress(ConnectionError):  # the client left after the last byte
            await response.write_eof()
    finally:
        when_gone(request, None)
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


class _Activity:
    """When a frame last passed, either way: what keeps a relayed WebSocket from being idle."""

    __slots__ = ("_loop", "last")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.last = loop.time()

    def touch(self) -> None:
        self.last = self._loop.time()

    def idle_for(self) -> float:
        return self._loop.time() - self.last


@dataclass(slots=True)
class _End:
    """How a relayed WebSocket ended: the side whose doing it was (``culprit``), the close
    code it sent (None when it vanished or failed), and whether its message was too large
    (aiohttp has closed that side with 1009 then)."""

    culprit: _Socket
    code: int | None
    reason: str
    too_big: bool = False


async def _relay_websocket(
    client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse, idle_timeout: float
) -> None:
    """Copy frames both ways until one side ends it or no frame passed for ``idle_timeout``;
    then close both sides.

    A side that closed gets its own code echoed (RFC 6455 §5.5.1) and the other side the same
    code and reason. A side whose message was over the size limit has been closed with 1009
    (Message Too Big) and the other side gets 1001 (Going Away). A side that vanished without
    a close frame makes the other one see 1014 (Bad Gateway: the upstream) or 1001 (the
    client). An idle WebSocket is closed with 1001 on both sides: the proxy goes away from it,
    neither peer ended it.
    """
    loop = asyncio.get_running_loop()
    activity = _Activity(loop)
    to_upstream = asyncio.ensure_future(_pump(client, upstream, activity))
    to_client = asyncio.ensure_future(_pump(upstream, client, activity))
    tasks = (to_upstream, to_client)
    end: _End | None = None
    try:
        while True:
            remaining = idle_timeout - activity.idle_for()
            if remaining <= 0:
                break  # idle
            done, _ = await asyncio.wait(
                tasks, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            if done:
                end = (to_client if to_client.done() else to_upstream).result()
                break
        # Cancelling the server side's receive is harmless; the client side's would mark
        # the connection as failed, so that one is left to close(), which interrupts it.
        if not to_upstream.done():
            to_upstream.cancel()
            await asyncio.wait((to_upstream,))
        if end is None:
            await asyncio.gather(
                client.close(code=WSCloseCode.GOING_AWAY, message=b"idle"),
                upstream.close(code=WSCloseCode.GOING_AWAY, message=b"idle"),
            )
            return
        culprit = end.culprit
        other: _Socket = upstream if culprit is client else client
        if end.too_big:
            code, reason = int(WSCloseCode.GOING_AWAY), ""
        elif end.code is not None:
            code, reason = _sendable(end.code), end.reason
        elif culprit is upstream:
            code, reason = int(WSCloseCode.BAD_GATEWAY), ""
        else:
            code, reason = int(WSCloseCode.GOING_AWAY), ""
        if not end.too_big:  # that side is closed already, with 1009
            await culprit.close(code=code, message=reason.encode())
        await other.close(code=code, message=reason.encode())
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _pump(source: _Socket, sink: _Socket, activity: _Activity) -> _End:
    """Copy frames until ``source`` closes, fails, or ``sink`` cannot take one."""
    while True:
        msg = await source.receive()
        activity.touch()
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
                return _End(source, int(msg.data), msg.extra or "")
            elif msg.type is WSMsgType.ERROR:
                error = msg.data
                too_big = (
                    isinstance(error, WebSocketError) and error.code == WSCloseCode.MESSAGE_TOO_BIG
                )
                return _End(source, None, "", too_big=too_big)
            else:  # CLOSING (we are closing it) or CLOSED
                return _End(source, None, "")
        except (ConnectionError, aiohttp.ClientError):
            return _End(sink, None, "")


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
    """Translate a failure before the response started into our vocabulary."""
    if isinstance(exc, UpstreamError):
        return exc
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, aiohttp.ConnectionTimeoutError | aiohttp.ClientConnectorError):
        return UpstreamError("connect", detail)
    if isinstance(exc, TimeoutError):
        return UpstreamError("timeout", detail)
    if isinstance(exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
        return UpstreamError("protocol", detail)
    return UpstreamError("reset", detail)
