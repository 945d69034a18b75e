"""The TLS listener's connections, from accept to close.

``Listener`` is the protocol factory of the plain TCP server: for every accepted connection a
``tls_transport.TLSProtocol`` (the handshake, counted against ``limits.max_connections`` and
``limits.max_connections_per_address`` from accept), then for each handshake that succeeds an HTTP/1.1 ``http1.client.
ClientConnection``, which hands a connection it does not serve to aiohttp's server
(``fallback.Fallback``, held here). Both protocols share one ``ListenerState``. The listener
applies a reload's limits, retires the connections made before a change of what decides
trust, and shuts every connection down within the grace period.
"""

from __future__ import annotations

import asyncio

from .addresses import PerAddress, address_key
from .config import LimitsConfig
from .fallback.server import Fallback
from .gateway import Gateway
from .handshakes import HandshakeScheduler
from .http1.client import ClientConnection
from .listener_state import ListenerState
from .metrics import Metrics
from .tls import PeerCertificates, TLSState
from .tls_transport import IPNetwork, TLSProtocol

#: the listener's read buffer: uvloop's own (its loop reads 256 KiB per system call)
READ_BUFFER = 256 * 1024


class Listener:
    """Makes, counts and ends the listener's connections (see the module's docstring)."""

    def __init__(
        self,
        gateway: Gateway,
        *,
        tls: TLSState,
        limits: LimitsConfig,
        peer_certs: PeerCertificates,
        metrics: Metrics,
        plain: bool = False,
        proxy_from: tuple[IPNetwork, ...] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.tls = tls
        #: listen.tls is false: plain HTTP from a front proxy (``tls_transport`` passes the
        #: bytes as they are)
        self.plain = plain
        #: with listen.proxy_protocol, the load balancers' networks (a reload may change them)
        self.proxy_from = proxy_from
        self.state = ListenerState(gateway, limits=limits, peer_certs=peer_certs, metrics=metrics)
        self._fallback = Fallback(self.state, self._loop)
        self.state.hand_off = self._fallback.adopt
        #: the worker's handshake budget per turn of the loop (``limits.handshake_budget``)
        self.handshakes = HandshakeScheduler(self._loop, limits.handshake_budget)
        #: what the accepted connections' sockets are read into, one read at a time
        #: (``tls_transport``): as large as uvloop's own read buffer, so an upload is read
        #: as many bytes per system call as before
        self.read_buffer = memoryview(bytearray(READ_BUFFER))
        handshakes = self.handshakes
        metrics.tls_handshakes_queued.set_function(lambda: float(handshakes.queued))
        #: accepted connections, from accept (handshake included) to close, with the client
        #: address each is counted for (None: a trusted proxy's, or no address)
        self.open_connections = 0
        self.accepted: dict[TLSProtocol, str | None] = {}
        self._per_address = PerAddress()
        #: the connections the HTTP/1.1 protocol serves
        self.clients: set[ClientConnection] = set()

    @property
    def limits(self) -> LimitsConfig:
        return self.state.limits

    @property
    def metrics(self) -> Metrics:
        return self.state.metrics

    def apply_limits(self, limits: LimitsConfig) -> None:
        """Use ``limits`` from now on (a reload): for every new connection, and for the next
        request head on a connection the HTTP/1.1 protocol serves. A connection handed over
        to aiohttp keeps the parser limits and header deadline it was given until it closes.
        ``handshake_timeout`` and ``max_connections`` apply from the next accept,
        ``handshake_budget`` from the next turn of the loop."""
        self.state.apply_limits(limits)
        self._fallback.apply_limits(limits)
        # from the next turn of the loop on, for the steps already waiting too
        self.handshakes.budget = limits.handshake_budget

    def __call__(self) -> TLSProtocol:
        return TLSProtocol(self, self._loop)

    # ---- tls_transport.Listener ----------------------------------------------------------

    def admit(self, connection: TLSProtocol) -> bool:
        """Count an accepted connection in; beyond ``limits.max_connections``, beyond
        ``limits.max_connections_per_address`` for its client address (unless a trusted
        proxy's), or while shutting down, it is refused at once, before any TLS work."""
        state = self.state
        limits = state.limits
        if self.open_connections >= limits.max_connections or state.closing:
            state.metrics.connections_refused.inc()
            return False
        address = connection.client_address()
        key = None if state.is_trusted(address) else address_key(address)
        if not self._per_address.take(key, limits.max_connections_per_address):
            state.metrics.limit_refusals.labels("max_connections_per_address").inc()
            return False
        self.open_connections += 1
        self.accepted[connection] = key
        return True

    def release(self, connection: TLSProtocol) -> None:
        if connection in self.accepted:
            self.open_connections -= 1
            self._per_address.give(self.accepted.pop(connection))

    def protocol(self) -> ClientConnection:
        client = ClientConnection(self.state, self._loop, forget=self.clients.discard)
        self.clients.add(client)
        return client

    # ---- ends ------------------------------------------------------------------------------

    def retire(self) -> None:
        """What decides trust changed (a reload): no connection made before serves another
        request. Handshakes under way end now; a request in flight finishes, with
        ``Connection: close``; idle connections close now, handed-over ones after their
        request."""
        self._abort_handshakes()
        for client in list(self.clients):
            client.stop()
        self._fallback.close_idle()

    def _abort_handshakes(self) -> None:
        for connection in list(self.accepted):
            if connection.handshaking:
                connection.abort()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """No new requests; in-flight ones get ``timeout`` seconds, then their connections are
        aborted. Idle connections close now."""
        self.state.closing = True
        self._abort_handshakes()
        grace = 0.0 if timeout is None else timeout
        tasks = [task for client in list(self.clients) if (task := client.stop()) is not None]
        self._fallback.close_idle()  # as aiohttp's runner does: idle ones close now
        fallback = asyncio.ensure_future(self._fallback.shutdown(timeout))
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
