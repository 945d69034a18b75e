"""The status page (issue #18 §3) in a real browser: it renders as the operator sees it, with
what it must show, no script, and its screenshot saved as a CI artefact."""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path

import aiohttp
from cryptography.hazmat.primitives.serialization import Encoding

from .cdp import Page
from .conftest import AdminScreenshot, DemoPKI, StartSidecar, demo_config


async def test_the_status_page_renders_and_is_saved_as_a_screenshot(
    page: Page,
    demo_pki: DemoPKI,
    demo_folder: Path,
    demo_upstream: int,
    serve_sidecar: StartSidecar,
    admin_screenshot: AdminScreenshot,
) -> None:
    sidecar = await serve_sidecar(demo_config(demo_folder, upstream_port=demo_upstream))
    # something to show: alice gets in (a lookup), mallory is refused, and so is a client
    # without any certificate
    assert (await page.goto(f"https://localhost:{sidecar.port}/admin/reports")).final.status == 200
    async with aiohttp.ClientSession() as http:
        ctx = _client_context(demo_folder, "mallory")
        async with http.get(f"https://localhost:{sidecar.port}/admin/", ssl=ctx) as resp:
            assert resp.status == 403
        async with http.get(
            f"https://localhost:{sidecar.port}/admin/", ssl=_client_context(demo_folder, None)
        ) as resp:
            assert resp.status == 401

    nav, path = await admin_screenshot(sidecar, "/")

    assert [(h.method, h.status) for h in nav.hops] == [("GET", 200)], nav.describe()
    assert await page.title() == "sidecar status"
    assert (await page.text("h1")).startswith("mTLS identity sidecar")
    body = await page.text("body")
    for shown in (
        "Configuration",
        "Listener certificate",
        "Trust anchors",
        "Identity backend",
        "Verdict cache",
        "Last 50 refusals",
        "Trust reports",
        "no_certificate",  # the 401's reason
        "unbound",  # mallory's
    ):
        assert shown in body, shown
    der = demo_pki.identity("mallory").certificate.public_bytes(Encoding.DER)
    mallory = hashlib.sha256(der).hexdigest()
    assert mallory[:16] in body and mallory not in body  # a prefix only
    assert await page.evaluate("document.scripts.length") == 0
    assert (
        path.name
        == "test_status_page--test_the_status_page_renders_and_is_saved_as_a_screenshot.png"
    )
    assert path.stat().st_size > 10_000


def _client_context(folder: Path, name: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(folder / "server-ca.pem"))
    if name is not None:
        ctx.load_cert_chain(folder / f"{name}.pem", folder / f"{name}.key")
    return ctx
