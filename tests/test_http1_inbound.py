"""Request bodies on the HTTP/1.1 protocol (``sidecar.http1.client``, ``sidecar.http1.inbound``)
on a fake transport and a fake clock, in the style of ``test_http1_client``: bytes in, time
moved by hand, the bytes written read back. The body's deadlines (``body_timeout``, and
``body_min_rate`` after it), ``100 Continue`` after the decision only, a body within
``body_buffer`` read whole before an upstream connection is taken, flow control both ways
while a longer one streams, and the per-address bound on streams.

Requests to ``/public/`` are forwarded to a fake upstream that reads each request whole (with
llhttp) before it answers ``ok:<path>:<body length>``; others are answered 401 by the gateway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.config import LimitsConfig, UpstreamConfig
from sidecar.flow import BODY
from sidecar.forwarder import Forwarder
from sidecar.http1.bodies import LengthDecoder
from sidecar.http1.client import ClientConnection
from sidecar.http1.inbound import Inbound
from sidecar.http1.upstream import BodyTimeout, BodyTooLarge
from sidecar.listener_state import ListenerState

from .test_http1_client import Clock, Transport, listener_state, settle

KiB = 1024
LIMITS = LimitsConfig(
    header_timeout=10,
    keepalive_timeout=30,
    send_timeout=20,
    body_timeout=5,
    body_min_rate=1000,
    body_buffer=4 * KiB,
    max_body_streams_per_address=2,
)


def post(path: str, *extra: str, body: bytes = b"", length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    lines = [f"POST {path} HTTP/1.1", "Host: localhost", *extra]
    if not any(e.lower().startswith("transfer-encoding") for e in extra):
        lines.append(f"Content-Length: {size}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# ---- the upstream ---------------------------------------------------------------------------


class _Message:
    def __init__(self) -> None:
        self.url = b""
        self.body = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


@dataclass
class Upstream:
    """Reads each request whole, then answers; ``stalled`` makes its transport say the
    upstream takes nothing more (``pause_writing``) until ``unstall``."""

    dials: int = 0
    received: list[bytes] = field(default_factory=list)
    messages: list[_Message] = field(default_factory=list)
    transports: list[_UpstreamTransport] = field(default_factory=list)
    stalled: bool = False
    #: its transport raises on a write (a transport in a state no write should meet)
    broken: bool = False

    async def dial(self, factory: Callable[[], asyncio.Protocol]) -> object:
        self.dials += 1
        protocol = factory()
        transport = _UpstreamTransport(self, protocol)
        self.transports.append(transport)
        protocol.connection_made(transport)
        return protocol

    def unstall(self) -> None:
        self.stalled = False
        for transport in self.transports:
            transport.unstall()

    @property
    def bytes_received(self) -> int:
        return sum(len(r) for r in self.received)


class _UpstreamTransport(asyncio.Transport):
    def __init__(self, upstream: Upstream, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.upstream = upstream
        self.protocol = protocol
        self.closed = False
        self.aborted = False
        self.paused = False
        self.message = _Message()
        self.parser = httptools.HttpRequestParser(self.message)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.upstream.broken:
            raise RuntimeError("this transport takes no writes")
        data = bytes(data)
        self.upstream.received.append(data)
        self.parser.feed_data(data)
        if self.message.done:
            message, self.message = self.message, _Message()
            self.parser = httptools.HttpRequestParser(self.message)
            self.upstream.messages.append(message)
            body = b"ok:%b:%d" % (message.url, len(message.body))
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
            asyncio.get_running_loop().call_soon(self.protocol.data_received, answer)
        if self.upstream.stalled and not self.paused:
            self.paused = True
            self.protocol.pause_writing()

    def unstall(self) -> None:
        if self.paused:
            self.paused = False
            self.protocol.resume_writing()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


# ---- the harness ------------------------------------------------------------------------------


@dataclass
class Harness:
    clock: Clock
    state: ListenerState
    upstream: Upstream

    def connect(self, peer: str = "192.0.2.1") -> tuple[ClientConnection, Transport]:
        conn = ClientConnection(
            self.state, cast(asyncio.AbstractEventLoop, self.clock), forget=lambda c: None
        )
        transport = Transport(conn)
        transport.get_extra_info = lambda name, default=None: (  # type: ignore[method-assign]
            (peer, 40000) if name == "peername" else default
        )
        conn.connection_made(transport)
        return conn, transport


@pytest.fixture
async def harness() -> Iterator[Harness]:  # type: ignore[misc]
    loop = asyncio.get_running_loop()
    upstream = Upstream()
    forwarder = Forwarder(UpstreamConfig(url="http://upstream.test"), dial=upstream.dial)
    await forwarder.start()
    state = listener_state(forwarder, LIMITS, client_certificate="optional")
    yield Harness(Clock(loop), state, upstream)
    await forwarder.close()


# ---- Inbound alone: deadlines and flow -------------------------------------------------------


@dataclass
class Holds:
    held: bool = False
    changes: int = 0

    def hold(self) -> None:
        self.held, self.changes = True, self.changes + 1

    def release(self) -> None:
        self.held, self.changes = False, self.changes + 1


def inbound(
    clock: Clock,
    holds: Holds,
    length: int,
    *,
    expecting: bool = False,
    window: int = 1000,
    limit: int | None = None,
) -> Inbound:
    return Inbound(
        cast(asyncio.AbstractEventLoop, clock),
        LengthDecoder(length),
        chunked=False,
        expecting=expecting,
        limit=limit,
        timeout=5,
        min_rate=100,
        window=window,
        hold=holds.hold,
        release=holds.release,
    )


def is_held(holds: Holds) -> bool:
    return holds.held


def failure(body: Inbound) -> BaseException | None:
    """``body.error``, read through a call (time passes between two reads of it)."""
    return body.error


@pytest.fixture
def clock() -> Clock:
    return Clock(cast(asyncio.AbstractEventLoop, None))


def test_a_pause_longer_than_body_timeout_fails_the_body(clock: Clock) -> None:
    body = inbound(clock, Holds(), 10_000)
    body.feed(b"x" * 600)  # 6 s of credit at 100 B/s: the pause limit comes first
    clock.advance(4.9)
    assert body.error is None
    body.feed(b"x")
    clock.advance(4.9)
    assert failure(body) is None
    clock.advance(0.2)
    assert isinstance(failure(body), BodyTimeout)
    assert "no request body byte" in str(body.error)


def test_a_trickle_below_the_minimum_rate_fails_after_the_grace(clock: Clock) -> None:
    """Apache's MinRate: body_timeout to begin with, then one more second for every
    min_rate bytes. One byte every 2 s keeps within body_timeout but not within the rate."""
    body = inbound(clock, Holds(), 10_000)
    for _ in range(10):
        clock.advance(2)
        if body.error is not None:
            break
        body.feed(b"x")
    # due at 5 s + n/100 s after n bytes: the third byte (at 6 s) came too late
    assert isinstance(body.error, BodyTimeout)
    assert "slower than 100 bytes per second" in str(body.error)
    assert body.size == 2


def test_a_body_at_the_minimum_rate_is_never_late(clock: Clock) -> None:
    body = inbound(clock, Holds(), 3_000)
    for _ in range(30):
        clock.advance(1)
        body.take()  # the forward keeps up
        body.feed(b"x" * 100)
    assert body.error is None and body.complete


def test_time_held_by_us_is_not_the_clients(clock: Clock) -> None:
    holds = Holds()
    body = inbound(clock, holds, 10_000, window=100)
    body.feed(b"x" * 200)  # past the window: reading stops
    assert holds.held
    clock.advance(60)  # the upstream takes its time: not the client's fault
    assert body.error is None
    assert body.take() == b"x" * 200
    assert not is_held(holds)  # reading again: the client's clock runs from here
    clock.advance(4.9)
    assert failure(body) is None
    clock.advance(0.2)
    assert isinstance(failure(body), BodyTimeout)


def test_the_clock_starts_when_100_continue_goes_out(clock: Clock) -> None:
    body = inbound(clock, Holds(), 100, expecting=True)
    clock.advance(60)  # the decision takes its time; the client waits for 100 Continue
    assert body.error is None
    body.continued()
    clock.advance(5)
    assert isinstance(body.error, BodyTimeout)


def test_past_the_limit_is_too_large_and_the_rest_is_dropped(clock: Clock) -> None:
    body = inbound(clock, Holds(), 1000, limit=100)
    assert body.feed(b"x" * 100) == b""
    assert body.feed(b"x" + b"GET / HTTP/1.1\r\n\r\n") == b""
    assert isinstance(body.error, BodyTooLarge)


def test_the_bytes_after_the_body_are_the_next_requests(clock: Clock) -> None:
    body = inbound(clock, Holds(), 5)
    assert body.feed(b"helloGET") == b"GET"
    assert body.complete and body.take() == b"hello"
    assert body.at_eof()


# ---- the protocol ---------------------------------------------------------------------------


async def test_a_body_within_body_buffer_is_read_before_the_upstream_is_asked(
    harness: Harness,
) -> None:
    conn, transport = harness.connect()
    conn.data_received(post("/public/a", length=10))
    conn.data_received(b"01234")
    await settle()
    assert harness.upstream.dials == 0  # nothing taken for a body not here yet
    conn.data_received(b"56789")
    await settle()
    assert harness.upstream.dials == 1
    [sent] = harness.upstream.received  # the head and the body in one write
    assert sent.endswith(b"\r\n\r\n0123456789")
    assert transport.statuses() == [200]
    assert b"ok:/public/a:10" in transport.written


async def test_a_small_chunked_body_goes_with_its_length(harness: Harness) -> None:
    conn, transport = harness.connect()
    conn.data_received(
        post("/public/c", "Transfer-Encoding: chunked") + b"3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n"
    )
    await settle()
    [message] = harness.upstream.messages
    assert message.body == b"abc"
    names = {name.lower() for name, _ in message.headers}
    assert b"content-length" in names and b"transfer-encoding" not in names
    assert transport.statuses() == [200]


async def test_100_continue_only_once_the_request_is_to_be_forwarded(harness: Harness) -> None:
    conn, transport = harness.connect()
    conn.data_received(post("/app/x", "Expect: 100-continue", length=5))
    await settle()
    assert transport.statuses() == [401]  # refused: no 100 Continue first
    assert transport.is_closing()  # and the body it would have sent is not waited for
    conn, transport = harness.connect()
    conn.data_received(post("/public/x", "Expect: 100-continue", length=5))
    await settle()
    assert transport.statuses() == [100]
    assert harness.upstream.dials == 0
    conn.data_received(b"hello")
    await settle()
    assert transport.statuses() == [100, 200]
    assert all(b"expect" not in r.lower() for r in harness.upstream.received)


async def test_a_streamed_body_holds_reading_while_the_upstream_takes_nothing(
    harness: Harness,
) -> None:
    conn, transport = harness.connect()
    harness.upstream.stalled = True
    conn.data_received(post("/public/big", length=1_000_000) + b"a" * 8 * KiB)
    await settle()
    assert harness.upstream.dials == 1  # past body_buffer: streamed
    for _ in range(40):  # the client sends on while the upstream takes nothing
        if not transport.is_reading():
            break
        conn.data_received(b"b" * 16 * KiB)
        await settle()
    assert not transport.is_reading(), "reading did not stop"
    held = harness.upstream.bytes_received
    harness.clock.advance(LIMITS.body_timeout * 4)  # our wait: no 408
    assert transport.statuses() == []
    harness.upstream.unstall()
    await settle()
    assert transport.is_reading()
    assert harness.upstream.bytes_received > held


async def test_a_slow_streamed_body_is_408_and_its_upstream_connection_aborted(
    harness: Harness,
) -> None:
    conn, transport = harness.connect()
    conn.data_received(post("/public/slow", length=100_000) + b"a" * 5 * KiB)
    await settle()
    assert harness.upstream.dials == 1
    for _ in range(20):  # one byte a second: within body_timeout, not at body_min_rate
        harness.clock.advance(1)
        await settle()
        if transport.statuses():
            break
        conn.data_received(b"b")
    assert transport.statuses() == [408]
    assert b"Connection: close" in transport.written
    [upstream] = harness.upstream.transports
    assert upstream.aborted  # the upstream sees the request incomplete, never complete
    assert harness.upstream.messages == []


async def test_streams_per_address_are_bounded(harness: Harness) -> None:
    streams = [harness.connect("192.0.2.7") for _ in range(3)]
    for conn, _ in streams:
        conn.data_received(post("/public/s", length=100_000) + b"a" * 5 * KiB)
        await settle()
    assert [t.statuses() for _, t in streams] == [[], [], [429]]
    other, transport = harness.connect("192.0.2.8")
    other.data_received(post("/public/s", length=5 * KiB + 1) + b"a" * (5 * KiB + 1))
    await settle()
    assert transport.statuses() == [200]
    streams[0][0].data_received(b"a" * (100_000 - 5 * KiB))  # the first stream ends
    await settle()
    assert streams[0][1].statuses() == [200]
    again, transport = harness.connect("192.0.2.7")
    again.data_received(post("/public/s", length=100_000) + b"a" * 5 * KiB)
    await settle()
    assert transport.statuses() == []  # its place was given back


async def test_an_early_answer_ends_the_connection(harness: Harness) -> None:
    """An answer given before the whole body was read is the connection's last: the rest of
    the body could not be told from a next request."""
    conn, transport = harness.connect()
    conn.data_received(post("/app/denied", length=100) + b"x" * 10)
    await settle()
    assert transport.statuses() == [401]
    assert b"Connection: close\r\n" in transport.written
    assert transport.is_closing()


async def test_a_body_read_whole_keeps_the_connection(harness: Harness) -> None:
    conn, transport = harness.connect()
    conn.data_received(post("/app/denied", body=b"x" * 10) + post("/public/next", body=b"y"))
    await settle()
    assert transport.statuses() == [401, 200]
    assert b"Connection: close" not in transport.written


def test_body_is_a_hold_reason_of_its_own() -> None:
    from sidecar.flow import PIPELINE, WRITING

    assert len({BODY, PIPELINE, WRITING}) == 3 and not BODY & (PIPELINE | WRITING)


# ---- bytes that arrive while the forward waits go to the upstream at once ---------------------


def _chunked(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_streamed_body_reaches_the_upstream_from_the_read_itself(
    harness: Harness, chunked: bool
) -> None:
    """Once the body streams and the forward waits for more, a read's body bytes are written
    to the upstream in the read's own call (no turn of the forward's task), framed as the
    client framed them; the body's end still goes through the task, and the upstream gets
    the body whole and in order."""
    conn, transport = harness.connect()
    pieces = [bytes([65 + i]) * (3 * KiB + i) for i in range(8)]
    if chunked:
        conn.data_received(
            post("/public/s", "Transfer-Encoding: chunked") + _chunked(pieces[:2])[:-5]
        )
    else:
        total = sum(len(p) for p in pieces)
        conn.data_received(post("/public/s", length=total) + pieces[0] + pieces[1])
    await settle()
    assert harness.upstream.dials == 1  # past body_buffer: streamed
    for piece in pieces[2:]:
        before = harness.upstream.bytes_received
        conn.data_received(_chunked([piece])[:-5] if chunked else piece)
        # no settle: written from data_received itself
        assert harness.upstream.bytes_received == before + len(piece) + (
            len(b"%x\r\n\r\n" % len(piece)) if chunked else 0
        )
    if chunked:
        conn.data_received(b"0\r\n\r\n")
    await settle()
    [message] = harness.upstream.messages
    assert message.body == b"".join(pieces)
    assert transport.statuses() == [200]


async def test_bytes_the_upstream_does_not_take_wait_for_the_forward(harness: Harness) -> None:
    """While the upstream takes nothing (its socket full), what arrives is held, not pushed,
    and reading stops past the window; bytes after it are never sent before it: once the
    upstream takes again the body arrives whole and in order."""
    conn, transport = harness.connect()
    pieces = [bytes([97 + i % 26]) * (16 * KiB + i) for i in range(48)]
    conn.data_received(post("/public/o", length=sum(len(p) for p in pieces)) + pieces[0])
    await settle()
    harness.upstream.stalled = True
    sent = 1
    conn.data_received(pieces[sent])  # pushed: the stall begins with this write
    sent += 1
    conn.data_received(pieces[sent])  # not pushed: the forward's task writes it, then waits
    sent += 1
    await settle()
    stalled_at = harness.upstream.bytes_received
    while transport.is_reading() and sent < len(pieces) - 2:
        conn.data_received(pieces[sent])
        sent += 1
        await settle()
    assert not transport.is_reading(), "reading did not stop"
    assert harness.upstream.bytes_received == stalled_at  # held here, not pushed
    harness.upstream.unstall()
    await settle()
    for piece in pieces[sent:]:
        conn.data_received(piece)
        await settle()
    [message] = harness.upstream.messages
    assert message.body == b"".join(pieces)
    assert transport.statuses() == [200]


async def _split_and_stalled(
    chunked: bool, sizes: list[int], cuts: list[int], stalls: list[bool]
) -> None:
    loop = asyncio.get_running_loop()
    upstream = Upstream()
    forwarder = Forwarder(UpstreamConfig(url="http://upstream.test"), dial=upstream.dial)
    await forwarder.start()
    try:
        harness = Harness(
            Clock(loop), listener_state(forwarder, LIMITS, client_certificate="optional"), upstream
        )
        conn, transport = harness.connect()
        pieces = [bytes([48 + i % 75]) * size for i, size in enumerate(sizes)]
        body = b"".join(pieces)
        if chunked:
            wire = post("/public/h", "Transfer-Encoding: chunked") + _chunked(pieces)
        else:
            wire = post("/public/h", length=len(body)) + body
        at = 0
        for i, cut in enumerate(cuts * (len(wire) // max(1, sum(cuts)) + 1)):
            if at >= len(wire):
                break
            if not transport.is_reading():  # held: the client's bytes wait for the upstream
                upstream.unstall()
                await settle()
            conn.data_received(wire[at : at + cut])
            at += cut
            upstream.stalled = stalls[i % len(stalls)] if stalls else False
            if i % 3 == 0:
                await settle()
        upstream.unstall()
        await settle()
        [message] = upstream.messages
        assert message.body == body
        assert transport.statuses() == [200]
    finally:
        await forwarder.close()


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    chunked=st.booleans(),
    sizes=st.lists(st.integers(1, 24 * KiB), min_size=1, max_size=10),
    cuts=st.lists(st.integers(1, 40 * KiB), min_size=1, max_size=12),
    stalls=st.lists(st.booleans(), max_size=12),
)
def test_any_split_of_a_body_with_any_stalls_reaches_the_upstream_whole(
    chunked: bool, sizes: list[int], cuts: list[int], stalls: list[bool]
) -> None:
    """Whatever the reads' sizes (cuts inside the head, the chunk framing and the data), and
    whenever the upstream stops and starts taking, the upstream gets the body whole and in
    order, pushed from the reads or sent by the forward's task, and the client its 200."""
    asyncio.run(_split_and_stalled(chunked, sizes, cuts, stalls))


async def test_a_push_whose_write_raises_fails_the_exchange(harness: Harness) -> None:
    """A write to the upstream that raises from a read's push ends the exchange as one from
    the forward's task does: the upstream connection is aborted (it never sees the body
    complete) and the client gets an error answer, not a 200."""
    conn, transport = harness.connect()
    conn.data_received(post("/public/x", length=100 * KiB) + b"a" * 8 * KiB)
    await settle()
    assert harness.upstream.dials == 1
    harness.upstream.broken = True
    conn.data_received(b"b" * 8 * KiB)  # pushed: the write raises
    await settle()
    [upstream] = harness.upstream.transports
    assert upstream.aborted
    assert harness.upstream.messages == []
    assert transport.statuses() and transport.statuses()[0] >= 500


def test_a_body_that_pushes_has_no_timeout_of_its_own(clock: Clock) -> None:
    """Pushed bytes do not wake the sender, so a timeout of its own would count a client
    sending steadily as silent: the two are refused together."""
    from sidecar.http1.upstream import RequestBody

    body = inbound(clock, Holds(), 10)
    with pytest.raises(ValueError, match="keeps its own deadlines"):
        RequestBody(body, chunked=False, limit=None, timeout=5.0, pushing=body)
