"""Handshake admission (``limits.handshake_budget``, issue #19 item 6) over real TLS and real
sockets: a burst of handshakes queued behind the budget all complete, queued handshakes keep
their deadlines and their connection slots, and a reload changes the budget cleanly.

No timing is asserted: which handshakes wait is the scheduler's business (its unit tests,
``test_handshake_budget.py``, pin that down with a fake loop); here the outcomes are checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

from sidecar.handshakes import HandshakeScheduler

from .conftest import ConfigDir, Running, SidecarFactory, Upstream
from .test_config import problems_of
from .test_listener import Conn, eventually, open_connections, req
from .test_operations import admin, metric
from .test_reload_security import edit

#: small enough that every turn of the loop runs one handshake step and queues the rest
TINY = 0.000001


def listener_of(running: Running) -> Any:
    listener = running.sidecar._listener
    assert listener is not None
    return listener


async def open_conn(running: Running) -> Conn:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        running.sidecar.port,
        ssl=running.client_ssl(running.certs.alice),
        server_hostname="localhost",
    )
    return Conn(reader, writer)


async def burst(running: Running, count: int) -> tuple[list[int], list[Conn]]:
    """``count`` connections at once, each with one request; the statuses (0: the connection
    failed) and the connections, still open."""
    conns: list[Conn] = []

    async def one() -> int:
        try:
            conn = await open_conn(running)
        except (ConnectionError, ssl.SSLError, OSError):
            return 0
        conns.append(conn)
        conn.send(req("GET", "/public/burst"))
        try:
            return (await conn.response(timeout=60)).status
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            return 0

    statuses = await asyncio.gather(*(one() for _ in range(count)))
    return list(statuses), conns


async def close_all(conns: list[Conn]) -> None:
    await asyncio.gather(*(c.close() for c in conns))


async def test_a_burst_of_handshakes_behind_the_budget_all_complete(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    """200 handshakes at once, one step per turn of the loop: every one completes and is
    answered; the queue empties."""
    data = config_dir.base(upstream.port)
    data["limits"] = {"handshake_budget": TINY}
    running = await start_sidecar(data)
    statuses, conns = await burst(running, 200)
    try:
        assert statuses == [200] * 200
    finally:
        await close_all(conns)
    _, text = await admin(running, "GET", "/metrics")
    assert metric(text, "sidecar_tls_handshakes_deferred_total") > 0, "nothing was queued"
    assert metric(text, "sidecar_tls_handshakes_queued") == 0
    assert metric(text, "sidecar_tls_handshake_failures_total") == 0
    await eventually(lambda: open_connections(running) == 0, "every connection released")


async def test_the_default_budget_serves_a_burst(running: Running) -> None:
    statuses, conns = await burst(running, 200)
    try:
        assert statuses == [200] * 200
    finally:
        await close_all(conns)
    assert listener_of(running).handshakes.queued == 0


async def test_queued_handshakes_count_against_max_connections(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    """Connections whose handshake waits hold their slot: of 60 at once with 40 slots, 40
    are served and 20 refused at accept."""
    data = config_dir.base(upstream.port)
    data["limits"] = {"handshake_budget": TINY, "max_connections": 40}
    running = await start_sidecar(data)
    statuses, conns = await burst(running, 60)
    try:
        assert sorted(statuses) == [0] * 20 + [200] * 40
        assert open_connections(running) == 40
    finally:
        await close_all(conns)
    _, text = await admin(running, "GET", "/metrics")
    assert metric(text, "sidecar_connections_refused_total") == 20


class Stuck:
    """A loop whose next turn never comes, for the scheduler only: what it queues stays
    queued (the rest of the sidecar runs on the real loop)."""

    def call_soon(self, callback: Any) -> None:
        pass


async def test_queued_handshakes_still_time_out(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    """Steps that wait for the budget keep their deadlines. With the scheduler's next turn
    never coming, the first ClientHello is answered (the turn's one step) and everything
    after it waits: the other connection's ClientHello (client_hello_timeout) and the first
    one's last flight (handshake_timeout). Both are closed, counted as failed handshakes,
    and their slots freed."""
    data = config_dir.base(upstream.port)
    data["limits"] = {"client_hello_timeout": "1s", "handshake_timeout": "2s"}
    running = await start_sidecar(data)
    listener = listener_of(running)
    listener.handshakes = HandshakeScheduler(Stuck(), TINY)
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(2):
            _, writer = await asyncio.open_connection("127.0.0.1", running.sidecar.port)
            stack.callback(writer.close)
            await eventually(lambda: open_connections(running) >= 1, "accepted")
            writer.write(_client_hello(running))
            await writer.drain()
        await eventually(lambda: listener.handshakes.queued == 1, "the second hello waits")
        await eventually(lambda: open_connections(running) == 0, "both closed", timeout=30)
    _, text = await admin(running, "GET", "/metrics")
    assert metric(text, "sidecar_tls_handshake_failures_total") == 2
    assert metric(text, "sidecar_tls_handshakes_deferred_total") == 1


async def test_a_reload_changes_the_budget_without_losing_queued_handshakes(
    running: Running, config_dir: ConfigDir
) -> None:
    """A burst under a tiny budget; a reload to no budget meanwhile: every handshake
    completes, none twice, and the new budget is in force. An invalid budget is refused
    whole, with its dotted path, and the running one kept."""
    edit(config_dir, limits={"handshake_budget": TINY})
    assert await running.sidecar.reload("test")
    listener = listener_of(running)
    assert listener.handshakes.budget == TINY
    edit(config_dir, limits={"handshake_budget": 0})
    flight = asyncio.ensure_future(burst(running, 100))
    await asyncio.sleep(0)
    assert await running.sidecar.reload("test")
    statuses, conns = await flight
    try:
        assert statuses == [200] * 100
    finally:
        await close_all(conns)
    assert listener.handshakes.budget == 0 and listener.handshakes.queued == 0
    edit(config_dir, limits={"handshake_budget": -1})
    assert not await running.sidecar.reload("test")
    assert listener.handshakes.budget == 0


def test_handshake_budget_is_validated_with_its_path(config_dir: ConfigDir) -> None:
    for bad in (-1, "soon", 2, True):
        data = config_dir.base()
        data["limits"] = {"handshake_budget": bad}
        problems = problems_of(config_dir.write(data))
        assert any(p.startswith("limits.handshake_budget") for p in problems), (bad, problems)


async def test_a_connection_that_sends_more_while_queued_is_not_read(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    """While its step waits, a connection's socket is read no further than a handshake
    flight's worth: what a client sends beyond it stays in the kernel, not in the sidecar's
    memory."""
    data = config_dir.base(upstream.port)
    running = await start_sidecar(data)
    listener = listener_of(running)
    listener.handshakes = HandshakeScheduler(Stuck(), TINY)
    async with contextlib.AsyncExitStack() as stack:
        writers = []
        for _ in range(2):  # the first takes the turn's budget, the second waits
            _, writer = await asyncio.open_connection("127.0.0.1", running.sidecar.port)
            stack.callback(writer.close)
            writers.append(writer)
            await eventually(lambda: open_connections(running) >= len(writers), "accepted")
            writer.write(_client_hello(running))
            await writer.drain()
        await eventually(lambda: listener.handshakes.queued == 1, "the second hello waits")
        (queued,) = [c for c in listener.accepted if c._queued]
        writers[1].write(b"\x17\x03\x03\x40\x00" + b"x" * (4 << 20))
        await eventually(lambda: queued._queue_paused, "reading paused")
        await asyncio.sleep(0.3)
        # at most one read (256 KiB) beyond the 64 KiB bound
        assert queued._incoming.pending <= (64 << 10) + (256 << 10)


def _client_hello(running: Running) -> bytes:
    ctx = running.client_ssl(running.certs.alice)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()
