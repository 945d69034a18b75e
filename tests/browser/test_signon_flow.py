"""A certificate Identity Plus wants validated (``PB 0003``), in a real browser: the sidecar
sends the browser to the sign-on page, the sign-on page validates the certificate the browser
presents to it and sends the browser back, and the person gets in. Once, without a loop.

The sign-on page is a fake (an HTTPS aiohttp server with the demo's server certificate). Like
the real one, it knows the person by the client certificate the browser presents to it.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509

from tests.fake_identityplus import FakeIdentityPlus, fake_identityplus
from tests.servers import serve_app

from .cdp import Page
from .conftest import DemoPKI, Screenshot, StartSidecar, demo_config

__all__ = ["fake_identityplus"]  # the fixture, imported to be used here


@dataclass
class SignOn:
    """The fake sign-on page: ``GET /<intent reference>`` validates the presented certificate
    in the fake Identity Plus and redirects to the intent's return URL."""

    fake: FakeIdentityPlus
    port: int = 0
    #: (intent reference, serial of the certificate the browser presented, or None)
    visits: list[tuple[str, int | None]] = field(default_factory=list)
    #: the browser's connections, dropped at the end: an idle TLS keep-alive connection
    #: would otherwise outlive the test, waiting for the browser's close_notify
    transports: list[asyncio.Transport] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        reference = request.match_info["reference"]
        assert request.transport is not None
        self.transports.append(request.transport)
        ssl_object = request.transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        serial = x509.load_der_x509_certificate(der).serial_number if der else None
        self.visits.append((reference, serial))
        intent = next((i for i in self.fake.intents if i.reference == reference), None)
        if intent is None:
            return web.Response(status=404, text=f"no intent {reference}")
        if serial is None:
            return web.Response(status=401, text="present your certificate")
        self.fake.set_profile(
            serial,
            "OK 0002",
            organizational_reference=hashlib.sha256(der or b"").hexdigest()[:16],
            local_user_name="alice",
            organizational_name="Alice Liddell",
            organizational_email="alice@example.com",
            service_roles=["administrator"],
        )
        raise web.HTTPFound(intent.return_url)


@pytest.fixture
async def signon(fake_identityplus: FakeIdentityPlus, demo_pki: DemoPKI) -> AsyncIterator[SignOn]:
    state = SignOn(fake_identityplus)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(demo_pki.folder / "server.pem", demo_pki.folder / "server.key")
    context.load_verify_locations(cafile=demo_pki.folder / "client-ca.pem")
    context.verify_mode = ssl.CERT_OPTIONAL  # the page tells who is there by the certificate
    app = web.Application()
    app.router.add_get("/{reference}", state.handle)
    runner, state.port = await serve_app(app, ssl_context=context)
    yield state
    for transport in state.transports:
        transport.abort()
    await runner.cleanup()


async def test_a_visitor_to_validate_signs_on_and_gets_in_without_a_loop(
    page: Page,
    demo_pki: DemoPKI,
    demo_folder: Path,
    demo_upstream: int,
    serve_sidecar: StartSidecar,
    fake_identityplus: FakeIdentityPlus,
    signon: SignOn,
    screenshot: Screenshot,
) -> None:
    fake = fake_identityplus
    alice = demo_pki.serial("alice")
    fake.set_simple(alice, "PB 0003")  # until the sign-on page validates her certificate
    identityplus = {
        "endpoint": fake.url,
        "certificate": str(fake.agent_certificate),
        "key": str(fake.agent_key),
        "ca": str(fake.ca_file),
        "signon_url": signon.url,
        "timeout": "5s",
    }
    sidecar = await serve_sidecar(
        demo_config(
            demo_folder,
            upstream_port=demo_upstream,
            identity={"backend": "identityplus", "identityplus": identityplus},
        )
    )
    app_url = f"https://localhost:{sidecar.port}/admin/reports?tab=open%20items"

    nav = await page.goto(app_url)

    [intent] = fake.intents
    assert [(h.method, h.url, h.status) for h in nav.hops] == [
        ("GET", app_url, 302),
        ("GET", f"{signon.url}/{intent.reference}", 302),
        ("GET", app_url, 200),
    ], nav.describe()
    assert nav.redirects == 2
    assert (intent.type, intent.return_url, intent.strict_massl) == ("validate", app_url, True)
    # the browser presented alice's certificate to the sign-on page too
    assert signon.visits == [(intent.reference, alice)]
    # asked before the sign-on (PB 0003, never cached) and after it (OK 0002)
    assert fake.calls[alice] == 2
    # the final page is the application's, and it knows her by the profile
    assert await page.url() == app_url
    assert await page.text("#who") == "Hello, Alice Liddell"
    identity = await page.text("#identity")
    assert "username\talice" in identity and "roles\tadministrator" in identity
    await screenshot(page)

    # once validated, the verdict is cached: the next visit goes straight in
    again = await page.goto(app_url)
    assert [(h.method, h.status) for h in again.hops] == [("GET", 200)], again.describe()
    assert len(fake.intents) == 1 and fake.calls[alice] == 2 and len(signon.visits) == 1
