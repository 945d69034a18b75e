"""The browser harness itself: it judges servers as a person's browser does (it trusts the
demo's server CA because the NSS database says so, and nothing else: were certificate errors
ignored, the other browser tests would prove nothing about TLS), and a machine where it cannot
run makes the tests fail with what to do, never skip."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from tests.pki import make_ca, make_leaf
from tests.servers import serve_app

from . import chromium
from .cdp import CDPError, Page


@pytest.fixture
async def stranger_server(tmp_path: Path) -> AsyncIterator[int]:
    """An HTTPS server for localhost whose CA no browser here trusts."""
    files = make_leaf(make_ca("Unknown Server CA"), "localhost", server=True).write(tmp_path, "s")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*files)

    async def never(request: web.Request) -> web.Response:
        return web.Response(text="should never be seen")

    app = web.Application()
    app.router.add_get("/", never)
    runner, port = await serve_app(app, ssl_context=context)
    yield port
    await runner.cleanup()


async def test_a_server_certificate_from_an_unknown_ca_is_refused(
    page: Page, stranger_server: int
) -> None:
    with pytest.raises(CDPError, match="ERR_CERT_AUTHORITY_INVALID"):
        await page.goto(f"https://localhost:{stranger_server}/")


def test_a_missing_chromium_fails_with_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chromium, "CHROMIUM", Path("/nonexistent/chromium"))
    with pytest.raises(chromium.BrowserSetupError, match="apt-get install chromium") as info:
        chromium.check_tools()
    assert "/nonexistent/chromium" in str(info.value)


def test_a_policy_folder_that_cannot_be_written_fails_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setattr(chromium, "POLICY_DIR", blocked / "managed")
    with (
        pytest.raises(chromium.BrowserSetupError, match="run them as root") as info,
        chromium.installed_policy(chromium.certificate_policy("Some CA")),
    ):
        pass
    assert str(blocked / "managed") in str(info.value)
