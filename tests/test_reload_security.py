"""Reload, attacked from outside: new limits bind the next connection, and a reload that fails
leaves nothing of what it built running.

Every test changes the configuration file, reloads the running sidecar, then speaks raw
HTTP/1.1 over real TLS to it (or counts what it holds open).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ssl
from typing import Any

import aiohttp
import pytest
import yaml
from structlog.testing import capture_logs

from .conftest import ConfigDir, Running, SidecarFactory, Upstream
from .pki import Issued
from .servers import StartScripted, keep_alive_ok
from .test_limits import raw_exchange, request, status_of


def edit(config_dir: ConfigDir, **sections: Any) -> None:
    """Rewrite sidecar.yaml with ``sections`` merged into it (one level deep)."""
    data = yaml.safe_load((config_dir.path / "sidecar.yaml").read_text())
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(name), dict):
            data[name] = {**data[name], **value}
        else:
            data[name] = value
    config_dir.write(data)


async def open_tls(
    running: Running, who: Issued | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", running.sidecar.port, ssl=running.client_ssl(who), server_hostname="localhost"
    )


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the sidecar closes the connection (EOF or reset) within ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except (ConnectionError, ssl.SSLError):
        pass
    return True


async def get_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One keep-alive GET on an open connection, its 200 read to the end of its body."""
    writer.write(b"GET /public/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200"), head
    lengths = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    await asyncio.wait_for(reader.readexactly(int(lengths[0].split(b":")[1])), 10)


# ---- limits.* apply on reload --------------------------------------------------------------


async def test_reloaded_header_timeout_closes_a_slow_head_on_a_new_connection(
    running: Running, config_dir: ConfigDir
) -> None:
    edit(config_dir, limits={"header_timeout": "1s"})
    assert await running.sidecar.reload("test")
    reader, writer = await open_tls(running)
    writer.write(b"GET /public/x HTTP/1.1\r\nHost: local")  # and never the rest
    try:
        # 60 s before the reload; generous margin over the new 1 s for a loaded machine
        assert await closed_within(reader, 15), "the old header_timeout is still in force"
    finally:
        writer.close()


@pytest.mark.parametrize("limit", ["header_timeout", "keepalive_timeout"])
async def test_a_reloaded_deadline_binds_an_open_connection_from_its_next_request(
    running: Running, config_dir: ConfigDir, upstream: Upstream, limit: str
) -> None:
    """The README: ``header_timeout`` and ``keepalive_timeout`` apply "from the next request
    on a connection already open" (the listener reads them with the head limits,
    ``HeadLimits``). 60 s and 75 s before the reload, 1 s after it."""
    reader, writer = await open_tls(running)
    try:
        await get_ok(reader, writer)
        edit(config_dir, limits={limit: "1s"})
        assert await running.sidecar.reload("test")
        if limit == "header_timeout":
            writer.write(b"GET /public/x HTTP/1.1\r\nHost: local")  # and never the rest
        else:
            await get_ok(reader, writer)  # the next request, then idle
        # generous margin over the new 1 s for a loaded machine
        assert await closed_within(reader, 15), f"the old {limit} is still in force"
    finally:
        writer.close()
    assert len(upstream.seen) == (1 if limit == "header_timeout" else 2)


async def test_reloaded_header_line_limit_refuses_on_the_fast_path(
    running: Running, config_dir: ConfigDir, upstream: Upstream
) -> None:
    line = "X-Long: " + "a" * 3000
    assert status_of(await raw_exchange(running, request("/public/x", line))) == 200
    edit(config_dir, limits={"max_header_line": 2048})
    assert await running.sidecar.reload("test")
    assert status_of(await raw_exchange(running, request("/public/x", line))) == 431
    assert len(upstream.seen) == 1


async def test_reloaded_limits_reach_the_connections_aiohttp_serves(
    running: Running, config_dir: ConfigDir, upstream: Upstream
) -> None:
    """A request with a body moves its connection to aiohttp's server: its parser limits and
    the body limit come from the reloaded configuration too."""
    line = "X-Long: " + "a" * 3000
    post = request("/public/x", line, "Content-Length: 5000", body=b"x" * 5000).replace(
        b"GET", b"POST", 1
    )
    assert status_of(await raw_exchange(running, post)) == 200
    edit(config_dir, limits={"max_header_line": 4096, "max_body_size": 1000})
    assert await running.sidecar.reload("test")
    assert status_of(await raw_exchange(running, post)) == 413
    edit(config_dir, limits={"max_header_line": 2048, "max_body_size": None})
    assert await running.sidecar.reload("test")
    assert status_of(await raw_exchange(running, post)) == 431
    assert len(upstream.seen) == 1


async def test_reloaded_send_timeout_drops_a_client_that_reads_nothing(
    running: Running, config_dir: ConfigDir
) -> None:
    edit(config_dir, limits={"send_timeout": "1s"})
    assert await running.sidecar.reload("test")
    reader, writer = await open_tls(running, running.certs.bob)
    size = 64 << 20  # far more than the socket buffers hold
    writer.write(b"GET /download/%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % size)
    await writer.drain()
    await asyncio.sleep(6)  # read nothing for 6 s: the reloaded send_timeout is 1 s
    received = 0
    try:
        async with asyncio.timeout(60):
            while received < size and (chunk := await reader.read(1 << 20)):
                received += len(chunk)
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()
    assert received < size, "the client was not dropped: the old send_timeout (60 s) applies"


async def test_a_reload_applies_every_limit(running: Running, config_dir: ConfigDir) -> None:
    # handshake_timeout too: the listener's own TLS layer reads it at every accept (sec/tls)
    edit(config_dir, limits={"handshake_timeout": "5s", "keepalive_timeout": "5s"})
    with capture_logs() as events:
        assert await running.sidecar.reload("test")
    assert [e["key"] for e in events if e["event"] == "reload_needs_restart"] == []
    limits = running.sidecar.config.limits
    assert (limits.keepalive_timeout, limits.handshake_timeout) == (5.0, 5.0)


# ---- a reload that fails closes what it built ----------------------------------------------


def open_sessions() -> int:
    """aiohttp client sessions not closed (the upstream client's, the backends')."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, aiohttp.ClientSession) and not o.closed)


async def test_a_failed_reload_closes_the_upstream_client_it_built(
    running: Running, config_dir: ConfigDir, upstream: Upstream
) -> None:
    before = open_sessions()
    # A new upstream (so the reload builds a new client), and an identity backend whose mTLS
    # certificate and key do not match: each file is valid, the pair is refused afterwards.
    edit(
        config_dir,
        upstream={"url": f"http://localhost:{upstream.port}"},
        identity={
            "backend": "http",
            "http": {
                "url": "https://127.0.0.1:1/verdict",
                "certificate": "alice.pem",
                "key": "bob.key",
            },
        },
    )
    for _ in range(3):
        with capture_logs() as events:
            assert not await running.sidecar.reload("test")
        assert any(e["event"] == "reload_failed" for e in events)
    assert open_sessions() == before, "a failed reload left upstream clients open"
    # and the old state serves on
    assert status_of(await raw_exchange(running, request("/public/x"))) == 200


async def test_a_reload_abandoned_by_shutdown_closes_what_it_built(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    before = open_sessions()
    running = await start_sidecar(config_dir.base(upstream.port))
    edit(config_dir, upstream={"url": f"http://localhost:{upstream.port}"})
    reload = asyncio.create_task(running.sidecar.reload("test"))
    await asyncio.sleep(0)  # the reload is under way (loading the file in a thread)
    await running.sidecar.stop(grace=1)
    with contextlib.suppress(asyncio.CancelledError):
        assert not await reload
    assert open_sessions() == before, "a reload finished after stop() left its clients open"


@pytest.mark.parametrize("watch", [False, True])
async def test_reload_watch_applies_on_reload(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream, watch: bool
) -> None:
    """reload.watch turned on (or off) by a reload is obeyed, not silently kept."""
    data = config_dir.base(upstream.port)
    data["reload"] = {"watch": not watch, "interval": "100ms"}
    running = await start_sidecar(data)
    edit(config_dir, reload={"watch": watch, "interval": "100ms"})
    assert await running.sidecar.reload("test")
    edit(config_dir, routes=[{"path": "/", "access": "public"}])  # /app/ becomes public
    if watch:
        for _ in range(100):
            await asyncio.sleep(0.1)
            if status_of(await raw_exchange(running, request("/app/"))) == 200:
                break
        else:
            pytest.fail("reload.watch turned on by a reload is not obeyed")
    else:
        await asyncio.sleep(1.5)  # fifteen intervals
        assert status_of(await raw_exchange(running, request("/app/"))) == 401, (
            "reload.watch turned off by a reload is not obeyed"
        )


async def test_a_change_seen_before_watching_was_turned_off_is_not_applied_after(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    """The watcher sees a change while a reload holds the lock; that reload turns
    reload.watch off. What the watcher saw must not be reloaded once the lock is free (it
    was, with whatever the file said by then: seen as a flaky
    test_reload_watch_applies_on_reload[False] under load)."""
    data = config_dir.base(upstream.port)
    data["reload"] = {"watch": True, "interval": "100ms"}
    running = await start_sidecar(data)
    sidecar = running.sidecar
    async with sidecar._reload_lock:
        edit(config_dir, reload={"watch": False, "interval": "100ms"})
        await asyncio.sleep(0.5)  # five intervals: the watcher has seen the change, and waits
        assert await sidecar._reload("test")  # the reload that turns watching off
        edit(config_dir, routes=[{"path": "/", "access": "public"}])  # /app/ becomes public
    await asyncio.sleep(0.5)
    assert status_of(await raw_exchange(running, request("/app/"))) == 401, (
        "a reload the watcher queued before watching was turned off ran after it"
    )


async def test_the_handshake_timeout_does_not_renew_the_upstream_pool(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, scripted: StartScripted
) -> None:
    """A limit the upstream client does not take is no change to it: the warm upstream
    connections stay, reload after reload (a certificate renewal reloads too)."""
    app = await scripted(keep_alive_ok)
    running = await start_sidecar(config_dir.base(app.port))
    assert status_of(await raw_exchange(running, request("/public/x"))) == 200
    edit(config_dir, limits={"handshake_timeout": "5s"})
    for _ in range(2):
        assert await running.sidecar.reload("test")
        assert status_of(await raw_exchange(running, request("/public/x"))) == 200
    assert app.connections == 1
    edit(config_dir, limits={"handshake_timeout": "5s", "max_body_size": 1000})
    assert await running.sidecar.reload("test")
    assert status_of(await raw_exchange(running, request("/public/x"))) == 200
    assert app.connections == 2  # a limit the client takes: a new pool
