"""A browser without a client certificate submits a form to a protected route: the sidecar
answers the ``POST`` itself with its 401 page and a link to sign on (``enrol_missing``), and
never forwards it (a redirect would make the browser replay it as a ``GET`` and lose the body).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from tests.fake_identityplus import FakeIdentityPlus, fake_identityplus
from tests.servers import serve_app

from .cdp import Page
from .conftest import Screenshot, StartSidecar, demo_config

__all__ = ["fake_identityplus"]  # the fixture, imported to be used here

SIGNON = "https://signon.example"

FORM = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Order a book</title></head>
<body><h1>Order a book</h1>
<form method="post" action="/app/orders">
  <label>Title <input name="title" value="Through the Looking-Glass"></label>
  <button id="order" type="submit">Order</button>
</form></body></html>
"""


@dataclass
class Shop:
    """The application: a public order form, and everything it received."""

    port: int = 0
    seen: list[tuple[str, str, bool]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        identified = "X-USERINFO" in request.headers or "X-APP-CERTIFICATE" in request.headers
        self.seen.append((request.method, request.path_qs, identified))
        if request.path == "/public/order":
            return web.Response(text=FORM, content_type="text/html")
        return web.Response(text="order received", content_type="text/plain")


@pytest.fixture
async def shop() -> AsyncIterator[Shop]:
    state = Shop()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", state.handle)
    runner, state.port = await serve_app(app)
    yield state
    await runner.cleanup()


async def test_a_post_without_a_certificate_gets_the_401_page_with_the_sign_on_link(
    anonymous_page: Page,
    demo_folder: Path,
    shop: Shop,
    serve_sidecar: StartSidecar,
    fake_identityplus: FakeIdentityPlus,
    screenshot: Screenshot,
) -> None:
    fake = fake_identityplus
    identityplus = {
        "endpoint": fake.url,
        "certificate": str(fake.agent_certificate),
        "key": str(fake.agent_key),
        "ca": str(fake.ca_file),
        "signon_url": SIGNON,
        "enrol_missing": True,
        "timeout": "5s",
    }
    sidecar = await serve_sidecar(
        demo_config(
            demo_folder,
            upstream_port=shop.port,
            identity={"backend": "identityplus", "identityplus": identityplus},
        )
    )
    base = f"https://localhost:{sidecar.port}"
    page = anonymous_page

    form = await page.goto(f"{base}/public/order")
    assert form.final.status == 200, form.describe()
    assert shop.seen == [("GET", "/public/order", False)]  # public: forwarded, anonymously

    nav = await page.click("#order")

    assert [(h.method, h.url, h.status) for h in nav.hops] == [("POST", f"{base}/app/orders", 401)]
    assert await page.title() == "401 Client certificate required"
    links = await page.evaluate("[...document.links].map(a => [a.textContent, a.href])")
    [[text, href]] = links
    assert text == "Continue to sign in"
    [intent] = [i for i in fake.intents if f"{SIGNON}/{i.reference}" == href]
    assert (intent.type, intent.return_url) == ("request", f"{base}/app/orders")
    assert "certificate" in (await page.text()).lower()
    # the application never saw the POST
    assert [method for method, _, _ in shop.seen] == ["GET"]
    assert fake.calls == {}  # no certificate: nothing to ask about
    await screenshot(page)
