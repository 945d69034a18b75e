"""The fallback's protocol: aiohttp's HTTP/1.1 server with the limits we promise.

A connection comes here from ``http1.client.ClientConnection`` at an upgrade (a WebSocket, or
``CONNECT``), whose head that protocol read and checked against every limit, and stays to its
end: as a WebSocket, or closed after its one answer (``last_on_connection``), so that aiohttp
never reads another request head of its own, whose size only its per-line limits would bound.
It keeps the peer certificate parsed there, gives a client ``limits.header_timeout`` to send a
complete request head (slowloris), and answers parse errors with our own error pages.

Flow control as on the listener's own path (``flow``): while the write buffer is above its
high-water mark nothing more is read (what arrives meanwhile waits here, unparsed) and
aiohttp's writes wait; a client that takes too little for ``limits.send_timeout`` is cut
off, which also ends a wait in ``write_eof`` or for ``100 Continue`` to go out. Behind an
upgrade, aiohttp holds at most 64 KiB before it stops reading (aiohttp >= 3.14.1).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

from .. import responses
from ..certs import ClientCert
from ..flow import FlowControl
from ..headers import lines_to_multidict
from ..listener_state import ListenerState
from ..responses import Answer


class FallbackConnection(RequestHandler):
    """aiohttp's protocol for a connection handed over, with the peer certificate the HTTP/1.1
    protocol parsed (None: no identity). The TLS layer counts the connection until it closes."""

    __slots__ = ("_flow", "_gone", "_header_timeout", "_held", "_peer", "_state")

    def __init__(
        self,
        server: web.Server,
        state: ListenerState,
        peer: ClientCert | None,
        *,
        loop: asyncio.AbstractEventLoop,
        **kwargs: Any,
    ) -> None:
        super().__init__(server, loop=loop, **kwargs)
        self._peer = peer
        self._state = state
        self._header_timeout = state.limits.header_timeout
        self._flow = FlowControl(loop, state.limits.send_timeout)
        #: bytes that arrived while the client was not taking its answers, not yet parsed
        self._held = b""
        #: called if the connection ends while a response streams to it (``when_gone``)
        self._gone: Callable[[], None] | None = None

    def peer_certificate(self) -> ClientCert | None:
        """The peer certificate the listener parsed before it handed the connection over."""
        return self._peer

    def when_gone(self, callback: Callable[[], None] | None) -> None:
        """Have ``callback`` called if the connection ends (None: no longer)."""
        if callback is not None and self.transport is None:
            callback()
            return
        self._gone = callback

    # -- the header deadline ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Reading is held through aiohttp's own pause_reading and resume_reading, which keep
        # count of its other reasons to hold it (a full request queue, a body not yet read).
        self._flow.attach(cast(asyncio.Transport, transport), self)
        super().connection_made(transport)
        # aiohttp arms the keep-alive timer for a connection that has sent nothing yet; the
        # request head must arrive within header_timeout instead.
        self._arm_header_deadline()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._flow.close()
        self._held = b""
        gone, self._gone = self._gone, None
        if gone is not None:
            gone()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._flow.pause_writing()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._flow.resume_writing()
        if self._held and not self._flow.write_paused:
            self.data_received(b"")  # what was held, in order, before anything read from now

    def data_received(self, data: bytes) -> None:
        if self._flow.write_paused:
            # The client is not taking its answers: parse nothing more until it does. aiohttp
            # may have resumed reading for a reason of its own (a body read): hold it again.
            self._held += data
            if not self._reading_paused and self.transport is not None:
                self.pause_reading()
            return
        if self._held:
            data, self._held = self._held + data, b""
        # The first bytes of a new request on an idle connection start its header deadline.
        waiter = self._waiter
        if (
            data
            and waiter is not None
            and not waiter.done()
            and self._payload_parser is None
            and not self._upgraded
            and not self._messages
        ):
            self._arm_header_deadline()
        super().data_received(data)

    def _arm_header_deadline(self) -> None:
        """Close the connection unless a complete request head arrives in time."""
        loop = self._loop
        deadline = loop.time() + self._header_timeout
        if deadline >= self._next_keepalive_close_time and self._keepalive_handle is not None:
            return
        self._next_keepalive_close_time = deadline
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
        self._keepalive_handle = loop.call_at(deadline, self._process_keepalive)

    # -- parse errors get our pages ------------------------------------------------------

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        if status == 500:
            self.log_exception("Error handling request", exc_info=exc)
            reason = "The sidecar could not handle this request."
        elif isinstance(exc, LineTooLong):
            # aiohttp names the part only by the limit it hit (see server._parser_limits).
            if len(exc.args) > 1 and exc.args[1] == self.max_line_size:
                status, reason = 414, "The request line is too long."
            else:
                status, reason = 431, "The request headers are too large."
        elif isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc):
            status, reason = 431, "The request has too many headers."
        else:
            status, reason = 400, "The request is not valid HTTP/1.1."
        try:
            accept = request.headers.get("Accept")
        except Exception:
            accept = None
        answer = responses.error(
            status, reason, request_id=responses.new_request_id(), accept=accept
        )
        answer.close = True
        return to_response(answer)


def to_response(answer: Answer) -> web.Response:
    """One of our own answers, as aiohttp's response."""
    response = web.Response(
        status=answer.status,
        reason=answer.reason,
        body=answer.body,
        headers=lines_to_multidict(answer.fields),
    )
    if answer.close:
        response.force_close()
    return response


def when_gone(request: web.BaseRequest, callback: Callable[[], None] | None) -> None:
    """Have ``callback`` called if the request's connection ends (None: no longer), when it
    is one of ours (aiohttp's own servers, in tests, have no such notice)."""
    protocol = request.protocol
    if isinstance(protocol, FallbackConnection):
        protocol.when_gone(callback)


def last_on_connection(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """Before ``response`` (an answer other than a WebSocket's) is prepared: it is the
    connection's last, and says ``Connection: close``. A connection is handed over for one
    upgrade: a refused or plain one ends it, and what follows it is never parsed here."""
    if isinstance(request.protocol, FallbackConnection):
        response.force_close()
