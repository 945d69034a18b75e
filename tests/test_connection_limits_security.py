"""What one client address can hold (issue #12 round 2, finding 4; round 2's fidelity note on
WebSockets), over real sockets.

- ``limits.max_connections_per_address``: one address (an IPv6 /64) cannot take every
  connection slot; connections over its bound are closed at accept and counted
  (``sidecar_limit_refusals_total{limit="max_connections_per_address"}``). Trusted proxies
  are not bound by it.
- ``limits.client_hello_timeout``: a connection that has not sent its ClientHello is closed
  sooner than a handshake in progress.
- ``limits.max_websockets_per_address`` and ``limits.max_websockets``: WebSockets hold an
  upstream connection each, outside the pool: 429 past the first bound, 503 past the second.

The sources are other loopback addresses (all of 127.0.0.0/8 is this machine's).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from .conftest import ConfigDir, Running, SidecarFactory, Upstream
from .test_config import problems_of
from .test_listener import Conn, connect, eventually, open_connections, req
from .test_operations import admin, metric
from .test_websocket_security import WSUpstream, upgrade, ws_upstream  # noqa: F401

Plain = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def idle_tcp(running: Running, count: int, source: str) -> AsyncIterator[list[Plain]]:
    """``count`` TCP connections from ``source`` that send nothing (no TLS byte)."""
    conns: list[Plain] = []
    try:
        for _ in range(count):
            conns.append(
                await asyncio.open_connection(
                    "127.0.0.1", running.sidecar.port, local_addr=(source, 0)
                )
            )
        yield conns
    finally:
        for _, writer in conns:
            writer.close()


async def closed_soon(reader: asyncio.StreamReader, within: float = 10) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), within) == b""
    except ConnectionError:
        return True


@contextlib.asynccontextmanager
async def tls_from(running: Running, source: str) -> AsyncIterator[Conn]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        running.sidecar.port,
        ssl=running.client_ssl(running.certs.alice),
        server_hostname="localhost",
        local_addr=(source, 0),
    )
    conn = Conn(reader, writer)
    try:
        yield conn
    finally:
        await conn.close()


async def alice_served(running: Running) -> bool:
    try:
        async with tls_from(running, "127.0.0.1") as conn:
            conn.send(req("GET", "/admin/reports"))
            return (await conn.response(timeout=10)).status == 200
    except (ConnectionError, OSError, asyncio.IncompleteReadError):
        return False


async def test_one_address_cannot_take_every_connection_slot(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    """The attacker's 4,100 idle TCP connections, scaled to a worker of 40 slots: before,
    they took all 40 and alice's connection was closed at accept."""
    data = config_dir.base(upstream.port)
    data["limits"] = {"max_connections": 40, "max_connections_per_address": 10}
    running = await start_sidecar(data)
    async with idle_tcp(running, 40, "127.0.0.2") as conns:
        # the first 10 are held (until client_hello_timeout), the 30 others closed at once
        closed = await asyncio.gather(*(closed_soon(r, 2) for r, _ in conns[10:]))
        assert all(closed)
        assert open_connections(running) == 10
        assert await alice_served(running)
    _, text = await admin(running, "GET", "/metrics")
    assert metric(text, "sidecar_limit_refusals_total", limit="max_connections_per_address") == 30
    assert metric(text, "sidecar_connections_refused_total") == 0


async def test_a_trusted_proxy_is_not_bound_per_address(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    data = config_dir.base(upstream.port)
    data["trusted_proxies"] = ["127.0.0.3/32"]
    data["limits"] = {"max_connections_per_address": 2}
    running = await start_sidecar(data)
    async with contextlib.AsyncExitStack() as stack:
        proxied = [
            await stack.enter_async_context(tls_from(running, "127.0.0.3")) for _ in range(5)
        ]
        for conn in proxied:
            conn.send(req("GET", "/admin/reports"))
            assert (await conn.response(timeout=10)).status == 200
    async with idle_tcp(running, 3, "127.0.0.4") as conns:
        assert await closed_soon(conns[2][0], 2)  # an ordinary address is


async def test_a_front_proxy_is_not_bound_per_address(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    """A proxy in ``front_proxy.trusted`` brings many clients over its own connections, as
    one in ``trusted_proxies`` does: the per-address bound would cut all of them off."""
    data = config_dir.base(upstream.port)
    data["front_proxy"] = {"trusted": ["127.0.0.3/32"]}
    data["limits"] = {"max_connections_per_address": 2}
    running = await start_sidecar(data)
    async with contextlib.AsyncExitStack() as stack:
        proxied = [
            await stack.enter_async_context(tls_from(running, "127.0.0.3")) for _ in range(5)
        ]
        for conn in proxied:
            conn.send(req("GET", "/admin/reports"))
            assert (await conn.response(timeout=10)).status == 200


async def test_a_connection_without_its_client_hello_is_closed_sooner(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    data = config_dir.base(upstream.port)
    data["limits"] = {"client_hello_timeout": "500ms", "handshake_timeout": "30s"}
    running = await start_sidecar(data)
    async with idle_tcp(running, 1, "127.0.0.1") as [(reader, _)]:
        started = time.monotonic()
        assert await closed_soon(reader, 10)
        assert time.monotonic() - started < 5
    await eventually(lambda: open_connections(running) == 0, "the slot given back")
    assert await alice_served(running)  # a prompt client is not affected


# ---- configuration ------------------------------------------------------------------------


def test_bad_bounds_are_refused_with_their_path(config_dir: ConfigDir) -> None:
    data = config_dir.base()
    data["limits"] = {
        "max_connections_per_address": 0,
        "client_hello_timeout": "soon",
        "max_websockets": 0,
        "max_websockets_per_address": -1,
        "body_buffer": -1,
        "body_min_rate": -1,
        "max_body_streams_per_address": 0,
    }
    problems = problems_of(config_dir.write(data))
    for key in (
        "max_websockets",
        "max_websockets_per_address",
        "body_buffer",
        "body_min_rate",
        "max_body_streams_per_address",
    ):
        assert any(p.startswith(f"limits.{key}") for p in problems), problems
    assert any(p.startswith("limits.max_connections_per_address") for p in problems), problems
    assert any(p.startswith("limits.client_hello_timeout") for p in problems), problems


# ---- WebSockets --------------------------------------------------------------------------


async def test_websockets_per_address_are_bounded(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    ws_upstream: WSUpstream,  # noqa: F811
) -> None:
    data = config_dir.base(ws_upstream.port)
    data["limits"] = {"max_websockets_per_address": 2}
    running = await start_sidecar(data)
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(2):
            await upgrade(await stack.enter_async_context(connect(running)))
        async with connect(running) as third:
            third.send(ws_request())
            refused = await third.response(timeout=10)
            assert refused.status == 429, refused
            assert refused.get("Retry-After")
        async with tls_from(running, "127.0.0.2") as other:  # another address
            await upgrade(other)
        _, text = await admin(running, "GET", "/metrics")
        assert metric(text, "sidecar_limit_refusals_total", limit="max_websockets_per_address") == 1
    # closed WebSockets give their place back
    await eventually(lambda: open_connections(running) == 0, "the WebSockets closed")
    async with connect(running) as again:
        await upgrade(again)


async def test_websockets_per_worker_are_bounded(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    ws_upstream: WSUpstream,  # noqa: F811
) -> None:
    data = config_dir.base(ws_upstream.port)
    data["limits"] = {"max_websockets": 2}
    running = await start_sidecar(data)
    async with contextlib.AsyncExitStack() as stack:
        await upgrade(await stack.enter_async_context(connect(running)))
        await upgrade(await stack.enter_async_context(tls_from(running, "127.0.0.2")))
        async with tls_from(running, "127.0.0.3") as third:
            third.send(ws_request())
            refused = await third.response(timeout=10)
            assert refused.status == 503, refused


def ws_request() -> bytes:
    return req(
        "GET",
        "/public/ws",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    )
