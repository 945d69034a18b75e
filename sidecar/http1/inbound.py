"""The body of the request in flight on a client connection, as the client sends it:
``Inbound``, decoded (``bodies``), held until the forward takes it, and timed.

The connection feeds it what arrives (``feed``: what is left over is the next request's); the
forward waits for the first ``limits.body_buffer`` bytes or the whole body (``buffered``),
then takes what is here (``take``) or streams it as it comes (``read_nowait``, ``at_eof``,
``readany``: the ``http1.upstream.BodyStream`` a ``RequestBody`` is sent from). While it
streams and waits in ``readany``, what arrives goes to the upstream from ``feed`` itself
(``attach``: the ``RequestBody``'s ``push``) when the upstream takes it at once, without a
turn of the forward's task; what it does not take, and the body's end, wake the task.

Flow control: while more than ``window`` body bytes wait to be taken, the connection reads
nothing more (``hold``; ``release`` once they are taken). So a body costs at most its window
in memory, whatever its size, and the client sends no faster than the upstream takes it.

Deadlines, both 408 (``BodyTimeout``): the client may pause for at most ``timeout`` between
two reads (nginx's ``client_body_timeout``), and once ``timeout`` has passed the body must
keep arriving at ``min_rate`` bytes per second on average (Apache mod_reqtimeout's
``MinRate``: the deadline is ``timeout`` plus one second for every ``min_rate`` bytes
received). Only the client's time counts: not while reading is held here (the decision, or
the upstream taking its time), nor while a client that asked for ``100 Continue`` waits for
it. One lazily re-armed timer, on the connection's loop (a fake clock in tests).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .bodies import BodyError, Decoder
from .upstream import BodyInvalid, BodyTimeout, BodyTooLarge


class Inbound:
    """A request body as it arrives (see the module's docstring)."""

    __slots__ = (
        "_chunks",
        "_clock",
        "_decoder",
        "_held",
        "_held_at",
        "_hold",
        "_last",
        "_limit",
        "_loop",
        "_min_rate",
        "_paused",
        "_queued",
        "_release",
        "_sink",
        "_started",
        "_timeout",
        "_timer",
        "_waiter",
        "chunked",
        "complete",
        "error",
        "expecting",
        "size",
        "window",
        "wire",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        decoder: Decoder,
        *,
        chunked: bool,
        expecting: bool,
        limit: int | None,
        timeout: float,
        min_rate: int,
        window: int,
        hold: Callable[[], None],
        release: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._decoder = decoder
        #: framed as chunks by the client
        self.chunked = chunked
        #: the client waits for ``100 Continue`` before it sends the body
        self.expecting = expecting
        self._limit = limit
        self._timeout = timeout
        self._min_rate = min_rate
        #: body bytes held before reading stops
        self.window = window
        self._hold = hold
        self._release = release
        #: body bytes so far (decoded), and bytes read for it (framing included)
        self.size = 0
        self.wire = 0
        #: the whole body has arrived
        self.complete = decoder.done
        #: why the body cannot be had (the first error sticks)
        self.error: BaseException | None = None
        self._chunks: list[bytes] = []
        self._queued = 0
        self._waiter: asyncio.Future[None] | None = None
        self._held = False
        # the client's clock: when it started, the seconds reading was held since, the
        # last read, and when the current hold began
        self._clock = False
        self._started = 0.0
        self._paused = 0.0
        self._last = 0.0
        self._held_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        #: where body bytes go while the forward waits for more (``attach``)
        self._sink: Callable[[bytes], bool] | None = None
        if not expecting and not self.complete:
            self._start_clock()

    # ---- from the connection -------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        """Bytes from the client: the body's are taken, and what follows the body is
        returned (the next request's). Once failed, everything is dropped."""
        if self.complete or self.error is not None:
            return b"" if self.error is not None else data
        try:
            body, used = self._decoder.decode(data)
        except BodyError as exc:
            self.fail(BodyInvalid(exc.text, exc.status))
            return b""
        self.wire += used
        if not self._clock:
            self._start_clock()  # sent without waiting for 100 Continue
        else:
            self._last = self._loop.time()
        pushed = False
        if body:
            size = self.size = self.size + len(body)
            limit = self._limit
            if limit is not None and size > limit:
                self.fail(BodyTooLarge(f"the request body exceeds {limit} bytes"))
                return b""
            if self._parked() and not self._chunks:
                # The forward waits for more and nothing is queued before these bytes: they
                # go to the upstream now, if it takes them, without a turn of its task.
                sink = self._sink
                pushed = sink is not None and sink(body)
            if not pushed:
                self._chunks.append(body)
                self._queued += len(body)
        if self._decoder.done:
            self.complete = True
            self._stop_timer()
            if self._held:
                self._unhold()  # what follows is the next request's: the connection's to bound
        elif self._queued > self.window and not self._held:
            self._held = True
            self._held_at = self._loop.time()
            self._hold()
        if not pushed or self.complete:
            self._wake()
        return data[used:] if self.complete and used < len(data) else b""

    def continued(self) -> None:
        """``100 Continue`` went out: the client's clock starts."""
        self.expecting = False
        if not self._clock and not self.complete:
            self._start_clock()

    def fail(self, exc: BaseException) -> None:
        """The body cannot be had (its deadline passed, the client left, ...)."""
        if self.error is None:
            self.error = exc
        self._stop_timer()
        self._wake()

    def close(self) -> None:
        """The request is over: no more deadline (reading resumes if held here)."""
        self._stop_timer()
        if self._held:
            self._unhold()
        if self.error is None and not self.complete:
            self.error = ConnectionAbortedError("the request ended before its body")
        self._chunks = []
        self._queued = 0
        self._wake()

    # ---- for the forward -----------------------------------------------------------------

    def attach(self, sink: Callable[[bytes], bool] | None) -> None:
        """While the forward streams the body (``http1.upstream.RequestBody.send_rest``):
        bytes that arrive while it waits in ``readany``, with none queued before them, go to
        ``sink``, which sends them to the upstream if it takes them at once (True) and
        otherwise leaves them here (False). None detaches it."""
        self._sink = sink

    def set_window(self, window: int) -> None:
        """Hold up to ``window`` bytes from now on (the body streams: a larger one)."""
        self.window = window
        if self._held and self._queued <= window:
            self._unhold()

    async def buffered(self, size: int) -> None:
        """Wait until the whole body or at least ``size`` bytes of it are here; raises
        ``BodyTimeout``, ``BodyTooLarge``, ``BodyInvalid`` or ``ConnectionError``."""
        while True:
            self._raise_failure()
            if self._ready(size):
                return
            await self._wait()

    def take(self) -> bytes:
        """The body bytes here, without waiting (all of it once ``complete``)."""
        self._raise_failure()
        chunks = self._chunks
        if not chunks:
            return b""
        self._chunks = []
        self._queued = 0
        if self._held:
            self._unhold()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    # http1.upstream.BodyStream

    def read_nowait(self) -> bytes:
        return self.take()

    def at_eof(self) -> bool:
        return self.complete and not self._chunks

    async def readany(self) -> bytes:
        while True:
            data = self.take()
            if data or self.at_eof():
                return data
            await self._wait()

    # ---- inside ---------------------------------------------------------------------------

    # State read through calls: mypy keeps an attribute narrowed across an await, and the
    # compiled build trusts it (see README, Development).
    def _raise_failure(self) -> None:
        if self.error is not None:
            raise self.error

    def _parked(self) -> bool:
        """The forward waits for body bytes, and has not been woken yet."""
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def _ready(self, size: int) -> bool:
        return self.complete or self._queued >= size

    async def _wait(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _unhold(self) -> None:
        self._held = False
        now = self._loop.time()
        if self._clock:
            self._paused += now - self._held_at
            self._last = now
            self._arm()
        self._release()

    def _start_clock(self) -> None:
        now = self._loop.time()
        self._clock = True
        self._started = self._last = now
        self._paused = 0.0
        if self._held:
            self._held_at = now
        self._arm()

    def _arm(self) -> None:
        if self._timer is None and not self.complete and self.error is None:
            self._timer = self._loop.call_at(self._deadline(), self._on_timer)

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _deadline(self) -> float:
        """When the body is due, as things stand (only ever later as bytes arrive)."""
        timeout = self._timeout
        due = self._last + timeout
        if self._min_rate:
            due = min(due, self._started + self._paused + timeout + self.wire / self._min_rate)
        return due

    def _on_timer(self) -> None:
        self._timer = None
        if self._held or self.complete or self.error is not None:
            return  # not the client's time (re-armed on release), or nothing left to time
        due = self._deadline()
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._on_timer)
            return
        if self._last + self._timeout <= due:
            reason = f"no request body byte for {self._timeout:g} s"
        else:
            reason = f"the request body arrived slower than {self._min_rate} bytes per second"
        self.fail(BodyTimeout(reason))
