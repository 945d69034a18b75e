"""Pipelined request heads are bounded in bytes on every path (issue #12 round 2, finding 5).

The attacker's reproducer: a request whose answer takes its time (here: the upstream never
answers it), then 34 heads of about 800 KB each, pipelined, on each of a few anonymous
connections. aiohttp's server, which served every request with a body, parsed up to 32
pipelined requests ahead with its own line limits (100 lines of 8190 bytes each), not
``limits.max_header_block``: about 50 MiB of the sidecar's memory per connection.

Must hold: ``limits.max_header_block`` is enforced before any head is held, at most 256 KiB of
pipelined bytes wait behind the request in flight on the listener's own path, and what still
reaches aiohttp's server (WebSocket upgrades) is bounded as well. The sidecar runs as its own
process, so that its memory can be read from ``/proc/<pid>/status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import ssl
import time
from collections.abc import AsyncIterator

import pytest

from .conftest import ConfigDir
from .servers import Scripted, StartScripted
from .test_pipelining_security import Process, start_process

#: the sidecar runs as its own process (conftest.pytest_collection_modifyitems)
pytestmark = pytest.mark.own_process

MiB = 1024 * 1024
CONNECTIONS = 4
#: all connections together; before: about 50 MiB per connection
GROWTH_LIMIT = 12 * MiB
#: a connection whose bytes the sidecar has not taken for this long is done sending
STALL = 1.0

HOST = b"Host: localhost\r\n"
BIG_HEAD = (
    b"GET /public/x HTTP/1.1\r\n"
    + HOST
    + b"".join(b"X-Pad-%02d: %s\r\n" % (i, b"a" * 8100) for i in range(98))
    + b"\r\n"
)

FIRST = {
    # a body: before, the connection went to aiohttp's server with it
    "body": b"POST /public/hang HTTP/1.1\r\n" + HOST + b"Content-Length: 1\r\n\r\nx",
    # a WebSocket upgrade the upstream never answers: still aiohttp's
    "upgrade": b"GET /public/hang HTTP/1.1\r\n"
    + HOST
    + b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
    + b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
}


@pytest.fixture
async def process(config_dir: ConfigDir, scripted: StartScripted) -> AsyncIterator[Process]:
    release = asyncio.Event()

    async def hang(state: Scripted, n: int, head: bytes, w: asyncio.StreamWriter) -> bool:
        if b" /public/hang " in head:
            await release.wait()
            return False
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return True

    upstream = await scripted(hang)
    data = config_dir.base(upstream.port)
    data["upstream"]["timeout"] = {"connect": "5s", "read": "120s"}
    started = await start_process(config_dir, data)
    yield started
    release.set()
    with contextlib.suppress(ProcessLookupError):
        started.proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(started.proc.wait(), 15)
    except TimeoutError:
        started.proc.kill()
        await started.proc.wait()


def pipeline(port: int, context: ssl.SSLContext, first: bytes) -> tuple[ssl.SSLSocket, int]:
    """Open a connection, send ``first``, then as many big heads as the sidecar takes until it
    has taken nothing for a second (or five seconds have passed); the socket (left open) and
    the bytes it took."""
    tls = context.wrap_socket(
        socket.create_connection(("127.0.0.1", port)), server_hostname="localhost"
    )
    tls.sendall(first)
    time.sleep(0.2)
    tls.setblocking(False)
    payload = BIG_HEAD * 34
    sent = 0
    deadline = time.monotonic() + 5
    progress = time.monotonic()
    while sent < len(payload) and time.monotonic() < min(deadline, progress + STALL):
        try:
            sent += tls.send(payload[sent : sent + 65536])
            progress = time.monotonic()
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            time.sleep(0.05)
        except OSError:
            break  # refused and closed: nothing more is held
    return tls, sent


@pytest.mark.slow
@pytest.mark.parametrize("first", list(FIRST))
async def test_pipelined_oversized_heads_are_not_held(process: Process, first: str) -> None:
    await asyncio.sleep(0.5)
    baseline = process.rss()
    peak = baseline
    context = process.client_context()
    # all connections at once (each ends when the sidecar stops taking its bytes), the memory
    # read every quarter second meanwhile and for two seconds after
    sending = asyncio.gather(
        *(
            asyncio.to_thread(pipeline, process.port, context, FIRST[first])
            for _ in range(CONNECTIONS)
        )
    )
    try:
        while not sending.done():
            await asyncio.wait([sending], timeout=0.25)
            peak = max(peak, process.rss())
        for _ in range(8):
            await asyncio.sleep(0.25)
            peak = max(peak, process.rss())
    finally:
        opened = await sending  # each thread ends on its own within five seconds
        for tls, _ in opened:
            with contextlib.suppress(OSError):
                tls.close()
    taken = [sent for _, sent in opened]
    growth = peak - baseline
    assert growth < GROWTH_LIMIT, (
        f"RSS grew {growth / MiB:.1f} MiB with {CONNECTIONS} connections "
        f"(each took {[round(t / MiB, 1) for t in taken]} MB of pipelined heads)"
    )
