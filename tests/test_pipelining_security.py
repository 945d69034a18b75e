"""A client that pipelines and never reads must not make the sidecar buffer without bound.

The sidecar runs as its own process (``sidecar run``) so that its memory can be read from
``/proc/<pid>/status``. A raw TLS client without a certificate writes 48 MiB of small
pipelined requests and never reads a byte: on a public route (the upstream's answers,
forwarded) and on a protected one (the sidecar's own 401s), on the listener's own path and
on aiohttp's (requests with a body are handed over to it). The process may grow by less than
16 MiB, and the connection must be cut off once the client has taken nothing for
``limits.send_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .conftest import ConfigDir, Upstream
from .ports import free_port

#: the sidecar runs as its own process (conftest.pytest_collection_modifyitems)
pytestmark = pytest.mark.own_process

MiB = 1024 * 1024
FLOOD = 48 * MiB
GROWTH_LIMIT = 16 * MiB
SEND_TIMEOUT = 2.0
# How long the flood may take to be cut off at most: generous, the machine is shared.
CUT_OFF_WITHIN = 60.0


@dataclass
class Process:
    proc: asyncio.subprocess.Process
    port: int
    admin_port: int
    config_dir: ConfigDir

    def rss(self) -> int:
        """The process's resident set, in bytes (VmRSS)."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc/<pid>/status")

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.config_dir.path / "server-ca.pem"))


async def start_process(config_dir: ConfigDir, data: dict[str, Any]) -> Process:
    port, admin_port = free_port(), free_port()
    data["listen"]["port"] = port
    data["admin"]["port"] = admin_port
    path = config_dir.write(data)
    # stderr to a file: a pipe nobody reads would stop the process at its first full buffer
    log = (config_dir.path / "sidecar.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "run",
        "--config",
        str(path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log,
    )
    log.close()
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline and proc.returncode is None:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as resp:
                    if resp.status == 200:
                        return Process(proc, port, admin_port, config_dir)
            await asyncio.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()
    log_text = (config_dir.path / "sidecar.log").read_text(errors="replace")
    raise AssertionError(f"sidecar did not become ready: {log_text[-2000:]}")


@pytest.fixture
async def process(config_dir: ConfigDir, upstream: Upstream) -> AsyncIterator[Process]:
    data = config_dir.base(upstream.port)
    data["limits"] = {"send_timeout": f"{SEND_TIMEOUT}s"}
    started = await start_process(config_dir, data)
    yield started
    with contextlib.suppress(ProcessLookupError):
        started.proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(started.proc.wait(), 15)
    except TimeoutError:
        started.proc.kill()
        await started.proc.wait()


@dataclass
class Flood:
    sent: int = 0
    #: seconds from the first byte until the sidecar cut the connection off (None: it did not)
    cut_off_after: float | None = None
    error: str = ""


def flood(port: int, context: ssl.SSLContext, unit: bytes, stop: threading.Event) -> Flood:
    """Write ``FLOOD`` bytes of ``unit`` repeated, reading nothing, until the sidecar cuts the
    connection off, ``CUT_OFF_WITHIN`` passed, or ``stop``."""
    result = Flood()
    chunk = unit * max(1, 64 * 1024 // len(unit))
    raw = socket.create_connection(("127.0.0.1", port))
    tls = context.wrap_socket(raw, server_hostname="localhost")
    tls.settimeout(0.5)
    # Once everything is written, the end of the connection is watched without reading:
    # the error and hang-up events of the socket (the sidecar aborts: a reset).
    watch = select.poll()
    watch.register(tls.fileno(), select.POLLERR | select.POLLHUP | select.POLLRDHUP)
    started = time.monotonic()
    try:
        while time.monotonic() - started < CUT_OFF_WITHIN and not stop.is_set():
            if result.sent >= FLOOD:
                if watch.poll(100):
                    raise ConnectionResetError("the sidecar closed the connection")
                continue
            try:
                result.sent += tls.send(chunk)
            except (TimeoutError, ssl.SSLWantWriteError):
                continue  # OpenSSL wants the same write again
    except (OSError, ssl.SSLError) as exc:
        result.cut_off_after = time.monotonic() - started
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(OSError):
            tls.close()
    return result


async def measure(
    process: Process, unit: bytes, warm: Callable[[], Awaitable[None]]
) -> tuple[Flood, int]:
    """Flood the sidecar; the flood's result and the largest growth of its RSS meanwhile."""
    await warm()
    await asyncio.sleep(0.5)  # let the warm-up's log lines and buffers settle
    baseline = process.rss()
    peak = baseline
    stop = threading.Event()
    task = asyncio.ensure_future(
        asyncio.to_thread(flood, process.port, process.client_context(), unit, stop)
    )
    try:
        while not task.done():
            peak = max(peak, process.rss())
            await asyncio.sleep(0.02)
    finally:
        stop.set()
    result = await task
    peak = max(peak, process.rss())
    return result, peak - baseline


async def get_ok(process: Process, request: bytes, expect: bytes) -> None:
    """A well-behaved client on its own connection: one request, its whole answer."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", process.port, ssl=process.client_context(), server_hostname="localhost"
    )
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(expect), head[:100]
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()


def post(path: str) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\n\r\nx".encode()


CASES = {
    # the listener's own path: forwarded answers, and the sidecar's own 401s
    "fast-path-forwarded": (get("/public/p"), b"HTTP/1.1 200"),
    "fast-path-401": (get("/app/p"), b"HTTP/1.1 401"),
    # aiohttp's path (a body hands the connection over): forwarded, and 401
    "aiohttp-forwarded": (post("/public/p"), b"HTTP/1.1 200"),
    "aiohttp-401": (post("/app/p"), b"HTTP/1.1 401"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
async def test_pipelining_client_that_never_reads_is_bounded_and_cut_off(
    process: Process, upstream: Upstream, case: str
) -> None:
    unit, expect = CASES[case]

    async def warm() -> None:
        for _ in range(3):
            await get_ok(process, unit, expect)

    result, growth = await measure(process, unit, warm)
    assert result.cut_off_after is not None, (
        f"not cut off within {CUT_OFF_WITHIN} s after writing {result.sent / MiB:.1f} MiB; "
        f"RSS grew {growth / MiB:.1f} MiB"
    )
    assert growth < GROWTH_LIMIT, (
        f"RSS grew {growth / MiB:.1f} MiB (limit {GROWTH_LIMIT / MiB:.0f}) "
        f"after {result.sent / MiB:.1f} MiB written"
    )
    # The client wrote until the sidecar stopped reading, then nothing was taken for
    # send_timeout: so the cut-off came no sooner than that.
    assert result.cut_off_after >= SEND_TIMEOUT, result
    assert result.sent < FLOOD, "the sidecar read all the client sent while it read nothing"
    # and the sidecar goes on serving others
    await get_ok(process, unit, expect)


@pytest.fixture(autouse=True)
def _linux_only() -> None:
    if not os.path.exists("/proc/self/status"):
        pytest.skip("reads /proc/<pid>/status")
