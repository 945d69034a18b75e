"""The client side of HTTP/1.1: one ``ClientConnection`` per TLS connection, from its
handshake until it closes or is handed over.

It reads request heads (``heads``) and bodies (``inbound``), has the gateway serve each
request, and writes the answers in order (``ResponseWriter``: ours, and the upstream's relayed
as bytes): the hot path of a proxy, without per-request objects it does not need. It serves
every request but an upgrade: at a WebSocket (or ``CONNECT``) it hands the connection over,
that request's bytes included, to aiohttp's server (``fallback``), which then serves it to
the end. A head it refuses (``heads.Refusal``) is answered here, and the connection closed.

Request bodies (``Content-Length`` or ``chunked``): ``100 Continue`` goes out only once the
gateway decided to forward the request, never for one it refuses. A body up to
``limits.body_buffer`` is read whole before an upstream connection is taken, then sent with
the request in one write (a chunked one with its length, as nginx does); a longer one is
streamed as it arrives, at most ``limits.max_body_streams_per_address`` at once per client
address (429 beyond), with flow control both ways (``inbound``). An answer given before the
whole body was read (our own refusal, or the upstream's early one) is the connection's last.

A request that needs no waiting on our side (verdict cached, an upstream connection idle)
is served from event-loop callbacks, without a task: written upstream in ``_start``, relayed
back in ``_on_upstream``. Whatever must wait goes to the connection's task, which continues
the same request with the gateway's and the forwarder's coroutines.

Per connection: the peer certificate is parsed once; a request head must be complete within
``limits.header_timeout`` of its first byte (slowloris); an idle keep-alive connection is
closed after ``limits.keepalive_timeout``. Pipelined requests are answered in order. Graceful
shutdown closes idle connections and lets in-flight requests finish (with ``Connection:
close``) within the grace period.

Flow control (``flow``): while the connection's write buffer is above its high-water mark
the client is not taking its answers, so no further request starts and nothing more is read;
the next one starts when the buffer has drained (``resume_writing``). A client that takes too
little for ``limits.send_timeout`` is cut off. Pipelined bytes beyond ``_PIPELINE_LIMIT``
behind the request in flight also stop reading until they are served.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Any, cast

from .. import responses
from ..addresses import address_key
from ..certs import ClientCert
from ..errors import CertificateError, LimitReached
from ..flow import BODY, PIPELINE, FlowControl
from ..forwarder import BodyInvalid, BodyTooLarge, Forward, RequestBody
from ..headers import HAS_DATE, HAS_LENGTH, HAS_SERVER
from ..listener_state import ListenerState
from ..log import get_logger
from ..request import ANSWER, FORWARD, Request
from ..responses import SERVER, Answer
from ..tls import requested_server_name
from .bodies import decoder
from .heads import HEAD_END, HandOff, Head, HeadReader, Refusal
from .inbound import Inbound

_UNSET: Any = object()
# Pipelined bytes held while a request is in flight before the client is told to wait.
_PIPELINE_LIMIT = 256 * 1024
# Body bytes held while a body streams upstream before the client is told to wait (with the
# upstream connection's own write buffer, what an upload in flight costs in memory).
_STREAM_WINDOW = 128 * 1024
# A read larger than this on an idle connection is served without copying the bytes after
# its head into the buffer (data_received); the head's end is looked for as far as a head may
# reach (``HeadLimits.max_head``; not found there, the read goes into the buffer as any other).
_LARGE_READ = 16 * 1024
_NO_BODY_STATUS = frozenset({204, 304})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

log = get_logger("sidecar.listener")


class ClientConnection(asyncio.Protocol):
    """One client connection on the fast path (see the module's docstring)."""

    __slots__ = (
        "_buffer",
        "_busy",
        "_deadline",
        "_flow",
        "_forget",
        "_gone",
        "_head_started",
        "_heads",
        "_in_task",
        "_inbound",
        "_peer",
        "_peer_chain",
        "_peer_ip",
        "_pending",
        "_ready",
        "_sni",
        "_state",
        "_stopped",
        "_stopping",
        "_tail",
        "_task",
        "_timer",
        "_transport",
        "_waiter",
        "_writer",
        "loop",
    )

    def __init__(
        self,
        state: ListenerState,
        loop: asyncio.AbstractEventLoop,
        *,
        forget: Callable[[ClientConnection], None],
    ) -> None:
        self._state = state
        self.loop = loop
        #: called once the connection is no longer this protocol's (closed, or handed over)
        self._forget = forget
        self._transport: asyncio.Transport | None = None
        #: bytes received and not yet served: the next request heads
        self._buffer = bytearray()
        #: while a large read is served (data_received): the bytes after its first head,
        #: which follow the buffer's (_begin_body gives them to the body's reader)
        self._tail = b""
        self._heads = HeadReader()
        self._stopping = False
        self._peer: ClientCert | None = _UNSET
        #: the issuers OpenSSL verified the peer certificate with (``peer_chain``)
        self._peer_chain: tuple[bytes, ...] | None = None
        self._peer_ip: str | None = None
        self._sni: str | None = None  # the TLS server name the client asked for
        # Requests that must wait for something (see _start) go to one task per connection,
        # made at the first such request; it waits on _waiter for the next one.
        self._task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._ready: Request | None = None
        #: the request written upstream from the event loop (``_start``), its answer to come
        self._pending: Forward | None = None
        self._writer = ResponseWriter(self)
        self._busy = False
        self._in_task = False  # the task is serving a request (else it waits, or is none)
        self._stopped: asyncio.Future[None] | None = None  # for stop(), while busy
        self._flow = FlowControl(loop, state.limits.send_timeout)
        #: called if the connection ends while a response streams to it (``when_gone``)
        self._gone: Callable[[], None] | None = None
        # one lazily re-armed timer: the header deadline, or the idle keep-alive limit
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._head_started = False
        #: the body of the request in flight, while it is being read
        self._inbound: Inbound | None = None

    # ---- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Made by the TLS layer after the handshake (counted there since accept).
        state = self._state
        if state.closing:  # a handshake that ended as the listener closed
            transport.abort()  # type: ignore[attr-defined]
            return
        self._transport = cast(asyncio.Transport, transport)
        self._flow.attach(self._transport, self._transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self._peer_ip = str(peer[0])
        ssl_object = transport.get_extra_info("ssl_object")
        self._sni = requested_server_name(ssl_object)
        # (TCP_NODELAY: asyncio's and uvloop's TCP transports set it on every connection)
        # The first request head must arrive within header_timeout of the handshake.
        self._head_started = True
        self._set_deadline(state.heads.header_timeout)
        # revocation: the handshake is complete (a resumed session's too): the gateway is told
        # of the certificate now, so that what its first request needs is fetched from now
        try:
            peer = state.peer_certs.from_ssl_object(ssl_object)
        except CertificateError:
            peer = None  # unreadable: its first request says so (peer_certificate)
        if peer is not None:
            self._peer = peer
            state.gateway.connection_started(peer)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._release()
        self._flow.close()
        inbound = self._inbound
        if inbound is not None:
            # as nginx: "client prematurely closed connection", 400 in the access log
            inbound.fail(BodyInvalid("The connection ended before the request body did."))
        self._end_waiting()
        self._wake_stopped()
        gone, self._gone = self._gone, None
        if gone is not None:
            gone()
        # the connection's objects that refer back to it: freed now, not by the cyclic GC
        self._writer.release()
        self._heads.close()

    def data_received(self, data: bytes) -> None:
        inbound = self._inbound
        if inbound is not None and not inbound.complete:
            data = inbound.feed(data)  # the body's bytes; what follows it is the next request's
            if not data:
                return
        flow = self._flow
        # Else pipelined behind the request in flight, or the client is not taking its
        # answers (reading is held then: these are bytes read before it was).
        serve = not self._busy and not flow.write_paused
        end = -1
        if serve and len(data) > _LARGE_READ and not self._buffer:
            # An upload's first read (up to the listener's 256 KiB): only the head goes
            # into the buffer; the bytes after it wait in _tail, where _begin_body gives them
            # to the body's reader, instead of being copied into the buffer and out again.
            end = data.find(HEAD_END, 0, self._state.heads.max_head)
        if end >= 0:
            size = end + len(HEAD_END)
            self._buffer += data[:size]
            self._tail = data[size:]
            self._next()
            tail, self._tail = self._tail, b""
            self._buffer += tail  # what no body took: as if the read had gone to the buffer
        else:
            self._buffer += data
            if serve:
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
        buffer, state = self._buffer, self._state
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
            self._set_deadline(state.heads.header_timeout, sooner_only=True)
        head = self._heads.read(buffer, state.heads)
        if not isinstance(head, Head):
            if isinstance(head, HandOff):
                self._hand_off()
            elif head is not None:
                self._refuse(head)
            return  # or wait for the rest of the head
        del buffer[: head.size]
        self._head_started = False
        if (head.length or head.chunked) and not self._begin_body(head):
            return
        request = Request(
            head.method,
            head.target,
            head.raw_headers,
            cert=(cert := self.peer_certificate()),
            chain_source=self.peer_chain if cert is not None else None,
            peer_ip=self._peer_ip,
            server_name=self._sni,
            http10=head.http10,
            keep_alive=head.keep_alive,
        )
        self._busy = True
        # From the loop, not from here: the upstream writes of the requests read in this
        # round then go out together (measured: writing each one between the TLS reads
        # served about 30 % fewer requests per second).
        self.loop.call_soon(self._start, request)

    def _begin_body(self, head: Head) -> bool:
        """The request has a body: it is read from now on (``inbound``), what is here first.
        False when the connection is closed instead: a body is not taken from a client whose
        certificate OpenSSL accepted but we cannot read (as a body was not handed to aiohttp's
        server from it), whatever it would be served as."""
        transport = self._transport
        self.peer_certificate()
        if self._stopping and transport is not None:
            transport.close()
            return False
        limits = self._state.limits
        flow = self._flow
        limit = limits.max_body_size
        inbound = self._inbound = Inbound(
            self.loop,
            decoder(head.length, head.chunked, max_trailers=limits.max_header_block),
            chunked=head.chunked,
            expecting=head.expect,
            limit=limit,
            timeout=limits.body_timeout,
            min_rate=limits.body_min_rate,
            window=limits.body_buffer,
            hold=functools.partial(flow.hold, BODY),
            release=functools.partial(flow.release, BODY),
        )
        if limit is not None and head.length > limit:
            # refused before a byte of it is read or forwarded (the gateway answers 413)
            inbound.fail(BodyTooLarge(f"Content-Length {head.length} exceeds {limit}"))
            return True
        tail = self._tail
        if tail:  # the rest of a large read (data_received): the buffer held only the head
            self._tail = b""
            self._buffer += inbound.feed(tail)
        elif buffer := self._buffer:
            self._buffer = bytearray(inbound.feed(bytes(buffer)))
        return True

    def _refuse(self, refusal: Refusal) -> None:
        """Our own answer to a head refused as it arrives, and close."""
        request = Request(
            "GET", "*", [], cert=None, peer_ip=None, server_name=None, keep_alive=False
        )
        answer = responses.error(
            refusal.status, refusal.text, request_id=responses.new_request_id(), accept=None
        )
        self._writer.answer(request, answer)
        self._stopping = True
        self._buffer = bytearray()
        self._tail = b""
        if self._transport is not None:
            self._transport.close()

    # ---- serving ------------------------------------------------------------------------------

    def _start(self, request: Request) -> None:
        """Serve a request without a task when nothing in it waits (a verdict the cache has,
        an idle upstream connection): the response comes back through ``_on_upstream``.
        Anything else goes to the connection's task."""
        gateway = self._state.gateway
        gateway.begin(request)
        if request.step is FORWARD:
            inbound = self._inbound
            if inbound is not None and not inbound.complete:
                self._queue(request)  # the body is still to come: the task waits for it
                return
            upstream = request.upstream
            assert upstream is not None
            try:
                block, body = request.block, None
                if inbound is not None:
                    block, body = _whole(request, inbound)
                forward = upstream.send(
                    request.method,
                    request.target,
                    block,
                    request.has_host,
                    body=body,
                    notify=functools.partial(self._on_upstream, request),
                )
            except Exception as exc:  # as in Gateway.resume: answered 500
                gateway.fail(request, exc)
            else:
                self._pending = forward
                if forward.written:
                    return
        if request.step is ANSWER:
            gateway.end(request)
            self._answer(request)
        else:
            self._queue(request)

    def _on_upstream(self, request: Request) -> None:
        """The upstream's response head is here, or the exchange failed (see ``_start``)."""
        forward = self._pending
        assert forward is not None
        if not forward.whole():  # a body still coming, or a failure: the task takes it on
            self._queue(request)
            return
        self._pending = None
        gateway = self._state.gateway
        try:
            try:
                fields, flags, request.reports = forward.head(request.request_id)
                self._writer.respond(
                    request, forward.status, forward.reason, fields, flags, forward.take(), True
                )
            finally:
                forward.release()
        except Exception as exc:  # as in Gateway.resume: answered 500
            gateway.fail(request, exc)
        else:
            gateway.forwarded(request, forward.status, forward.upstream_seconds)
        gateway.end(request)
        self._answer(request)

    def _queue(self, request: Request) -> None:
        """Hand the request to the connection's task (made at the first such request)."""
        self._ready = request
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set_result(None)
        elif self._task is None:
            self._task = self.loop.create_task(self._run())

    async def _run(self) -> None:
        """Serve the requests queued for the task, until the connection closes."""
        while True:
            request = self._ready
            if request is None:
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
            self._in_task = True
            try:
                await self._state.gateway.resume(request, self._forward)
            except Exception as exc:  # the gateway answers errors itself: a broken write
                log.error("response_failed", error=repr(exc), exc_info=exc)
                request.keep_alive = False
                request.answer = None
                self.abort()
            finally:
                self._in_task = False
            self._answer(request)

    async def _forward(self, request: Request) -> tuple[int, float]:
        """``gateway.Forwarding`` for this connection: the request (written by ``_start``
        already, or now) and its answer, relayed to the client."""
        forward = self._pending
        self._pending = None
        stream: str | None = None  # the client address a streamed body is counted for
        try:
            if forward is None:
                upstream = request.upstream
                assert upstream is not None
                block: bytes = request.block
                body: RequestBody | bytes | None = None
                inbound = self._inbound
                if inbound is not None:
                    block, body, stream = await self._body(request, inbound)
                forward = upstream.send(
                    request.method, request.target, block, request.has_host, body=body
                )
        except BaseException:
            self._end_stream(stream)
            raise
        try:
            await forward.response()
            writer = self._writer
            fields, flags, request.reports = forward.head(request.request_id)
            if forward.complete:  # all of it arrived with the head: one write
                writer.respond(
                    request, forward.status, forward.reason, fields, flags, forward.take(), True
                )
            else:
                writer.respond(request, forward.status, forward.reason, fields, flags, b"", False)
                await forward.relay(writer, writer.push)
        finally:
            forward.release()
            self._end_stream(stream)
        return forward.status, forward.upstream_seconds

    async def _body(
        self, request: Request, inbound: Inbound
    ) -> tuple[bytes, RequestBody | bytes, str | None]:
        """The body of a request to forward: all of it when it fits ``limits.body_buffer``
        (no upstream connection is taken before), else a stream, counted against the client
        address's ``limits.max_body_streams_per_address`` (its key is returned, to be given
        back). Raises the body's failure (408, 413, 400) or ``LimitReached`` (429)."""
        limits = self._state.limits
        failure = inbound.error
        if failure is not None:  # refused as it began (413 by its length): no 100 Continue
            raise failure
        if inbound.expecting:
            # The gateway decided to forward: the client may send the body now. (A request it
            # refuses never gets here: its client is told so instead, without 100 Continue.)
            self.write(_CONTINUE)
            inbound.continued()
        await inbound.buffered(limits.body_buffer)
        if inbound.complete:
            block, body = _whole(request, inbound)
            return block, body, None
        key: str | None = None
        if not request.trusted:
            key = address_key(request.peer_ip)
            if not self._state.body_streams.take(key, limits.max_body_streams_per_address):
                raise LimitReached("max_body_streams_per_address", 429)
        inbound.set_window(max(limits.body_buffer, _STREAM_WINDOW))
        stream = RequestBody(
            inbound, chunked=inbound.chunked, limit=None, timeout=None, pushing=inbound
        )
        return request.block, stream, key

    def _end_stream(self, key: str | None) -> None:
        if key is not None:
            self._state.body_streams.give(key)

    def _answer(self, request: Request) -> None:
        """Send our own answer, if there is one; then on to the next request."""
        inbound = self._inbound
        if inbound is not None:
            self._inbound = None
            if not inbound.complete:
                # What is left of the body cannot be told from a next request: the answer
                # is the connection's last (closed after a lingering read, tls_transport).
                request.keep_alive = False
            inbound.close()
        answer = request.answer
        if answer is not None:
            try:
                self._writer.answer(request, answer)
            except Exception as exc:
                log.error("response_failed", error=repr(exc), exc_info=exc)
                request.keep_alive = False
                self.abort()
        self._busy = False
        self._wake_stopped()
        if not request.keep_alive:
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
            self._set_deadline(self._state.heads.keepalive_timeout)  # idle now
        self._next()
        # Read again once what is held is at most the limit, or while the rest of a head is due.
        if self._open() and (not self._busy or len(self._buffer) <= _PIPELINE_LIMIT):
            flow.release(PIPELINE)

    def _open(self) -> bool:
        # A call, not an inline test: _next may have closed or handed over the connection,
        # and mypy (whose narrowing the compiled build trusts) would not see it.
        transport = self._transport
        return transport is not None and not transport.is_closing()

    def peer_chain(self) -> tuple[bytes, ...]:
        """The certificates after the peer's that OpenSSL verified it with (made once)."""
        chain = self._peer_chain
        if chain is None:
            transport = self._transport
            ssl_obj = transport.get_extra_info("ssl_object") if transport is not None else None
            cert = self.peer_certificate()
            chain = () if cert is None else self._state.peer_certs.chain_of(ssl_obj, cert)
            self._peer_chain = chain
        return chain

    def peer_certificate(self) -> ClientCert | None:
        peer = self._peer
        if peer is _UNSET:
            transport = self._transport
            ssl_obj = transport.get_extra_info("ssl_object") if transport is not None else None
            try:
                peer = self._state.peer_certs.from_ssl_object(ssl_obj)
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

    @property
    def taking(self) -> bool:
        """A write now goes out: the connection is open and its transport's buffer below the
        high-water mark."""
        transport = self._transport
        return transport is not None and not transport.is_closing() and not self._flow.write_paused

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
        """No request follows the one answered now: shutdown, the client's close, or a body
        not read to its end."""
        inbound = self._inbound
        return (
            self._stopping or self._state.closing or (inbound is not None and not inbound.complete)
        )

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
        self._forget(self)

    def _hand_off(self) -> None:
        """Give the connection, with every byte not yet served, to aiohttp's server."""
        transport = self._transport
        assert transport is not None
        peer = self.peer_certificate()
        if self._stopping:  # a certificate OpenSSL accepted but we cannot read: no service
            transport.close()
            return
        self._release()
        self._end_waiting()
        data, self._buffer = bytes(self._buffer) + self._tail, bytearray()
        self._tail = b""
        fallback = self._state.hand_off(transport, peer)
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


def _whole(request: Request, inbound: Inbound) -> tuple[bytes, bytes]:
    """The header lines and the body of a request whose body is all here: a chunked one goes
    with its length (chunk extensions and trailers stay behind, as with nginx)."""
    body = inbound.take()
    if inbound.chunked:
        return request.block + b"Content-Length: %d\r\n" % len(body), body
    return request.block, body


class ResponseWriter:
    """Frames the answers of one client connection, one request at a time: our own
    (``answer``) and the upstream's (``respond``, then for a body still arriving
    ``forwarder.Client``: ``write``, ``finish``, ``abort``)."""

    __slots__ = ("_chunked", "_conn", "_no_body")

    def __init__(self, conn: ClientConnection) -> None:
        #: None once the connection is lost (``release``)
        self._conn: ClientConnection | None = conn
        self._chunked = False
        self._no_body = False  # a HEAD request's: the head only

    def release(self) -> None:
        """The connection is lost: let go of it. The connection and this writer refer to each
        other; without this, every closed connection waited for the cyclic garbage collector
        (in S2 a gen-0 collection every ~2,000 connections, up to 80 ms long). A response
        still streaming finds the client gone, as it would have from the connection."""
        self._conn = None

    def respond(
        self,
        request: Request,
        status: int,
        reason: bytes,
        fields: bytes,
        flags: int,
        body: bytes,
        complete: bool,
    ) -> None:
        """The response head (header lines ``fields`` as from ``headers.response_fields``,
        with its ``flags``) and ``body``: all of it if ``complete``, else the rest follows."""
        framing = b""
        head_request = request.method == "HEAD"
        self._no_body = head_request
        self._chunked = False
        if status in _NO_BODY_STATUS or status < 200:
            body = b""
        elif complete:
            # A HEAD response's length is the GET's: the upstream's, or none.
            if not flags & HAS_LENGTH and not head_request:
                framing = b"Content-Length: %d\r\n" % len(body)
        elif not flags & HAS_LENGTH:
            if request.http10:
                request.keep_alive = False  # the end of the connection ends the body
            else:
                framing = b"Transfer-Encoding: chunked\r\n"
                self._chunked = True
        if head_request:
            body = b""
        conn = self._conn
        if conn is None:
            return
        if conn.stopping:
            request.keep_alive = False
        if not request.keep_alive:
            framing += b"Connection: close\r\n"
        elif request.http10:
            framing += b"Connection: keep-alive\r\n"
        if not flags & HAS_DATE:
            framing += _http_date()
        if not flags & HAS_SERVER:
            framing += _SERVER_LINE
        conn.write(
            b"%b %d %b\r\n%b%b\r\n%b"
            % (
                b"HTTP/1.0" if request.http10 else b"HTTP/1.1",
                status,
                reason,
                fields,
                framing,
                body,
            )
        )

    def answer(self, request: Request, answer: Answer) -> None:
        """One of our own answers."""
        if answer.close:
            request.keep_alive = False
        self.respond(
            request,
            answer.status,
            answer.reason.encode("latin-1"),
            answer.fields,
            answer.flags,
            answer.body,
            True,
        )

    # ---- forwarder.Client ---------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        conn = self._conn
        if conn is None:
            raise ConnectionResetError("the client closed the connection")
        self._send(conn, data)
        await conn.drain()

    def push(self, data: bytes) -> bool:
        """``write`` without the wait, from the upstream's read while the relay waits for
        more (``UpstreamConnection.attach``): ``data`` goes to the client now, framed, if it
        takes it at once; False, and nothing written, when it does not (its transport's
        buffer is above the high-water mark, the connection is closing or gone) or the
        answer has no body (the relay's task then sees to it as before)."""
        conn = self._conn
        if conn is None or self._no_body or not data or not conn.taking:
            return False
        self._send(conn, data)
        return True

    def _send(self, conn: ClientConnection, data: bytes) -> None:
        """``data`` (not empty: an empty chunk would end the body) framed for the client."""
        if self._chunked:
            conn.write(b"%x\r\n%b\r\n" % (len(data), data))
        elif not self._no_body:
            conn.write(data)

    async def finish(self) -> None:
        conn = self._conn
        if self._chunked and conn is not None:
            conn.write(b"0\r\n\r\n")

    def abort(self) -> None:
        conn = self._conn
        if conn is not None:
            conn.abort()

    def when_gone(self, callback: Callable[[], None] | None) -> None:
        conn = self._conn
        if conn is not None:
            conn.when_gone(callback)
        elif callback is not None:
            callback()


_SERVER_LINE = f"Server: {SERVER}\r\n".encode()
_date_cache: tuple[int, bytes] = (0, b"")


def _http_date() -> bytes:
    """The Date header line, made once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, b"Date: %b\r\n" % formatdate(now, usegmt=True).encode())
    return _date_cache[1]
