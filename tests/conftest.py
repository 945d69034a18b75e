"""Shared fixtures: a test PKI on disk, a configuration writer, an echo upstream, a running sidecar.

Everything is real: TLS with generated certificates, sockets on 127.0.0.1, an aiohttp upstream.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from hypothesis import HealthCheck, settings

from sidecar import config as config_mod
from sidecar.app import Sidecar
from sidecar.metrics import Metrics

from .pki import PKI, Issued
from .servers import scripted, serve_app  # noqa: F401 (scripted: a fixture for every module)

# CI and the helpers' machines are loaded 2-CPU boxes: an example that takes long is the
# machine, not a defect, so hypothesis neither times examples nor fails for slowness (a test
# that sets its own suppress_health_check list adds too_slow to it).
settings.register_profile("sidecar", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("sidecar")

ALICE_SUB = "2d73cf2a-5339-421e-81cd-8fa0d25a100b"
BOB_SUB = "6c0c8c2e-1f0a-4f51-9b1e-2b6a0c7f1d11"


@dataclass
class Certs:
    pki: PKI
    alice: Issued
    bob: Issued
    stranger: Issued  # trusted CA, bound to nobody


@pytest.fixture(scope="session")
def certs() -> Certs:
    pki = PKI.create()
    return Certs(
        pki, pki.client("Alice Liddell"), pki.client("Bob Builder"), pki.client("Mallory Stranger")
    )


@dataclass
class ConfigDir:
    """A folder with TLS files and a writer for sidecar.yaml."""

    path: Path
    certs: Certs

    def write(self, data: dict[str, Any], name: str = "sidecar.yaml") -> Path:
        file = self.path / name
        file.write_text(yaml.safe_dump(data, sort_keys=False))
        return file

    def base(self, upstream_port: int = 1, **overrides: Any) -> dict[str, Any]:
        """A valid configuration: alice (administrator) and bob (member), three routes."""
        data: dict[str, Any] = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "tls": {
                "certificate": "server.pem",
                "key": "server.key",
                "client_ca": ["client-ca.pem"],
                "client_certificate": "optional",
            },
            "upstream": {
                "url": f"http://127.0.0.1:{upstream_port}",
                "timeout": {"connect": "2s", "read": "5s"},
            },
            "identity": {
                "backend": "static",
                "static": {
                    "users": [
                        {
                            "sub": ALICE_SUB,
                            "username": "alice",
                            "given_name": "Alice",
                            "family_name": "Liddell",
                            "email": "alice@example.com",
                            "roles": ["administrator"],
                            "certificates": [{"file": "alice.pem"}],
                        },
                        {
                            "sub": BOB_SUB,
                            "username": "bob",
                            "roles": ["member"],
                            "certificates": [{"sha256": _colon_fp(self.certs.bob.der)}],
                        },
                    ]
                },
            },
            "routes": [
                {"path": "/public/", "access": "public"},
                {"path": "/admin/", "roles": ["administrator"]},
                {"path": "/"},
            ],
            "admin": {"host": "127.0.0.1", "port": 0},
            "reload": {"watch": False},
            "shutdown": {"drain_delay": 0, "grace_period": "2s"},
        }
        for key, value in overrides.items():
            data[key] = value
        return data


def _colon_fp(der: bytes) -> str:
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, 64, 2))


@pytest.fixture
def config_dir(tmp_path: Path, certs: Certs) -> ConfigDir:
    pki = certs.pki
    pki.server.write(tmp_path, "server")
    (tmp_path / "client-ca.pem").write_bytes(pki.client_root.pem + pki.client_intermediate.pem)
    (tmp_path / "server-ca.pem").write_bytes(pki.server_ca.pem)
    certs.alice.write(tmp_path, "alice")
    certs.bob.write(tmp_path, "bob")
    certs.stranger.write(tmp_path, "stranger")
    return ConfigDir(tmp_path, certs)


# ---- an echo upstream ---------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body_sha256: str
    body_len: int

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class Upstream:
    port: int
    seen: list[Seen] = field(default_factory=list)

    @property
    def last(self) -> Seen:
        assert self.seen, "the upstream received no request"
        return self.seen[-1]


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    state = Upstream(0)

    async def echo(request: web.Request) -> web.StreamResponse:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        seen = Seen(request.method, request.raw_path, headers, digest.hexdigest(), size)
        state.seen.append(seen)
        if request.path.startswith("/download/"):
            n = int(request.path.rsplit("/", 1)[1])
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            resp.content_length = n
            await resp.prepare(request)
            block = bytes(range(256)) * 256
            sent = 0
            while sent < n:
                piece = block[: min(len(block), n - sent)]
                await resp.write(piece)
                sent += len(piece)
            await resp.write_eof()
            return resp
        if request.path.startswith("/ws"):
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                if msg.type == web.WSMsgType.TEXT:
                    await ws.send_str("echo:" + msg.data)
                elif msg.type == web.WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
            return ws
        return web.json_response(
            {
                "method": seen.method,
                "path": seen.raw_path,
                "headers": seen.headers,
                "sha256": seen.body_sha256,
                "length": size,
            }
        )

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", echo)
    runner, state.port = await serve_app(app)
    yield state
    await runner.cleanup()


# ---- a running sidecar --------------------------------------------------------------------


@dataclass
class Running:
    sidecar: Sidecar
    config_dir: ConfigDir
    certs: Certs

    @property
    def url(self) -> str:
        return f"https://localhost:{self.sidecar.port}"

    def client_ssl(
        self, who: Issued | None = None, *, chain: list[Issued] | None = None
    ) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=self.certs.pki.server_ca.pem.decode())
        if who is not None:
            folder = self.config_dir.path / "clients"
            cert, key = who.write(folder, hashlib.sha256(who.der).hexdigest()[:16], chain=chain)
            ctx.load_cert_chain(cert, key)
        return ctx


SidecarFactory = Callable[..., Any]


@pytest.fixture
async def start_sidecar(config_dir: ConfigDir, certs: Certs) -> AsyncIterator[SidecarFactory]:
    started: list[Sidecar] = []

    async def start(data: dict[str, Any], **options: Any) -> Running:
        """``options`` go to ``Sidecar`` (e.g. ``ticket_secret``: as a worker of several)."""
        path = config_dir.write(data)
        cfg = config_mod.load(path)
        sidecar = Sidecar(cfg, config_path=path, metrics=Metrics(), **options)
        await sidecar.start()
        started.append(sidecar)
        return Running(sidecar, config_dir, certs)

    yield start
    for sidecar in started:
        await sidecar.stop(grace=1)


@pytest.fixture
async def running(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> Running:
    result: Running = await start_sidecar(config_dir.base(upstream.port))
    return result


def decode_userinfo(value: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(base64.b64decode(value, validate=True))
    return doc


def _test_loop() -> str:
    """The event loop async tests run on: uvloop, the loop ``sidecar run`` uses, unless
    ``SIDECAR_TEST_LOOP=asyncio`` (CI runs the interpreted build that way)."""
    return "asyncio" if os.environ.get("SIDECAR_TEST_LOOP") == "asyncio" else "uvloop"


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]] | None:
    if _test_loop() == "asyncio":
        return {"asyncio": asyncio.new_event_loop}
    import uvloop

    return {"uvloop": uvloop.new_event_loop}


#: fixtures that start the sidecar as its own process (tests/fleet.py's replicas)
OWN_PROCESS_FIXTURES = frozenset({"fleet"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests whose sidecar runs as a ``sidecar run`` process of its own are marked
    ``own_process`` (by hand, or here when they use a fixture in ``OWN_PROCESS_FIXTURES``).
    ``SIDECAR_TEST_OWN_PROCESS=skip`` skips them: CI's second run (the interpreted build)
    leaves them to the first. What they exercise besides the request path (the supervisor,
    its workers, signals, replicas sharing Redis) is interpreted in both builds, and the
    interpreted request path is what the in-process tests run there."""
    skipping = os.environ.get("SIDECAR_TEST_OWN_PROCESS") == "skip"
    skip = pytest.mark.skip(
        reason="own_process: left to the compiled run (SIDECAR_TEST_OWN_PROCESS=skip)"
    )
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        if callspec is not None:  # a parameter of the same name is not the fixture
            fixtures -= set(callspec.params)
        if fixtures & OWN_PROCESS_FIXTURES and item.get_closest_marker("own_process") is None:
            item.add_marker(pytest.mark.own_process)
        if skipping and item.get_closest_marker("own_process"):
            item.add_marker(skip)


def pytest_report_header(config: pytest.Config) -> str:
    """Which build of the request path the tests run (see setup.py; SIDECAR_PURE=1 for the
    interpreted one)."""
    from sidecar import BUILD

    line = f"sidecar build: {BUILD.describe()}, test loop: {_test_loop()}"
    return line if BUILD.note is None else f"{line} ({BUILD.note})"
