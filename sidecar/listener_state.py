"""What the listener's connections share, whichever protocol serves them: ``ListenerState``.

The HTTP/1.1 protocol (``http1.client``) and aiohttp's (``fallback``) are given this one
object, as uvicorn's protocols are given its ``ServerState``: neither reaches into the listener
that made it, and the listener (``listener``) changes what they share only here (a reload's
limits, shutdown's closing flag).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .addresses import PerAddress
from .certs import ClientCert
from .config import LimitsConfig
from .gateway import Gateway
from .http1.heads import HeadLimits
from .metrics import Metrics
from .tls import PeerCertificates

#: takes over a connection the HTTP/1.1 protocol does not serve, with its peer certificate:
#: the protocol it now has, connected (the bytes not yet served are given to it next)
HandOff = Callable[[asyncio.Transport, ClientCert | None], asyncio.Protocol]


def _no_fallback(transport: asyncio.Transport, peer: ClientCert | None) -> asyncio.Protocol:
    raise RuntimeError("the listener has no fallback protocol")


class ListenerState:
    """The gateway, the limits in force, the certificate parser, the metrics, whether the
    listener is closing, where a connection goes that HTTP/1.1 does not serve, and what each
    client address holds beyond its connections: request bodies streaming upstream, and
    WebSockets (``addresses``)."""

    __slots__ = (
        "body_streams",
        "closing",
        "gateway",
        "hand_off",
        "heads",
        "limits",
        "metrics",
        "peer_certs",
        "websockets",
        "websockets_per_address",
    )

    def __init__(
        self,
        gateway: Gateway,
        *,
        limits: LimitsConfig,
        peer_certs: PeerCertificates,
        metrics: Metrics,
    ) -> None:
        self.gateway = gateway
        self.peer_certs = peer_certs
        self.metrics = metrics
        #: shutting down: no new request starts, and an answer says ``Connection: close``
        self.closing = False
        #: set by the listener (``fallback.Fallback.adopt``)
        self.hand_off: HandOff = _no_fallback
        self.limits = limits
        self.heads = HeadLimits(limits)
        #: request bodies streaming upstream, by client address (``limits.body_buffer``)
        self.body_streams = PerAddress()
        #: open WebSockets, in all and by client address
        self.websockets = 0
        self.websockets_per_address = PerAddress()

    def is_trusted(self, address: str | None) -> bool:
        """Whether ``address`` is a trusted proxy's: many clients, bound per address by none
        of the bounds of ``addresses``."""
        return self.gateway.plan.rules.is_trusted_proxy(address)

    def apply_limits(self, limits: LimitsConfig) -> None:
        """Use ``limits`` from now on: for every new connection, and for the next request head
        on a connection the HTTP/1.1 protocol serves."""
        self.limits = limits
        self.heads = HeadLimits(limits)
