"""Flow control of one client connection: when it may read, and ``limits.send_timeout``.

The transport tells its protocol when its write buffer passes the high-water mark
(``pause_writing``) and when it has drained below the low-water mark (``resume_writing``).
While it is above, the client is not taking what it was sent: the connection then reads
nothing more (so a client that sends and never reads cannot make the sidecar buffer answers
without bound), and if it stays above for ``send_timeout`` the connection is aborted, as
nginx's ``send_timeout`` does. That holds for every byte the sidecar writes, its own answers
included, on both of the listener's protocols (``http1.client``, ``fallback.connection``).

Reading can be held for other reasons too (``hold``, ``release``): it resumes when none is
left. ``FlowControl`` does no I/O of its own beyond ``pause_reading``, ``resume_reading`` and
``abort``, so it is tested with a fake transport and a fake clock.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

#: reasons to hold reading (bits): the client is not taking what it was sent
WRITING = 1
#: reasons to hold reading (bits): pipelined bytes wait behind the request in flight
PIPELINE = 2
#: reasons to hold reading (bits): the request body waits for the forward to take it
BODY = 4


class Reader(Protocol):
    """What reading is paused and resumed through: the transport, or a protocol with its own
    bookkeeping of who paused it (aiohttp's)."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class Aborting(Protocol):
    def abort(self) -> None: ...


class FlowControl:
    """Reading holds, the write pause and the send deadline of one connection."""

    __slots__ = (
        "_closed",
        "_deadline",
        "_drain",
        "_holds",
        "_loop",
        "_reader",
        "_timeout",
        "_timer",
        "_transport",
        "write_paused",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, send_timeout: float) -> None:
        self._loop = loop
        self._timeout = send_timeout
        self._transport: Aborting | None = None
        self._reader: Reader | None = None
        self._holds = 0
        #: the transport's write buffer is above its high-water mark
        self.write_paused = False
        # One lazily re-armed timer: a pause moves the deadline; the timer follows it when it
        # fires instead of being rescheduled at every pause (a large download pauses often).
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._drain: asyncio.Future[None] | None = None
        self._closed = False

    def attach(self, transport: Aborting, reader: Reader) -> None:
        """Start on ``transport``; reading is paused and resumed through ``reader``."""
        self._transport = transport
        self._reader = reader

    # ---- reading ------------------------------------------------------------------------

    def hold(self, reason: int) -> None:
        """Stop reading for ``reason`` (until ``release``)."""
        if self._holds & reason:
            return
        first = not self._holds
        self._holds |= reason
        if first and self._reader is not None and not self._closed:
            self._reader.pause_reading()

    def release(self, reason: int) -> None:
        """``reason`` no longer holds reading; it resumes once no reason does."""
        if not self._holds & reason:
            return
        self._holds &= ~reason
        if not self._holds and self._reader is not None and not self._closed:
            self._reader.resume_reading()

    # ---- writing ------------------------------------------------------------------------

    def pause_writing(self) -> None:
        """The transport's ``pause_writing``: read nothing more, and start the send deadline."""
        self.write_paused = True
        self._deadline = self._loop.time() + self._timeout
        if self._timer is None and not self._closed:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
        self.hold(WRITING)

    def resume_writing(self) -> None:
        """The transport's ``resume_writing``: the client took enough; reading may resume."""
        self.write_paused = False
        self._wake()
        self.release(WRITING)

    async def drain(self) -> None:
        """Wait while the write buffer is above its high-water mark; ``ConnectionResetError``
        once the connection is gone (or aborted for ``send_timeout``)."""
        while True:
            if self._gone():
                raise ConnectionResetError("the client connection is closed")
            if not self._paused():
                return
            waiter = self._drain = self._loop.create_future()
            try:
                await waiter
            finally:
                self._drain = None

    # State read through calls: mypy keeps an attribute narrowed across an await, and the
    # compiled build trusts it (see README, Development).
    def _gone(self) -> bool:
        return self._closed

    def _paused(self) -> bool:
        return self.write_paused

    # ---- ends ---------------------------------------------------------------------------

    def close(self) -> None:
        """The connection is lost: no more deadline, and a waiting ``drain`` raises."""
        self._closed = True
        self._transport = None
        self._reader = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()

    def detach(self) -> None:
        """The connection goes to another protocol: whatever held reading lets go."""
        if self._holds:
            self._holds = 0
            if self._reader is not None and not self._closed:
                self._reader.resume_reading()
        self.write_paused = False
        self.close()

    def _wake(self) -> None:
        waiter = self._drain
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_timer(self) -> None:
        self._timer = None
        if not self.write_paused or self._closed:
            return
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
            return
        # The client took too little of what it was sent for send_timeout: it must not hold
        # this connection, nor an upstream connection behind it, any longer.
        transport = self._transport
        if transport is not None:
            transport.abort()
