"""Identity Plus "HTTP legacy" in a real browser: the sidecar cannot see the certificate (it
asks for none, as behind a load balancer that terminates TLS), so it sends the browser to
sign on; the sign-on page, which does see the certificate, sends the browser back with the
intent's reference; the sidecar resolves it once, sets its session cookie and sends the
browser to the page it asked for, which the application serves with the person's identity.
Three redirects, one intent, one resolution; the cookies are invisible to the page's scripts;
the next visit goes straight in.

The sign-on page is a fake (an HTTPS aiohttp server with the demo's server certificate) that
plays Identity Plus: it reads the certificate the browser presents and tells the fake
Identity Plus API who signed on with the intent.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest
from aiohttp import web
from cryptography import x509

from tests.fake_identityplus import FakeIdentityPlus, fake_identityplus
from tests.servers import serve_app

from .cdp import Page
from .conftest import DemoPKI, Screenshot, StartSidecar, demo_config

__all__ = ["fake_identityplus"]  # the fixture, imported to be used here


@dataclass
class LegacySignOn:
    """``GET /<intent reference>``: the person signs on with the certificate the browser
    presents here, and is sent back to the return URL with ``identity-plus-intent``."""

    fake: FakeIdentityPlus
    port: int = 0
    visits: list[tuple[str, int | None]] = field(default_factory=list)
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
        if intent is None or intent.strict_massl:
            return web.Response(status=404, text=f"no legacy intent {reference}")
        if serial is None:
            return web.Response(status=401, text="present your certificate")
        self.fake.set_profile(
            serial,
            "OK 0002",
            organizational_reference=hashlib.sha256(der or b"").hexdigest()[:16],
            local_user_name="alice",
            organizational_name="Alice Liddell",
            service_roles=["administrator"],
        )
        self.fake.sign_on(reference, serial)
        back = intent.return_url + ("&" if "?" in intent.return_url else "?")
        raise web.HTTPFound(f"{back}identity-plus-intent={quote(reference, safe='')}")


@pytest.fixture
async def legacy_signon(
    fake_identityplus: FakeIdentityPlus, demo_pki: DemoPKI
) -> AsyncIterator[LegacySignOn]:
    state = LegacySignOn(fake_identityplus)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(demo_pki.folder / "server.pem", demo_pki.folder / "server.key")
    context.load_verify_locations(cafile=demo_pki.folder / "client-ca.pem")
    context.verify_mode = ssl.CERT_OPTIONAL
    app = web.Application()
    app.router.add_get("/{reference}", state.handle)
    runner, state.port = await serve_app(app, ssl_context=context)
    yield state
    for transport in state.transports:
        transport.abort()
    await runner.cleanup()


async def test_a_browser_the_sidecar_cannot_see_signs_on_and_gets_in(
    page: Page,
    demo_pki: DemoPKI,
    demo_folder: Path,
    demo_upstream: int,
    serve_sidecar: StartSidecar,
    fake_identityplus: FakeIdentityPlus,
    legacy_signon: LegacySignOn,
    screenshot: Screenshot,
) -> None:
    fake = fake_identityplus
    alice = demo_pki.serial("alice")
    (demo_folder / "session.key").write_text(base64.b64encode(os.urandom(32)).decode())
    identityplus = {
        "endpoint": fake.url,
        "certificate": str(fake.agent_certificate),
        "key": str(fake.agent_key),
        "ca": str(fake.ca_file),
        "signon_url": legacy_signon.url,
        "timeout": "5s",
        "legacy": True,
        "session_keys": ["session.key"],
    }
    sidecar = await serve_sidecar(
        demo_config(
            demo_folder,
            upstream_port=demo_upstream,
            # the sidecar asks for no certificate: the browser shows it to the sign-on page only
            tls={"certificate": "server.pem", "key": "server.key", "client_certificate": "none"},
            identity={"backend": "identityplus", "identityplus": identityplus},
        )
    )
    app_url = f"https://localhost:{sidecar.port}/admin/reports?tab=open%20items"

    nav = await page.goto(app_url)

    [intent] = fake.intents
    back = f"{app_url}&identity-plus-intent={intent.reference}"
    assert [(h.method, h.url, h.status) for h in nav.hops] == [
        ("GET", app_url, 302),
        ("GET", f"{legacy_signon.url}/{intent.reference}", 302),
        ("GET", back, 302),
        ("GET", app_url, 200),
    ], nav.describe()
    assert (intent.type, intent.return_url, intent.strict_massl) == ("request", app_url, False)
    assert legacy_signon.visits == [(intent.reference, alice)]
    assert fake.resolutions[intent.reference] == 1
    assert await page.url() == app_url
    assert await page.text("#who") == "Hello, Alice Liddell"
    identity = await page.text("#identity")
    assert "username\talice" in identity and "roles\tadministrator" in identity
    body = await page.text()
    assert "identity-plus-intent" not in body and "__Host-sidecar" not in body
    assert "X-App-Certificate" not in body and "X-APP-CERTIFICATE" not in body
    # HttpOnly: the page's scripts see neither cookie
    assert await page.evaluate("document.cookie") == ""
    await screenshot(page)

    # the session holds: the next visit goes straight in, from the verdict cache
    again = await page.goto(app_url)
    assert [(h.method, h.status) for h in again.hops] == [("GET", 200)], again.describe()
    assert len(fake.intents) == 1 and len(legacy_signon.visits) == 1
    assert fake.calls[alice] == 1
