"""The demo's echo application: JSON for curl (what the README shows), a page for browsers, and
nothing from the request ever becoming markup on that page. (tests/browser/test_demo_page.py
shows the page in a real browser through the sidecar.)"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from typing import Any

import aiohttp
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sidecar.demo_echo import echo_app, page

from .servers import serve_app

ALICE = {
    "sub": "2d73cf2a-5339-421e-81cd-8fa0d25a100b",
    "username": "alice",
    "given_name": "Alice",
    "family_name": "Liddell",
    "email": "alice@example.com",
    "roles": ["administrator"],
}
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


@pytest.fixture
async def echo_url() -> AsyncIterator[str]:
    runner, port = await serve_app(echo_app())
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def get(url: str, headers: dict[str, str]) -> tuple[str, dict[str, str], str]:
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        return resp.content_type, dict(resp.headers), await resp.text()


def userinfo(doc: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(doc).encode()).decode()


async def test_curl_gets_json(echo_url: str) -> None:
    kind, _, text = await get(
        f"{echo_url}/admin/reports", {"Accept": "*/*", "X-USERINFO": userinfo(ALICE)}
    )
    assert kind == "application/json"
    doc = json.loads(text)
    assert doc["identity"] == ALICE
    assert doc["upstream_saw"]["method"] == "GET"
    assert doc["upstream_saw"]["path"] == "/admin/reports"


async def test_a_browser_gets_a_page_with_the_identity(echo_url: str) -> None:
    kind, headers, text = await get(
        f"{echo_url}/admin/reports", {"Accept": BROWSER_ACCEPT, "X-USERINFO": userinfo(ALICE)}
    )
    assert kind == "text/html"
    assert headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert "<title>Demo application: Alice Liddell</title>" in text
    assert '<h1 id="who">Hello, Alice Liddell</h1>' in text
    assert "<tr><th>roles</th><td>administrator</td></tr>" in text
    assert '<code id="request">GET /admin/reports</code>' in text


async def test_without_identity_headers_the_page_says_anonymous(echo_url: str) -> None:
    _, _, text = await get(f"{echo_url}/public/hello", {"Accept": BROWSER_ACCEPT})
    assert '<h1 id="who">Hello, anonymous visitor</h1>' in text


class _Markup(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


#: every element the page's template has; anything else came from the request
TEMPLATE_TAGS = {
    "html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "code", "table", "tr",
    "th", "td",
}  # fmt: skip
texts = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40)


@given(
    name=texts,
    roles=st.lists(texts, max_size=3),
    header=texts,
    path=texts,
)
@example(
    name="<script>alert(1)</script>",
    roles=["</td><td>root"],
    header='"><img src=x onerror=alert(1)>',
    path="/<b>&amp;",
)
def test_nothing_from_the_request_becomes_markup(
    name: str, roles: list[str], header: str, path: str
) -> None:
    doc = {
        "upstream_saw": {
            "method": "GET",
            "path": path,
            "headers": {"X-Note": header, header: "value"},
            "body_bytes": 0,
        },
        "identity": {"sub": name, "username": name, "given_name": name, "roles": roles},
        "certificate_der_bytes": None,
    }
    markup = _Markup()
    markup.feed(page(doc))
    markup.close()
    assert set(markup.tags) <= TEMPLATE_TAGS
    assert markup.tags.count("tr") == 4 + 2  # sub, username, given_name, roles; two headers
    shown = "".join(markup.text)
    for value in (name, header, path, *roles):
        assert value in shown
