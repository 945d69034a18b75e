"""Resumption with ``listen.workers: 2`` (the real ``sidecar run``), attacked from outside.

The kernel hands each new connection to either worker. A session must resume on both (from
the table of sessions the supervisor hands them, or with ``tls.session_cache: 0`` from tickets
whose keys come from one secret it hands them), must not resume anywhere after a reload that
changed trust (issue #12 item 4), and a session the sidecar did not make (another sidecar's,
or a ticket with bytes flipped in it) gives a full handshake, never an error.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar import tls_tickets

from .conftest import ConfigDir
from .pki import make_ca
from .test_listener import App, upstream
from .test_operations import metric
from .test_signals import start as start_process

#: the sidecar runs as its own process (conftest.pytest_collection_modifyitems)
pytestmark = pytest.mark.own_process

__all__ = ["upstream"]

#: new connections per check: all on one worker has a chance of 2 in 2**24
SPREAD = 24


@dataclass
class Fetched:
    status: int
    reused: bool
    session: ssl.SSLSession | None


def _get(
    port: int, ctx: ssl.SSLContext, path: str, session: ssl.SSLSession | None, name: str
) -> Fetched:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=name, session=session) as tls,
    ):
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
        return Fetched(status, bool(tls.session_reused), tls.session)


async def fetch(
    port: int,
    ctx: ssl.SSLContext,
    path: str,
    session: ssl.SSLSession | None = None,
    name: str = "localhost",
) -> Fetched:
    """GET ``path`` on a new connection (SNI and Host ``name``), resuming ``session``."""
    return await asyncio.to_thread(_get, port, ctx, path, session, name)


def client(config_dir: ConfigDir, *, tls12: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(config_dir.path / "server-ca.pem"))
    ctx.load_cert_chain(config_dir.path / "alice.pem", config_dir.path / "alice.key")
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class Sidecar:
    """``sidecar run`` with two workers; its access log (JSON, one line per request, with the
    worker's index) is read as it comes so the pipe never fills."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, admin_port: int) -> None:
        self.proc, self.port, self.admin_port = proc, port, admin_port
        self.lines: list[str] = []
        assert proc.stdout is not None and proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(proc.stdout)),
            asyncio.create_task(self._read(proc.stderr)),
        ]

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.lines.append(line.decode(errors="replace"))

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)

    def workers_of(self, prefix: str) -> set[int]:
        """The workers that logged a request whose path starts with ``prefix``."""
        seen = set()
        for line in self.lines:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "request" and str(event.get("path")).startswith(prefix):
                    seen.add(int(event["worker"]))
        return seen

    async def metrics(self) -> str:
        """/metrics of the admin listener (the supervisor's: summed over the workers)."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{self.admin_port}/metrics") as resp,
        ):
            return await resp.text()

    async def reloads(self) -> float:
        text = await self.metrics()
        try:
            return metric(text, "sidecar_config_reloads_total", result="success")
        except AssertionError:  # no reload yet: no sample
            return 0.0

    async def reload(self) -> None:
        """SIGHUP, and wait until both workers have reloaded."""
        before = await self.reloads()
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while await self.reloads() < before + 2:
            assert time.monotonic() < deadline, "the workers did not both reload"
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def two_workers(config_dir: ConfigDir, data: dict[str, Any]) -> AsyncIterator[Sidecar]:
    data["listen"]["workers"] = 2
    data["log"] = {"level": "info", "format": "json"}
    sidecar = Sidecar(*await start_process(config_dir, data))
    try:
        yield sidecar
    finally:
        await sidecar.stop()


@pytest.mark.parametrize("kind", ["TLS 1.3", "TLS 1.2"])
@pytest.mark.parametrize("cache", [tls_tickets.SESSION_CACHE_SIZE, 0], ids=["table", "tickets"])
async def test_a_session_resumes_on_both_workers(
    config_dir: ConfigDir, upstream: App, kind: str, cache: int
) -> None:
    """From the table the workers share (tls_sessions), or, with ``tls.session_cache: 0``,
    from a ticket either worker can open."""
    ctx = client(config_dir, tls12="1.2" in kind)
    data = config_dir.base(upstream.port)
    data["tls"]["session_cache"] = cache
    async with two_workers(config_dir, data) as sidecar:
        first = await fetch(sidecar.port, ctx, "/app/first")
        assert first.status == 200
        again = [
            await fetch(sidecar.port, ctx, f"/app/again/{i}", first.session) for i in range(SPREAD)
        ]
        text = await sidecar.metrics()
    assert [(a.status, a.reused) for a in again] == [(200, True)] * SPREAD
    assert metric(text, "sidecar_tls_handshakes_total", resumed="true") == SPREAD
    assert metric(text, "sidecar_tls_handshakes_total", resumed="false") == 1
    assert sidecar.workers_of("/app/again/") == {0, 1}, "the connections did not reach both"


async def test_no_session_resumes_in_any_worker_after_a_trust_change(
    config_dir: ConfigDir, upstream: App
) -> None:
    """Another CA added to client_ca: alice is still trusted, but what decides trust changed,
    so every new connection is a full handshake (verified against the new trust) in both
    workers."""
    ctx = client(config_dir)
    async with two_workers(config_dir, config_dir.base(upstream.port)) as sidecar:
        first = await fetch(sidecar.port, ctx, "/app/first")
        again = await fetch(sidecar.port, ctx, "/app/again", first.session)
        assert (first.status, again.status, again.reused) == (200, 200, True)
        ca = config_dir.path / "client-ca.pem"
        ca.write_bytes(ca.read_bytes() + make_ca("Another client CA").pem)
        await sidecar.reload()
        after = [
            await fetch(sidecar.port, ctx, f"/app/after/{i}", again.session) for i in range(SPREAD)
        ]
        assert [(a.status, a.reused) for a in after] == [(200, False)] * SPREAD
        # the sessions made now resume again, in both workers
        fresh = after[-1].session
        resumed = [await fetch(sidecar.port, ctx, f"/app/fresh/{i}", fresh) for i in range(SPREAD)]
        assert [(r.status, r.reused) for r in resumed] == [(200, True)] * SPREAD
    assert sidecar.workers_of("/app/after/") == {0, 1}
    assert sidecar.workers_of("/app/fresh/") == {0, 1}


async def test_no_session_resumes_in_any_worker_after_its_ca_was_removed(
    config_dir: ConfigDir, upstream: App
) -> None:
    ctx = client(config_dir)
    async with two_workers(config_dir, config_dir.base(upstream.port)) as sidecar:
        first = await fetch(sidecar.port, ctx, "/app/first")
        assert first.status == 200
        (config_dir.path / "client-ca.pem").write_bytes(make_ca("Another client CA").pem)
        await sidecar.reload()
        for i in range(SPREAD):
            try:
                after = await fetch(sidecar.port, ctx, f"/app/after/{i}", first.session)
            except (ssl.SSLError, ConnectionError):
                continue  # refused in the handshake (TLS 1.2) or at the first read (TLS 1.3)
            # optional client certificate: served as anonymous at most, never as alice
            assert not after.reused and after.status == 401, after
    assert upstream.paths() == ["/app/first"]


async def test_a_ticket_from_another_sidecar_gives_a_full_handshake(
    config_dir: ConfigDir, upstream: App
) -> None:
    """Same configuration, same certificates, another process: another secret. Its tickets are
    forgeries here (a key name nobody here knows)."""
    ctx = client(config_dir)
    async with two_workers(config_dir, config_dir.base(upstream.port)) as other:
        foreign = await fetch(other.port, ctx, "/app/there")
        assert foreign.status == 200 and foreign.session is not None
    async with two_workers(config_dir, config_dir.base(upstream.port)) as sidecar:
        here = [await fetch(sidecar.port, ctx, f"/app/here/{i}", foreign.session) for i in range(8)]
    assert [(h.status, h.reused) for h in here] == [(200, False)] * 8


def _ticket_span(der: bytes) -> tuple[int, int]:
    """Where the ticket's bytes are in a DER ``SSL_SESSION``: the OCTET STRING in its ``[10]``
    field, found with ``openssl asn1parse``."""
    out = subprocess.run(
        ["openssl", "asn1parse", "-inform", "DER"], input=der, capture_output=True, check=True
    ).stdout.decode()
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if "cont [ 10 ]" in line:
            match = re.match(r"\s*(\d+):d=\d+\s+hl=(\d+)\s+l=\s*(\d+)", lines[i + 1])
            assert match and "OCTET STRING" in lines[i + 1], lines[i + 1]
            offset, header, length = (int(g) for g in match.groups())
            return offset + header, offset + header + length
    raise AssertionError(f"no ticket in the session: {out}")


async def s_client(port: int, folder: Path, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-servername",
        "localhost",
        "-CAfile",
        str(folder / "server-ca.pem"),
        "-cert",
        str(folder / "alice.pem"),
        "-key",
        str(folder / "alice.key"),
        "-tls1_2",
        "-ign_eof",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    request = b"GET /app/s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    out, _ = await asyncio.wait_for(proc.communicate(request), 20)
    return out.decode(errors="replace")


@pytest.mark.parametrize("where", ["key name", "encrypted state", "MAC"])
async def test_a_garbled_ticket_gives_a_full_handshake(
    config_dir: ConfigDir, upstream: App, where: str
) -> None:
    folder = config_dir.path
    data = config_dir.base(upstream.port)
    data["tls"]["session_cache"] = 0  # tickets, not session ids
    async with two_workers(config_dir, data) as sidecar:
        out = await s_client(sidecar.port, folder, "-sess_out", str(folder / "session.pem"))
        assert "HTTP/1.1 200" in out, out
        pem = (folder / "session.pem").read_text()
        body = "".join(line for line in pem.splitlines() if not line.startswith("-----"))
        der = bytearray(base64.b64decode(body))
        start, end = _ticket_span(bytes(der))
        spot = {"key name": start + 3, "encrypted state": start + 40, "MAC": end - 3}[where]
        der[spot] ^= 0x5A
        garbled = base64.encodebytes(bytes(der)).decode()
        (folder / "garbled.pem").write_text(
            f"-----BEGIN SSL SESSION PARAMETERS-----\n{garbled}-----END SSL SESSION PARAMETERS-----\n"
        )
        outs = [
            await s_client(sidecar.port, folder, "-sess_in", str(folder / "garbled.pem"))
            for _ in range(4)
        ]
        intact = await s_client(sidecar.port, folder, "-sess_in", str(folder / "session.pem"))
    for out in outs:
        assert "HTTP/1.1 200" in out, out
        assert "\nNew, " in out and "Reused, " not in out, out
    assert "Reused, " in intact, intact
