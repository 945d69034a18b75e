"""Handshake admission: how much TLS handshake work one worker does before it serves the
connections that are already open again (``limits.handshake_budget``).

A worker runs every connection on one event loop, and a handshake step (OpenSSL answering a
ClientHello: key exchange and signature; or checking the client's certificate chain and
signature) is about a millisecond of CPU that nothing interrupts. A thousand clients that
arrive at once would hold the loop for a second, and a request on an open connection, whose
verdict is cached and which needs a few microseconds, would wait behind all of them.

``HandshakeScheduler`` gives handshakes a budget of CPU time per turn of the loop. A step that
arrives while this turn's budget is spent (or while others wait) is queued; each later turn
runs queued steps, first come first served, until the budget is spent again, and in between
the loop reads and answers the open connections. At least one step runs per turn, so
handshakes always progress; with no contention a step runs at once, as without a budget.
A queued connection buffers little (``tls_transport`` stops reading it beyond a
handshake flight's worth) and keeps its deadlines
(``client_hello_timeout``, ``handshake_timeout``): one that ends while queued is skipped.
It is HAProxy's and nginx's idea of bounding handshake work (``maxsslrate``) measured in CPU
time instead of handshakes per second, since one event loop is the resource being shared.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol


class Loop(Protocol):
    """What the scheduler uses of the event loop (tests give it a fake one)."""

    def call_soon(self, callback: Callable[[], None], /) -> Any: ...


class Handshaking(Protocol):
    """A connection whose handshake takes steps (``tls_transport.TLSProtocol``)."""

    def handshake_step(self) -> None:
        """Let OpenSSL process what the client sent (a no-op once the connection ended)."""

    def handshake_deferred(self) -> None:
        """The step waits in the queue."""

    def handshake_resumed(self) -> None:
        """The step leaves the queue (it runs next)."""


class HandshakeScheduler:
    """Per-worker handshake budget (see the module's docstring)."""

    __slots__ = (
        "_clock",
        "_loop",
        "_queue",
        "_scheduled",
        "_spent",
        "budget",
        "deferred",
    )

    def __init__(
        self,
        loop: Loop,
        budget: float,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._loop = loop
        self._clock = clock
        #: seconds of handshake work per turn of the loop; 0: no budget
        self.budget = budget
        self._queue: deque[Handshaking] = deque()
        self._spent = 0.0
        #: a turn callback is due: it resets the budget and runs what waits
        self._scheduled = False
        #: steps that were queued, in all (sidecar_tls_handshakes_deferred_total)
        self.deferred = 0

    @property
    def queued(self) -> int:
        """Steps waiting now."""
        return len(self._queue)

    def step(self, connection: Handshaking) -> None:
        """Run ``connection``'s handshake step now if this turn's budget allows, else queue it."""
        budget = self.budget
        if budget <= 0.0 and not self._queue:
            connection.handshake_step()
            return
        if self._queue or self._spent >= budget:
            self._queue.append(connection)
            self.deferred += 1
            connection.handshake_deferred()
            self._schedule()
            return
        self._run(connection)

    def _run(self, connection: Handshaking) -> None:
        clock = self._clock
        started = clock()
        try:
            connection.handshake_step()
        finally:
            self._spent += clock() - started
            self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            # call_soon: it runs in the loop's next turn, after the I/O this turn found ready
            self._loop.call_soon(self._turn)

    def _turn(self) -> None:
        """A new turn of the loop: a fresh budget for the steps that wait, oldest first."""
        self._scheduled = False
        self._spent = 0.0
        queue = self._queue
        budget = self.budget
        ran = False
        while queue and (not ran or budget <= 0.0 or self._spent < budget):
            connection = queue.popleft()
            connection.handshake_resumed()
            self._run(connection)
            ran = True
        if queue:
            self._schedule()
