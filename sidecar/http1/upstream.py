"""HTTP/1.1 to the upstream on the wire: the request head, the request body, and the
``UpstreamConnection`` protocol that reads the response.

An ``UpstreamConnection`` owns its transport, an httptools (llhttp) response parser and the state of
the one exchange in progress: status, headers, body chunks (with read backpressure),
completion, and one lazily re-armed read timer. Failures come out as ``TimeoutError``,
``OSError`` (resets), ``UpstreamError`` (protocol), ``BodyTooLarge`` or ``BodyTimeout``; the
caller decides what they mean for the client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol, cast

import httptools

from ..errors import UpstreamError

# The response head (status line and headers, interim responses included) is held in memory
# whole; nginx's largest default proxy buffers take 32 KiB, a cookie-heavy application more.
MAX_HEAD = 64 * 1024
# Body bytes buffered before the upstream is told to wait (the client is slower than it).
_HIGH_WATER = 256 * 1024


class BodyTooLarge(Exception):
    """The request body exceeded ``max_body_size`` before the upstream answered."""


class BodyTimeout(Exception):
    """The client paused its request body for longer than ``limits.body_timeout``, or sent
    it slower than ``limits.body_min_rate``."""


class BodyInvalid(Exception):
    """The request body's framing is broken (a malformed chunk): 400, or 431 for trailer
    fields too large."""

    def __init__(self, text: str, status: int = 400) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def request_head(
    method: str, target: str, block: bytes, host: bytes | None, *, chunked: bool = False
) -> bytes:
    """The request line and the header lines of ``block`` (from ``headers.request_fields``,
    which checked them), with a Host line first when ``host`` is given (the client sent none),
    and ``Transfer-Encoding: chunked`` last for a ``chunked`` body."""
    # parsers refuse them: defence in depth. (On the str: ``bytes in bytes`` first tries the
    # operand as an int and builds a TypeError to throw away, and ``bytes.find`` parses its
    # arguments as a tuple; surrogateescape leaves CR and LF as they are.)
    if "\r" in target or "\n" in target:
        raise ValueError("CR or LF in the request target")
    target_bytes = target.encode("utf-8", "surrogateescape")
    end = b"Transfer-Encoding: chunked\r\n\r\n" if chunked else b"\r\n"
    if host is None:
        return b"".join((method.encode("ascii"), b" ", target_bytes, b" HTTP/1.1\r\n", block, end))
    return b"".join(
        (
            method.encode("ascii"),
            b" ",
            target_bytes,
            b" HTTP/1.1\r\nHost: ",
            host,
            b"\r\n",
            block,
            end,
        )
    )


class BodyStream(Protocol):
    """Where a request body comes from: ``http1.inbound.Inbound`` on the listener's own path,
    aiohttp's ``StreamReader`` for the requests its server parsed."""

    def read_nowait(self) -> bytes: ...

    def at_eof(self) -> bool: ...

    async def readany(self) -> bytes: ...


class Pushing(Protocol):
    """A body source that can hand what arrives to the upstream itself, while the sender
    waits for more (``http1.inbound.Inbound``): ``sink`` takes bytes and says whether it sent
    them; None detaches it."""

    def attach(self, sink: Callable[[bytes], bool] | None) -> None: ...


class RequestBody:
    """The client's request body, framed as the client framed it, refused past ``limit``, and
    given up when the client pauses it for longer than ``timeout`` (None: the body's source
    keeps its own deadlines, as ``Inbound`` does).

    With ``pushing`` (the content itself, on the listener's own path), the bytes that arrive
    while the sender waits for more go to the upstream from the source's call (``push``)
    rather than through the sender's task; whatever the upstream does not take at once, and
    the body's end, still go through the task."""

    def __init__(
        self,
        content: BodyStream,
        *,
        chunked: bool,
        limit: int | None,
        timeout: float | None,
        pushing: Pushing | None = None,
    ) -> None:
        if pushing is not None and timeout is not None:
            # pushed bytes do not wake the sender, whose timeout would then count a client
            # that sends steadily as silent: a source that pushes keeps its own deadlines
            raise ValueError("a body source that pushes keeps its own deadlines: timeout None")
        self._content = content
        self._pushing = pushing
        self._conn: UpstreamConnection | None = None
        #: framed as chunks (the client sent no length)
        self.chunked = chunked
        self._timeout = timeout
        # Content-Length bodies are framed by the server's parser; only chunked ones can grow.
        self._limit = limit if chunked else None
        self._seen = 0

    def buffered(self) -> tuple[list[bytes], bool]:
        """What has arrived already, framed, and whether that is the whole body."""
        try:
            data = self._content.read_nowait()
        except (BodyTimeout, BodyTooLarge, BodyInvalid):
            raise
        except Exception as exc:  # the client's body failed already (it left, bad framing)
            raise UpstreamError("reset", f"request body: {type(exc).__name__}: {exc}") from exc
        done = self._content.at_eof()
        return self._frame(data, done), done

    async def send_rest(self, conn: UpstreamConnection) -> None:
        """Stream the rest to ``conn`` as it arrives; a failure becomes the exchange's error
        (``BodyTimeout`` when the client pauses longer than the timeout: the upstream
        connection is then aborted, so that the upstream sees the request incomplete)."""
        pushing = self._pushing
        if pushing is not None:
            self._conn = conn
            pushing.attach(self.push)
        try:
            while True:
                data = await self._read()
                conn.writelines(self._frame(data, not data))
                if not data:
                    conn.request_sent = True
                    return
                conn.touch()
                await conn.drain()
        except (BodyTooLarge, BodyTimeout, BodyInvalid, OSError) as exc:
            conn.fail(exc)
        except Exception as exc:  # e.g. the client's chunked framing was broken
            conn.fail(ConnectionAbortedError(f"request body: {type(exc).__name__}: {exc}"))
        finally:
            if pushing is not None:
                pushing.attach(None)
                self._conn = None

    def push(self, data: bytes) -> bool:
        """Send ``data`` (body bytes, not the end) now, framed, if the upstream takes it at
        once: False, and nothing sent, when it does not (its socket is full, the exchange
        failed or is over) or when ``data`` would pass ``limit`` (the sender's task then
        meets the same and fails the exchange as without a push). A write that raises fails
        the exchange, as in ``send_rest``: True, the bytes are taken and dropped with it."""
        conn = self._conn
        if conn is None or not data or not conn.taking:
            return False
        if self._limit is not None and self._seen + len(data) > self._limit:
            return False
        framed = self._frame(data, False)  # counts it; within the limit, so it cannot raise
        try:
            conn.writelines(framed)
        except Exception as exc:  # as in send_rest: the exchange fails (the bytes were taken)
            conn.fail(ConnectionAbortedError(f"request body: {type(exc).__name__}: {exc}"))
            return True
        conn.touch()
        return True

    async def _read(self) -> bytes:
        """The body bytes that have arrived, waiting at most ``timeout`` for some; b"" at the
        end. Only a wait for the client is timed (not one for the upstream to take the body),
        and bytes already here need no timer."""
        content = self._content
        data = content.read_nowait()
        if data or content.at_eof():
            return data
        if self._timeout is None:
            return await content.readany()
        try:
            async with asyncio.timeout(self._timeout):
                return await content.readany()
        except TimeoutError:
            raise BodyTimeout(f"no request body byte for {self._timeout:g} s") from None

    def _frame(self, data: bytes, done: bool) -> list[bytes]:
        self._seen += len(data)
        if self._limit is not None and self._seen > self._limit:
            raise BodyTooLarge(f"chunked body exceeds {self._limit}")
        if not self.chunked:
            return [data]
        framed = [b"%x\r\n" % len(data), data, b"\r\n"] if data else []
        if done:
            framed.append(b"0\r\n\r\n")
        return framed


def _until_eof(raw_headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a response's body ends with the connection: llhttp reads one without
    Content-Length that is not chunked until EOF."""
    until_eof = True
    for name, value in raw_headers:
        if len(name) == 14 and name.lower() == b"content-length":
            until_eof = False
        elif len(name) == 17 and name.lower() == b"transfer-encoding":
            until_eof = not value.rstrip().lower().endswith(b"chunked")
    return until_eof


class UpstreamConnection(asyncio.Protocol):
    """One connection to the upstream; ``begin`` starts an exchange, ``head`` and ``read``
    wait for its response. Errors are sticky: once failed, every wait raises the error."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        self._loop = loop
        self._read_timeout = read_timeout
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._stale_parser = False
        self.lost = False
        #: set by the pool once the connection is its own: called once when it closes
        self.on_lost: Callable[[UpstreamConnection], None] | None = None
        #: served an exchange before this one (a stale keep-alive connection may be retried)
        self.reused = False
        self.idle = False
        self._waiter: asyncio.Future[None] | None = None
        # instead of a waiter: called (soon) once the head is here or the exchange failed
        self._notify: Callable[[], None] | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        #: where body bytes go while the relay waits for more (``attach``)
        self._sink: Callable[[bytes], bool] | None = None
        self._reset(head_only=False)
        self.request_sent = True

    def _reset(self, *, head_only: bool) -> None:
        self._head_only = head_only
        self._error: BaseException | None = None
        self._interim = False
        #: the response's first bytes are "HTTP/1.1 " (``on_headers_complete``)
        self._http11 = False
        self._head_size = 0
        #: response bytes received in this exchange (interim responses included)
        self.received = 0
        self.status = 0
        self.reason = b""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._read_paused = False

    # ---- the exchange, as the forwarder sees it ----------------------------------------------

    def begin(self, *, head_only: bool, sending: bool) -> None:
        """Start an exchange: ``head_only`` for HEAD requests (no body in the response),
        ``sending`` while a request body is still to be written (``request_sent`` after)."""
        if self._stale_parser:
            # llhttp cannot be told a response is to HEAD: it may still wait for that body.
            self._parser = httptools.HttpResponseParser(self)
            self._stale_parser = False
        if self._read_paused and self._transport is not None:
            self._transport.resume_reading()  # the last body was not read to the end
        self._reset(head_only=head_only)
        self._notify = None
        self._sink = None
        self.request_sent = not sending
        self.idle = False
        if self.closing:  # closed on its way out of the pool
            self._error = ConnectionResetError("the upstream closed the connection")

    @property
    def closing(self) -> bool:
        return self.lost or self._transport is None or self._transport.is_closing()

    @property
    def taking(self) -> bool:
        """A write now goes out: no failure, not closing, the upstream's socket not full."""
        return self._error is None and not self._write_paused and not self.closing

    def writelines(self, data: list[bytes]) -> None:
        # After a failure the error surfaces in the next wait; a closed transport may raise.
        if self._error is None and not self.closing:
            assert self._transport is not None
            self._transport.writelines(data)

    async def drain(self) -> None:
        """Wait while the upstream is not taking what we write (its socket buffer is full)."""
        while True:
            if self._error is not None:
                raise self._error
            if self.lost:
                raise ConnectionResetError("the upstream closed the connection")
            if not self._write_paused:
                return
            self._drain_waiter = self._loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    def touch(self) -> None:
        """Push the read deadline back: the request body is still making progress, and the
        upstream need not answer before it has all of it (as nginx arms proxy_read_timeout
        once the body is sent; a client that pauses its body is bounded by body_timeout), or
        the response body is arriving while the relay's task waits (``_push``)."""
        self._deadline = self._loop.time() + self._read_timeout

    def notify(self, callback: Callable[[], None]) -> None:
        """Have ``callback`` called, from the event loop and once, when the response head has
        arrived or the exchange has failed (read timeout included): ``head`` without a task,
        for a caller that then looks at ``head_done``, ``complete`` and ``failed``."""
        self._deadline = self._loop.time() + self._read_timeout
        if self._timer is None:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
        self._notify = callback
        self._wake()  # the head may be here already, or the connection failed

    @property
    def failed(self) -> bool:
        return self._error is not None

    def _completed(self) -> bool:
        # ``complete`` read through a call: in data_received mypy keeps it narrowed to False
        # across the parser's callbacks that set it, and the compiled build trusts that.
        return self.complete

    async def head(self) -> None:
        """Wait for the final response's head (interim 1xx responses are skipped)."""
        while not self.head_done:
            await self._wait()

    async def read(self) -> bytes:
        """The body bytes received so far, waiting for some if there are none; b"" at the end."""
        while not self._chunks:
            if self.complete:
                return b""
            await self._wait()
        return self.take()

    def attach(self, sink: Callable[[bytes], bool] | None) -> None:
        """While the relay streams the body (``forwarder.Forward.relay``): the body bytes a
        read brings while it waits in ``read``, with none queued before them, go to ``sink``,
        which writes them to the client if it takes them at once (True) and otherwise leaves
        them here (False, and the relay wakes for them). None detaches it."""
        self._sink = sink

    def take(self) -> bytes:
        """The body bytes received so far, without waiting (all of it once ``complete``)."""
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        if not chunks:
            return b""
        if self._read_paused:
            self._read_paused = False
            assert self._transport is not None
            self._transport.resume_reading()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    @property
    def reusable(self) -> bool:
        """Whether the exchange ended cleanly on both sides with the connection left usable."""
        return (
            self.complete
            and self.keep_alive
            and self.request_sent
            and self._error is None
            and not self.lost
        )

    def fail(self, exc: BaseException) -> None:
        """End the exchange with ``exc`` (the first error sticks) and drop the connection."""
        if self._error is None:
            self._error = exc
        self._wake()
        if self._transport is not None:
            self._transport.abort()

    def abandon(self) -> None:
        """The client this response goes to is gone: a response still arriving is dropped
        with its connection (a complete one may still be reused)."""
        if not self.complete:
            self.fail(ConnectionAbortedError("the client connection is gone"))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # ---- waiting, with one timer per connection ----------------------------------------------

    async def _wait(self) -> None:
        self._raise_failure()
        self._deadline = self._loop.time() + self._read_timeout
        if self._timer is None:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        self._raise_failure()

    def _raise_failure(self) -> None:
        # A method, not the same test inline before and after the await in _wait: mypy keeps
        # an attribute narrowed across an await, and the compiled build (setup.py) trusts it.
        if self._error is not None:
            raise self._error

    def _on_timer(self) -> None:
        # Deadlines move on every wait and body write; the timer follows them lazily instead
        # of being cancelled and rescheduled each time.
        self._timer = None
        if self._waiter is None and self._notify is None:
            return
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
        elif self._error is None:
            self._error = TimeoutError(f"no data from the upstream for {self._read_timeout}s")
            self._wake()

    def _wake(self) -> None:
        notify = self._notify
        if notify is not None and (self.head_done or self._error is not None):
            self._notify = None
            # From the loop, not from here: the caller's writes then go out together with
            # those of the other connections served in this round (fewer, cheaper syscalls).
            self._loop.call_soon(notify)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        drain = self._drain_waiter
        if drain is not None and not drain.done():
            drain.set_result(None)

    # ---- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not registered as asyncio.Transport, so no isinstance check.
        self._transport = cast(asyncio.Transport, transport)
        # (TCP_NODELAY: asyncio's and uvloop's TCP transports set it on every connection)

    def data_received(self, data: bytes) -> None:
        if self.idle or self.complete:
            # Nothing is owed to us: an idle connection that talks (a 408 before closing) or
            # bytes after the response cannot be trusted with another exchange.
            self.keep_alive = False
            self.close()
            return
        if not self.received:
            self._http11 = data[:9] == b"HTTP/1.1 "  # (startswith parses its arguments)
        self.received += len(data)
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self._completed():  # bytes after a complete response
                self.keep_alive = False
                self.close()
                self._wake()  # the body is whole: the relay need not wait for the close
            else:  # a callback's own error, or what llhttp found
                self.fail(self._error or UpstreamError("protocol", f"{type(exc).__name__}: {exc}"))
            return
        if not self.head_done and self.received > MAX_HEAD:
            self.fail(UpstreamError("protocol", f"response head larger than {MAX_HEAD} bytes"))
        elif (
            self._sink is not None
            and self._chunks
            and self._parked()
            and self._push()
            and not self._completed()
        ):
            return  # written to the client: the relay waits on (its end wakes it)
        self._wake()

    def _parked(self) -> bool:
        """The relay waits in ``read`` and has not been woken yet (it waits there only with
        nothing queued: what is queued now came with this read)."""
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def _push(self) -> bool:
        """This read's body bytes to the sink; whether it took them. A sink that raises
        fails the exchange (the relay then aborts the client, as for its own write)."""
        sink = self._sink
        assert sink is not None
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = [data]  # joined once, whoever takes it
        try:
            taken = sink(data)
        except Exception as exc:
            self.take()  # taken and dropped with the exchange, as the relay's own write would be
            self.fail(ConnectionAbortedError(f"writing to the client: {type(exc).__name__}: {exc}"))
            return False
        if not taken:
            return False
        self.take()  # gone to the client (reading resumes if it was held)
        self.touch()  # as the relay's next wait would have moved the deadline
        return True

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.idle and not self.complete:
            if self.head_done and exc is None and _until_eof(self.raw_headers):
                self.complete = True  # a body delimited by the end of the connection
            elif self._error is None:
                self._error = exc or ConnectionResetError("the upstream closed the connection")
        self._write_paused = False
        self._wake()
        if self.on_lost is not None:
            self.on_lost(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    # ---- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.head_done:  # a second final response: stop before it overwrites the first
            raise ConnectionAbortedError("unsolicited response")
        self.reason = b""
        self.raw_headers = []

    def on_status(self, status: bytes) -> None:
        self.reason += status  # llhttp may hand it over in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:  # the head's size is checked on the bytes received
            self.raw_headers.append((name, value))
            return
        # Trailers are dropped, as hop-by-hop framing, but llhttp holds each until it is whole.
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD:
            self._error = UpstreamError("protocol", f"trailers larger than {MAX_HEAD} bytes")
            raise self._error  # stops the parser; data_received fails the connection

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if 100 <= status < 200:
            self._interim = True  # 100 Continue, 103 Early Hints: the final response follows
            self._http11 = False  # its status line is still to come
            return
        # Everything received so far is at most the head plus some body: only a large total
        # needs the head measured (data_received checks heads that arrive in pieces).
        if self.received > MAX_HEAD:
            size = sum(len(name) + len(value) + 4 for name, value in self.raw_headers)
            if size > MAX_HEAD:
                self._error = UpstreamError(
                    "protocol", f"response head larger than {MAX_HEAD} bytes"
                )
                raise self._error
        self.status = status
        self.head_done = True
        # Reused only after HTTP/1.1 (llhttp also keeps an HTTP/1.0 response with
        # "Connection: keep-alive"). When the exchange's first bytes are "HTTP/1.1 ", this
        # head is the one they began (no interim response came first): llhttp read that
        # version from them, and get_http_version's str.format (2,200 instructions) is not
        # needed.
        self.keep_alive = parser.should_keep_alive() and (
            self._http11 or parser.get_http_version() == "1.1"
        )
        if self._head_only or status in (204, 304):
            self.complete = True
            if self._head_only:
                self._stale_parser = True

    def on_body(self, body: bytes) -> None:
        if self._interim:
            # RFC 9110 §15.2: a 1xx response ends with its header section. llhttp reads no
            # body after 100, 102 and 103 but takes any other 1xx's framing at its word, and
            # such a body would run into the final response's, past its length on the
            # client's connection: the upstream's protocol error, nothing of it forwarded.
            self._error = UpstreamError("protocol", "a body in an interim (1xx) response")
            raise self._error  # stops the parser; data_received fails the connection
        if self.complete:  # a body after a HEAD response: the connection is out of step
            self.keep_alive = False
            return
        if not body:
            return  # (never from llhttp: an empty piece would read as the body's end)
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._read_paused:
            self._read_paused = True
            assert self._transport is not None
            self._transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.complete = True
