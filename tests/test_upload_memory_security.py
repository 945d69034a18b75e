"""What an upload in flight costs the sidecar in memory (issue #19 item 5).

Uploads far larger than ``limits.body_buffer`` stream to an application that takes none of
their bytes: each is held back by flow control (at most its window waiting in the sidecar,
plus the upstream connection's write buffer), so memory grows with the number of uploads, not
with their size. The sidecar runs as its own process, so that its memory can be read.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import ssl
import time
from collections.abc import AsyncIterator
from typing import cast

import pytest

from .conftest import ConfigDir
from .test_pipelining_security import Process, start_process

#: the sidecar runs as its own process (conftest.pytest_collection_modifyitems)
pytestmark = pytest.mark.own_process

MiB = 1024 * 1024
UPLOADS = 20
#: per upload in flight, on average (measured: about 0.95 MiB; through aiohttp's server
#: before, about 2.1 MiB). The window is 128 KiB; the rest is TLS state, the connections'
#: read buffers and objects.
PER_UPLOAD = 3 * MiB // 2


@pytest.fixture
async def process(config_dir: ConfigDir) -> AsyncIterator[Process]:
    release = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        # takes none of the request, its head included
        cast(asyncio.Transport, writer.transport).pause_reading()
        await release.wait()
        writer.close()

    upstream = await asyncio.start_server(stall, "127.0.0.1", 0)
    try:
        data = config_dir.base(upstream.sockets[0].getsockname()[1])
        data["upstream"]["timeout"] = {"connect": "5s", "read": "120s"}
        data["upstream"]["max_connections"] = UPLOADS + 4
        data["limits"] = {"body_min_rate": 0}
        started = await start_process(config_dir, data)
        try:
            yield started
        finally:
            release.set()  # the application answers nothing: the uploads' forwards end
            with contextlib.suppress(ProcessLookupError):
                started.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(started.proc.wait(), 15)
            except TimeoutError:
                started.proc.kill()
                await started.proc.wait()
    finally:
        release.set()
        for writer in writers:
            writer.close()
        upstream.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(upstream.wait_closed(), 5)


def upload(port: int, context: ssl.SSLContext, seconds: float) -> tuple[ssl.SSLSocket, int]:
    """Start a 1 GB upload and send as much of it as the sidecar takes within ``seconds``."""
    tls = context.wrap_socket(
        socket.create_connection(("127.0.0.1", port)), server_hostname="localhost"
    )
    tls.sendall(
        b"POST /public/upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000000\r\n\r\n"
    )
    tls.setblocking(False)
    chunk = b"u" * 65536
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sent += tls.send(chunk)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            time.sleep(0.05)
        except OSError:
            break
    return tls, sent


@pytest.mark.slow
async def test_memory_grows_with_uploads_not_with_their_size(process: Process) -> None:
    await asyncio.sleep(0.5)
    baseline = process.rss()
    sockets: list[ssl.SSLSocket] = []
    taken: list[int] = []
    try:
        results = await asyncio.gather(
            *(
                asyncio.to_thread(upload, process.port, process.client_context(), 3)
                for _ in range(UPLOADS)
            )
        )
        for tls, sent in results:
            sockets.append(tls)
            taken.append(sent)
        await asyncio.sleep(1)
        growth = process.rss() - baseline
    finally:
        for tls in sockets:
            with contextlib.suppress(OSError):
                tls.close()
    print(
        f"RSS +{growth / MiB:.1f} MiB for {UPLOADS} uploads in flight "
        f"({growth / UPLOADS / 1024:.0f} KiB each); each sent {min(taken) / MiB:.1f}"
        f"-{max(taken) / MiB:.1f} MB"
    )
    assert growth < UPLOADS * PER_UPLOAD, f"RSS grew {growth / MiB:.1f} MiB"
