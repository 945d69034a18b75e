"""The identity backends' HTTP clients against hostile identity services (issue #12, item 11).

A verdict service or an Identity Plus endpoint that answers with a redirect must not move the
sidecar's question anywhere else (a redirect to ``http://`` would skip TLS and
``server_pins``), and one that answers with an endless or enormous body must not make the
sidecar hold it: every such reply is a failing reply (503, fail closed), and the sidecar
reads no more than 1 MiB of it. Everything runs through the whole sidecar over real TLS.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from .conftest import ConfigDir, Running, SidecarFactory, Upstream
from .fake_identityplus import FakeIdentityPlus, fake_identityplus
from .pki import PKI, Issued
from .servers import serve_app

__all__ = ["fake_identityplus"]  # the fixture, imported to be used here

MiB = 1024 * 1024
ALLOW = {
    "verdict": "allow",
    "user": {"sub": "evil", "username": "evil", "roles": ["administrator"]},
}


# ---- the services -----------------------------------------------------------------------------


@dataclass
class PlainService:
    """A plain-HTTP server on 127.0.0.1 that allows everyone: where a redirect would lead."""

    port: int = 0
    seen: list[tuple[str, str]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/verdict"


@pytest.fixture
async def plain() -> AsyncIterator[PlainService]:
    service = PlainService()

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        service.seen.append((request.method, request.path))
        profile = {
            "outcome": "OK 0001 Certificate valid",
            "organizational-reference": "evil",
            "service-roles": ["administrator"],
        }
        return web.json_response({**ALLOW, "Identity-Profile": profile})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner, service.port = await serve_app(app)
    yield service
    await runner.cleanup()


@dataclass
class HostileService:
    """An HTTPS verdict service whose answer the test chooses: ``mode`` is ``redirect``
    (``status`` to ``location``), ``stream`` (``size`` bytes of a valid allowing reply,
    chunked, or with a Content-Length when ``declare_length``), or ``gzip`` (a small
    compressed body that inflates to ``size`` bytes)."""

    ca_file: Path
    mode: str = "redirect"
    status: int = 302
    location: str = ""
    size: int = 64 * MiB
    declare_length: bool = False
    port: int = 0
    requests: int = 0
    #: body bytes the service managed to hand to its socket before the client went away
    sent: int = 0

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}/verdict"


_HEAD = json.dumps(ALLOW)[:-1].encode() + b', "padding": "'
_TAIL = b'"}'
_BLOCK = b"x" * (64 * 1024)


def padded_allow(size: int) -> list[bytes]:
    """A valid allowing reply of exactly ``size`` bytes (unknown keys are ignored), in pieces
    of at most 64 KiB that share one block: the service holds no copy of the whole."""
    pieces, left = [_HEAD], size - len(_HEAD) - len(_TAIL)
    while left > 0:
        pieces.append(_BLOCK if left >= len(_BLOCK) else _BLOCK[:left])
        left -= len(pieces[-1])
    return [*pieces, _TAIL]


@pytest.fixture
async def hostile(tmp_path: Path) -> AsyncIterator[HostileService]:
    pki = PKI.create()
    ca_file = tmp_path / "hostile-ca.pem"
    ca_file.write_bytes(pki.server_ca.pem)
    cert, key = pki.server.write(tmp_path, "hostile")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    service = HostileService(ca_file)

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        service.requests += 1
        if service.mode == "redirect":
            return web.Response(status=service.status, headers={"Location": service.location})
        pieces = padded_allow(service.size)
        if service.mode == "gzip":
            return web.Response(
                body=gzip.compress(b"".join(pieces), 9),
                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
            )
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if service.declare_length:
            response.content_length = service.size
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        for piece in pieces:
            transport = request.transport
            if transport is None or transport.is_closing():
                break  # the client went away: what was sent is what counts
            try:
                await response.write(piece)
            except (ConnectionError, RuntimeError):
                break
            service.sent += len(piece)
            # A write into a connection the peer has reset is dropped without an error until
            # the loop runs the transport's callbacks: let it, so that ``sent`` is true.
            await asyncio.sleep(0)
        return response

    app = web.Application()
    app.router.add_route("*", "/verdict", handle)
    runner, service.port = await serve_app(app, ssl_context=context, shutdown_timeout=0.5)
    yield service
    await runner.cleanup()


# ---- helpers ----------------------------------------------------------------------------------


async def get(running: Running, path: str, who: Issued | None) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(running.url + path, ssl=running.client_ssl(who), allow_redirects=False) as r,
    ):
        await r.read()
        return r.status


async def lookups(running: Running, outcome: str) -> float:
    url = f"http://127.0.0.1:{running.sidecar.admin_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "sidecar_identity_lookups_total"
                and sample.labels.get("outcome") == outcome
            ):
                total += sample.value
    return total


def rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def peak_rss_during(work: asyncio.Future[Any] | Any) -> tuple[Any, int]:
    """Run ``work`` while sampling this process's RSS; (its result, the peak growth)."""
    before = rss()
    peak = before
    task = asyncio.ensure_future(work)
    while not task.done():
        peak = max(peak, rss())
        await asyncio.sleep(0.002)
    return task.result(), max(peak, rss()) - before


async def start_http_backend(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream, url: str, ca: Path
) -> Running:
    data = config_dir.base(upstream.port)
    data["identity"] = {"backend": "http", "http": {"url": url, "ca": str(ca), "timeout": "10s"}}
    running: Running = await start_sidecar(data)
    return running


# ---- redirects --------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_the_http_backend_never_follows_a_redirect(
    hostile: HostileService,
    plain: PlainService,
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
    status: int,
) -> None:
    hostile.mode, hostile.status, hostile.location = "redirect", status, plain.url
    running = await start_http_backend(
        start_sidecar, config_dir, upstream, hostile.url, hostile.ca_file
    )
    who = config_dir.certs.pki.client("Redirected Visitor")
    assert await get(running, "/admin/x", who) == 503
    assert hostile.requests == 1
    assert plain.seen == []  # the question went nowhere else
    assert upstream.seen == []
    assert await lookups(running, "http-status") == 1


async def test_identity_plus_never_follows_a_redirect(
    fake_identityplus: FakeIdentityPlus,
    plain: PlainService,
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
) -> None:
    fake_identityplus.redirect_to = plain.url
    fake_identityplus.set_fault(None, "redirect")
    data = config_dir.base(upstream.port)
    data["identity"] = {
        "backend": "identityplus",
        "identityplus": {
            "endpoint": fake_identityplus.url,
            "certificate": str(fake_identityplus.agent_certificate),
            "key": str(fake_identityplus.agent_key),
            "ca": str(fake_identityplus.ca_file),
            "timeout": "5s",
            "enrol_missing": True,
        },
    }
    running = await start_sidecar(data)
    who = config_dir.certs.pki.client("Redirected Visitor")
    assert await get(running, "/admin/x", who) == 503
    assert await get(running, "/app/", None) == 503  # the enrolment intent, redirected too
    assert len(fake_identityplus.requests) == 2
    assert plain.seen == []
    assert upstream.seen == []


# ---- bodies -----------------------------------------------------------------------------------


@pytest.mark.parametrize("declare_length", [False, True], ids=["chunked", "content-length"])
async def test_a_huge_reply_is_503_and_read_no_further(
    hostile: HostileService,
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
    declare_length: bool,
) -> None:
    hostile.mode, hostile.size, hostile.declare_length = "stream", 64 * MiB, declare_length
    running = await start_http_backend(
        start_sidecar, config_dir, upstream, hostile.url, hostile.ca_file
    )
    who = config_dir.certs.pki.client("Flooded Visitor")
    status, growth = await peak_rss_during(get(running, "/app/x", who))
    assert status == 503
    assert upstream.seen == []
    assert await lookups(running, "too-large") == 1
    # The sidecar stopped reading at 1 MiB: what the service got out is that plus what the
    # kernel's socket buffers hold, far from the 64 MiB it tried to send.
    await asyncio.sleep(0.2)
    assert hostile.sent < 24 * MiB, hostile.sent
    assert growth < 24 * MiB, f"RSS grew {growth / MiB:.0f} MiB"


async def test_a_compressed_reply_is_not_inflated(
    hostile: HostileService,
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
) -> None:
    hostile.mode, hostile.size = "gzip", 64 * MiB  # about 64 KiB on the wire
    running = await start_http_backend(
        start_sidecar, config_dir, upstream, hostile.url, hostile.ca_file
    )
    who = config_dir.certs.pki.client("Bombed Visitor")
    status, growth = await peak_rss_during(get(running, "/app/x", who))
    assert status == 503
    assert upstream.seen == []
    assert growth < 24 * MiB, f"RSS grew {growth / MiB:.0f} MiB"


async def test_identity_plus_huge_reply_is_503(
    fake_identityplus: FakeIdentityPlus,
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
) -> None:
    fake_identityplus.set_fault(None, "huge")
    data = config_dir.base(upstream.port)
    data["identity"] = {
        "backend": "identityplus",
        "identityplus": {
            "endpoint": fake_identityplus.url,
            "certificate": str(fake_identityplus.agent_certificate),
            "key": str(fake_identityplus.agent_key),
            "ca": str(fake_identityplus.ca_file),
            "timeout": "10s",
        },
    }
    running = await start_sidecar(data)
    who = config_dir.certs.pki.client("Flooded Visitor")
    status, growth = await peak_rss_during(get(running, "/app/x", who))
    assert status == 503
    assert upstream.seen == []
    assert await lookups(running, "too-large") == 1
    await asyncio.sleep(0.2)
    assert fake_identityplus.huge_sent < 24 * MiB, fake_identityplus.huge_sent
    assert growth < 24 * MiB, f"RSS grew {growth / MiB:.0f} MiB"


async def test_a_reply_of_exactly_one_mib_is_read(
    hostile: HostileService,
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
) -> None:
    hostile.mode, hostile.size = "stream", MiB
    running = await start_http_backend(
        start_sidecar, config_dir, upstream, hostile.url, hostile.ca_file
    )
    who = config_dir.certs.pki.client("Patient Visitor")
    assert await get(running, "/admin/x", who) == 200
    hostile.size = MiB + 1
    assert await get(running, "/admin/y", config_dir.certs.pki.client("Other Visitor")) == 503
