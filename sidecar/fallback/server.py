"""aiohttp's server, for the connections the HTTP/1.1 protocol hands over (``Fallback``), and
the gateway for the requests it parses (``Serve``): each one becomes a ``request.Request``, is
forwarded (``forward``) or answered with our own answer as an aiohttp response.

Connections come here at an upgrade only (``http1.heads``): a WebSocket holds an upstream
connection of its own for its whole life, outside the pool, so they are bounded, per client
address (``limits.max_websockets_per_address``: 429; trusted proxies aside) and per worker
(``limits.max_websockets``: 503).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from ..addresses import address_key
from ..certs import ClientCert
from ..config import LimitsConfig
from ..errors import LimitReached
from ..headers import lines_to_multidict
from ..listener_state import ListenerState
from ..request import Request
from ..tls import requested_server_name
from .connection import FallbackConnection, last_on_connection, to_response
from .forward import FallbackForwarder, Forwarded, is_websocket


class Fallback:
    """aiohttp's low-level server, held for the connections handed over to it: ``adopt``
    makes its protocol for one, ``close_idle`` and ``shutdown`` end them."""

    __slots__ = ("_loop", "_server", "_state")

    def __init__(self, state: ListenerState, loop: asyncio.AbstractEventLoop) -> None:
        self._state = state
        self._loop = loop
        self._server = web.Server(
            Serve(state), access_log=None, loop=loop, **_parser_limits(state.limits)
        )

    def apply_limits(self, limits: LimitsConfig) -> None:
        """For the connections handed over from now on: a connection handed over already
        keeps the parser limits and header deadline it was given until it closes."""
        self._server._kwargs.update(_parser_limits(limits))

    def adopt(self, transport: asyncio.Transport, peer: ClientCert | None) -> asyncio.Protocol:
        """Take ``transport`` over: the listener's ``ListenerState.hand_off``."""
        server = self._server
        connection = FallbackConnection(
            server, self._state, peer, loop=self._loop, **server._kwargs
        )
        transport.set_protocol(connection)
        connection.connection_made(transport)
        return connection

    def close_idle(self) -> None:
        """Shutdown or a trust change: idle connections close now, busy ones after their
        request (aiohttp's ``close``)."""
        self._server.pre_shutdown()

    async def shutdown(self, timeout: float | None) -> None:  # noqa: ASYNC109 (aiohttp's)
        """In-flight requests get ``timeout`` seconds, then their connections are closed."""
        await self._server.shutdown(timeout)


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


class Serve:
    """aiohttp's request handler: the gateway for each request."""

    __slots__ = ("state",)

    def __init__(self, state: ListenerState) -> None:
        self.state = state

    async def __call__(self, web_request: web.BaseRequest) -> web.StreamResponse:
        request = Request(
            web_request.method,
            web_request.raw_path,
            web_request.raw_headers,
            cert=(cert := _peer_certificate(web_request)),
            chain=_verified_chain(self.state, web_request, cert) if cert is not None else (),
            peer_ip=_peer_ip(web_request),
            server_name=_server_name(web_request),
        )
        forwarded: web.StreamResponse | None = None

        async def forward(request: Request) -> tuple[int, float]:
            nonlocal forwarded
            upstream = request.upstream
            assert isinstance(upstream, FallbackForwarder)
            headers = lines_to_multidict(request.block)
            result: Forwarded
            if is_websocket(web_request):
                key = self._admit_websocket(request)
                try:
                    result = await upstream.forward(web_request, headers)
                finally:
                    self._end_websocket(key)
            else:
                result = await upstream.forward(web_request, headers)
            forwarded = result.response
            request.reports = result.reports
            return result.status, result.upstream_seconds

        gateway = self.state.gateway
        gateway.begin(request)
        await gateway.resume(request, forward)
        if forwarded is not None:
            return forwarded
        answer = request.answer
        assert answer is not None
        response = to_response(answer)
        last_on_connection(web_request, response)
        return response

    def _admit_websocket(self, request: Request) -> str | None:
        """Count a WebSocket in (its client address's key, to give back), or refuse it."""
        state = self.state
        limits = state.limits
        if state.websockets >= limits.max_websockets:
            raise LimitReached("max_websockets", 503)
        key = None if request.trusted else address_key(request.peer_ip)
        if not state.websockets_per_address.take(key, limits.max_websockets_per_address):
            raise LimitReached("max_websockets_per_address", 429)
        state.websockets += 1
        return key

    def _end_websocket(self, key: str | None) -> None:
        state = self.state
        state.websockets -= 1
        state.websockets_per_address.give(key)


def _peer_certificate(request: web.BaseRequest) -> ClientCert | None:
    protocol = request.protocol
    return protocol.peer_certificate() if isinstance(protocol, FallbackConnection) else None


def _server_name(request: web.BaseRequest) -> str | None:
    transport = request.transport
    return requested_server_name(transport.get_extra_info("ssl_object") if transport else None)


def _verified_chain(
    state: ListenerState, request: web.BaseRequest, cert: ClientCert
) -> tuple[bytes, ...]:
    transport = request.transport
    ssl_obj = transport.get_extra_info("ssl_object") if transport else None
    return state.peer_certs.chain_of(ssl_obj, cert)


def _peer_ip(request: web.BaseRequest) -> str | None:
    transport = request.transport
    if transport is None:
        return None
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return None
