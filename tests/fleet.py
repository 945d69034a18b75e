"""A fleet for the tests: real ``sidecar run`` processes sharing one Redis and one counting
verdict service (the ``http`` backend), and a TLS client that presents many certificates.

Everything runs on 127.0.0.1: the sidecars as subprocesses (their logs in files), the verdict
service and the echo upstream in the test's own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import ssl
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from .conftest import ConfigDir
from .pki import Issued
from .redisd import free_port
from .servers import serve_app

# ---- the verdict service --------------------------------------------------------------------


@dataclass
class Verdicts:
    """The http backend: allows every certificate but those in ``deny``; counts calls."""

    url: str = ""
    latency: float = 0.02
    calls: Counter[str] = field(default_factory=Counter)
    deny: set[str] = field(default_factory=set)
    failing: bool = False

    def users(self, sha256: str) -> dict[str, object]:
        return {"sub": f"u-{sha256[:12]}", "username": f"user-{sha256[:8]}", "roles": ["member"]}


@pytest.fixture
async def verdicts() -> AsyncIterator[Verdicts]:
    state = Verdicts()

    async def verdict(request: web.Request) -> web.Response:
        body = await request.json()
        sha = str(body["sha256"])
        state.calls[sha] += 1
        await asyncio.sleep(state.latency)
        if state.failing:
            return web.Response(status=500)
        if sha in state.deny:
            return web.json_response({"verdict": "deny", "reason": "revoked"})
        return web.json_response({"verdict": "allow", "user": state.users(sha)})

    app = web.Application()
    app.router.add_post("/verdict", verdict)
    runner, port = await serve_app(app)
    state.url = f"http://127.0.0.1:{port}/verdict"
    yield state
    await runner.cleanup()


# ---- replicas ---------------------------------------------------------------------------------


@dataclass
class Replica:
    name: str
    proc: asyncio.subprocess.Process
    port: int
    admin_port: int
    log: Path

    def events(self) -> list[dict[str, Any]]:
        lines = self.log.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    async def admin(self, method: str, path: str) -> tuple[int, str]:
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                method,
                f"http://127.0.0.1:{self.admin_port}{path}",
                headers={"X-Sidecar-Admin": "1"},
            ) as resp,
        ):
            return resp.status, await resp.text()

    async def metric(self, name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        _, text = await self.admin("GET", "/metrics")
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
        return total


def replica_config(
    config_dir: ConfigDir,
    *,
    upstream_port: int,
    verdicts: Verdicts,
    redis_url: str,
    workers: int = 1,
    **shared: Any,
) -> dict[str, Any]:
    data = config_dir.base(upstream_port)
    data["listen"] = {"host": "127.0.0.1", "port": free_port(), "workers": workers}
    data["admin"] = {"host": "127.0.0.1", "port": free_port()}
    data["identity"] = {
        "backend": "http",
        "http": {"url": verdicts.url, "timeout": "3s"},
        "cache": {"shared": {"url": redis_url, **shared}},
    }
    data["log"] = {"level": "warning"}
    return data


class PortTaken(AssertionError):
    """A replica could not bind its ports: another socket took one after ``free_port``."""


@pytest.fixture
async def fleet(config_dir: ConfigDir) -> AsyncIterator[Callable[..., Awaitable[Replica]]]:
    """``await fleet(name, data)``: a ``sidecar run`` process, ready; stopped at the end."""
    started: list[Replica] = []

    async def start(name: str, data: dict[str, Any]) -> Replica:
        for _ in range(3):
            try:
                return await start_once(name, data)
            except PortTaken:
                # free_port's port was taken meanwhile (an outgoing connection's local port
                # is drawn from the same range): new ports, in ``data`` too, and again
                data["listen"]["port"], data["admin"]["port"] = free_port(), free_port()
        return await start_once(name, data)

    async def start_once(name: str, data: dict[str, Any]) -> Replica:
        path = config_dir.write(data, f"{name}.yaml")
        log = config_dir.path / f"{name}.log"
        with log.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "sidecar",
                "run",
                "--config",
                str(path),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=err,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        replica = Replica(name, proc, data["listen"]["port"], data["admin"]["port"], log)
        started.append(replica)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                if (await replica.admin("GET", "/readyz"))[0] == 200:
                    return replica
            if proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
        text = log.read_text()
        if proc.returncode is not None and "address already in use" in text:
            started.remove(replica)
            raise PortTaken(text[-3000:])
        raise AssertionError(f"{name} did not become ready: {text[-3000:]}")

    yield start
    for replica in started:
        if replica.proc.returncode is None:
            replica.proc.send_signal(signal.SIGTERM)
    for replica in started:
        try:
            await asyncio.wait_for(replica.proc.wait(), 20)
        except TimeoutError:
            replica.proc.kill()
            await replica.proc.wait()


# ---- clients ----------------------------------------------------------------------------------


@dataclass
class Client:
    """One client certificate, ready to connect."""

    issued: Issued
    context: ssl.SSLContext

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.issued.der).hexdigest()


def make_clients(config_dir: ConfigDir, count: int, prefix: str = "fleet") -> list[Client]:
    pki = config_dir.certs.pki
    folder = config_dir.path / "clients"
    clients = []
    for i in range(count):
        issued = pki.client(f"{prefix}-{i}")
        cert, key = issued.write(folder, f"{prefix}-{i}", chain=[pki.client_intermediate])
        context = ssl.create_default_context(cadata=pki.server_ca.pem.decode())
        context.load_cert_chain(cert, key)
        clients.append(Client(issued, context))
    return clients


async def get(port: int, client: Client | None, path: str = "/app/x", timeout: float = 30) -> int:
    """One request on a new TLS connection; the status (0: no answer)."""
    context = client.context if client else ssl.create_default_context()
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname="localhost"
            )
            try:
                writer.write(
                    f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
                )
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.read()
                return int(head.split(b" ", 2)[1])
            finally:
                writer.close()
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError):
        return 0


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "the condition did not become true in time"
        await asyncio.sleep(0.05)


# ---- a TCP proxy to cut one replica off Redis --------------------------------------------------


class CutProxy:
    """Relays 127.0.0.1:<port> to Redis until ``cut``: then every relayed connection drops and
    new ones are refused, until ``restore``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    async def restore(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}
