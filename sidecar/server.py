"""The listener's connection protocol: aiohttp's HTTP/1.1 server with the limits we promise.

One ``Connection`` per TLS connection. It parses the peer certificate once, refuses
connections beyond ``limits.max_connections``, gives a client ``limits.header_timeout`` to send
a complete request head (slowloris), closes idle keep-alive connections, and answers parse
errors (oversized request line or headers, malformed framing) with our own error pages.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

from . import responses
from .certs import ClientCert
from .config import LimitsConfig
from .errors import CertificateError
from .metrics import Metrics
from .tls import PeerCertificates

_UNSET: Any = object()


class Connection(RequestHandler):
    __slots__ = ("_counted", "_header_timeout", "_made", "_metrics", "_peer", "_peer_certs")

    def __init__(
        self, manager: ListenerServer, *, loop: asyncio.AbstractEventLoop, **kwargs: Any
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._peer: ClientCert | None = _UNSET
        self._peer_certs = manager.peer_certs
        self._header_timeout = manager.limits.header_timeout
        self._metrics = manager.metrics
        self._counted = False
        self._made = False

    def __del__(self) -> None:
        # asyncio makes this protocol at accept time but calls connection_made only after the
        # TLS handshake: one that never got there failed (or was abandoned) during the handshake.
        if not self._made:
            self._metrics.tls_handshake_failures.inc()

    # -- the peer certificate, parsed once per connection --------------------------------

    def peer_certificate(self) -> ClientCert | None:
        peer = self._peer
        if peer is _UNSET:
            transport = self.transport
            ssl_obj = transport.get_extra_info("ssl_object") if transport is not None else None
            try:
                peer = self._peer_certs.from_ssl_object(ssl_obj)
            except CertificateError:
                # OpenSSL verified it but we cannot parse it: treat as no identity, and close.
                self.force_close()
                peer = None
            self._peer = peer
        return peer

    # -- connection limits -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._made = True
        manager: ListenerServer = self._manager  # type: ignore[assignment]
        if manager.open_connections >= manager.limits.max_connections:
            manager.metrics.connections_refused.inc()
            transport.abort()  # type: ignore[attr-defined]
            return
        manager.open_connections += 1
        self._counted = True
        super().connection_made(transport)
        # aiohttp arms the keep-alive timer for a connection that has sent nothing yet; the
        # first request head must arrive within header_timeout instead.
        self._arm_header_deadline()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            manager: ListenerServer | None = self._manager  # type: ignore[assignment]
            if manager is not None:
                manager.open_connections -= 1
        super().connection_lost(exc)

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


class ListenerServer(web.Server):
    """aiohttp's low-level server, making our ``Connection`` protocol."""

    def __init__(
        self,
        handler: Any,
        *,
        limits: LimitsConfig,
        peer_certs: PeerCertificates,
        metrics: Metrics,
        **kwargs: Any,
    ) -> None:
        # aiohttp reports which limit was hit, not which part: keep the two numbers distinct
        # (one byte more for the request line) so that 414 and 431 can be told apart.
        line_limit = limits.max_request_line
        if line_limit == limits.max_header_line:
            line_limit += 1
        super().__init__(
            handler,
            keepalive_timeout=limits.keepalive_timeout,
            max_line_size=line_limit,
            max_field_size=limits.max_header_line,
            max_headers=limits.max_headers,
            access_log=None,
            **kwargs,
        )
        self.limits = limits
        self.peer_certs = peer_certs
        self.metrics = metrics
        self.open_connections = 0

    def __call__(self) -> Connection:
        return Connection(self, loop=self._loop, **self._kwargs)
