"""Requests the listener serves without a task (``ClientConnection._start``/``_on_upstream``).

A request that needs no waiting on our side (its verdict is cached or not needed, and the
upstream pool has an idle connection) is written upstream straight from the event loop, and
its response relayed from the upstream connection's notice. Every way such an exchange can go
other than "the whole response at once" must end exactly as on the task's path: a read
timeout is a 504, a stale pooled connection is sent again, a streamed body is relayed to its
end, garbage is a 502, a client that leaves costs nothing, and shutdown waits for it.

Each test first warms the pool with one request, then checks (white-box, so that the test
cannot silently stop covering this path) that the connection under test never needed a task.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from sidecar.listener import ClientConnection

from .conftest import ConfigDir, Running, SidecarFactory
from .servers import Scripted, StartScripted, answer_ok
from .test_limits import request
from .test_listener import (
    App,
    connect,
    eventually,
    open_connections,
    stream_body,
)


@pytest.fixture
async def upstream() -> AsyncIterator[App]:
    """test_listener's application (``running`` forwards to it)."""
    app = App(0)
    await app.start()
    yield app
    await app.stop()


def clients(running: Running) -> set[ClientConnection]:
    listener = running.sidecar._listener
    assert listener is not None
    return set(listener.clients)


async def warm(running: Running) -> None:
    """One request on a connection of its own: the upstream pool then has an idle one."""
    async with connect(running) as conn:
        conn.send(request("/public/warm"))
        assert (await conn.response()).status == 200


def taskless(conn: ClientConnection) -> bool:
    return conn._task is None


async def start_with(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, port: int, read: str = "5s"
) -> Running:
    data = config_dir.base(port)
    data["upstream"]["timeout"]["read"] = read
    running: Running = await start_sidecar(data)
    return running


async def the_client(running: Running, before: set[ClientConnection]) -> ClientConnection:
    new: set[ClientConnection] = set()

    def arrived() -> bool:
        new.update(clients(running) - before)
        return bool(new)

    await eventually(arrived, "the connection under test")
    assert len(new) == 1
    return new.pop()


async def test_warm_requests_need_no_task(running: Running, upstream: App) -> None:
    await warm(running)
    before = clients(running)
    async with connect(running) as conn:
        for i in range(3):
            conn.send(request(f"/public/n/{i}"))
            answer = await conn.response()
            assert (answer.status, answer.json()["path"]) == (200, f"/public/n/{i}")
        assert taskless(await the_client(running, before))


async def test_read_timeout_is_504(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: App
) -> None:
    running = await start_with(start_sidecar, config_dir, upstream.port, read="300ms")
    await warm(running)
    before = clients(running)
    async with connect(running) as conn:
        conn.send(request("/public/slow"))
        await eventually(lambda: upstream.slow_waiting == 1, "the request upstream")
        client = await the_client(running, before)
        assert taskless(client)
        answer = await conn.response()
        assert answer.status == 504
        assert answer.json()["status"] == 504
        assert not taskless(client)  # the task took the failed exchange over
        upstream.release.set()
        conn.send(request("/public/after"))  # and the connection goes on
        after = await conn.response()
        assert (after.status, after.json()["path"]) == (200, "/public/after")


async def test_stale_pooled_connection_is_sent_again(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    scripted: StartScripted,
) -> None:
    # The upstream closes each connection when a second request arrives on it, without a
    # byte of answer: the race of a keep-alive timeout with a request on its way.
    async def answer(state: Scripted, n: int, head: bytes, w: asyncio.StreamWriter) -> bool:
        if n == 1:
            return False
        w.write(answer_ok(b"answered"))
        return True

    up = await scripted(answer)
    running = await start_with(start_sidecar, config_dir, int(up.url.rsplit(":", 1)[1]))
    await warm(running)
    before = clients(running)
    async with connect(running) as conn:
        conn.send(request("/public/again"))
        answer_ = await conn.response()
        assert (answer_.status, answer_.body) == (200, b"answered")
        assert not taskless(await the_client(running, before))  # sent again by the task
    paths = [r.split(b" ", 2)[1] for r in up.requests]
    assert paths == [b"/public/warm", b"/public/again", b"/public/again"]
    assert up.connections == 2


async def test_a_body_that_keeps_coming_is_streamed(running: Running, upstream: App) -> None:
    await warm(running)
    async with connect(running) as conn:
        conn.send(request("/public/stream/64") + request("/public/next"))
        streamed = await conn.response()
        assert (streamed.status, streamed.framing) == (200, "chunked")
        assert streamed.body == stream_body(64)
        following = await conn.response()
        assert following.json()["path"] == "/public/next"


async def test_garbage_from_the_upstream_is_502(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    scripted: StartScripted,
) -> None:
    async def answer(state: Scripted, n: int, head: bytes, w: asyncio.StreamWriter) -> bool:
        if b" /public/garbage " in head:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: x2\r\n\r\nok")
        else:
            w.write(answer_ok())
        return True

    up = await scripted(answer)
    running = await start_with(start_sidecar, config_dir, int(up.url.rsplit(":", 1)[1]))
    await warm(running)
    before = clients(running)
    async with connect(running) as conn:
        conn.send(request("/public/garbage"))
        assert (await conn.response()).status == 502
        conn.send(request("/public/fine"))
        assert (await conn.response()).body == b"ok"
        assert not taskless(await the_client(running, before))  # the 502 came from the task


@pytest.mark.parametrize("how", ["abort", "close"])
async def test_client_leaving_while_its_request_is_upstream(
    running: Running, upstream: App, how: str
) -> None:
    await warm(running)
    before = clients(running)
    async with connect(running) as conn:
        conn.send(request("/public/slow"))
        await eventually(lambda: upstream.slow_waiting == 1, "the request upstream")
        assert taskless(await the_client(running, before))
        if how == "abort":
            conn.abort()
        else:
            await conn.close()
    await eventually(lambda: open_connections(running) == 0, "the connection counted out")
    upstream.release.set()
    # the late answer ends the request: not counted in flight for ever, and logged once
    await eventually(lambda: running.sidecar.metrics.in_flight == 0, "no request in flight")
    for i in range(2):  # the pool and the listener go on
        async with connect(running) as conn:
            conn.send(request(f"/public/then/{i}"))
            assert (await conn.response()).json()["path"] == f"/public/then/{i}"


async def test_shutdown_waits_for_a_request_without_a_task(running: Running, upstream: App) -> None:
    await warm(running)
    before = clients(running)
    async with connect(running) as conn:
        conn.send(request("/public/slow"))
        await eventually(lambda: upstream.slow_waiting == 1, "the request upstream")
        client = await the_client(running, before)
        assert taskless(client)
        stop = asyncio.create_task(running.sidecar.stop(grace=5))
        await asyncio.sleep(0.2)
        assert not stop.done(), "stop() did not wait for the request in flight"
        upstream.release.set()
        late = await conn.response()
        assert (late.status, late.body) == (200, b"late")
        assert "close" in late.tokens("Connection")
        assert await conn.ended() == b""
        await asyncio.wait_for(stop, 5)
