"""Response bodies relayed to the client (``forwarder.Forward.relay``, ``http1.upstream``,
``http1.client.ResponseWriter``) on fake transports, in the style of ``test_http1_inbound``.

While the relay waits for more of a body, the bytes an upstream read brings go to the client
from that read itself (``UpstreamConnection.attach``, ``ResponseWriter.push``) when the client
takes them at once; otherwise they wait for the relay's task as before. Whatever the reads'
sizes and whenever the client stops taking, the client gets the body whole, in order and
framed once; the upstream's read deadline counts pushed bytes as progress; a write that
raises from a push ends the exchange as one from the task does.
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
from sidecar.forwarder import Forwarder
from sidecar.http1.client import ClientConnection
from sidecar.http1.upstream import UpstreamConnection
from sidecar.listener_state import ListenerState

from .test_http1_client import Clock, Transport, listener_state, settle

KiB = 1024
LIMITS = LimitsConfig(header_timeout=10, keepalive_timeout=30, send_timeout=20)
GET = b"GET /public/d HTTP/1.1\r\nHost: localhost\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


# ---- the upstream: answered by the test, piece by piece -----------------------------------------


@dataclass
class Upstream:
    """Takes the requests; the test writes the answers (``send``) on the latest connection."""

    protocols: list[asyncio.Protocol] = field(default_factory=list)
    transports: list[_UpstreamTransport] = field(default_factory=list)
    requests: list[bytes] = field(default_factory=list)

    async def dial(self, factory: Callable[[], asyncio.Protocol]) -> object:
        protocol = factory()
        transport = _UpstreamTransport(self)
        self.protocols.append(protocol)
        self.transports.append(transport)
        protocol.connection_made(transport)
        return protocol

    def send(self, data: bytes) -> None:
        self.protocols[-1].data_received(data)


class _UpstreamTransport(asyncio.Transport):
    def __init__(self, upstream: Upstream) -> None:
        super().__init__()
        self.upstream = upstream
        self.closed = False
        self.aborted = False
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.upstream.requests.append(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True
        self.closed = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class _BrokenTransport(Transport):
    """A client's transport that raises on a write once ``broken`` (a state no write should
    meet)."""

    broken = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.broken:
            raise RuntimeError("this transport takes no writes")
        super().write(data)


# ---- the client's side ----------------------------------------------------------------------------


class _Responses:
    """The responses a client was sent, parsed as a client parses them (llhttp)."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.complete = 0

    def on_message_begin(self) -> None:
        self.bodies.append(b"")

    def on_body(self, body: bytes) -> None:
        self.bodies[-1] += body

    def on_message_complete(self) -> None:
        self.complete += 1


def responses(written: bytes | bytearray) -> _Responses:
    seen = _Responses()
    httptools.HttpResponseParser(seen).feed_data(bytes(written))
    return seen


@dataclass
class Harness:
    clock: Clock
    state: ListenerState
    upstream: Upstream

    def connect(
        self, *, high: int = 1 << 30, broken: bool = False
    ) -> tuple[ClientConnection, Transport]:
        conn = ClientConnection(
            self.state, cast(asyncio.AbstractEventLoop, self.clock), forget=lambda c: None
        )
        transport: Transport = (
            _BrokenTransport(conn, high=high) if broken else Transport(conn, high=high)
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


def head(*, chunked: bool, length: int = 0) -> bytes:
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % length
    return b"HTTP/1.1 200 OK\r\n%b\r\n\r\n" % framing


# ---- pushed from the upstream's read ----------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_streamed_response_reaches_the_client_from_the_upstreams_read(
    harness: Harness, chunked: bool
) -> None:
    """Once the relay waits for more of a body, an upstream read's body bytes are written to
    the client in the read's own call (no turn of the relay's task), framed for the client;
    the body's end still goes through the task, the client gets the body whole and in order,
    and the connections stay in use for the next request."""
    conn, transport = harness.connect()
    pieces = [bytes([65 + i]) * (3 * KiB + i) for i in range(8)]
    total = sum(len(p) for p in pieces)
    conn.data_received(GET)
    await settle()
    first = chunk(pieces[0]) if chunked else pieces[0]
    harness.upstream.send(head(chunked=chunked, length=total) + first)
    await settle()
    for piece in pieces[1:]:
        before = len(transport.written)
        harness.upstream.send(chunk(piece) if chunked else piece)
        # no settle: written from the upstream's data_received itself
        assert len(transport.written) == before + len(chunk(piece) if chunked else piece)
    if chunked:
        harness.upstream.send(b"0\r\n\r\n")
    await settle()
    seen = responses(transport.written)
    assert seen.complete == 1
    assert seen.bodies == [b"".join(pieces)]
    conn.data_received(GET)  # the same connections serve the next request
    await settle()
    harness.upstream.send(head(chunked=False, length=2) + b"ok")
    await settle()
    assert transport.statuses() == [200, 200]
    assert len(harness.upstream.transports) == 1


async def test_bytes_the_client_does_not_take_wait_for_the_relay(harness: Harness) -> None:
    """While the client takes nothing (its transport's buffer above the high-water mark),
    what the upstream sends is held, not pushed, and reading the upstream stops past its
    limit; bytes after it are never written before it: once the client takes again, the body
    arrives whole and in order."""
    conn, transport = harness.connect(high=64 * KiB)
    pieces = [bytes([97 + i % 26]) * (16 * KiB + i) for i in range(48)]
    conn.data_received(GET)
    await settle()
    harness.upstream.send(head(chunked=False, length=sum(len(p) for p in pieces)) + pieces[0])
    await settle()
    sent = 1
    while not transport.is_paused() and sent < 8:
        harness.upstream.send(pieces[sent])  # pushed, until the client's buffer is full
        sent += 1
    assert transport.is_paused(), "the pushes did not fill the client's buffer"
    paused_at = len(transport.written)
    harness.upstream.send(pieces[sent])  # the client takes nothing: held, not written
    sent += 1
    assert len(transport.written) == paused_at
    [upstream] = harness.upstream.transports
    while upstream.reading:
        harness.upstream.send(pieces[sent])
        sent += 1
        await settle()
    assert sent < len(pieces), "reading the upstream did not stop"
    held_at = len(transport.written)
    harness.upstream.send(b"")  # a read of nothing changes nothing
    assert len(transport.written) == held_at
    while sent < len(pieces):
        transport.take()
        await settle()
        harness.upstream.send(pieces[sent])
        sent += 1
    transport.take()
    await settle()
    seen = responses(transport.written)
    assert seen.complete == 1
    assert seen.bodies == [b"".join(pieces)]


async def _split_and_paused(
    chunked: bool, sizes: list[int], cuts: list[int], takes: list[bool]
) -> None:
    loop = asyncio.get_running_loop()
    upstream = Upstream()
    forwarder = Forwarder(UpstreamConfig(url="http://upstream.test"), dial=upstream.dial)
    await forwarder.start()
    try:
        harness = Harness(
            Clock(loop), listener_state(forwarder, LIMITS, client_certificate="optional"), upstream
        )
        conn, transport = harness.connect(high=32 * KiB)
        pieces = [bytes([48 + i % 75]) * size for i, size in enumerate(sizes)]
        body = b"".join(pieces)
        if chunked:
            wire = head(chunked=True) + b"".join(chunk(p) for p in pieces) + b"0\r\n\r\n"
        else:
            wire = head(chunked=False, length=len(body)) + body
        conn.data_received(GET)
        await settle()
        at = 0
        for i, cut in enumerate(cuts * (len(wire) // max(1, sum(cuts)) + 1)):
            if at >= len(wire):
                break
            if not upstream.transports[-1].reading:  # held: the upstream waits for the client
                transport.take()
                await settle()
            upstream.send(wire[at : at + cut])
            at += cut
            if takes and takes[i % len(takes)]:
                transport.take()
            if i % 3 == 0:
                await settle()
        for _ in range(4):
            transport.take()
            await settle()
        seen = responses(transport.written)
        assert seen.complete == 1
        assert seen.bodies == [body]
        conn.data_received(GET)  # the connections were kept: the next request is served
        await settle()
        upstream.send(head(chunked=False, length=2) + b"ok")
        await settle()
        assert transport.statuses() == [200, 200]
        assert len(upstream.transports) == 1
    finally:
        await forwarder.close()


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    chunked=st.booleans(),
    sizes=st.lists(st.integers(1, 24 * KiB), min_size=1, max_size=10),
    cuts=st.lists(st.integers(1, 40 * KiB), min_size=1, max_size=12),
    takes=st.lists(st.booleans(), max_size=12),
)
def test_any_split_of_a_response_with_any_client_pauses_reaches_the_client_whole(
    chunked: bool, sizes: list[int], cuts: list[int], takes: list[bool]
) -> None:
    """Whatever the upstream reads' sizes (cuts inside the head, the chunk framing and the
    data), and whenever the client stops and starts taking, the client gets the body whole,
    in order and framed once, pushed from the reads or written by the relay's task, and both
    connections serve the next request."""
    asyncio.run(_split_and_paused(chunked, sizes, cuts, takes))


async def test_a_push_whose_write_raises_ends_the_exchange(harness: Harness) -> None:
    """A write to the client that raises from an upstream read's push ends the exchange as
    one from the relay's task does: the client is aborted (it never sees the body complete)
    and the upstream connection is dropped, not reused."""
    conn, transport = harness.connect(broken=True)
    conn.data_received(GET)
    await settle()
    harness.upstream.send(head(chunked=False, length=100 * KiB) + b"a" * 8 * KiB)
    await settle()
    assert transport.statuses() == [200]
    cast(_BrokenTransport, transport).broken = True
    harness.upstream.send(b"b" * 8 * KiB)  # pushed: the write raises
    await settle()
    assert transport.aborted
    [upstream] = harness.upstream.transports
    assert upstream.aborted


async def test_bytes_after_a_complete_response_end_it_at_once(harness: Harness) -> None:
    """An upstream read that ends the body and carries bytes after it (a second, unsolicited
    response): the client gets the body whole at once, never a byte of what follows, and the
    upstream connection is closed, not reused (the relay does not wait for its close)."""
    conn, transport = harness.connect()
    conn.data_received(GET)
    await settle()
    harness.upstream.send(head(chunked=False, length=8) + b"aaaa")
    await settle()
    harness.upstream.send(b"bbbb" + b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nEVL")
    await settle()
    seen = responses(transport.written)
    assert seen.complete == 1
    assert seen.bodies == [b"aaaabbbb"]
    assert b"EVL" not in transport.written
    assert harness.upstream.transports[0].closed
    conn.data_received(GET)  # served on a new upstream connection
    await settle()
    harness.upstream.send(head(chunked=False, length=2) + b"ok")
    await settle()
    assert transport.statuses() == [200, 200]
    assert len(harness.upstream.transports) == 2


# ---- the upstream's read deadline ---------------------------------------------------------------


async def test_pushed_bytes_move_the_upstreams_read_deadline() -> None:
    """The read timeout is for an upstream that sends nothing: bytes that went to the client
    from the read, with the relay's task still waiting, are progress as much as bytes the
    task took; a silence longer than the timeout still fails the read."""
    clock = Clock(asyncio.get_running_loop())
    conn = UpstreamConnection(cast(asyncio.AbstractEventLoop, clock), 5.0)
    conn.connection_made(_UpstreamTransport(Upstream()))
    conn.begin(head_only=False, sending=False)
    conn.data_received(head(chunked=False, length=1 << 20))
    await conn.head()
    pushed: list[bytes] = []

    def sink(data: bytes) -> bool:
        pushed.append(data)
        return True

    conn.attach(sink)
    read = asyncio.get_running_loop().create_task(conn.read())
    await settle()
    for i in range(6):  # 24 s of steady bytes, 4 s apart: longer than the timeout
        clock.advance(4)
        conn.data_received(b"x" * 100)
        await settle()
        assert not read.done(), f"the read ended after {4 * (i + 1)} s of steady bytes"
    assert len(pushed) == 6
    clock.advance(6)  # then silence, past the timeout
    await settle()
    with pytest.raises(TimeoutError):
        await read


async def test_a_sink_that_refuses_leaves_the_bytes_for_the_task() -> None:
    """Bytes the sink does not take stay in order for ``read``, which wakes for them."""
    clock = Clock(asyncio.get_running_loop())
    conn = UpstreamConnection(cast(asyncio.AbstractEventLoop, clock), 5.0)
    conn.connection_made(_UpstreamTransport(Upstream()))
    conn.begin(head_only=False, sending=False)
    conn.data_received(head(chunked=True))
    await conn.head()
    conn.attach(lambda data: False)
    read = asyncio.get_running_loop().create_task(conn.read())
    await settle()
    conn.data_received(chunk(b"one") + chunk(b"two"))
    await settle()
    assert read.done() and read.result() == b"onetwo"
