"""The listener's fallback protocol: aiohttp's HTTP/1.1 server with the limits we promise.

A connection comes here from ``listener.ClientConnection`` at the first request the fast path
does not serve (a body, an upgrade, a malformed or oversized head) and stays to its end. It
keeps the peer certificate parsed there, gives a client ``limits.header_timeout`` to send a
complete request head (slowloris), closes idle keep-alive connections, and answers parse
errors (oversized request line or headers, malformed framing) with our own error pages.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

from . import responses
from .certs import ClientCert

if TYPE_CHECKING:
    from .listener import ListenerServer


class Connection(RequestHandler):
    """aiohttp's protocol for a connection the listener handed over (``adopt`` first)."""

    __slots__ = ("_header_timeout", "_listener", "_metrics", "_peer")

    def __init__(
        self, manager: ListenerServer, *, loop: asyncio.AbstractEventLoop, **kwargs: Any
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._peer: ClientCert | None = None
        self._listener = manager
        self._header_timeout = manager.limits.header_timeout
        self._metrics = manager.metrics

    def adopt(self, *, peer: ClientCert | None) -> None:
        """Take over a connection from the listener, with its peer certificate, already parsed
        (None: no identity). The TLS layer counts the connection until it closes."""
        self._peer = peer

    def peer_certificate(self) -> ClientCert | None:
        """The peer certificate the listener parsed before it handed the connection over."""
        return self._peer

    @property
    def closing(self) -> bool:
        """The listener is shutting down: a response prepared now is the connection's last."""
        return self._listener.closing

    # -- the header deadline ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # aiohttp arms the keep-alive timer for a connection that has sent nothing yet; the
        # request head must arrive within header_timeout instead.
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        # The first bytes of a new request on an idle connection start its header deadline.
        waiter = self._waiter
        if (
            waiter is not None
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
            # aiohttp names the part only by the limit it hit (see ListenerServer.__init__).
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
        response = responses.error(
            status, reason, request_id=responses.new_request_id(), accept=accept
        )
        response.force_close()
        return response


def last_on_connection(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """Before ``response`` is prepared: during shutdown it says ``Connection: close`` (aiohttp
    closes the connection after it anyway; the client should know), as on the listener's path."""
    protocol = request.protocol
    if isinstance(protocol, Connection) and protocol.closing:
        response.force_close()
