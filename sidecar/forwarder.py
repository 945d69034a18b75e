"""The forwarder: a request the gateway decided to forward goes to the upstream application,
and its answer comes back.

One way in: ``Forwarder.send`` starts a forward and returns it (``Forward``), pending. When the
request has no body, or all of it is here, and a pooled connection is idle, it is written at
once and ``notify`` is
called from the event loop once the response head is here or the exchange failed: a protocol
can then write a whole answer without a task (``Forward.whole``). Whatever is left (a
connection to wait for, the request to write, the response head, one more try on a new
connection when a reused one turns out to be closed) is ``await forward.response()``. The
protocol then writes the response head (``Forward.head``, which takes out the application's
report headers and hands their values back) and the body (``take``, or ``relay`` for one
still arriving), and ``release`` gives the connection back.

A failure before the response started raises ``UpstreamError`` (502, or 504 for a timeout),
``BodyTooLarge`` (413), ``BodyTimeout`` (408) or ``BodyInvalid`` (400); after it started, the
client connection is
aborted so that a truncated response never passes for a complete one. A request is sent a
second time only when it is idempotent, has no body, and met a reused connection that failed
before any byte of answer. HTTP/1.1 on the wire is ``http1.upstream``, the keep-alive
connections ``http1.pool``; the client's protocol is unknown here (``Client``).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from time import perf_counter  # compiled, time.perf_counter() reads the attribute each time
from typing import Protocol

from yarl import URL

from .config import LimitsConfig, UpstreamConfig
from .errors import UpstreamError
from .headers import DEFAULT_RESPONSE_RULES, Captured, ResponseRules, response_fields
from .http1.pool import Dial, Pool
from .http1.upstream import (
    BodyInvalid,
    BodyTimeout,
    BodyTooLarge,
    RequestBody,
    UpstreamConnection,
    request_head,
)

# Methods that may be sent again when a reused connection fails before any byte of answer:
# the application cannot have acted on them in a way that matters (RFC 9110 §9.2.2; nginx's
# proxy_next_upstream never retries POST, LOCK or PATCH; PUT and DELETE are not retried here
# either, since applications often implement them with side effects that are not idempotent).
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})

__all__ = [
    "BodyInvalid",
    "BodyTimeout",
    "BodyTooLarge",
    "Client",
    "Forward",
    "Forwarder",
    "RequestBody",
]


class Client(Protocol):
    """Where an answer still arriving goes (``Forward.relay``): the client connection, which
    frames it for its protocol."""

    async def write(self, data: bytes) -> None:
        """More of the body, once the client takes it (it is cut off when it takes nothing
        for ``limits.send_timeout``); ``ConnectionError`` once the client is gone."""
        ...

    async def finish(self) -> None:
        """The body is complete."""
        ...

    def abort(self) -> None:
        """The body cannot be completed: close so that the client sees it truncated."""
        ...

    def when_gone(self, callback: Callable[[], None] | None) -> None:
        """Have ``callback`` called if the client connection ends (None: no longer)."""
        ...


class Forwarder:
    """The upstream application, over pooled keep-alive HTTP/1.1 connections."""

    def __init__(
        self,
        config: UpstreamConfig,
        *,
        limits: LimitsConfig | None = None,
        dial: Dial | None = None,
        responses: ResponseRules = DEFAULT_RESPONSE_RULES,
    ) -> None:
        base = URL(config.url)
        self.https = base.scheme == "https"
        self.host = base.raw_host or ""
        self.port = base.port or (443 if self.https else 80)
        # For clients that sent none (HTTP/1.0): what any client of the upstream would send.
        self._host_bytes = (base.host_port_subcomponent or self.host).encode("ascii")
        # Plain string concatenation with the client's raw target keeps it byte-exact.
        self.prefix = base.raw_path.rstrip("/")
        self.config = config
        self.limits = limits if limits is not None else LimitsConfig()
        #: what is taken out of every response head (``headers.reports``)
        self.responses = responses
        self.tls: ssl.SSLContext | None = None
        self._dial = dial
        self._pool: Pool | None = None

    async def start(self) -> None:
        self.tls = ssl.create_default_context() if self.https else None
        config = self.config
        self._pool = Pool(
            self.host,
            self.port,
            tls=self.tls,
            connect_timeout=config.timeout.connect,
            read_timeout=config.timeout.read,
            max_connections=config.max_connections,
            dial=self._dial,
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
        self._pool = None

    def send(
        self,
        method: str,
        target: str,
        block: bytes,
        has_host: bool,
        *,
        body: RequestBody | bytes | None = None,
        notify: Callable[[], None] | None = None,
    ) -> Forward:
        """Start forwarding a request: ``target`` as the client sent it, the header lines
        ``block`` (``headers.request_fields``: checked, ours added) and whether they have a
        Host (else the upstream's own goes first), and the ``body`` if there is one: all of it
        (``bytes``, framed by a Content-Length in ``block``) or one still arriving.

        With ``notify`` and no body still arriving, the request is written now if a pooled
        connection is idle, and ``notify`` is called from the event loop once its response
        head is here or the exchange failed. Either way ``Forward.response`` does whatever is
        left.

        Raises ``BodyTooLarge`` when what has arrived of the body is too large already (nothing
        is sent then), ``ValueError`` for a CR or LF in the target."""
        pool = self._pool
        if pool is None:
            raise RuntimeError("Forwarder.start() has not been awaited")
        streamed: RequestBody | None = None
        whole = b""
        if isinstance(body, RequestBody):
            streamed = body
        elif body is not None:
            whole = body
        head = request_head(
            method,
            self.prefix + (target if target.startswith("/") else origin_form(target)),
            block,
            None if has_host else self._host_bytes,
            chunked=streamed is not None and streamed.chunked,
        )
        out = [head]
        rest: RequestBody | None = None
        if streamed is not None:
            first, done = streamed.buffered()
            out += first
            rest = None if done else streamed
        elif whole:
            out.append(whole)
        forward = Forward(
            pool,
            out,
            rest,
            self.responses,
            head_only=method == "HEAD",
            retry=body is None and method in _IDEMPOTENT,
        )
        if notify is not None and rest is None:
            conn = pool.take_idle()  # no coroutine when one is idle
            if conn is not None:
                forward.write_now(conn, notify)
        return forward


class Forward:
    """One request on its way to the upstream and its answer on the way back (see the
    module's docstring): ``response``, then ``head`` and the body, then ``release``."""

    __slots__ = (
        "_out",
        "_pool",
        "_responses",
        "_rest",
        "_sender",
        "conn",
        "head_only",
        "retry",
        "started",
        "status",
        "upstream_seconds",
    )

    def __init__(
        self,
        pool: Pool,
        out: list[bytes],
        rest: RequestBody | None,
        responses: ResponseRules,
        *,
        head_only: bool,
        retry: bool,
    ) -> None:
        self._pool = pool
        self._responses = responses
        #: the request head and what is here of the body: sent again if the request is
        self._out = out
        #: the rest of the body, sent by a task (``_sender``) while the answer is awaited
        self._rest = rest
        self._sender: asyncio.Task[None] | None = None
        #: the connection the exchange runs on, from the start to ``release``
        self.conn: UpstreamConnection | None = None
        self.head_only = head_only
        #: the method is idempotent and there is no body: it may be sent again
        self.retry = retry
        self.started = 0.0
        #: the upstream's status, once its response head is here
        self.status = 0
        #: from sending the request until the upstream's response head arrived
        self.upstream_seconds = 0.0

    @property
    def written(self) -> bool:
        """The request is on a connection (``send`` wrote it, or ``response`` did)."""
        return self.conn is not None

    def write_now(self, conn: UpstreamConnection, notify: Callable[[], None]) -> None:
        """Write the request on ``conn``, an idle pooled connection; ``notify`` follows."""
        self.conn = conn
        conn.begin(head_only=self.head_only, sending=False)
        conn.writelines(self._out)
        conn.notify(notify)
        self.started = perf_counter()

    def whole(self) -> bool:
        """After ``send``'s notice: whether all of the answer is here and nothing failed (the
        protocol writes it in one go); else ``response`` takes it from here."""
        conn = self.conn
        if conn is None or not conn.complete or conn.failed:
            return False
        self.status = conn.status
        self.upstream_seconds = perf_counter() - self.started
        return True

    async def response(self) -> None:
        """Send the request if ``send`` did not, and wait for the response head (interim
        responses skipped); a request that may be sent again is, once, when the reused
        connection it met turns out to be closed. On failure the connection is released and
        ``UpstreamError``, ``BodyTooLarge`` or ``BodyTimeout`` raised."""
        conn = self.conn
        if conn is None:
            pool = self._pool
            self.started = perf_counter()
            conn = pool.take_idle() or await pool.acquire()  # no coroutine when one is idle
            self.conn = conn
            self._sender = _send(conn, self._out, self._rest, self.head_only)
        conn = await self._head(conn)
        self.status = conn.status
        self.upstream_seconds = perf_counter() - self.started

    async def _head(self, conn: UpstreamConnection) -> UpstreamConnection:
        """The response head of the request on ``conn``; the connection it came on."""
        pool = self._pool
        try:
            try:
                await conn.head()
            except OSError as exc:
                stale = self.retry and conn.reused and conn.received == 0
                if isinstance(exc, TimeoutError) or not stale:
                    raise
                # The upstream closed an idle keep-alive connection as we sent: every proxy
                # sends such a request again, on a connection that cannot be stale.
                self.conn = None
                pool.release(conn, reuse=False)
                conn = await pool.acquire(fresh=True)
                self.conn = conn
                self._sender = _send(conn, self._out, None, self.head_only)
                await conn.head()
        except (OSError, TimeoutError, UpstreamError) as exc:
            self._drop()
            raise upstream_error(exc) from exc
        except BaseException:  # BodyTooLarge, BodyTimeout, or we were cancelled
            self._drop()
            raise
        return conn

    def head(self, request_id: str | None) -> tuple[bytes, int, Captured | None]:
        """The response's header lines for the client, with the request's id; which of
        ``headers.HAS_LENGTH``, ``HAS_DATE``, ``HAS_SERVER`` they have; and the values of the
        report headers it carried (None: none), for the gateway once the answer has gone.
        Hop-by-hop headers, the upstream's own X-Request-ID and the report headers are not
        passed on (``headers.response_fields``), whether trust reports are on or off."""
        conn = self.conn
        assert conn is not None
        # trust-reports: the report headers are taken out here, for both protocols, and
        # their values handed back
        fields, flags, reports = response_fields(conn.raw_headers, self._responses)
        if request_id is None:
            return fields, flags, reports
        fields += b"X-Request-ID: " + request_id.encode("ascii") + b"\r\n"
        return fields, flags, reports

    @property
    def reason(self) -> bytes:
        conn = self.conn
        assert conn is not None
        return conn.reason

    @property
    def complete(self) -> bool:
        """All of the body is here (``take`` has it)."""
        conn = self.conn
        return conn is not None and conn.complete

    def take(self) -> bytes:
        """The body bytes received so far, without waiting."""
        conn = self.conn
        assert conn is not None
        return conn.take()

    async def relay(self, client: Client, push: Callable[[bytes], bool] | None = None) -> None:
        """The rest of the body to ``client`` as it arrives. When the upstream fails, the
        client is aborted (it must see the answer truncated); a client that leaves (or is
        cut off for ``send_timeout``) ends the exchange at once, not at the upstream's next
        byte. With ``push`` (``client.write`` without the wait, False when the client does
        not take the bytes at once), what arrives while this waits goes to the client from
        the upstream's read (``UpstreamConnection.attach``)."""
        conn = self.conn
        assert conn is not None
        client.when_gone(conn.abandon)
        if push is not None:
            conn.attach(push)
        try:
            while True:
                try:
                    chunk = await conn.read()
                except Exception:  # timeout, reset, malformed body
                    client.abort()
                    return
                if not chunk:
                    await client.finish()
                    return
                await client.write(chunk)
        except ConnectionError:  # the client is gone
            return
        finally:
            conn.attach(None)
            client.when_gone(None)

    def release(self) -> None:
        """Give the connection back (it is reused if the exchange ended cleanly on both
        sides) and stop sending the body; once."""
        sender = self._sender
        if sender is not None:  # the upstream answered before it took the whole body
            _cancel(sender)
            self._sender = None
        conn, self.conn = self.conn, None
        if conn is not None:
            self._pool.release(conn, reuse=True)

    def _drop(self) -> None:
        _cancel(self._sender)
        self._sender = None
        conn, self.conn = self.conn, None
        if conn is not None:
            self._pool.release(conn, reuse=False)


def _send(
    conn: UpstreamConnection, out: list[bytes], rest: RequestBody | None, head_only: bool
) -> asyncio.Task[None] | None:
    """Start the exchange with the head and what is here of the body; a task sends the rest."""
    conn.begin(head_only=head_only, sending=rest is not None)
    conn.writelines(out)
    if rest is None:
        return None
    return asyncio.get_running_loop().create_task(rest.send_rest(conn))


def _cancel(sender: asyncio.Task[None] | None) -> None:
    if sender is not None and not sender.done():
        sender.cancel()


def origin_form(raw: str) -> str:
    """A request target as the upstream gets it: origin-form (a path and a query)."""
    if raw.startswith("/"):
        return raw
    # absolute-form ("http://host/p?q") keeps its path and query; asterisk-form becomes "/"
    target = URL(raw, encoded=True).raw_path_qs
    return target if target.startswith("/") else "/"


def upstream_error(exc: BaseException) -> UpstreamError:
    """Translate a failure before the response started into our vocabulary."""
    if isinstance(exc, UpstreamError):
        return exc
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, TimeoutError):
        return UpstreamError("timeout", detail)
    return UpstreamError("reset", detail)
