"""Server-side TLS over an accepted TCP connection: the handshake, the records, the alerts, and
the transport the HTTP protocol above reads and writes through.

The listening socket is a plain TCP server; ``TLSProtocol`` is made for each accepted
connection and runs TLS itself over OpenSSL memory BIOs (``ssl.SSLObject``), as asyncio's
``sslproto`` does, but smaller: the server side only, and no buffer of its own.

- **Accept.** The listener admits the connection or refuses it at once (``Listener.admit``:
  ``limits.max_connections`` and ``max_connections_per_address`` count connections still in
  their handshake). The connection is
  wrapped with the context current at accept (``TLSState.current``) and keeps it for its whole
  life, session cache included; ticket keys are derived from trust (``tls_tickets``), so a
  session made before a trust change cannot be resumed after it. With several servers, the first bytes are held until the
  ClientHello says which server it asks for (``sni``), and the connection is wrapped with
  that server's context.
- **Handshake**, within ``limits.handshake_timeout``, and its first message, the ClientHello,
  within the shorter ``limits.client_hello_timeout``: a connection that sends nothing costs
  a slot for seconds, not a minute (a client that means it sends its ClientHello at once).
  Each handshake step (OpenSSL answering what the client sent) runs within the worker's
  handshake budget per turn of the event loop (``handshakes``, ``limits.handshake_budget``):
  beyond it, the step waits its turn, first come first served (and the connection is not
  read beyond ``_QUEUED_BYTES`` meanwhile), so that a burst of handshakes cannot hold up the
  connections already open.
  A handshake OpenSSL refuses is answered
  with the alert OpenSSL chose (certificate_required, unknown_ca, certificate_expired, ...),
  flushed before the connection is closed, so that browsers and scanners can say why. Each
  handshake that fails, times out or is abandoned is counted once, when it ends.
- **Reads.** The socket is read into one buffer that all the listener's connections share
  (``get_buffer``: a ``BufferedProtocol``), as OpenSSL reads its socket into its own buffer:
  the loop does not make a bytes object of each read. A read is done with before the next:
  what is decrypted at once is decrypted from it where it is (``tls_records``), anything
  else is copied where it is kept (the incoming BIO, the ClientHello's buffer, the PROXY
  header's).
- **Open.** The listener's HTTP protocol (``Listener.protocol``) gets a ``TLSTransport``:
  asyncio's transport interface over the TLS session. A write is encrypted and handed to the
  TCP transport at once, one TCP write per application write; the TCP transport's flow control
  is therefore the application's (``pause_writing`` above its high-water mark of encrypted bytes
  the socket has not taken: 512 KiB, and ``resume_writing`` below 128 KiB, as with asyncio's
  TLS transport). ``pause_reading`` stops reading from the socket. Everything one
  read decrypts reaches the application in one ``data_received``. A close_notify from the peer
  is an end of file; renegotiation is refused by the context (``OP_NO_RENEGOTIATION``).
- **Close.** ``close`` sends close_notify, then a FIN once everything before it is sent, and
  lingers: what the peer still sends is read and dropped until it closes too, for at most
  ``_LINGER`` after our last byte left, so that a client we stopped reading gets our last
  answer rather than a reset (nginx's lingering close). Whatever happens, the connection is
  gone ``_SHUTDOWN_TIMEOUT`` after ``close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
from typing import Any, Protocol, cast

from . import proxyproto, tls_records
from .config import LimitsConfig
from .handshakes import HandshakeScheduler
from .log import get_logger
from .metrics import Metrics
from .sni import ClientHelloReader
from .tls import TLSState

log = get_logger("sidecar.tls")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# what one SSL_read returns at most: one record's plaintext (RFC 8446 §5.1)
_READ_SIZE = 16384
#: how long a closing connection waits for the peer to close once our last byte is sent
_LINGER = 5.0
#: how long a closing connection may take in all (asyncio's ssl_shutdown_timeout)
_SHUTDOWN_TIMEOUT = 30.0
#: the TCP transport's write-buffer water marks once the connection is open: asyncio's and
#: uvloop's for their TLS transports, so the application sees the flow control it had with them
_HIGH_WATER = 512 * 1024
#: what a connection whose handshake step waits (``handshakes``) may receive meanwhile before
#: its socket is no longer read: more than any client's handshake flight
_QUEUED_BYTES = 64 * 1024
_LOW_WATER = _HIGH_WATER // 4
#: many records decrypted in one call (the compiled build), else None: one call per record
_RECORDS = tls_records.reader()

_HANDSHAKE = 0  # accepted; the handshake runs
_OPEN = 1  # the handshake succeeded; the application reads and writes
_CLOSING = 2  # our close_notify or alert is out (or the connection was aborted): lingering
_CLOSED = 3  # the TCP connection is gone


class Listener(Protocol):
    """What the accepted connections share (``listener.Listener``)."""

    tls: TLSState
    #: listen.tls is false: no TLS at all, the bytes pass as they are (behind a front proxy)
    plain: bool
    #: listen.proxy_protocol: the networks whose connections start with a PROXY protocol
    #: header (any other connection is closed at accept); None: no PROXY protocol
    proxy_from: tuple[IPNetwork, ...] | None
    #: the worker's handshake budget (``limits.handshake_budget``)
    handshakes: HandshakeScheduler
    #: what every connection's socket is read into (``TLSProtocol.get_buffer``): one buffer
    #: per listener, whose connections are all served by one loop in one thread
    read_buffer: memoryview

    @property
    def limits(self) -> LimitsConfig: ...

    @property
    def metrics(self) -> Metrics: ...

    def admit(self, connection: TLSProtocol) -> bool:
        """Count a new connection in, or refuse it (False: it is closed at once)."""

    def release(self, connection: TLSProtocol) -> None:
        """Count a connection that ``admit`` took out, once it is closed."""

    def protocol(self) -> asyncio.Protocol:
        """The HTTP protocol for a connection whose handshake succeeded."""


class TLSProtocol(asyncio.BufferedProtocol):
    """TLS on one accepted TCP connection (see the module's docstring)."""

    __slots__ = (
        "_admitted",
        "_app",
        "_app_writing_paused",
        "_awaiting_hello",
        "_buffer",
        "_close_by",
        "_error",
        "_handshake_due",
        "_hello",
        "_incoming",
        "_listener",
        "_loop",
        "_outgoing",
        "_peer",
        "_proxy",
        "_queue_paused",
        "_queued",
        "_raw",
        "_reading_paused",
        "_sslobj",
        "_state",
        "_tcp",
        "_timer",
        "_writing_paused",
    )

    def __init__(self, listener: Listener, loop: asyncio.AbstractEventLoop) -> None:
        self._listener = listener
        self._loop = loop
        #: where the TCP transport reads into: the listener's, which all its connections share
        self._buffer = listener.read_buffer
        self._state = _HANDSHAKE
        self._tcp: asyncio.Transport | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._sslobj: ssl.SSLObject | None = None
        #: the SSLObject's own ``_ssl._SSLSocket`` (``_wrap``): its read, write and pending
        #: without ssl.py's wrappers, each an interpreted call (about 1 µs of an S1 request)
        self._raw: Any = None
        self._app: asyncio.Protocol | None = None
        # the handshake deadline, then the lingering close's
        self._timer: asyncio.TimerHandle | None = None
        self._close_by = 0.0
        self._handshake_due = 0.0
        #: the ClientHello has not arrived whole yet (OpenSSL has not answered it)
        self._awaiting_hello = False
        self._admitted = False
        #: the next handshake step waits for the worker's handshake budget (``handshakes``)
        self._queued = False
        self._queue_paused = False  # ... and its socket is not read meanwhile
        self._reading_paused = False  # the application asked
        self._writing_paused = False  # the TCP transport said so
        self._app_writing_paused = False  # the application was told so
        self._error: Exception | None = None  # why the connection failed, for the application
        #: with several servers, the first bytes until they hold the ClientHello
        self._hello: ClientHelloReader | None = None
        #: with the PROXY protocol, the first bytes until they hold its header
        self._proxy: bytearray | None = None
        #: the client's address and port from the PROXY header (None: the TCP peer's)
        self._peer: tuple[str, int] | None = None

    @property
    def handshaking(self) -> bool:
        return self._state == _HANDSHAKE

    # ---- the TCP side (asyncio.Protocol) --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not registered as asyncio.Transport, so no isinstance check.
        tcp = cast(asyncio.Transport, transport)
        self._tcp = tcp
        listener = self._listener
        if not listener.admit(self):
            self._state = _CLOSED
            tcp.abort()
            return
        self._admitted = True
        self._handshake_due = self._loop.time() + listener.limits.handshake_timeout
        proxy_from = listener.proxy_from
        if proxy_from is not None:
            # The PROXY header comes before TLS: only the connection's address can vouch for
            # it, and guessing whether one is there is what the specification forbids.
            if not _within(tcp.get_extra_info("peername"), proxy_from):
                log.info("proxy_protocol_refused", client=self._client(), reason="untrusted peer")
                self._state = _CLOSING
                tcp.abort()
                return
            self._proxy = bytearray()
            self._timer = self._loop.call_later(listener.limits.handshake_timeout, self._on_timer)
            return
        self._begin(b"")

    def _begin(self, data: bytes) -> None:
        """TLS (or, plain, the application) takes the connection; ``data`` came first."""
        listener = self._listener
        if listener.plain:
            self._cancel_timer()
            if self._open() and data:
                app = self._app
                if app is not None:
                    app.data_received(data)
            return
        tls = listener.tls
        if tls.servers is None:  # policy: one server: its context now; else see _choose
            self._wrap(tls.current)
        else:
            self._hello = ClientHelloReader()
        if self._timer is None:  # after a PROXY header, its deadline stands for both
            limits = listener.limits
            loop = self._loop
            hello = limits.client_hello_timeout
            self._awaiting_hello = hello < limits.handshake_timeout
            self._timer = loop.call_later(
                hello if self._awaiting_hello else limits.handshake_timeout, self._on_timer
            )
        if data:
            self._received(memoryview(data))

    def client_address(self) -> str | None:
        """The client's IP address: the PROXY header's, else the socket peer's (None when
        the socket has none)."""
        tcp = self._tcp
        peer: Any = self._peer
        if peer is None:
            peer = tcp.get_extra_info("peername") if tcp is not None else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else None

    def _proxy_header(self, data: memoryview) -> None:
        """The PROXY protocol header, within ``limits.handshake_timeout`` (with the handshake)
        and ``proxyproto.MAX_LENGTH`` bytes; anything else closes the connection."""
        buffer = self._proxy
        assert buffer is not None
        buffer += data
        try:
            parsed = proxyproto.parse(bytes(buffer))
        except proxyproto.ProxyProtocolError as exc:
            log.info("proxy_protocol_refused", client=self._client(), reason=str(exc))
            self._state = _CLOSING
            self._cancel_timer()
            tcp = self._tcp
            if tcp is not None:
                tcp.abort()
            return
        if parsed is None:
            return
        self._proxy = None
        self._peer = parsed.header.client
        self._begin(parsed.rest)

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the TCP transport reads the socket into: the listener's read buffer, which
        every connection of its loop shares. Nothing keeps a view of it past
        ``buffer_updated``: what is kept is copied (into the incoming BIO, the ClientHello's
        or the PROXY header's buffer, or a bytes object)."""
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._received(self._buffer[:nbytes])

    def _received(self, data: memoryview) -> None:
        """A read of the socket: ``data`` is valid during this call only (``get_buffer``)."""
        state = self._state
        if state == _OPEN:
            if self._sslobj is None:  # plain
                app = self._app
                if app is not None:
                    app.data_received(bytes(data))
                return
            records = _RECORDS
            if (
                records is not None
                and not self._reading_paused
                and len(data) > _READ_SIZE
                and not self._incoming.pending
                and self._read_all(records, data)
            ):
                return  # decrypted where they are (tls_records)
            self._incoming.write(data)
            if not self._reading_paused:
                self._read()
        elif state == _HANDSHAKE:
            if self._proxy is not None:
                self._proxy_header(data)
                return
            if self._sslobj is not None:
                self._incoming.write(data)
            elif not self._choose(bytes(data)):  # policy: several servers
                return
            if not self._queued:
                self._listener.handshakes.step(self)
            elif self._incoming.pending > _QUEUED_BYTES and not self._queue_paused:
                # more than a handshake flight while its step waits: the rest stays in the
                # kernel (a step often waits a turn or two: pausing each would cost two
                # system calls for nothing)
                self._queue_paused = True
                tcp = self._tcp
                if tcp is not None:
                    tcp.pause_reading()
        # closing: what the peer still sends is dropped (see the module's docstring)

    def eof_received(self) -> bool:
        state = self._state
        if state == _HANDSHAKE:
            self._end_handshake("the client closed the connection during the handshake")
        elif state == _OPEN:
            # Without a close_notify first: an end of file all the same. HTTP's own framing
            # says where a request ends, so a truncation cannot make a shorter request.
            self._end_of_input()
        return False  # the TCP transport closes once what it holds is sent

    def connection_lost(self, exc: Exception | None) -> None:
        state = self._state
        if state == _HANDSHAKE:
            self._end_handshake("the connection was lost during the handshake")
        elif state == _OPEN and self._sslobj is not None:
            # Lost (a reset) before we closed: end the TLS as if we had. OpenSSL drops a
            # cached session when its connection is freed without our close_notify, and the
            # client's next connection would be a full handshake (``tls_tickets``). The
            # close_notify goes nowhere.
            with contextlib.suppress(ssl.SSLError):
                self._sslobj.unwrap()
        self._state = _CLOSED
        self._cancel_timer()
        if self._admitted:
            self._admitted = False
            self._listener.release(self)
        app, self._app = self._app, None
        if app is not None:
            app.connection_lost(exc if exc is not None else self._error)

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self._state == _OPEN:
            self._pause_app_writing()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._app_writing_paused:
            self._app_writing_paused = False
            app = self._app
            if app is not None:
                app.resume_writing()

    # ---- the handshake ------------------------------------------------------------------------

    def handshake_step(self) -> None:
        """Run the handshake on what has arrived (``handshakes``: now, or when its turn comes)."""
        self._queued = False
        if self._state == _HANDSHAKE:
            self._handshake()

    def handshake_deferred(self) -> None:
        """The step waits for the worker's handshake budget (the deadlines keep running);
        beyond ``_QUEUED_BYTES`` received meanwhile, the socket is not read."""
        self._queued = True
        self._listener.metrics.tls_handshakes_deferred.inc()

    def handshake_resumed(self) -> None:
        """Its turn: read again if reading was paused while it waited."""
        if not self._queue_paused:
            return
        self._queue_paused = False
        tcp = self._tcp
        if tcp is not None and self._state == _HANDSHAKE and not tcp.is_closing():
            tcp.resume_reading()

    def _handshake(self) -> None:
        sslobj = self._sslobj
        assert sslobj is not None
        try:
            sslobj.do_handshake()
        except ssl.SSLWantReadError:
            if self._awaiting_hello and self._outgoing.pending:
                self._hello_answered()
            self._flush()  # our part of the handshake
            return
        except ssl.SSLError as exc:
            # OpenSSL refused (no certificate, an untrusted one, no common version...): its
            # alert is in the outgoing BIO.
            self._end_handshake(_reason(exc))
            self._flush()
            self._linger()
            return
        self._established(sslobj)

    def _choose(self, data: bytes) -> bool:
        """With several servers: hold the first bytes until they hold the ClientHello, then
        make the connection with the context of the server it names (``sni``; the first
        server without SNI). False while more bytes are needed."""
        hello = self._hello
        assert hello is not None
        done, name = hello.feed(data)
        if not done:
            return False
        self._hello = None
        context = self._listener.tls.context_for(name)
        self._wrap(context)
        self._incoming.write(hello.data)
        return True

    def _wrap(self, context: ssl.SSLContext) -> None:
        sslobj = self._sslobj = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        # CPython's SSLObject forwards read, write and pending to it as they are; another
        # Python's may have none: the SSLObject then
        self._raw = getattr(sslobj, "_sslobj", sslobj)

    def _established(self, sslobj: ssl.SSLObject) -> None:
        metrics = self._listener.metrics
        if sslobj.session_reused:
            metrics.tls_handshakes_resumed.inc()
        else:
            metrics.tls_handshakes_full.inc()
        self._cancel_timer()
        self._flush()  # the last of the handshake and, in TLS 1.3, the session tickets
        if not self._open():
            return  # closed at once
        if not self._reading_paused and (self._incoming.pending or self._raw.pending()):
            self._read()  # the request that came with the client's last handshake message

    def _open(self) -> bool:
        """The application's protocol takes the connection; False if it closed it at once."""
        tcp = self._tcp
        assert tcp is not None
        tcp.set_write_buffer_limits(_HIGH_WATER, _LOW_WATER)
        self._state = _OPEN
        app = self._listener.protocol()
        self._app = app
        app.connection_made(TLSTransport(self))
        if self._state != _OPEN:
            return False
        if self._writing_paused:
            self._pause_app_writing()
        return True

    def _hello_answered(self) -> None:
        """OpenSSL answered the ClientHello: the rest of the handshake is due within
        ``handshake_timeout`` of the accept."""
        self._awaiting_hello = False
        self._cancel_timer()
        loop = self._loop
        self._timer = loop.call_later(max(0.0, self._handshake_due - loop.time()), self._on_timer)

    def _end_handshake(self, reason: str) -> None:
        """The handshake failed, timed out or was abandoned: counted here, once."""
        if self._state != _HANDSHAKE:
            return
        self._state = _CLOSING
        self._cancel_timer()
        self._listener.metrics.tls_handshake_failures.inc()
        log.debug("tls_handshake_failed", client=self._client(), reason=reason)

    def _on_timer(self) -> None:
        self._timer = None
        tcp = self._tcp
        assert tcp is not None
        state = self._state
        if state == _HANDSHAKE:
            if self._awaiting_hello:
                self._end_handshake("no ClientHello within limits.client_hello_timeout")
            else:
                self._end_handshake("not done within limits.handshake_timeout")
            tcp.abort()
        elif state == _CLOSING:
            if tcp.get_write_buffer_size() == 0:
                tcp.close()  # our last byte left _LINGER ago: lingered enough
            elif self._loop.time() >= self._close_by:
                tcp.abort()
            else:
                self._timer = self._loop.call_later(_LINGER, self._on_timer)

    # ---- records --------------------------------------------------------------------------------

    def _read(self) -> None:
        """Decrypt what the incoming BIO holds and give it to the application in one call."""
        sslobj = self._sslobj
        assert sslobj is not None
        incoming = self._incoming
        records = _RECORDS
        if records is not None and incoming.pending > _READ_SIZE and self._read_all(records):
            return  # more than one record: decrypted in one call (tls_records)
        raw = self._raw
        first = b""
        more: list[bytes] | None = None
        eof = False
        try:
            while True:
                chunk = raw.read(_READ_SIZE)
                if not chunk:
                    eof = True  # close_notify
                    break
                if not first:
                    first = chunk
                elif more is None:
                    more = [first, chunk]
                else:
                    more.append(chunk)
                if not incoming.pending and not raw.pending():
                    break
        except ssl.SSLWantReadError:
            pass  # the rest of a record is still to come
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        self._deliver(first if more is None else b"".join(more), eof)

    def _read_all(self, records: tls_records.Reader, data: memoryview | None = None) -> bool:
        """``_read`` with the C reader: every record into one bytes object; those of ``data``
        (a socket read, the incoming BIO being empty) without writing it into the BIO. False
        when it refused the connection's ``SSLObject`` (nothing was read: the caller reads)."""
        raw = self._raw
        incoming = self._incoming
        parts: list[bytes] = []
        while True:
            # at most: the records in the BIO and in data (each one's plaintext is shorter),
            # what OpenSSL decrypted and holds, and the record it has begun reading (16 KiB)
            limit = (0 if data is None else len(data)) + incoming.pending + raw.pending()
            limit += _READ_SIZE
            try:
                if data is not None:
                    got, how = records(raw, raw.context, limit, data)
                    data = None  # read, or (what the records left of it) in the incoming BIO
                else:
                    got, how = records(raw, raw.context, limit)
            except MemoryError:
                # what OpenSSL decrypted is gone with it: the stream cannot go on
                self._fail(ssl.SSLError("out of memory while reading TLS records"))
                return True
            except (TypeError, ValueError, RuntimeError):
                if parts:  # cannot happen: the same object was taken a moment ago
                    self._fail(ssl.SSLError("the TLS records could not be read"))
                    return True
                return False
            if how == tls_records.FAILED:
                # OpenSSL's error is still queued: Python's read raises it (and the alert
                # OpenSSL chose is in the outgoing BIO)
                try:
                    raw.read(_READ_SIZE)
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as exc:
                    self._fail(exc)
                    return True
                self._fail(ssl.SSLError("a TLS record could not be read"))
                return True
            if got:
                parts.append(got)
            if how != tls_records.FULL:
                break
        self._deliver(parts[0] if len(parts) == 1 else b"".join(parts), how == tls_records.CLOSED)
        return True

    def _deliver(self, data: bytes, eof: bool) -> None:
        """What a read decrypted, to the application; then the end of input, if it came."""
        if self._outgoing.pending:
            self._flush()  # what reading made OpenSSL send (an alert)
        app = self._app
        if data and app is not None:
            app.data_received(data)
        if eof and self._state == _OPEN:
            self._end_of_input()

    def _read_if_open(self) -> None:
        if self._state == _OPEN and not self._reading_paused:
            self._read()

    def _end_of_input(self) -> None:
        """The peer sends no more: the application is told, and the connection closes (over
        TLS a half-closed connection is not kept, as in asyncio)."""
        app = self._app
        if app is not None:
            app.eof_received()
        self._close()

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        if self._state != _OPEN or not data:
            return  # closing: dropped, as asyncio's transports drop writes after close
        sslobj = self._sslobj
        tcp = self._tcp
        assert tcp is not None
        if sslobj is None:  # plain
            tcp.write(data)
            return
        try:
            self._raw.write(data)  # a memory BIO takes all of it
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        tcp.write(self._outgoing.read())

    def _flush(self) -> None:
        outgoing = self._outgoing
        tcp = self._tcp
        if outgoing.pending and tcp is not None:
            tcp.write(outgoing.read())

    def _fail(self, exc: ssl.SSLError) -> None:
        """A TLS error on an open connection (a record that fails to decrypt, ...)."""
        if self._state != _OPEN:
            return
        self._state = _CLOSING
        self._error = exc
        log.debug("tls_connection_failed", client=self._client(), reason=_reason(exc))
        self._flush()  # OpenSSL's alert
        self._linger()

    # ---- closing --------------------------------------------------------------------------------

    def _close(self) -> None:
        if self._state != _OPEN:
            return
        self._state = _CLOSING
        sslobj = self._sslobj
        if sslobj is not None:
            # unwrap puts our close_notify in the outgoing BIO, then raises
            # SSLWantReadError: the peer's close_notify is not waited for.
            with contextlib.suppress(ssl.SSLError):
                sslobj.unwrap()
            self._flush()
        self._linger()

    def _linger(self) -> None:
        """FIN after what is buffered; then wait for the peer to close (``_on_timer``)."""
        tcp = self._tcp
        assert tcp is not None
        self._cancel_timer()
        if tcp.is_closing():
            return
        if not tcp.can_write_eof():
            tcp.close()
            return
        tcp.write_eof()
        loop = self._loop
        self._close_by = loop.time() + _SHUTDOWN_TIMEOUT
        self._timer = loop.call_later(_LINGER, self._on_timer)

    def abort(self) -> None:
        """Close at once, without a word (shutdown, a reload that changed trust)."""
        if self._state == _CLOSED:
            return
        self._state = _CLOSING  # not a failed handshake: aborted by us
        self._cancel_timer()
        tcp = self._tcp
        if tcp is not None:
            tcp.abort()

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    # ---- for the application's transport ------------------------------------------------------

    def _pause_app_writing(self) -> None:
        app = self._app
        if app is not None and not self._app_writing_paused:
            self._app_writing_paused = True
            app.pause_writing()

    def _repause(self) -> None:
        if self._writing_paused and self._state == _OPEN:
            self._pause_app_writing()

    def _set_protocol(self, protocol: asyncio.Protocol) -> None:
        self._app = protocol
        if self._app_writing_paused:
            # The new protocol was not told; it is told once it is connected (the caller
            # connects it right after this), so that resume_writing never comes first.
            self._app_writing_paused = False
            self._loop.call_soon(self._repause)

    def _pause_reading(self) -> None:
        if self._reading_paused:
            return
        self._reading_paused = True
        tcp = self._tcp
        if self._state == _OPEN and tcp is not None:
            tcp.pause_reading()

    def _resume_reading(self) -> None:
        if not self._reading_paused:
            return
        self._reading_paused = False
        tcp = self._tcp
        sslobj = self._sslobj
        if self._state != _OPEN or tcp is None:
            return
        tcp.resume_reading()
        if sslobj is not None and (self._incoming.pending or self._raw.pending()):
            self._loop.call_soon(self._read_if_open)

    def _extra(self, name: str, default: Any) -> Any:
        if name == "peername" and self._peer is not None:
            return self._peer  # the PROXY header's: the client behind the load balancer
        sslobj = self._sslobj
        if sslobj is not None:
            if name == "ssl_object":
                return sslobj
            if name == "sslcontext":
                return sslobj.context
            if name == "peercert":
                # None after a resumption from the workers' table: the certificate is in
                # the session's application data (tls_sessions.resumed_peer), not decoded
                return sslobj.getpeercert()
            if name == "cipher":
                return sslobj.cipher()
            if name == "compression":
                return sslobj.compression()
        tcp = self._tcp
        return tcp.get_extra_info(name, default) if tcp is not None else default

    def _client(self) -> str | None:
        return self.client_address()


def _within(peer: Any, networks: tuple[IPNetwork, ...]) -> bool:
    """Whether a socket's peer address lies in ``networks`` (IPv4-mapped IPv6 read as IPv4)."""
    if not isinstance(peer, tuple) or not peer:
        return False
    try:
        ip = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


def _reason(exc: ssl.SSLError) -> str:
    verify = getattr(exc, "verify_message", None)
    return str(verify or exc.reason or exc)


class TLSTransport(asyncio.Transport):
    """asyncio's transport interface over one TLS connection, for the HTTP protocol."""

    __slots__ = ("_tls",)

    def __init__(self, tls: TLSProtocol) -> None:
        self._tls = tls

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._tls._write(data)

    def writelines(self, list_of_data: Any) -> None:
        self._tls._write(b"".join(list_of_data))

    def write_eof(self) -> None:
        raise NotImplementedError("a TLS connection is not half-closed")

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        """close_notify, then close (see the module's docstring)."""
        self._tls._close()

    def abort(self) -> None:
        self._tls.abort()

    def is_closing(self) -> bool:
        return self._tls._state != _OPEN

    def pause_reading(self) -> None:
        self._tls._pause_reading()

    def resume_reading(self) -> None:
        self._tls._resume_reading()

    def is_reading(self) -> bool:
        tls = self._tls
        return tls._state == _OPEN and not tls._reading_paused

    def get_write_buffer_size(self) -> int:
        tcp = self._tls._tcp
        return tcp.get_write_buffer_size() if tcp is not None else 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        tcp = self._tls._tcp
        return tcp.get_write_buffer_limits() if tcp is not None else (0, 0)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        tcp = self._tls._tcp
        if tcp is not None:
            tcp.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._tls._extra(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._tls._set_protocol(cast(asyncio.Protocol, protocol))

    def get_protocol(self) -> asyncio.BaseProtocol:
        app = self._tls._app
        assert app is not None
        return app
