"""``Sidecar.stop`` ends every connection within the grace period, on either protocol.

A client that keeps its connection open and never closes it (a browser's idle keep-alive
connection) must not outlive the process's shutdown: when ``stop`` returns, the listener has
no connection left, whichever protocol served it, and the client has seen its end. (Reported
for connections aiohttp's server took over, with asyncio's TLS transport, which waited up to
30 s for the peer's close_notify; the listener's own TLS layer aborts what still lingers.)
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

import pytest

from .conftest import Running
from .test_listener import connect, open_connections, req


@pytest.mark.parametrize("method", ["GET", "POST"], ids=["http1", "handed-over"])
async def test_stop_ends_an_idle_keep_alive_connection(running: Running, method: str) -> None:
    async with connect(running) as conn:
        conn.send(req(method, "/public/idle", body=b"x" if method == "POST" else b""))
        assert (await conn.response()).status == 200
        assert open_connections(running) == 1
        started = time.monotonic()
        await running.sidecar.stop(grace=5)
        assert time.monotonic() - started < 5  # idle: nothing to wait for
        assert open_connections(running) == 0
        # the client sees the end at once, not when it gives up itself
        assert await asyncio.wait_for(conn.ended(), 2) == b""


async def test_stop_ends_a_handed_over_connection_whose_client_never_closes(
    running: Running,
) -> None:
    async with connect(running) as conn:
        conn.send(req("POST", "/public/idle", body=b"x"))
        assert (await conn.response()).status == 200
        # The client reads nothing more and so never answers our close_notify: the connection
        # must not linger after stop() (the TLS layer waits up to 30 s for a peer's).
        cast(asyncio.Transport, conn.writer.transport).pause_reading()
        started = time.monotonic()
        await running.sidecar.stop(grace=1)
        assert time.monotonic() - started < 5
        assert open_connections(running) == 0
        conn.abort()  # ours would wait for the sidecar's close_notify, which it cannot read
