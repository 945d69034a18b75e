"""The HTTP/1.1 protocol (``sidecar.http1.client``) on a fake transport and a fake clock, in
the style of uvicorn's ``tests/protocols``: bytes are fed to ``data_received``, time moves only
when a test says so (``clock.advance``), and the bytes written are read back. No socket, no
TLS, no sleeping: the deadlines, the order of pipelined answers, flow control and the hand-off
to the fallback, each on its own.

Requests to ``/public/`` are forwarded to a fake upstream (``Upstream``: a pooled connection
over a fake transport, through the forwarder's ``dial``); any other path is answered by the
gateway itself (401: these clients have no certificate).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.certs import ClientCert
from sidecar.config import LimitsConfig, UpstreamConfig
from sidecar.forwarder import Forwarder
from sidecar.gateway import Gateway
from sidecar.headers import HeaderRules
from sidecar.hosts import ServerNames
from sidecar.http1.client import ClientConnection
from sidecar.identity import LookupContext, SignOnPurpose, Verdict
from sidecar.identity.intents import SignOn
from sidecar.listener_state import ListenerState
from sidecar.metrics import Metrics
from sidecar.plan import Plan
from sidecar.policy import Route, RouteTable
from sidecar.servers import Server, Servers
from sidecar.tls import PeerCertificates

from .revocation_parts import no_revocation

LIMITS = LimitsConfig(header_timeout=10, keepalive_timeout=30, send_timeout=20)


def get(path: str, *extra: str) -> bytes:
    return ("\r\n".join([f"GET {path} HTTP/1.1", "Host: localhost", *extra]) + "\r\n\r\n").encode()


class FakeTimer:
    """``asyncio.TimerHandle`` as the protocol uses it."""

    def __init__(self, when: float, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        self._when = when
        self._callback = callback
        self._args = args
        self._cancelled = False

    def when(self) -> float:
        return self._when

    def cancel(self) -> None:
        self._cancelled = True

    def cancelled(self) -> bool:
        return self._cancelled

    def run(self) -> None:
        self._callback(*self._args)


class Clock:
    """The running loop, as the protocol uses it, but for time: ``time``, ``call_at`` and
    ``call_later`` follow a clock that moves only with ``advance`` (timers fire then, in
    order); ``call_soon``, futures and tasks are the real loop's."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.now = 1000.0
        self.timers: list[FakeTimer] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> FakeTimer:
        timer = FakeTimer(when, callback, args)
        self.timers.append(timer)
        return timer

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> FakeTimer:
        return self.call_at(self.now + delay, callback, *args)

    def call_soon(self, callback: Callable[..., object], *args: Any) -> asyncio.Handle:
        return self._loop.call_soon(callback, *args)

    def create_future(self) -> asyncio.Future[Any]:
        return self._loop.create_future()

    def create_task(self, coro: Any) -> asyncio.Task[Any]:
        return self._loop.create_task(coro)

    def advance(self, seconds: float) -> None:
        """Move the clock; fire the timers that are due, earliest first."""
        self.now += seconds
        while True:
            due = [t for t in self.timers if not t.cancelled() and t.when() <= self.now]
            if not due:
                break
            timer = min(due, key=lambda t: t.when())
            self.timers.remove(timer)
            timer.run()
        self.timers = [t for t in self.timers if not t.cancelled()]


class Transport(asyncio.Transport):
    """A client's transport with asyncio's write-buffer water marks: ``pause_writing`` once
    more than ``high`` bytes wait, ``resume_writing`` once ``take`` leaves none."""

    def __init__(self, protocol: asyncio.Protocol, *, high: int = 1 << 30) -> None:
        super().__init__()
        self.protocol = protocol
        self.high = high
        self.written = bytearray()  # everything, for the test to read
        self.waiting = 0  # what the client has not taken
        self.paused = False
        self.reading = True
        self.closed = False
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "written after close"
        self.written += data
        self.waiting += len(data)
        if not self.paused and self.waiting > self.high:
            self.paused = True
            self.protocol.pause_writing()

    def take(self) -> None:
        """The client reads all it was sent."""
        self.waiting = 0
        if self.paused:
            self.paused = False
            self.protocol.resume_writing()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def is_paused(self) -> bool:
        return self.paused

    def was_aborted(self) -> bool:
        return self.aborted

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
        return {"peername": ("192.0.2.1", 40000)}.get(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = cast(asyncio.Protocol, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol

    # what the test reads
    def statuses(self) -> list[int]:
        return [int(s) for s in re.findall(rb"HTTP/1\.[01] (\d{3}) ", self.written)]

    def bodies(self) -> list[bytes]:
        return re.findall(rb"ok:/[a-z0-9/]*", self.written)  # the upstream's (lower-case paths)


@dataclass
class Upstream:
    """The upstream application behind the forwarder's pool: each request is answered at once
    with ``ok:<path>``, unless its path is in ``held`` (answered on ``release``)."""

    requests: list[bytes] = field(default_factory=list)
    held: set[str] = field(default_factory=set)
    waiting: list[tuple[asyncio.Protocol, str]] = field(default_factory=list)

    async def dial(self, factory: Callable[[], asyncio.Protocol]) -> object:
        protocol = factory()
        protocol.connection_made(_UpstreamTransport(self, protocol))
        return protocol

    def receive(self, protocol: asyncio.Protocol, data: bytes) -> None:
        self.requests.append(data)
        path = data.split(b" ", 2)[1].decode()
        if path in self.held:
            self.waiting.append((protocol, path))
        else:
            self.answer(protocol, path)

    def answer(self, protocol: asyncio.Protocol, path: str) -> None:
        body = f"ok:{path}".encode()
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
        asyncio.get_running_loop().call_soon(protocol.data_received, head + body)

    def release(self) -> None:
        for protocol, path in self.waiting:
            self.answer(protocol, path)
        self.waiting.clear()

    def paths(self) -> list[str]:
        return [r.split(b" ", 2)[1].decode() for r in self.requests]


class _UpstreamTransport(asyncio.Transport):
    def __init__(self, upstream: Upstream, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.upstream = upstream
        self.protocol = protocol
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.upstream.receive(self.protocol, bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class NoIdentity:
    """``gateway.Identity`` for clients that never present a certificate."""

    name = "none"
    can_enrol = False

    def peek(self, cert: ClientCert) -> Verdict | None:
        raise AssertionError("no certificate here")

    async def lookup(self, cert: ClientCert, context: LookupContext) -> Verdict:
        raise AssertionError("no certificate here")

    async def sign_on(
        self,
        purpose: SignOnPurpose,
        return_url: str,
        client_ip: str | None,
        *,
        shared: bool = True,
    ) -> SignOn:
        raise AssertionError("no sign-on here")


@dataclass
class HandedOver:
    """``ListenerState.hand_off``: what the fallback would have been given."""

    transport: asyncio.Transport
    peer: ClientCert | None
    data: bytearray = field(default_factory=bytearray)


class Fallback(asyncio.Protocol):
    def __init__(self, record: HandedOver) -> None:
        self.record = record

    def data_received(self, data: bytes) -> None:
        self.record.data += data


@dataclass
class Harness:
    clock: Clock
    state: ListenerState
    upstream: Upstream
    forwarder: Forwarder
    handed: list[HandedOver] = field(default_factory=list)
    forgotten: list[ClientConnection] = field(default_factory=list)

    def connect(self, *, high: int = 1 << 30) -> tuple[ClientConnection, Transport]:
        loop = cast(asyncio.AbstractEventLoop, self.clock)
        conn = ClientConnection(self.state, loop, forget=self.forgotten.append)
        transport = Transport(conn, high=high)
        conn.connection_made(transport)
        return conn, transport

    def hand_off(self, transport: asyncio.Transport, peer: ClientCert | None) -> asyncio.Protocol:
        record = HandedOver(transport, peer)
        self.handed.append(record)
        fallback = Fallback(record)
        transport.set_protocol(fallback)
        return fallback


def listener_state(
    forwarder: Forwarder, limits: LimitsConfig, *, client_certificate: str
) -> ListenerState:
    """A listener's state for protocol tests: one server ("localhost": ``/public/`` public,
    ``/`` the rest), no identity backend, forwarding through ``forwarder``, no access log."""
    plan = Plan(
        policy=Servers(
            [
                Server(
                    ServerNames(["localhost"]),
                    RouteTable([Route("/public/", public=True), Route("/")]),
                    client_certificate=client_certificate,
                )
            ]
        ),
        identity=NoIdentity(),
        upstream=forwarder,
        rules=HeaderRules("X-APP-CERTIFICATE", "X-USERINFO"),
        max_header_block=limits.max_header_block,
        revocation=no_revocation(),
    )
    gateway = Gateway(
        plan, metrics=Metrics(), logger=structlog.get_logger("test"), access_log=False
    )
    return ListenerState(gateway, limits=limits, peer_certs=PeerCertificates(), metrics=Metrics())


@pytest.fixture
async def harness() -> Iterator[Harness]:  # type: ignore[misc]
    loop = asyncio.get_running_loop()
    upstream = Upstream()
    forwarder = Forwarder(UpstreamConfig(url="http://upstream.test"), dial=upstream.dial)
    await forwarder.start()
    state = listener_state(forwarder, LIMITS, client_certificate="required")
    made = Harness(Clock(loop), state, upstream, forwarder)
    state.hand_off = made.hand_off
    yield made
    await forwarder.close()


async def settle(rounds: int = 20) -> None:
    """Let the callbacks and tasks that are ready run, ``rounds`` times over (no time passes
    on the clock)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


# ---- answers and pipelining -----------------------------------------------------------------


async def test_an_answer_and_the_connection_stays_open(harness: Harness) -> None:
    conn, transport = harness.connect()
    conn.data_received(get("/app/x"))
    await settle()
    assert transport.statuses() == [401]
    assert b"Connection: close" not in transport.written
    assert not transport.is_closing()


async def test_pipelined_requests_are_answered_in_order(harness: Harness) -> None:
    conn, transport = harness.connect()
    harness.upstream.held.add("/public/slow")
    conn.data_received(get("/public/slow") + get("/app/denied") + get("/public/fast"))
    await settle()
    assert transport.statuses() == []  # the first one holds the others back
    assert harness.upstream.paths() == ["/public/slow"]
    harness.upstream.release()
    await settle()
    assert transport.statuses() == [200, 401, 200]
    assert transport.bodies() == [b"ok:/public/slow", b"ok:/public/fast"]
    assert harness.upstream.paths() == ["/public/slow", "/public/fast"]


async def test_a_warm_request_is_served_without_a_task(harness: Harness) -> None:
    conn, _ = harness.connect()
    conn.data_received(get("/public/warm"))  # the pool has no connection yet: a task dials
    await settle()
    assert conn._task is not None
    second, transport2 = harness.connect()
    second.data_received(get("/public/a") + get("/public/b"))
    await settle()
    assert transport2.bodies() == [b"ok:/public/a", b"ok:/public/b"]
    assert second._task is None


async def test_a_close_asked_for_is_the_last_answer(harness: Harness) -> None:
    conn, transport = harness.connect()
    conn.data_received(get("/app/x", "Connection: close") + get("/app/never"))
    await settle()
    assert transport.statuses() == [401]
    assert b"Connection: close\r\n" in transport.written
    assert transport.is_closing() and harness.forgotten == [conn]


# ---- deadlines ------------------------------------------------------------------------------


async def test_the_first_head_is_due_within_header_timeout(harness: Harness) -> None:
    _, transport = harness.connect()
    harness.clock.advance(LIMITS.header_timeout - 1)
    assert not transport.is_closing()
    harness.clock.advance(1)
    assert transport.is_closing() and not transport.was_aborted()
    assert transport.written == b""


async def test_a_head_that_trickles_in_is_cut_at_header_timeout(harness: Harness) -> None:
    conn, transport = harness.connect()
    harness.clock.advance(5)
    conn.data_received(b"GET /app/x HTTP/1.1\r\n")  # started: due 10 s after the handshake
    harness.clock.advance(4)
    conn.data_received(b"Host: localhost\r\n")
    assert not transport.is_closing()
    harness.clock.advance(1)
    assert transport.is_closing()
    assert transport.statuses() == []


async def test_an_idle_connection_closes_after_keepalive_timeout(harness: Harness) -> None:
    conn, transport = harness.connect()
    conn.data_received(get("/app/x"))
    await settle()
    harness.clock.advance(LIMITS.keepalive_timeout - 1)
    assert not transport.is_closing()
    harness.clock.advance(1)
    assert transport.is_closing()


async def test_a_head_begun_on_an_idle_connection_is_due_sooner(harness: Harness) -> None:
    conn, transport = harness.connect()
    conn.data_received(get("/app/x"))
    await settle()
    harness.clock.advance(25)
    conn.data_received(b"GET /app/y HTTP/1.1\r\n")  # due at the keep-alive end, 5 s from now
    harness.clock.advance(5)
    assert transport.is_closing()
    assert transport.statuses() == [401]


async def test_no_deadline_cuts_a_request_in_flight(harness: Harness) -> None:
    conn, transport = harness.connect()
    harness.upstream.held.add("/public/slow")
    conn.data_received(get("/public/slow"))
    await settle()
    harness.clock.advance(LIMITS.keepalive_timeout * 2)  # the upstream's read timeout bounds it
    assert not transport.is_closing()
    harness.upstream.release()
    await settle()
    assert transport.statuses() == [200]


# ---- flow control ---------------------------------------------------------------------------


async def test_nothing_starts_while_the_client_takes_nothing(harness: Harness) -> None:
    conn, transport = harness.connect(high=1)  # any answer fills the client's window
    conn.data_received(get("/public/a") + get("/public/b") + get("/app/c"))
    await settle()
    assert transport.bodies() == [b"ok:/public/a"]
    assert harness.upstream.paths() == ["/public/a"]  # nothing else started upstream
    assert transport.is_paused() and not transport.is_reading()
    transport.take()
    await settle()
    assert transport.bodies() == [b"ok:/public/a", b"ok:/public/b"]
    transport.take()
    await settle()
    assert transport.statuses() == [200, 200, 401]
    transport.take()
    assert transport.is_reading()


async def test_a_client_that_takes_nothing_is_cut_off_after_send_timeout(harness: Harness) -> None:
    conn, transport = harness.connect(high=1)
    conn.data_received(get("/app/a") + get("/app/b"))
    await settle()
    harness.clock.advance(LIMITS.send_timeout - 1)
    assert not transport.was_aborted()
    harness.clock.advance(1)
    assert transport.was_aborted()
    await settle()
    assert harness.forgotten == [conn]


async def test_pipelined_bytes_past_the_limit_stop_reading_until_served(harness: Harness) -> None:
    conn, transport = harness.connect()
    harness.upstream.held.add("/public/slow")
    pad = "X-Pad: " + "p" * 1000
    conn.data_received(get("/public/slow") + b"".join(get(f"/app/{i}", pad) for i in range(300)))
    await settle()
    assert not transport.is_reading()  # about 300 KiB behind the request in flight
    harness.upstream.release()
    await settle(1000)  # a round of the loop per request
    assert transport.statuses() == [200] + [401] * 300
    assert transport.is_reading()


# ---- hand-off ------------------------------------------------------------------------------


async def test_an_upgrade_is_handed_over_with_every_byte_not_served(harness: Harness) -> None:
    conn, transport = harness.connect()
    upgrade = get("/app/ws", "Connection: Upgrade", "Upgrade: websocket")
    conn.data_received(get("/app/first") + upgrade + b"frames")
    await settle()
    assert transport.statuses() == [401]  # the first one, served here
    [handed] = harness.handed
    assert handed.data == upgrade + b"frames"
    assert handed.transport is transport and transport.protocol is not conn
    assert harness.forgotten == [conn]
    conn.data_received(b"late")  # nothing reaches the old protocol's requests any more
    harness.clock.advance(LIMITS.keepalive_timeout * 2)
    assert not transport.is_closing()  # its deadlines went with it


async def test_a_head_too_large_is_refused_here_and_closes(harness: Harness) -> None:
    conn, transport = harness.connect()
    lines = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 400) for i in range(100))
    conn.data_received(b"GET /app/x HTTP/1.1\r\nHost: localhost\r\n" + lines)
    await settle()
    assert transport.statuses() == [431]
    assert b"Connection: close\r\n" in transport.written
    assert transport.is_closing() and harness.handed == []


# ---- shutdown -------------------------------------------------------------------------------


async def test_stop_closes_an_idle_connection_and_lets_a_busy_one_finish(harness: Harness) -> None:
    idle, idle_transport = harness.connect()
    busy, busy_transport = harness.connect()
    harness.upstream.held.add("/public/slow")
    busy.data_received(get("/public/slow"))
    await settle()
    assert idle.stop() is None and idle_transport.is_closing()
    finished = busy.stop()
    assert finished is not None and not finished.done()
    harness.upstream.release()
    await settle()
    assert finished.done()
    assert busy_transport.statuses() == [200]
    assert b"Connection: close\r\n" in busy_transport.written


# ---- a large read: its head, then the rest without the buffer ------------------------------


class RecordingUpstream(Upstream):
    """``Upstream`` for requests with bodies: the bytes of each upstream connection are
    parsed into requests (Content-Length or chunked bodies), each answered once whole."""

    def __init__(self) -> None:
        super().__init__()
        self.streams: dict[int, bytearray] = {}
        self.whole: list[bytes] = []  # each request as the upstream got it, X-Request-ID out

    def receive(self, protocol: asyncio.Protocol, data: bytes) -> None:
        stream = self.streams.setdefault(id(protocol), bytearray())
        stream += data
        while (end := stream.find(b"\r\n\r\n")) >= 0:
            head = bytes(stream[: end + 4])
            length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
            size = end + 4 + (int(length.group(1)) if length else 0)
            if re.search(rb"\r\ntransfer-encoding: *chunked", head, re.I):
                last = stream.find(b"\r\n0\r\n\r\n", end)
                if last < 0:
                    return
                size = last + 7
            if len(stream) < size:
                return
            whole = bytes(stream[:size])
            del stream[:size]
            self.requests.append(whole)
            # the head without its X-Request-ID, and the body decoded (chunks are framed as
            # they arrived)
            body = whole[end + 4 :]
            if not length and body:
                body = b"".join(_unchunked(body))
            # (a chunked body that arrived whole is sent with its length)
            volatile = rb"\r\n(X-Request-ID|Content-Length|Transfer-Encoding): [^\r]*"
            self.whole.append(re.sub(volatile, b"", head, flags=re.I) + body)
            self.answer(protocol, whole.split(b" ", 2)[1].decode())


def _unchunked(data: bytes) -> Iterator[bytes]:
    while True:
        line, _, data = data.partition(b"\r\n")
        size = int(line, 16)
        if not size:
            return
        yield data[:size]
        data = data[size + 2 :]


def _post(path: str, body: bytes, *, chunked: bool = False) -> bytes:
    if chunked:
        framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in _pieces(body)) + b"0\r\n\r\n"
        return get(path, "Transfer-Encoding: chunked").replace(b"GET", b"POST", 1) + framed
    head = get(path, f"Content-Length: {len(body)}").replace(b"GET", b"POST", 1)
    return head + body


def _pieces(body: bytes) -> list[bytes]:
    return [body[i : i + 7000] for i in range(0, len(body), 7000)]


_ITEMS = st.one_of(
    st.tuples(st.just("get"), st.integers(0, 99)),
    st.tuples(st.just("denied"), st.integers(0, 99)),  # 401 here
    st.tuples(
        st.sampled_from(["post", "chunked"]),
        st.integers(0, 99),
        st.sampled_from([0, 1, 100, 16_000, 40_000, 300_000]),
    ),
)
#: what ends a connection's requests: an upgrade (and 30,000 bytes after it), a malformed head,
#: a length past max_body_size
_LAST = st.sampled_from([("upgrade",), ("refused",), ("too large",)])


def _item(item: tuple[Any, ...]) -> bytes:
    kind = item[0]
    if kind == "get":
        return get(f"/public/g{item[1]}")
    if kind == "denied":
        return get(f"/app/d{item[1]}")
    if kind in ("post", "chunked"):
        return _post(f"/public/p{item[1]}", bytes([item[1]]) * item[2], chunked=kind == "chunked")
    if kind == "upgrade":
        return get("/app/ws", "Connection: Upgrade", "Upgrade: websocket") + b"w" * 30_000
    if kind == "refused":
        return b"GET /public/bad HTTP/1.1\r\nHost: localhost\r\nBad Header\r\n\r\n"
    return b"POST /public/big HTTP/1.1\r\nHost: localhost\r\nContent-Length: 900000\r\n\r\n"


async def _served(
    reads: list[bytes],
) -> tuple[list[int], list[bytes], list[bytes], bytes, bool]:
    """What a connection given ``reads`` answered, what the upstream got, what was handed
    over, and whether the connection was closed."""
    upstream = RecordingUpstream()
    forwarder = Forwarder(UpstreamConfig(url="http://upstream.test"), dial=upstream.dial)
    await forwarder.start()
    limits = LimitsConfig(
        header_timeout=10, keepalive_timeout=30, send_timeout=20, max_body_size=500_000
    )
    state = listener_state(forwarder, limits, client_certificate="required")
    harness = Harness(Clock(asyncio.get_running_loop()), state, upstream, forwarder)
    state.hand_off = harness.hand_off
    _, transport = harness.connect()
    try:
        for data in reads:
            for _ in range(100):
                if transport.is_reading() or transport.is_closing():
                    break
                await settle(1)  # held: the client waits, as a socket would
            if transport.is_closing():
                break
            transport.protocol.data_received(data)  # the fallback's, once handed over
            await settle(5)
        await settle(200)
        handed = [bytes(h.data) for h in harness.handed]
        answers = re.sub(rb"[0-9a-f]{32}|Date: [^\r]+", b"", bytes(transport.written))
        closed = transport.is_closing()
        transport.close()
        await settle(5)
    finally:
        await forwarder.close()
    return transport.statuses(), upstream.whole, handed, answers, closed


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    items=st.lists(_ITEMS, min_size=1, max_size=4),
    last=st.none() | _LAST,
    large=st.sampled_from([0, 300_000]),
)
def test_a_large_read_is_served_as_the_same_bytes_in_small_reads(
    items: list[tuple[Any, ...]], last: tuple[str] | None, large: int
) -> None:
    """A connection's bytes (heads, bodies of both framings, an upgrade and what follows it,
    a refused head, a body over max_body_size), read in large pieces (each item at once, or
    300,000 bytes at a time: the head found in the read, the rest given to the body's reader
    from there, ``_tail``), are served exactly as in reads of 4 KiB, which always go through
    the buffer. (Where timing decides, the two may rightly differ, and no such stream is made
    here: a 401 to a POST whose body is all there keeps the connection, and a body already
    there gets no 100 Continue.)"""
    reads = [_item(item) for item in [*items, *([last] if last else [])]]
    stream = b"".join(reads)
    pieces = reads if not large else [stream[i : i + large] for i in range(0, len(stream), large)]
    small = [stream[i : i + 4096] for i in range(0, len(stream), 4096)]

    async def both() -> tuple[object, object]:
        return await _served(pieces), await _served(small)

    in_large, in_small = asyncio.run(both())
    assert in_large == in_small
