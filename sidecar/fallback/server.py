"""The gateway for the requests aiohttp's server parsed: each one becomes a ``gateway.Request``,
is forwarded with its body (``forward``) or answered with our own answer as an aiohttp
response."""

from __future__ import annotations

from aiohttp import web

from ..certs import ClientCert
from ..gateway import Gateway, Request
from ..headers import lines_to_multidict
from ..tls import requested_server_name
from .connection import FallbackConnection, last_on_connection, to_response
from .forward import FallbackForwarder


class Serve:
    """aiohttp's request handler: ``gateway`` for each request."""

    __slots__ = ("gateway",)

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, web_request: web.BaseRequest) -> web.StreamResponse:
        request = Request(
            web_request.method,
            web_request.raw_path,
            web_request.raw_headers,
            cert=_peer_certificate(web_request),
            peer_ip=_peer_ip(web_request),
            server_name=_server_name(web_request),
        )
        forwarded: web.StreamResponse | None = None

        async def forward(request: Request) -> tuple[int, float]:
            nonlocal forwarded
            upstream = request.upstream
            assert isinstance(upstream, FallbackForwarder)
            result = await upstream.forward(web_request, lines_to_multidict(request.block))
            forwarded = result.response
            return result.status, result.upstream_seconds

        gateway = self.gateway
        gateway.begin(request)
        await gateway.resume(request, forward)
        if forwarded is not None:
            return forwarded
        answer = request.answer
        assert answer is not None
        response = to_response(answer)
        last_on_connection(web_request, response)
        return response


def _peer_certificate(request: web.BaseRequest) -> ClientCert | None:
    protocol = request.protocol
    return protocol.peer_certificate() if isinstance(protocol, FallbackConnection) else None


def _server_name(request: web.BaseRequest) -> str | None:
    transport = request.transport
    return requested_server_name(transport.get_extra_info("ssl_object") if transport else None)


def _peer_ip(request: web.BaseRequest) -> str | None:
    transport = request.transport
    if transport is None:
        return None
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return None
