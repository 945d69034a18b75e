"""``TLSProtocol`` and ``TLSTransport`` without sockets: a real TLS client over memory BIOs on
one side, a fake TCP transport and a fake clock on the other, timers fired by hand."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar import tls_records, tls_transport
from sidecar.config import LimitsConfig, TLSConfig
from sidecar.handshakes import HandshakeScheduler
from sidecar.listener import READ_BUFFER
from sidecar.metrics import Metrics
from sidecar.tls import TLSState, server_context
from sidecar.tls_transport import _LINGER, _SHUTDOWN_TIMEOUT, IPNetwork, TLSProtocol, TLSTransport

from .conftest import Certs
from .pki import Issued, make_ca, make_leaf

# ---- fakes ----------------------------------------------------------------------------------


class Timer:
    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Clock:
    """Just the loop methods the protocol uses; ``advance`` fires the timers that are due."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._timers: list[Timer] = []
        self._soon: list[Callable[[], object]] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], object]) -> Timer:
        timer = Timer(self.now + delay, callback)
        self._timers.append(timer)
        return timer

    def call_soon(self, callback: Callable[[], object]) -> None:
        self._soon.append(callback)

    def run_soon(self) -> None:
        soon, self._soon = self._soon, []
        for callback in soon:
            callback()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while due := sorted(
            (t for t in self._timers if not t.cancelled and t.when <= self.now),
            key=lambda t: t.when,
        ):
            timer = due[0]
            self._timers.remove(timer)
            timer.callback()

    @property
    def pending_timers(self) -> int:
        return sum(1 for timer in self._timers if not timer.cancelled)


@dataclass
class TCP:
    """The accepted TCP connection, as the protocol sees it."""

    written: bytearray = field(default_factory=bytearray)
    buffered: int = 0  # what the "socket" has not taken yet
    reading: bool = True
    eof_written: bool = False
    closed: bool = False
    aborted: bool = False
    limits: tuple[int | None, int | None] = (None, None)

    def write(self, data: bytes) -> None:
        assert not self.eof_written, "write after write_eof"
        self.written += data

    def take(self) -> bytes:
        data, self.written = bytes(self.written), bytearray()
        return data

    def write_eof(self) -> None:
        self.eof_written = True

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.limits = (high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (16384, 65536)

    def end(self) -> str:
        """How the protocol ended the connection so far ("" while open)."""
        if self.aborted:
            return "aborted"
        if self.closed:
            return "closed"
        return "eof" if self.eof_written else ""

    def is_reading(self) -> bool:
        return self.reading

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("192.0.2.7", 50000), "socket": "the socket"}.get(name, default)


@dataclass
class App(asyncio.Protocol):
    """The HTTP protocol above, recording what it is told."""

    events: list[str] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    #: the objects it was given, kept as they are (a view of the read buffer would change)
    received: list[bytes] = field(default_factory=list)
    transport: TLSTransport | None = None
    lost: list[BaseException | None] = field(default_factory=list)
    on_made: Callable[[TLSTransport], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, TLSTransport)
        self.transport = transport
        self.events.append("made")
        if self.on_made is not None:
            self.on_made(transport)

    def data_received(self, data: bytes) -> None:
        self.events.append(f"data {len(data)}")
        self.data += data
        self.received.append(data)

    def eof_received(self) -> bool:
        self.events.append("eof")
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.events.append("lost")
        self.lost.append(exc)

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")


@dataclass
class Listener:
    """``tls_transport.Listener``: the shared state the protocol reports to."""

    tls: TLSState
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    metrics: Metrics = field(default_factory=Metrics)
    plain: bool = False
    proxy_from: tuple[IPNetwork, ...] | None = None
    #: no budget: every handshake step runs at once (tests/test_handshake_budget.py has one)
    handshakes: HandshakeScheduler = field(
        default_factory=lambda: HandshakeScheduler(cast(Any, None), 0.0)
    )
    read_buffer: memoryview = field(default_factory=lambda: memoryview(bytearray(READ_BUFFER)))
    capacity: int = 10
    admitted: int = 0
    released: int = 0
    apps: list[App] = field(default_factory=list)

    def admit(self, connection: TLSProtocol) -> bool:
        if self.admitted - self.released >= self.capacity:
            return False
        self.admitted += 1
        return True

    def release(self, connection: TLSProtocol) -> None:
        self.released += 1

    def protocol(self) -> App:
        app = App()
        self.apps.append(app)
        return app

    @property
    def failures(self) -> float:
        return float(self.metrics.tls_handshake_failures._value.get())


# ---- a connection: the protocol, its TCP side, and a TLS client -------------------------------


def socket_read(tls: TLSProtocol, data: bytes) -> None:
    """A read of ``data`` as the event loop makes it: into the protocol's buffer, then
    ``buffer_updated`` (in several reads beyond the buffer's size). Then the bytes read are
    overwritten, as the next read of any connection sharing the buffer would: whatever kept
    a view of them rather than a copy now holds other bytes, and its test fails."""
    while data:
        buffer = tls.get_buffer(-1)
        size = min(len(buffer), len(data))
        buffer[:size] = data[:size]
        tls.buffer_updated(size)
        buffer[:size] = b"\xaa" * size
        data = data[size:]


class Conn:
    def __init__(self, listener: Listener, client_ctx: ssl.SSLContext) -> None:
        self.clock = Clock()
        self.tcp = TCP()
        self.listener = listener
        self.tls = TLSProtocol(listener, self.clock)  # type: ignore[arg-type]
        self.tls.connection_made(self.tcp)  # type: ignore[arg-type]
        self.c_in, self.c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = client_ctx.wrap_bio(self.c_in, self.c_out, server_hostname="localhost")

    @property
    def app(self) -> App:
        return self.listener.apps[-1]

    def to_server(self) -> None:
        data = self.c_out.read()
        if data:
            socket_read(self.tls, data)

    def to_client(self) -> None:
        self.c_in.write(self.tcp.take())

    def handshake(self) -> None:
        """Drive the handshake both ways until the client is done (or refused)."""
        for _ in range(10):
            try:
                self.client.do_handshake()
            except ssl.SSLWantReadError:
                pass
            else:
                self.to_server()
                return
            self.to_server()
            self.to_client()
        raise AssertionError("the handshake did not end")

    def send(self, data: bytes) -> None:
        self.client.write(data)
        self.to_server()

    def receive(self) -> bytes:
        """Everything the server sent that decrypts now (the client's view)."""
        self.to_client()
        data = b""
        while True:
            try:
                chunk = self.client.read(65536)
            except ssl.SSLWantReadError:
                return data
            if not chunk:
                return data
            data += chunk


@pytest.fixture
def tls_files(tmp_path: Path, certs: Certs) -> TLSConfig:
    certs.pki.server.write(tmp_path, "server")
    pki = certs.pki
    (tmp_path / "client-ca.pem").write_bytes(pki.client_root.pem + pki.client_intermediate.pem)
    return TLSConfig(
        certificate=tmp_path / "server.pem",
        key=tmp_path / "server.key",
        client_ca=(tmp_path / "client-ca.pem",),
    )


def state(config: TLSConfig, **changes: Any) -> TLSState:
    return TLSState(*server_context(config.model_copy(update=changes)))


def client_ctx(
    certs: Certs, who: Issued | None = None, *, tmp: Path | None = None
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=certs.pki.server_ca.pem.decode())
    if who is not None:
        assert tmp is not None
        cert, key = who.write(tmp, "client")
        ctx.load_cert_chain(cert, key)
    return ctx


@pytest.fixture
def listener(tls_files: TLSConfig) -> Listener:
    return Listener(state(tls_files))


@pytest.fixture
def conn(listener: Listener, certs: Certs, tmp_path: Path) -> Conn:
    return Conn(listener, client_ctx(certs, certs.alice, tmp=tmp_path))


@pytest.fixture
def opened(conn: Conn) -> Conn:
    conn.handshake()
    assert conn.app.events == ["made"]
    return conn


# ---- the handshake -------------------------------------------------------------------------


def test_handshake_hands_the_connection_to_the_http_protocol(opened: Conn, certs: Certs) -> None:
    transport = opened.app.transport
    assert transport is not None
    ssl_obj = transport.get_extra_info("ssl_object")
    assert isinstance(ssl_obj, ssl.SSLObject)
    assert ssl_obj.getpeercert(binary_form=True) == certs.alice.der
    assert transport.get_extra_info("sslcontext") is opened.listener.tls.current
    assert transport.get_extra_info("peercert")["subject"]
    assert transport.get_extra_info("cipher")[1] == "TLSv1.3"
    assert transport.get_extra_info("compression") is None
    assert transport.get_extra_info("peername") == ("192.0.2.7", 50000)
    assert transport.get_extra_info("socket") == "the socket"
    assert transport.get_extra_info("nothing", 7) == 7
    assert not transport.is_closing() and transport.is_reading()
    assert transport.get_protocol() is opened.app
    assert opened.clock.pending_timers == 0, "the handshake deadline is cancelled"
    assert opened.tcp.limits == (512 * 1024, 128 * 1024), "asyncio's TLS water marks"
    assert opened.listener.failures == 0


def test_the_servername_callback_sees_the_connection_s_ssl_object(
    tls_files: TLSConfig, certs: Certs, tmp_path: Path
) -> None:
    seen: list[tuple[ssl.SSLObject, str | None]] = []

    class Recording(TLSState):
        def _select(self, ssl_obj: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
            seen.append((ssl_obj, name))

    listener = Listener(Recording(*server_context(tls_files)))
    conn = Conn(listener, client_ctx(certs, certs.alice, tmp=tmp_path))
    conn.handshake()
    assert conn.app.transport is not None
    assert seen == [(conn.app.transport.get_extra_info("ssl_object"), "localhost")]


def test_session_tickets_are_sent_with_the_end_of_the_handshake(opened: Conn) -> None:
    opened.receive()  # TLS 1.3: the tickets come after the handshake, with nothing asked
    assert opened.client.session is not None and opened.client.session.has_ticket


def test_request_sent_with_the_client_finished_reaches_the_application(conn: Conn) -> None:
    for _ in range(10):
        try:
            conn.client.do_handshake()
            break
        except ssl.SSLWantReadError:
            conn.to_server()
            conn.to_client()
    conn.client.write(b"GET / HTTP/1.1\r\n\r\n")
    conn.to_server()  # Finished and the request in one read
    assert conn.app.events == ["made", "data 18"]
    assert conn.app.data == b"GET / HTTP/1.1\r\n\r\n"


def test_refused_handshake_ends_with_openssl_s_alert(tls_files: TLSConfig, certs: Certs) -> None:
    listener = Listener(state(tls_files, client_certificate="required"))
    conn = Conn(listener, client_ctx(certs))  # no certificate
    conn.handshake()  # TLS 1.3: the client is done before the server judges it
    with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
        conn.receive()
    assert conn.tcp.eof_written and not conn.tcp.aborted
    assert listener.apps == []
    assert listener.failures == 1
    conn.tls.connection_lost(None)
    assert listener.failures == 1, "counted once"
    assert listener.admitted == listener.released == 1


def test_untrusted_certificate_gets_unknown_ca(
    listener: Listener, certs: Certs, tmp_path: Path
) -> None:
    stranger = make_leaf(make_ca("Stranger CA"), "stranger")
    conn = Conn(listener, client_ctx(certs, stranger, tmp=tmp_path))
    conn.handshake()
    with pytest.raises(ssl.SSLError, match="UNKNOWN_CA"):
        conn.receive()
    assert listener.failures == 1 and listener.apps == []


def test_not_tls_at_all_is_refused_and_counted(listener: Listener, conn: Conn) -> None:
    socket_read(conn.tls, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert conn.tcp.eof_written
    assert listener.failures == 1 and listener.apps == []


def send_client_hello(conn: Conn) -> None:
    with contextlib.suppress(ssl.SSLWantReadError):
        conn.client.do_handshake()
    conn.to_server()


def test_handshake_deadline(listener: Listener, conn: Conn) -> None:
    # (a connection that sends nothing has the shorter client_hello_timeout: below)
    send_client_hello(conn)
    assert conn.tcp.written, "the server answered the ClientHello"
    conn.clock.advance(listener.limits.handshake_timeout - 1)
    assert conn.tcp.end() == ""
    conn.clock.advance(1)
    assert conn.tcp.end() == "aborted"
    assert listener.failures == 1
    conn.tls.connection_lost(None)
    assert listener.failures == 1
    assert listener.released == 1


def test_client_hello_deadline(listener: Listener, conn: Conn) -> None:
    """A connection that has not sent its ClientHello is closed after client_hello_timeout,
    and counted as a failed handshake."""
    assert listener.limits.client_hello_timeout < listener.limits.handshake_timeout
    conn.clock.advance(listener.limits.client_hello_timeout - 1)
    assert conn.tcp.end() == ""
    conn.clock.advance(1)
    assert conn.tcp.end() == "aborted"
    assert listener.failures == 1


def test_a_client_hello_in_pieces_is_due_whole_within_client_hello_timeout(
    listener: Listener, conn: Conn
) -> None:
    with contextlib.suppress(ssl.SSLWantReadError):
        conn.client.do_handshake()
    hello = conn.c_out.read()
    socket_read(conn.tls, hello[:10])  # a few bytes, then nothing
    assert not conn.tcp.written
    conn.clock.advance(listener.limits.client_hello_timeout)
    assert conn.tcp.end() == "aborted"


def test_the_hello_deadline_is_never_later_than_the_handshake_deadline(
    tls_files: TLSConfig, certs: Certs
) -> None:
    listener = Listener(
        state(tls_files), limits=LimitsConfig(handshake_timeout=3, client_hello_timeout=10)
    )
    conn = Conn(listener, client_ctx(certs))
    conn.clock.advance(3)
    assert conn.tcp.end() == "aborted"


@pytest.mark.parametrize("how", ["eof", "lost"])
def test_abandoned_handshake_is_counted_once(listener: Listener, conn: Conn, how: str) -> None:
    socket_read(conn.tls, conn.c_out.read() or b"")  # nothing yet: the client has not started
    if how == "eof":
        assert conn.tls.eof_received() is False
    conn.tls.connection_lost(None)
    assert listener.failures == 1
    assert conn.clock.pending_timers == 0


def test_connection_refused_at_accept(listener: Listener) -> None:
    listener.capacity = 0
    tcp = TCP()
    tls = TLSProtocol(listener, Clock())  # type: ignore[arg-type]
    tls.connection_made(tcp)  # type: ignore[arg-type]
    assert tcp.aborted
    socket_read(tls, b"\x16\x03\x01")
    tls.connection_lost(None)
    assert (listener.admitted, listener.released, listener.failures) == (0, 0, 0)


def test_aborted_during_the_handshake_by_us_is_not_a_failure(
    listener: Listener, conn: Conn
) -> None:
    assert conn.tls.handshaking
    conn.tls.abort()
    assert conn.tcp.aborted
    conn.tls.connection_lost(None)
    assert listener.failures == 0 and listener.released == 1


# ---- reading and writing ----------------------------------------------------------------------


def test_records_both_ways(opened: Conn) -> None:
    opened.send(b"one")
    opened.send(b"two")
    assert opened.app.data == b"onetwo"
    transport = opened.app.transport
    assert transport is not None
    transport.write(b"answer ")
    transport.writelines([b"in ", b"parts"])
    transport.write(b"")
    assert opened.receive() == b"answer in parts"


def test_all_that_one_read_decrypts_is_one_data_received(opened: Conn) -> None:
    for piece in (b"a" * 20000, b"b" * 20000, b"c"):  # more than one record each
        opened.client.write(piece)
    opened.to_server()
    assert opened.app.events[1:] == ["data 40001"]


def test_record_split_across_reads(opened: Conn) -> None:
    opened.client.write(b"split record")
    data = opened.c_out.read()
    socket_read(opened.tls, data[:7])
    assert opened.app.data == b""
    socket_read(opened.tls, data[7:])
    assert opened.app.data == b"split record"


def test_pause_reading_stops_the_socket_and_the_deliveries(opened: Conn) -> None:
    transport = opened.app.transport
    assert transport is not None
    transport.pause_reading()
    assert not opened.tcp.is_reading() and not transport.is_reading()
    opened.send(b"arrived while paused")  # already on its way when reading stopped
    assert opened.app.data == b""
    transport.resume_reading()
    assert opened.tcp.is_reading()
    assert opened.app.data == b""  # not from inside resume_reading
    opened.clock.run_soon()
    assert opened.app.data == b"arrived while paused"


def test_flow_control_follows_the_tcp_transport(opened: Conn) -> None:
    transport = opened.app.transport
    assert transport is not None
    opened.tcp.buffered = 70000
    assert transport.get_write_buffer_size() == 70000
    opened.tls.pause_writing()
    opened.tls.resume_writing()
    assert opened.app.events == ["made", "pause", "resume"]
    transport.set_write_buffer_limits(high=1000)
    assert opened.tcp.limits == (1000, None)
    assert transport.get_write_buffer_limits() == (16384, 65536)


def test_paused_while_the_handshake_ran_is_told_once_connected(conn: Conn) -> None:
    conn.tls.pause_writing()  # the client takes nothing of the server's flight
    conn.handshake()
    assert conn.app.events == ["made", "pause"]
    conn.tls.resume_writing()
    assert conn.app.events == ["made", "pause", "resume"]


def test_hand_over_while_writing_is_paused(opened: Conn) -> None:
    first = opened.app
    transport = first.transport
    assert transport is not None
    opened.tls.pause_writing()
    second = App()
    transport.set_protocol(second)
    second.connection_made(transport)  # as listener._hand_off does
    assert transport.get_protocol() is second
    opened.clock.run_soon()
    assert second.events == ["made", "pause"], "told once connected, never resumed first"
    opened.tls.resume_writing()
    assert second.events == ["made", "pause", "resume"]
    assert first.events == ["made", "pause"]
    opened.send(b"to the new one")
    assert second.data == b"to the new one"


# ---- closing ------------------------------------------------------------------------------------


def test_close_sends_close_notify_then_lingers(opened: Conn) -> None:
    transport = opened.app.transport
    assert transport is not None
    transport.write(b"last answer")
    transport.close()
    assert transport.is_closing()
    transport.write(b"dropped")
    assert opened.receive() == b"last answer"  # then the close_notify: end of data
    assert opened.tcp.end() == "eof"
    opened.send(b"the client was still sending")
    assert opened.app.data == b"", "dropped while closing"
    opened.clock.advance(_LINGER)
    assert opened.tcp.end() == "closed"
    opened.tls.connection_lost(None)
    assert opened.app.events == ["made", "lost"]
    assert opened.app.lost == [None]
    assert opened.listener.released == 1


def test_a_client_that_takes_nothing_is_cut_off_after_the_shutdown_timeout(opened: Conn) -> None:
    transport = opened.app.transport
    assert transport is not None
    opened.tcp.buffered = 1 << 20
    transport.close()
    opened.clock.advance(_SHUTDOWN_TIMEOUT - _LINGER)
    assert opened.tcp.end() == "eof"
    opened.clock.advance(_LINGER)
    assert opened.tcp.end() == "aborted"


def test_close_notify_from_the_client_is_an_end_of_file(opened: Conn) -> None:
    opened.send(b"last request")
    with pytest.raises(ssl.SSLWantReadError):
        opened.client.unwrap()
    opened.to_server()
    assert opened.app.events == ["made", "data 12", "eof"]
    opened.to_client()
    opened.client.unwrap()  # completes: our close_notify came back
    assert opened.tcp.eof_written


def test_tcp_eof_without_close_notify_is_an_end_of_file(opened: Conn) -> None:
    assert opened.tls.eof_received() is False
    assert opened.app.events == ["made", "eof"]
    assert opened.app.transport is not None and opened.app.transport.is_closing()


def test_abort(opened: Conn) -> None:
    transport = opened.app.transport
    assert transport is not None
    transport.abort()
    assert opened.tcp.aborted and transport.is_closing()
    opened.tls.connection_lost(None)
    assert opened.app.lost == [None]


def test_a_record_that_fails_to_decrypt_ends_the_connection(opened: Conn) -> None:
    opened.client.write(b"tampered")
    record = bytearray(opened.c_out.read())
    record[-1] ^= 1
    socket_read(opened.tls, bytes(record))
    assert opened.app.data == b""
    assert opened.tcp.eof_written
    with pytest.raises(ssl.SSLError, match="BAD_RECORD_MAC"):
        opened.receive()
    opened.tls.connection_lost(None)
    assert isinstance(opened.app.lost[0], ssl.SSLError)


def test_closing_inside_connection_made(tls_files: TLSConfig, certs: Certs, tmp_path: Path) -> None:
    listener = Listener(state(tls_files))

    def protocol() -> App:
        app = App(on_made=lambda transport: transport.close())
        listener.apps.append(app)
        return app

    listener.protocol = protocol  # type: ignore[method-assign]
    conn = Conn(listener, client_ctx(certs, certs.alice, tmp=tmp_path))
    conn.handshake()
    assert conn.tcp.eof_written
    assert conn.app.events == ["made"]


# ---- many records in one read (tls_records) -----------------------------------------------------

#: both readers: the C one (the compiled build's) and one call per record
READERS = ["native", "python"]


@pytest.fixture(params=READERS)
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "native":
        if tls_records.reader() is None:
            pytest.skip("the C reader is built with the compiled build only")
        monkeypatch.setattr(tls_transport, "_RECORDS", tls_records.reader())
    else:
        monkeypatch.setattr(tls_transport, "_RECORDS", None)
    return str(request.param)


def test_the_compiled_build_reads_many_records_in_one_call() -> None:
    from sidecar import BUILD

    assert (tls_records.reader() is not None) == BUILD.compiled
    assert (tls_transport._RECORDS is not None) == BUILD.compiled


def test_many_records_then_close_notify_in_one_read(opened: Conn, reader: str) -> None:
    sent = bytes(range(256)) * 300  # five records
    opened.client.write(sent)
    with pytest.raises(ssl.SSLWantReadError):
        opened.client.unwrap()
    opened.to_server()
    assert opened.app.events == ["made", f"data {len(sent)}", "eof"]
    assert opened.app.data == sent
    opened.to_client()
    opened.client.unwrap()  # our close_notify came back
    assert opened.tcp.eof_written


def test_a_tampered_record_among_many_ends_the_connection_with_openssl_s_alert(
    opened: Conn, reader: str
) -> None:
    opened.client.write(b"x" * 40000)  # three records: the last one is changed
    records = bytearray(opened.c_out.read())
    records[-1] ^= 1
    socket_read(opened.tls, bytes(records))
    assert opened.app.data == b"", "nothing of a read that failed is delivered"
    assert opened.tcp.eof_written
    with pytest.raises(ssl.SSLError, match="BAD_RECORD_MAC"):
        opened.receive()
    socket_read(opened.tls, bytes(records))  # whatever follows is dropped
    assert opened.app.data == b""
    opened.tls.connection_lost(None)
    lost = opened.app.lost[0]
    assert isinstance(lost, ssl.SSLError) and "BAD_RECORD_MAC" in str(lost)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pieces=st.lists(st.integers(min_value=1, max_value=40000), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=400000), max_size=6),
    close=st.booleans(),
)
def test_whatever_the_reads_the_application_gets_exactly_what_was_sent(
    tls_files: TLSConfig,
    certs: Certs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pieces: list[int],
    cuts: list[int],
    close: bool,
) -> None:
    """The records of a stream of writes, cut anywhere into reads: the application gets
    every byte once, in order, with either reader, and the end of input only at the end."""
    for which in READERS:
        records = tls_records.reader() if which == "native" else None
        if which == "native" and records is None:
            continue
        monkeypatch.setattr(tls_transport, "_RECORDS", records)
        conn = Conn(Listener(state(tls_files)), client_ctx(certs, certs.alice, tmp=tmp_path))
        conn.handshake()
        sent = b"".join(bytes([n % 251]) * n for n in pieces)
        for n in pieces:
            conn.client.write(bytes([n % 251]) * n)
        if close:
            with pytest.raises(ssl.SSLWantReadError):
                conn.client.unwrap()
        wire = conn.c_out.read()
        at = 0
        for cut in [*sorted({c % (len(wire) + 1) for c in cuts}), len(wire)]:
            if cut > at:
                socket_read(conn.tls, wire[at:cut])
                at = cut
        assert bytes(conn.app.data) == sent, which
        assert conn.app.events[-1] == ("eof" if close else f"data {conn.app.events[-1][5:]}")
        assert conn.app.events.count("eof") == (1 if close else 0)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.tuples(st.integers(1, 90000), st.integers(1, 90000)),
    cuts=st.tuples(
        st.lists(st.integers(0, 200000), max_size=5), st.lists(st.integers(0, 200000), max_size=5)
    ),
    turns=st.lists(st.booleans(), max_size=12),
)
def test_connections_reading_into_one_buffer_each_get_their_own_bytes(
    tls_files: TLSConfig,
    certs: Certs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    sizes: tuple[int, int],
    cuts: tuple[list[int], list[int]],
    turns: list[bool],
) -> None:
    """Two connections of one listener read into the same buffer, their reads interleaved
    and cut anywhere, records split across them: each application gets exactly what its own
    client sent. A view of the buffer kept past its read would hold the other connection's
    bytes (or ``socket_read``'s filler) by the time it is used."""
    for which in READERS:
        records = tls_records.reader() if which == "native" else None
        if which == "native" and records is None:
            continue
        monkeypatch.setattr(tls_transport, "_RECORDS", records)
        listener = Listener(state(tls_files))
        conns = [Conn(listener, client_ctx(certs, certs.alice, tmp=tmp_path)) for _ in range(2)]
        assert conns[0].tls.get_buffer(-1) is conns[1].tls.get_buffer(-1)
        reads: list[list[bytes]] = []
        sent: list[bytes] = []
        apps: list[App] = []
        for index, conn in enumerate(conns):
            conn.handshake()
            apps.append(listener.apps[-1])  # its own (``Conn.app`` is the listener's last)
            data = bytes((index * 101 + n) % 251 for n in range(sizes[index]))
            conn.client.write(data)
            sent.append(data)
            wire = conn.c_out.read()
            bounds = [0, *sorted({c % (len(wire) + 1) for c in cuts[index]}), len(wire)]
            reads.append([wire[a:b] for a, b in itertools.pairwise(bounds) if b > a])
        for turn in [*turns, *[False] * len(reads[0]), *[True] * len(reads[1])]:
            queue = reads[1 if turn else 0]
            if queue:
                socket_read(conns[1 if turn else 0].tls, queue.pop(0))
        for app, data in zip(apps, sent, strict=True):
            assert bytes(app.data) == data, which
            assert b"".join(app.received) == data, which  # what it was given is still that


def test_plain_reads_reach_the_application_as_bytes_of_their_own(tls_files: TLSConfig) -> None:
    """``listen.tls: false``: each read is handed on as it is, a copy of the read buffer,
    which the next read overwrites."""
    listener = Listener(state(tls_files), plain=True)
    tls = TLSProtocol(listener, Clock())  # type: ignore[arg-type]
    tls.connection_made(TCP())  # type: ignore[arg-type]
    socket_read(tls, b"GET / HTTP/1.1\r\n")
    socket_read(tls, b"Host: x\r\n\r\n")
    assert listener.apps[-1].received == [b"GET / HTTP/1.1\r\n", b"Host: x\r\n\r\n"]


def test_the_c_reader_takes_only_an_ssl_object_over_memory_of_its_context(
    opened: Conn,
) -> None:
    if tls_records.reader() is None:
        pytest.skip("the C reader is built with the compiled build only")
    from sidecar import _records_c  # type: ignore[attr-defined]

    inner = opened.tls._sslobj._sslobj  # type: ignore[union-attr]
    with pytest.raises(TypeError):
        _records_c.read(object(), inner.context, 100)
    with pytest.raises(ValueError, match="of that context"):
        _records_c.read(inner, ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), 100)
    with pytest.raises(ValueError, match="positive"):
        _records_c.read(inner, inner.context, 0)
    import socket

    with socket.socket() as plain:  # an SSLSocket's _SSLSocket has its socket: refused
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        over_socket = context._wrap_socket(plain, False, "x")  # type: ignore[attr-defined]
        with pytest.raises(ValueError, match="over memory"):
            _records_c.read(over_socket, context, 100)
    opened.client.write(b"y" * 50000)
    opened.tls._incoming.write(opened.c_out.read())
    assert _releases_buffers(inner)
    got, how = _records_c.read(inner, inner.context, 20000)  # less than there is
    assert (got, how) == (b"y" * 20000, tls_records.FULL)
    assert _releases_buffers(inner), "the mode is set back after the read"
    got, how = _records_c.read(inner, inner.context, 100000)
    assert (got, how) == (b"y" * 30000, tls_records.WANT)
    assert _releases_buffers(inner)


def _releases_buffers(inner: object) -> bool:
    """Whether the SSL of an ``_ssl._SSLSocket`` has ``SSL_MODE_RELEASE_BUFFERS`` (CPython
    sets it; the C reader clears it for the records of one call only)."""
    import ctypes

    from sidecar.tls_groups import function, ssl_library

    pointer = ctypes.c_void_p
    ctrl = function(
        ssl_library(), "SSL_ctrl", ctypes.c_long, pointer, ctypes.c_int, ctypes.c_long, pointer
    )
    ssl_at = id(inner) + object.__basicsize__ + ctypes.sizeof(pointer)  # after the socket's weakref
    return bool(ctrl(ctypes.c_void_p.from_address(ssl_at).value, 33, 0, None) & 0x10)


def test_many_records_read_while_paused_wait_in_the_bio(opened: Conn, reader: str) -> None:
    transport = opened.app.transport
    assert transport is not None
    transport.pause_reading()
    opened.send(b"z" * 70000)  # read before the socket stopped: kept, not delivered
    assert opened.app.data == b""
    transport.resume_reading()
    opened.clock.run_soon()
    assert opened.app.data == b"z" * 70000


def test_an_ssl_object_the_c_reader_refuses_is_read_record_by_record(
    opened: Conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the connection's object is not CPython's ``_ssl._SSLSocket`` (here the
    ``ssl.SSLObject`` wrapper itself), the C reader raises before reading anything and
    the records are read one by one: all of them arrive."""
    native = tls_records.reader()
    if native is None:
        pytest.skip("the C reader is built with the compiled build only")
    asked: list[object] = []

    def counted(raw: object, context: object, limit: int) -> tuple[bytes, int]:
        asked.append(raw)
        return native(raw, context, limit)

    monkeypatch.setattr(tls_transport, "_RECORDS", counted)
    opened.tls._raw = opened.tls._sslobj
    opened.send(b"w" * 70000)
    assert asked == [opened.tls._sslobj], "the C reader was asked first, and refused"
    assert opened.app.data == b"w" * 70000


class CountedBIO:
    """The connection's incoming BIO, counting what is written into it."""

    def __init__(self, bio: ssl.MemoryBIO) -> None:
        self.bio = bio
        self.written: list[int] = []

    @property
    def pending(self) -> int:
        return self.bio.pending

    def write(self, data: bytes) -> int:
        self.written.append(len(data))
        return self.bio.write(data)

    def write_eof(self) -> None:
        self.bio.write_eof()


def test_a_large_read_is_decrypted_where_it_is_not_copied_into_the_bio(
    opened: Conn, reader: str
) -> None:
    counted = CountedBIO(opened.tls._incoming)
    opened.tls._incoming = counted  # type: ignore[assignment]
    opened.send(b"q" * 100000)
    opened.send(b"r" * 10)  # one small record: into the BIO, as ever
    assert opened.app.data == b"q" * 100000 + b"r" * 10
    if reader == "native":
        assert len(counted.written) == 1 and counted.written[0] < 100
    else:
        assert len(counted.written) == 2 and counted.written[0] > 100000
    assert counted.pending == 0


def test_the_c_reader_given_data_leaves_what_it_did_not_read_in_the_bio(opened: Conn) -> None:
    if tls_records.reader() is None:
        pytest.skip("the C reader is built with the compiled build only")
    from sidecar import _records_c  # type: ignore[attr-defined]

    inner = opened.tls._sslobj._sslobj  # type: ignore[union-attr]
    incoming = opened.tls._incoming
    opened.client.write(b"a" * 50000)
    wire = opened.c_out.read()
    got, how = _records_c.read(inner, inner.context, 20000, wire)  # less than there is
    assert (got, how) == (b"a" * 20000, tls_records.FULL)
    assert 0 < incoming.pending < len(wire), "the records not read wait in the BIO"
    got, how = _records_c.read(inner, inner.context, 100000)
    assert (got, how) == (b"a" * 30000, tls_records.WANT)
    assert incoming.pending == 0
    # a record cut in two: its first part is kept by OpenSSL, nothing is left in the BIO
    opened.client.write(b"b" * 30000)
    wire = opened.c_out.read()
    got, how = _records_c.read(inner, inner.context, 100000, wire[:20000])
    assert (got, how, incoming.pending) == (b"b" * 16384, tls_records.WANT, 0)
    assert _releases_buffers(inner)  # and the record begun was kept (released only when whole)
    got, how = _records_c.read(inner, inner.context, 100000, wire[20000:])
    assert (got, how, incoming.pending) == (b"b" * 13616, tls_records.WANT, 0)
    # with bytes in the BIO it refuses, and nothing is taken
    incoming.write(b"\x17")
    with pytest.raises(ValueError, match="not empty"):
        _records_c.read(inner, inner.context, 100000, b"\x17\x03\x03")
    assert incoming.pending == 1


def test_reads_of_data_leave_no_bio_behind_and_the_incoming_one_lives_as_long_as_the_ssl(
    tls_files: TLSConfig, certs: Certs, tmp_path: Path
) -> None:
    """Reads of data free the read-only BIO of each (glibc's count of what is allocated: one
    kept per read grows it by about 7 MiB here), keep no reference to the incoming BIO of their
    own (OpenSSL frees it with the SSL), and drop none (it outlives its Python object)."""
    if tls_records.reader() is None:
        pytest.skip("the C reader is built with the compiled build only")
    import ctypes
    import gc

    from sidecar import _records_c  # type: ignore[attr-defined]
    from sidecar.tls_groups import function, ssl_library

    conn = Conn(Listener(state(tls_files)), client_ctx(certs, certs.alice, tmp=tmp_path))
    conn.handshake()
    inner = conn.tls._sslobj._sslobj  # type: ignore[union-attr]
    libc = ctypes.CDLL(None)

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in (
                *("arena", "ordblks", "smblks", "hblks", "hblkhd"),
                *("usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"),
            )
        ]

    def allocated() -> int:
        if not hasattr(libc, "mallinfo2"):
            return 0  # not glibc: the count is not checked
        libc.mallinfo2.restype = MallInfo2
        info = libc.mallinfo2()
        return int(info.uordblks + info.hblkhd)

    def read(conn: Conn, inner: Any, n: int) -> None:
        conn.client.write(b"%d" % n)
        got, how = _records_c.read(inner, inner.context, 1000, conn.c_out.read())
        assert (got, how) == (b"%d" % n, tls_records.WANT)

    read(conn, inner, 0)
    before = allocated()
    for n in range(30000):
        read(conn, inner, n)
    assert allocated() - before < 1 << 20, "no BIO is left behind per read"

    # the incoming BIO: told when OpenSSL frees it
    incoming = conn.tls._incoming
    address = ctypes.c_void_p.from_address(id(incoming) + object.__basicsize__).value
    freed: list[int] = []
    bio_cb = ctypes.CFUNCTYPE(
        ctypes.c_long,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_long,
        ctypes.c_int,
        ctypes.c_void_p,
    )

    def on_bio(
        bio: int, oper: int, argp: int, size: int, argi: int, argl: int, ret: int, done: int
    ) -> int:
        if oper == 0x01:  # BIO_CB_FREE
            freed.append(bio)
        return ret  # what OpenSSL asked: the operation goes on as it would

    callback = bio_cb(on_bio)
    set_callback = function(ssl_library(), "BIO_set_callback_ex", None, ctypes.c_void_p, bio_cb)
    set_callback(address, callback)
    conn.tls._incoming = ssl.MemoryBIO()
    del incoming
    gc.collect()
    assert freed == [], "the SSL still holds the incoming BIO"
    read(conn, inner, 1)  # and reads through it
    del inner, conn
    gc.collect()
    assert freed == [address], "freed with the SSL: no reference of the reads' own is left"
    del callback


@pytest.mark.parametrize(
    ("version", "safe"),
    [
        (0x30000130, True),  # 3.0.19
        (0x300000E0, True),  # 3.0.14: the fix of CVE-2024-4741
        (0x300000D0, False),  # 3.0.13
        (0x30100060, True),  # 3.1.6
        (0x30100050, False),  # 3.1.5
        (0x30200020, True),  # 3.2.2
        (0x30200010, False),  # 3.2.1
        (0x30300010, True),  # 3.3.1
        (0x30300000, False),  # 3.3.0
        (0x30400000, True),  # 3.4.0
        (0x40000000, True),
        (0x1010119F, False),  # 1.1.1y: fixed in paid support only, taken as unfixed
    ],
)
def test_the_read_buffer_is_released_only_where_openssl_keeps_a_record_begun(
    version: int, safe: bool
) -> None:
    """``SSL_free_buffers`` before 3.0.14 (3.1.6, 3.2.2, 3.3.1) freed a buffer whose record
    header was read and whose body was still to come (CVE-2024-4741); a client decides where
    its records are cut, so the C reader calls it only with a fixed OpenSSL."""
    assert tls_records.frees_buffers_safely(version) is safe
