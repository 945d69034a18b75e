"""The TLS listener: every client connection starts on our own HTTP/1.1 protocol.

``ClientConnection`` is the asyncio protocol made for each accepted connection. It reads
request heads itself (framing by the blank line, parsing by httptools/llhttp), runs
``Handler.process`` for each, relays the upstream's answer byte for byte and frames it for
its client: the hot path of a proxy, without per-request objects it does not need.

It serves requests without a body and without an upgrade, which is nearly all of what a
browser sends. The first request it does not serve itself (a body, an upgrade, ``Expect``, a
head llhttp refuses or one past a size limit) hands the connection over, that request's
bytes included, to aiohttp's server (``server.Connection``), which then serves it to the end:
bodies are streamed, WebSockets relayed and malformed requests answered there, as before.

A request that needs no waiting on our side (verdict cached, an upstream connection idle)
is served from event-loop callbacks, without a task: written upstream in ``_start``, relayed
back in ``_on_upstream``. Whatever must wait goes to the connection's task, which continues
the same exchange with the handler's and upstream client's coroutines.

TLS is ``tls_transport``'s: ``ListenerServer`` makes a ``TLSProtocol`` for every accepted
connection, counted against ``limits.max_connections`` from accept to close, and a
``ClientConnection`` for each handshake that succeeds.

Per connection: the peer certificate is parsed once; a request head must be complete within
``limits.header_timeout`` of its first byte (slowloris); an idle keep-alive connection is
closed after ``limits.keepalive_timeout``.
Pipelined requests are answered in order. Graceful shutdown closes idle connections and lets
in-flight requests finish (with ``Connection: close``) within the grace period.

Flow control (``flow``): while the connection's write buffer is above its high-water mark
the client is not taking its answers, so no further request starts and nothing more is read;
the next one starts when the buffer has drained (``resume_writing``). A client that takes too
little for ``limits.send_timeout`` is cut off. Pipelined bytes beyond ``_PIPELINE_LIMIT``
behind the request in flight also stop reading until they are served.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import Any, cast

import httptools
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from . import responses
from .certs import ClientCert
from .config import LimitsConfig
from .errors import CertificateError
from .flow import PIPELINE, FlowControl
from .handler import DONE, FORWARD, Handler, Ticket
from .headers import HAS_DATE, HAS_LENGTH, HAS_SERVER
from .log import get_logger
from .metrics import Metrics
from .responses import SERVER
from .server import Connection as FallbackConnection
from .tls import PeerCertificates, TLSState, requested_server_name
from .tls_transport import TLSProtocol
from .upstream import Forwarded, Sent, UpstreamClient

_UNSET: Any = object()
_HEAD_END = b"\r\n\r\n"
# Headers that take a request off the fast path (aiohttp serves it): a body, an upgrade, an
# interim response to send. Lower case, as llhttp gives names as sent.
_HAND_OFF = frozenset({b"transfer-encoding", b"upgrade", b"expect"})
# Pipelined bytes held while a request is in flight before the client is told to wait.
_PIPELINE_LIMIT = 256 * 1024
_NO_BODY_STATUS = frozenset({204, 304})

log = get_logger("sidecar.listener")


class ListenerServer(web.Server):
    """Makes a ``TLSProtocol`` per accepted connection and a ``ClientConnection`` per
    handshake that succeeds; keeps the limits, counters and the connections for shutdown. As
    an aiohttp ``Server`` it also manages the connections handed over to aiohttp."""

    def __init__(
        self,
        handler: Handler,
        *,
        tls: TLSState,
        limits: LimitsConfig,
        peer_certs: PeerCertificates,
        metrics: Metrics,
    ) -> None:
        super().__init__(handler, access_log=None, **_parser_limits(limits))
        self.handler = handler
        self.tls = tls
        self.limits = limits
        self.peer_certs = peer_certs
        self.metrics = metrics
        #: accepted connections, from accept (handshake included) to close
        self.open_connections = 0
        self.accepted: set[TLSProtocol] = set()
        self.clients: set[ClientConnection] = set()
        self.short_head = 0
        self.max_head = 0
        self.apply_limits(limits)
        self.closing = False

    def apply_limits(self, limits: LimitsConfig) -> None:
        """Use ``limits`` from now on (a reload): for every new connection, and for the next
        request head on a connection this protocol serves. A connection already handed over
        to aiohttp keeps the parser limits and header deadline it was given until it closes.
        ``handshake_timeout`` and ``max_connections`` apply from the next accept."""
        self.limits = limits
        # A head longer than this may break a line limit: it is measured line by line.
        self.short_head = min(limits.max_request_line, limits.max_header_line)
        # Bytes without a complete head beyond which the head cannot be acceptable: the
        # request line and the whole header block (limits.max_header_block), with their CRLFs.
        self.max_head = limits.max_request_line + limits.max_header_block + 4
        self._kwargs.update(_parser_limits(limits))  # for the connections adopt() makes

    def __call__(self) -> TLSProtocol:  # type: ignore[override]
        return TLSProtocol(self, self._loop)

    # ---- tls_transport.Listener ----------------------------------------------------------------

    def admit(self, connection: TLSProtocol) -> bool:
        """Count an accepted connection in; beyond ``limits.max_connections`` (or while
        shutting down) it is refused at once, before any TLS work."""
        if self.open_connections >= self.limits.max_connections or self.closing:
            self.metrics.connections_refused.inc()
            return False
        self.open_connections += 1
        self.accepted.add(connection)
        return True

    def release(self, connection: TLSProtocol) -> None:
        self.open_connections -= 1
        self.accepted.discard(connection)

    def protocol(self) -> ClientConnection:
        return ClientConnection(self)

    def retire(self) -> None:
        """What decides trust changed (a reload): no connection made before serves another
        request. Handshakes under way end now; a request in flight finishes, with
        ``Connection: close``; idle connections close now, handed-over ones after their
        request (aiohttp's ``close``)."""
        self._abort_handshakes()
        for client in list(self.clients):
            client.stop()
        self.pre_shutdown()

    def _abort_handshakes(self) -> None:
        for connection in list(self.accepted):
            if connection.handshaking:
                connection.abort()

    def adopt(self) -> FallbackConnection:
        """An aiohttp connection protocol for a connection handed over."""
        return FallbackConnection(self, loop=self._loop, **self._kwargs)

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aiohttp's signature)
        """No new requests; in-flight ones get ``timeout`` seconds, then their connections are
        aborted. Idle connections close now."""
        self.closing = True
        self._abort_handshakes()
        grace = 0.0 if timeout is None else timeout
        tasks = [task for client in list(self.clients) if (task := client.stop()) is not None]
        self.pre_shutdown()  # as aiohttp's runner does: idle handed-over connections close now
        fallback = asyncio.ensure_future(super().shutdown(timeout))
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        await fallback
        for client in list(self.clients):
            client.abort()
        for connection in list(self.accepted):
            connection.abort()  # still closing (lingering)


def _parser_limits(limits: LimitsConfig) -> dict[str, Any]:
    """aiohttp's ``RequestHandler`` keyword arguments for ``limits``."""
    # aiohttp reports which limit was hit, not which part: keep the two numbers distinct
    # (one byte more for the request line) so that 414 and 431 can be told apart.
    line_limit = limits.max_request_line
    if line_limit == limits.max_header_line:
        line_limit += 1
    return {
        "keepalive_timeout": limits.keepalive_timeout,
        "max_line_size": line_limit,
        "max_field_size": limits.max_header_line,
        "max_headers": limits.max_headers,
    }


class ClientConnection(asyncio.Protocol):
    """One client connection on the fast path (see the module's docstring)."""

    __slots__ = (
        "_buffer",
        "_busy",
        "_complete",
        "_deadline",
        "_flow",
        "_gone",
        "_head_started",
        "_hosts",
        "_in_task",
        "_keep_alive",
        "_parser",
        "_peer",
        "_peer_ip",
        "_raw_headers",
        "_ready",
        "_server",
        "_sni",
        "_stopped",
        "_stopping",
        "_task",
        "_timer",
        "_transport",
        "_unusual",
        "_url",
        "_waiter",
        "loop",
    )

    def __init__(self, server: ListenerServer) -> None:
        self._server = server
        self.loop = server._loop
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._parser = httptools.HttpRequestParser(self)
        self._stopping = False
        self._peer: ClientCert | None = _UNSET
        self._peer_ip: str | None = None
        self._sni: str | None = None  # the TLS server name the client asked for
        # Requests that must wait for something (see _start) go to one task per connection,
        # made at the first such request; it waits on _waiter for the next one.
        self._task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._ready: tuple[Exchange, Ticket] | None = None
        self._busy = False
        self._in_task = False  # the task is serving a request (else it waits, or is none)
        self._stopped: asyncio.Future[None] | None = None  # for stop(), while busy
        self._flow = FlowControl(self.loop, server.limits.send_timeout)
        #: called if the connection ends while a response streams to it (``when_gone``)
        self._gone: Callable[[], None] | None = None
        # one lazily re-armed timer: the header deadline, or the idle keep-alive limit
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._head_started = False
        # the head being parsed
        self._url = b""
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._complete = False
        self._unusual = False
        self._hosts = 0
        self._keep_alive = False

    # ---- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Made by the TLS layer after the handshake (counted there since accept).
        server = self._server
        if server.closing:  # a handshake that ended as the listener closed
            transport.abort()  # type: ignore[attr-defined]
            return
        server.clients.add(self)
        self._transport = cast(asyncio.Transport, transport)
        self._flow.attach(self._transport, self._transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self._peer_ip = str(peer[0])
        self._sni = requested_server_name(transport.get_extra_info("ssl_object"))
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The first request head must arrive within header_timeout of the handshake.
        self._head_started = True
        self._set_deadline(server.limits.header_timeout)
        # revocation: looked into as the connection starts, resumed sessions too: what its
        # first request will need (a CRL, an OCSP answer) is fetched from now
        try:
            peer = server.peer_certs.from_ssl_object(transport.get_extra_info("ssl_object"))
        except CertificateError:
            peer = None  # unreadable: its first request says so (peer_certificate)
        if peer is not None:
            self._peer = peer
            server.handler.plan.revocation.connection_started(peer)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._release()
        self._flow.close()
        self._end_waiting()
        self._wake_stopped()
        gone, self._gone = self._gone, None
        if gone is not None:
            gone()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        flow = self._flow
        # Else pipelined behind the request in flight, or the client is not taking its
        # answers (reading is held then: these are bytes read before it was).
        if not self._busy and not flow.write_paused:
            self._next()
        if len(self._buffer) > _PIPELINE_LIMIT and (self._busy or flow.write_paused):
            flow.hold(PIPELINE)

    def eof_received(self) -> bool:
        # The client is done sending: nothing more to serve (over TLS the transport closes).
        self._stopping = True
        return False

    def pause_writing(self) -> None:
        self._flow.pause_writing()

    def resume_writing(self) -> None:
        self._flow.resume_writing()
        # While busy, the request in flight is writing (this may come from inside one of its
        # writes): it goes on by itself, and _answer continues once it is done.
        if not self._busy:
            self._continue()

    # ---- request heads ------------------------------------------------------------------------

    def _next(self) -> None:
        """Take the next request head from the buffer, if there is one, and serve it."""
        buffer, server = self._buffer, self._server
        if self._stopping or self._transport is None:
            if self._transport is not None:
                self._transport.close()
            return
        if not buffer:
            return
        if not self._head_started:
            # First bytes on an idle connection: the head is due within header_timeout (or
            # at the end of the keep-alive period, if that is sooner).
            self._head_started = True
            self._set_deadline(server.limits.header_timeout, sooner_only=True)
        end = buffer.find(_HEAD_END)
        if end < 0:
            if b"\n\n" in buffer or (
                len(buffer) > server.limits.max_request_line and b"\n" not in buffer
            ):
                self._hand_off()  # bare-LF framing, or a request line too long: aiohttp answers
            elif len(buffer) > server.max_head:
                self._refuse_head()  # held in memory no further
            return
        size = end + 4
        head = bytes(buffer[:size]) if size < len(buffer) else bytes(buffer)
        if size > server.short_head and not self._within_limits(head):
            self._hand_off()
            return
        self._url = b""
        self._raw_headers = []
        self._complete = self._unusual = False
        self._hosts = 0
        parser = self._parser
        try:
            parser.feed_data(head)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._hand_off()
            return
        if (
            not self._complete
            or self._unusual
            or len(self._raw_headers) > server.limits.max_headers
        ):
            self._hand_off()
            return
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            self._hand_off()
            return
        # One Host, or none in HTTP/1.0 (RFC 9112 §3.2): aiohttp answers the others with 400.
        if self._hosts > 1 or (self._hosts == 0 and version == "1.1"):
            self._hand_off()
            return
        del buffer[:size]
        self._head_started = False
        exchange = Exchange(
            self,
            _method(parser.get_method()),
            self._url.decode("utf-8", "surrogateescape"),
            self._raw_headers,
            http10=version == "1.0",
            keep_alive=self._keep_alive,
        )
        self._busy = True
        # From the loop, not from here: the upstream writes of the requests read in this
        # round then go out together (measured: writing each one between the TLS reads
        # served about 30 % fewer requests per second).
        self.loop.call_soon(self._start, exchange)

    def _refuse_head(self) -> None:
        """431 and close: the head grew past what it may be before it ended."""
        exchange = Exchange(self, "GET", "*", [], http10=False, keep_alive=False)
        exchange.answer(
            responses.error(
                431,
                "The request headers are too large.",
                request_id=responses.new_request_id(),
                accept=None,
            )
        )
        self._stopping = True
        self._buffer = bytearray()
        if self._transport is not None:
            self._transport.close()

    def _within_limits(self, head: bytes) -> bool:
        limits = self._server.limits
        lines = head.split(b"\r\n")
        if len(lines[0]) > limits.max_request_line:
            return False
        longest = limits.max_header_line
        return all(len(line) <= longest for line in lines[1:])

    # httptools callbacks (the whole head is fed at once)

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))
        lower = name.lower()
        if lower == b"host":
            self._hosts += 1
        elif lower in _HAND_OFF:
            self._unusual = True

    def on_message_complete(self) -> None:
        self._complete = True
        # Read now: once the message is complete llhttp resets its flags for the next one,
        # and should_keep_alive() would only give the version's default.
        self._keep_alive = self._parser.should_keep_alive()

    # ---- serving ------------------------------------------------------------------------------

    def _start(self, exchange: Exchange) -> None:
        """Serve a request without a task when nothing in it waits (a verdict the cache has,
        an idle upstream connection): the response comes back through ``_on_upstream``.
        Anything else goes to the connection's task."""
        handler = self._server.handler
        ticket = handler.begin(exchange, self.peer_certificate(), self._peer_ip, self._sni)
        if ticket.step == FORWARD:
            try:
                sent = ticket.plan.upstream.send_now(
                    exchange.method,
                    exchange.raw_path,
                    ticket.block,
                    ticket.has_host,
                    functools.partial(self._on_upstream, exchange, ticket),
                )
            except Exception as exc:  # as in Handler.resume: answered 500
                handler.fail(ticket, exc)
            else:
                if sent is not None:
                    exchange.sent = sent
                    return
        if ticket.step == DONE:
            handler.end(ticket)
            self._answer(exchange, ticket.response)
        else:
            self._queue(exchange, ticket)

    def _on_upstream(self, exchange: Exchange, ticket: Ticket) -> None:
        """The upstream's response head is here, or the exchange failed (see ``_start``)."""
        sent = exchange.sent
        assert sent is not None
        handler = self._server.handler
        try:
            forwarded = ticket.plan.upstream.relay_whole(exchange, sent, ticket.request_id)
        except Exception as exc:  # as in Handler.resume: answered 500
            handler.fail(ticket, exc)
        else:
            if forwarded is None:  # a body still coming, or a failure: the task takes it on
                self._queue(exchange, ticket)
                return
            handler.forwarded(ticket, forwarded)
        exchange.sent = None
        handler.end(ticket)
        self._answer(exchange, ticket.response)

    def _queue(self, exchange: Exchange, ticket: Ticket) -> None:
        """Hand the request to the connection's task (made at the first such request)."""
        self._ready = (exchange, ticket)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set_result(None)
        elif self._task is None:
            self._task = self.loop.create_task(self._run())

    async def _run(self) -> None:
        """Serve the requests queued for the task, until the connection closes."""
        while True:
            ready = self._ready
            if ready is None:
                transport = self._transport
                if transport is None or transport.is_closing():
                    return
                waiter = self._waiter = self.loop.create_future()
                try:
                    await waiter
                except asyncio.CancelledError:
                    return  # the connection closed or was handed over while idle
                continue
            self._ready = None
            exchange, ticket = ready
            self._in_task = True
            try:
                response = await self._server.handler.resume(ticket, exchange.forward)
            except Exception as exc:  # the handler answers errors itself: a broken write
                log.error("response_failed", error=repr(exc), exc_info=exc)
                exchange.keep_alive = False
                self.abort()
                response = None
            finally:
                self._in_task = False
            self._answer(exchange, response)

    def _answer(self, exchange: Exchange, response: web.StreamResponse | None) -> None:
        """Send our own answer, if there is one; then on to the next request."""
        if response is not None:
            try:
                exchange.answer(response)
            except Exception as exc:
                log.error("response_failed", error=repr(exc), exc_info=exc)
                exchange.keep_alive = False
                self.abort()
        self._busy = False
        self._wake_stopped()
        if not exchange.keep_alive:
            self._stopping = True
        self._continue()

    def _continue(self) -> None:
        """On to the next request, unless the client must first take what it was sent
        (``resume_writing`` comes back here then, or ``send_timeout`` cuts it off)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        flow = self._flow
        if flow.write_paused and not self._stopping:
            return
        if not self._buffer and not self._stopping:
            self._set_deadline(self._server.limits.keepalive_timeout)  # idle now
        self._next()
        # Read again once what is held is at most the limit, or while the rest of a head is due.
        if self._open() and (not self._busy or len(self._buffer) <= _PIPELINE_LIMIT):
            flow.release(PIPELINE)

    def _open(self) -> bool:
        # A call, not an inline test: _next may have closed or handed over the connection,
        # and mypy (whose narrowing the compiled build trusts) would not see it.
        transport = self._transport
        return transport is not None and not transport.is_closing()

    def peer_certificate(self) -> ClientCert | None:
        peer = self._peer
        if peer is _UNSET:
            transport = self._transport
            ssl_obj = transport.get_extra_info("ssl_object") if transport is not None else None
            try:
                peer = self._server.peer_certs.from_ssl_object(ssl_obj)
            except CertificateError:
                # OpenSSL verified it but we cannot parse it: treat as no identity, and close.
                self._stopping = True
                peer = None
            self._peer = peer
        return peer

    # ---- writing, for the exchange -----------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    async def drain(self) -> None:
        """Wait while the client is not taking what it was sent (``flow``: cut off after
        ``send_timeout``); ``ConnectionResetError`` once the connection is gone."""
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        await self._flow.drain()

    def when_gone(self, callback: Callable[[], None] | None) -> None:
        """Have ``callback`` called if the connection ends (None: no longer)."""
        if callback is not None and self._transport is None:
            callback()
            return
        self._gone = callback

    @property
    def stopping(self) -> bool:
        return self._stopping or self._server.closing

    # ---- ends ---------------------------------------------------------------------------------

    def stop(self) -> asyncio.Future[None] | None:
        """Shutdown: no more requests here. Idle connections close now; the request in flight
        finishes first: what is returned is done then (cancelling it cancels the request if
        the task serves it)."""
        self._stopping = True
        if not self._busy:
            if self._transport is not None:
                self._transport.close()
            self._end_waiting()
            return None
        if self._in_task:
            assert self._task is not None
            return self._task
        if self._stopped is None:
            self._stopped = self.loop.create_future()
        return self._stopped

    def _wake_stopped(self) -> None:
        stopped, self._stopped = self._stopped, None
        if stopped is not None and not stopped.done():
            stopped.set_result(None)

    def _end_waiting(self) -> None:
        """Let the connection's task end if it is waiting for a request."""
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.cancel()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _release(self) -> None:
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._server.clients.discard(self)

    def _hand_off(self) -> None:
        """Give the connection, with every byte not yet served, to aiohttp's server."""
        transport = self._transport
        assert transport is not None
        peer = self.peer_certificate()
        if self._stopping:  # a certificate OpenSSL accepted but we cannot read: no service
            transport.close()
            return
        fallback = self._server.adopt()
        self._release()
        self._end_waiting()
        data, self._buffer = bytes(self._buffer), bytearray()
        transport.set_protocol(fallback)
        fallback.adopt(peer=peer)
        fallback.connection_made(transport)
        self._flow.detach()  # reading resumes if held here: aiohttp's protocol holds its own
        if data:
            fallback.data_received(data)

    # ---- the deadline --------------------------------------------------------------------------

    def _set_deadline(self, seconds: float, *, sooner_only: bool = False) -> None:
        deadline = self.loop.time() + seconds
        if sooner_only and self._timer is not None and deadline >= self._deadline:
            return
        self._deadline = deadline
        if self._timer is None or self._timer.when() > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._transport is None or self._busy:
            return  # gone, or busy: the upstream's read timeout bounds a request in flight
        if self.loop.time() < self._deadline:
            self._timer = self.loop.call_at(self._deadline, self._on_timer)
            return
        # No complete head in time (slowloris), or idle past keep-alive: close.
        self._transport.close()


class Exchange:
    """One request on the fast path: what the handler reads (``handler.Request``) and where
    the upstream's answer goes (``upstream.Downstream``)."""

    __slots__ = (
        "_chunked",
        "_conn",
        "_headers",
        "http10",
        "keep_alive",
        "method",
        "raw_headers",
        "raw_path",
        "sent",
    )

    def __init__(
        self,
        conn: ClientConnection,
        method: str,
        raw_path: str,
        raw_headers: list[tuple[bytes, bytes]],
        *,
        http10: bool,
        keep_alive: bool,
    ) -> None:
        self._conn = conn
        self.method = method
        self.raw_path = raw_path
        self.raw_headers = raw_headers
        self.http10 = http10
        self.keep_alive = keep_alive
        self._headers: CIMultiDict[str] | None = None
        self._chunked = False
        #: the request as written upstream by ``UpstreamClient.send_now``, its answer to come
        self.sent: Sent | None = None

    @property
    def headers(self) -> CIMultiDict[str]:
        headers = self._headers
        if headers is None:
            headers = self._headers = CIMultiDict(
                (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
                for name, value in self.raw_headers
            )
        return headers

    @property
    def path(self) -> str:
        return _decoded_path(self.raw_path)

    def forward(
        self, upstream: UpstreamClient, block: bytes, has_host: bool, request_id: str
    ) -> Awaitable[Forwarded]:
        """``handler.Forward_`` for this request (the rest of it, when it was sent already)."""
        if self.sent is not None:
            return upstream.finish_relay(self, self.sent, request_id)
        return upstream.relay(self, self.method, self.raw_path, block, has_host, request_id)

    # ---- upstream.Downstream ---------------------------------------------------------------------

    def respond(
        self,
        status: int,
        reason: bytes,
        fields: bytes,
        flags: int,
        body: bytes,
        complete: bool,
    ) -> None:
        framing = b""
        if status in _NO_BODY_STATUS or status < 200:
            body = b""
        elif complete:
            # A HEAD response's length is the GET's: the upstream's, or none.
            if not flags & HAS_LENGTH and self.method != "HEAD":
                framing = b"Content-Length: %d\r\n" % len(body)
        elif not flags & HAS_LENGTH:
            if self.http10:
                self.keep_alive = False  # the end of the connection ends the body
            else:
                framing = b"Transfer-Encoding: chunked\r\n"
                self._chunked = True
        if self.method == "HEAD":
            body = b""
        conn = self._conn
        if conn.stopping:
            self.keep_alive = False
        if not self.keep_alive:
            framing += b"Connection: close\r\n"
        elif self.http10:
            framing += b"Connection: keep-alive\r\n"
        if not flags & HAS_DATE:
            framing += _http_date()
        if not flags & HAS_SERVER:
            framing += _SERVER_LINE
        conn.write(
            b"%b %d %b\r\n%b%b\r\n%b"
            % (
                b"HTTP/1.0" if self.http10 else b"HTTP/1.1",
                status,
                reason,
                fields,
                framing,
                body,
            )
        )

    def send(self, data: bytes) -> None:
        if self._chunked:
            self._conn.write(b"%x\r\n%b\r\n" % (len(data), data))
        elif self.method != "HEAD":
            self._conn.write(data)

    async def drain(self) -> None:
        await self._conn.drain()

    def when_gone(self, callback: Callable[[], None] | None) -> None:
        self._conn.when_gone(callback)

    def finish(self) -> None:
        if self._chunked:
            self._conn.write(b"0\r\n\r\n")

    def abort(self) -> None:
        self.keep_alive = False
        self._conn.abort()

    # ---- our own answers ---------------------------------------------------------------------

    def answer(self, response: web.StreamResponse) -> None:
        """Send one of the handler's own responses (a complete ``web.Response``)."""
        assert isinstance(response, web.Response)
        if response.keep_alive is False:
            self.keep_alive = False
        body = response.body
        assert body is None or isinstance(body, bytes)
        lines = []
        flags = 0
        for name, value in response.headers.items():
            lines.append(f"{name}: {value}\r\n")
            flags |= _FLAGS.get(name.lower(), 0)
        fields = "".join(lines).encode("utf-8", "surrogateescape")
        self.respond(
            response.status, response.reason.encode("latin-1"), fields, flags, body or b"", True
        )


_METHODS = {m.encode(): m for m in ("GET", "HEAD", "DELETE", "OPTIONS", "POST", "PUT", "PATCH")}


def _method(raw: bytes) -> str:
    return _METHODS.get(raw) or raw.decode("ascii")  # llhttp knows only ASCII methods


#: targets longer than this are decoded every time: rare, and they would fill the cache
_LONGEST_CACHED_TARGET = 1024
#: what an entry costs beyond its two strings' characters (object headers, the dict's slot)
_PATH_ENTRY = 120


class PathCache:
    """Decoded request paths by raw target, for the access log. Anonymous clients choose the
    keys, so what is held is bounded in characters (keys and values, about bytes, plus an
    estimate per entry), and the cache is emptied when it would pass that bound."""

    __slots__ = ("budget", "entries", "size")

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.size = 0
        self.entries: dict[str, str] = {}

    def get(self, raw: str) -> str:
        value = self.entries.get(raw)
        if value is not None:
            return value
        try:
            value = URL(raw, encoded=True).path
        except ValueError:
            value = raw
        if len(raw) <= _LONGEST_CACHED_TARGET:
            cost = len(raw) + len(value) + _PATH_ENTRY
            if self.size + cost > self.budget:
                self.entries.clear()
                self.size = 0
            self.entries[raw] = value
            self.size += cost
        return value


decoded_paths = PathCache(1 << 20)


def _decoded_path(raw: str) -> str:
    return decoded_paths.get(raw)


_SERVER_LINE = f"Server: {SERVER}\r\n".encode()
_FLAGS = {"content-length": HAS_LENGTH, "date": HAS_DATE, "server": HAS_SERVER}
_date_cache: tuple[int, bytes] = (0, b"")


def _http_date() -> bytes:
    """The Date header line, made once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, b"Date: %b\r\n" % formatdate(now, usegmt=True).encode())
    return _date_cache[1]
