"""The pool of keep-alive connections to the upstream: bounded, reused newest first.

Idle connections wait in a deque (last in, first out, so that a quiet period lets the oldest
ones be closed by the upstream); at most ``max_connections`` are open or opening; requests that
find all of them busy wait in arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Awaitable, Callable

from ..errors import UpstreamError
from .upstream import UpstreamConnection

#: opens a connection to the upstream for the protocol the factory makes (by default asyncio's
#: ``create_connection`` to the pool's address; a test gives a fake of its own)
Dial = Callable[[Callable[[], asyncio.Protocol]], Awaitable[object]]


class Pool:
    """At most ``max_connections`` connections; idle ones are reused newest first.

    When all are busy, requests wait in arrival order for one to come back (or to close,
    which frees a slot to connect) for at most the connect timeout, then fail with
    ``UpstreamError("connect")``: to the client as if the upstream could not be reached.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None,
        connect_timeout: float,
        read_timeout: float,
        max_connections: int,
        dial: Dial | None = None,
    ) -> None:
        self._host = host
        self._dial = dial
        self._port = port
        self._tls = tls
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max = max_connections
        self._open = 0  # connections open or being opened: the slots in use
        self._idle: deque[UpstreamConnection] = deque()
        # None is a slot to connect with; an UpstreamConnection is handed over directly (FIFO).
        self._waiters: deque[asyncio.Future[UpstreamConnection | None]] = deque()
        self._closed = False

    async def acquire(self, *, fresh: bool = False) -> UpstreamConnection:
        """An idle connection (unless ``fresh``), a new one, or the next one given back."""
        if self._closed:
            raise RuntimeError("the upstream pool is closed")
        if not fresh:
            conn = self.take_idle()
            if conn is not None:
                return conn
        idle = self._idle
        if self._open < self._max:
            self._open += 1
            return await self._connect()
        if idle:  # fresh, and no room: the oldest idle connection gives up its slot
            old = idle.popleft()
            old.on_lost, old.idle = None, False
            old.close()
            return await self._connect()
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[UpstreamConnection | None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._connect_timeout):
                got = await waiter
        except BaseException as exc:
            if not waiter.done():
                waiter.cancel()
            elif not waiter.cancelled() and waiter.exception() is None:
                self._give_back(waiter.result())  # handed over just as we gave up
            if isinstance(exc, TimeoutError):
                raise UpstreamError(
                    "connect", f"all {self._max} upstream connections stayed busy"
                ) from None
            raise
        if got is None:
            return await self._connect()
        got.reused = True
        return got

    def take_idle(self) -> UpstreamConnection | None:
        """The newest idle connection, without waiting, or None."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closing:  # else it is on its way out: connection_lost is due
                conn.reused = True
                return conn
        return None

    def release(self, conn: UpstreamConnection, *, reuse: bool) -> None:
        """Take ``conn`` back: pooled if ``reuse`` and it is clean, closed otherwise."""
        if not reuse or self._closed or not conn.reusable:
            if conn.complete and conn.request_sent and not self._closed:
                conn.close()  # a clean end, just not one to reuse (UpstreamConnection: close)
            else:
                conn.fail(ConnectionAbortedError("not reusable"))
            return
        conn.idle = True
        if not self._hand_over(conn):
            self._idle.append(conn)

    async def close(self) -> None:
        """Close the idle connections; busy ones are closed when they come back."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(UpstreamError("connect", "the upstream pool is closed"))

    async def _connect(self) -> UpstreamConnection:
        """A new connection in a slot already counted in ``_open``; the slot is freed if it fails."""
        loop = asyncio.get_running_loop()
        conn = UpstreamConnection(loop, self._read_timeout)
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self._dial is not None:
                    await self._dial(lambda: conn)
                else:
                    await loop.create_connection(
                        lambda: conn,
                        self._host,
                        self._port,
                        ssl=self._tls,
                        server_hostname=self._host if self._tls is not None else None,
                    )
        except BaseException as exc:
            self._free_slot()
            if isinstance(exc, OSError | TimeoutError):  # ssl.SSLError is an OSError
                raise UpstreamError("connect", f"{type(exc).__name__}: {exc}") from exc
            raise
        conn.on_lost = self._lost
        if conn.lost:  # closed before we got to it
            self._lost(conn)
        return conn

    def _lost(self, conn: UpstreamConnection) -> None:
        if conn.idle:
            conn.idle = False
            with contextlib.suppress(ValueError):
                self._idle.remove(conn)
        conn.on_lost = None
        self._free_slot()

    def _free_slot(self) -> None:
        self._open -= 1
        if self._waiters and not self._closed:
            self._open += 1
            if not self._hand_over(None):
                self._open -= 1

    def _hand_over(self, item: UpstreamConnection | None) -> bool:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                if item is not None:
                    item.idle = False
                waiter.set_result(item)
                return True
        return False

    def _give_back(self, item: UpstreamConnection | None) -> None:
        if item is None:
            self._free_slot()
        else:
            self.release(item, reuse=True)
