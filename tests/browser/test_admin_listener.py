"""The admin listener in a real browser: the screenshot helper the status page's test will use
(issue #18 §3), and the refusal of a state change that another site's page makes the
browser send (the admin listener's cross-site rules, with the headers a browser really sends).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import serve_app

from .cdp import Page
from .conftest import AdminScreenshot, StartSidecar, demo_config


async def test_an_admin_page_opens_in_the_browser_and_is_saved_as_a_screenshot(
    demo_folder: Path,
    demo_upstream: int,
    serve_sidecar: StartSidecar,
    admin_screenshot: AdminScreenshot,
    page: Page,
) -> None:
    sidecar = await serve_sidecar(demo_config(demo_folder, upstream_port=demo_upstream))

    nav, path = await admin_screenshot(sidecar, "/readyz")

    assert [(h.method, h.status) for h in nav.hops] == [("GET", 200)], nav.describe()
    assert json.loads(await page.text("body")) == {"ready": True}
    assert path.name == (
        "test_admin_listener--"
        "test_an_admin_page_opens_in_the_browser_and_is_saved_as_a_screenshot.png"
    )
    assert path.parent.name == "artifacts" and path.stat().st_size > 1000


PURGE_FORM = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Win a prize</title></head>
<body><form method="post" action="{action}"><button id="go">Claim</button></form></body></html>
"""


@pytest.fixture
async def other_site() -> AsyncIterator[dict[str, str]]:
    """A plain web site whose page posts a form to wherever ``action`` says."""
    state = {"action": ""}

    async def form(request: web.Request) -> web.Response:
        return web.Response(
            text=PURGE_FORM.format(action=state["action"]), content_type="text/html"
        )

    app = web.Application()
    app.router.add_get("/", form)
    runner, port = await serve_app(app)
    state["url"] = f"http://127.0.0.1:{port}/"
    yield state
    await runner.cleanup()


async def test_another_sites_page_cannot_make_the_browser_purge_the_cache(
    demo_folder: Path,
    demo_upstream: int,
    serve_sidecar: StartSidecar,
    other_site: dict[str, str],
    page: Page,
) -> None:
    sidecar = await serve_sidecar(demo_config(demo_folder, upstream_port=demo_upstream))
    # alice's verdict is cached
    assert (await page.goto(f"https://localhost:{sidecar.port}/app/")).final.status == 200
    other_site["action"] = f"http://127.0.0.1:{sidecar.admin_port}/cache/purge"

    await page.goto(other_site["url"])
    nav = await page.click("#go")

    assert [(h.method, h.status) for h in nav.hops] == [("POST", 403)], nav.describe()
    assert "error" in json.loads(await page.text("body"))
    assert await cache_entries(sidecar.admin_port) == 1  # not purged


async def cache_entries(admin_port: int) -> float:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{admin_port}/metrics") as resp,
    ):
        text = await resp.text()
    [value] = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "sidecar_cache_entries"
    ]
    return value
