"""``sidecar demo`` in a real browser: alice's certificate from the browser's NSS database,
the demo's own configuration and PKI, and the echo application's page showing who she is."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from .cdp import Page
from .conftest import Screenshot, StartSidecar, demo_config

FORGED = {"sub": "admin", "username": "mallory", "given_name": "Eve", "roles": ["root"]}


async def test_the_demo_page_shows_alice_and_her_roles(
    page: Page,
    demo_folder: Path,
    demo_upstream: int,
    serve_sidecar: StartSidecar,
    screenshot: Screenshot,
) -> None:
    sidecar = await serve_sidecar(demo_config(demo_folder, upstream_port=demo_upstream))

    nav = await page.goto(f"https://localhost:{sidecar.port}/admin/reports")

    assert [(h.method, h.status) for h in nav.hops] == [("GET", 200)], nav.describe()
    assert await page.title() == "Demo application: Alice Liddell"
    assert await page.text("#who") == "Hello, Alice Liddell"
    identity = await page.text("#identity")
    assert "alice@example.com" in identity and "2d73cf2a-5339-421e-81cd-8fa0d25a100b" in identity
    assert "roles\tadministrator" in identity
    assert await page.text("#request") == "GET /admin/reports"
    await screenshot(page)


async def test_a_forged_userinfo_from_the_browser_does_not_change_the_page(
    page: Page, demo_folder: Path, demo_upstream: int, serve_sidecar: StartSidecar
) -> None:
    sidecar = await serve_sidecar(demo_config(demo_folder, upstream_port=demo_upstream))
    forged = base64.b64encode(json.dumps(FORGED).encode()).decode()
    # The browser itself sends the identity headers on every request, as an extension or an
    # intercepting proxy on the person's machine could make it do.
    await page.set_extra_headers(
        {"X-USERINFO": forged, "X_USERINFO": forged, "X-APP-CERTIFICATE": "Zm9yZ2Vk"}
    )

    nav = await page.goto(f"https://localhost:{sidecar.port}/admin/reports")

    assert nav.final.status == 200, nav.describe()
    assert await page.text("#who") == "Hello, Alice Liddell"
    body = await page.text()
    assert "mallory" not in body and "Eve" not in body and "root" not in body
    assert forged not in body and "Zm9yZ2Vk" not in body
    # what the application received: the sidecar's one X-USERINFO, nothing of the client's
    headers = await page.text("#headers")
    assert headers.count("X-USERINFO") == 1 and "X_USERINFO" not in headers
