"""Response header injection through the sidecar's own answers, attacked over real TLS.

The http identity backend's ``redirect`` goes into ``Location``; a CR or LF in it would add
header lines of the backend's (or whoever controls its reply's) choosing to the visitor's
response: ``Set-Cookie`` in their browser. Such a reply is a failing reply (503, logged),
on the listener's path (a GET) and on aiohttp's (a request with a body: its 302, and the
401 with ``Location`` a POST gets). Every header value of our own answers is checked.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from sidecar import responses

from .conftest import ConfigDir, Running, SidecarFactory, Upstream
from .pki import Issued
from .servers import serve_app
from .test_listener import Response, read_response


@dataclass
class VerdictService:
    """A plain-HTTP verdict service: one programmed reply per certificate fingerprint."""

    port: int = 0
    replies: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/verdict"


@pytest.fixture
async def verdicts() -> AsyncIterator[VerdictService]:
    service = VerdictService()

    async def verdict(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response(service.replies.get(body["sha256"], {"verdict": "deny"}))

    app = web.Application()
    app.router.add_post("/verdict", verdict)
    runner, service.port = await serve_app(app)
    yield service
    await runner.cleanup()


@pytest.fixture
async def gate(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
    verdicts: VerdictService,
) -> Running:
    data = config_dir.base(upstream.port)
    data["identity"] = {"backend": "http", "http": {"url": verdicts.url, "timeout": "2s"}}
    running: Running = await start_sidecar(data)
    return running


def fingerprint(who: Issued) -> str:
    return hashlib.sha256(who.der).hexdigest()


async def ask(running: Running, who: Issued, method: str, body: bytes = b"") -> Response:
    head = f"{method} /app/x HTTP/1.1\r\nHost: localhost\r\nAccept: text/html\r\n"
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", running.sidecar.port, ssl=running.client_ssl(who), server_hostname="localhost"
    )
    try:
        writer.write((head + "Connection: close\r\n\r\n").encode() + body)
        async with asyncio.timeout(10):
            return await read_response(reader, method)
    finally:
        writer.close()


INJECTED = [
    "https://idp.example/v\r\nSet-Cookie: session=attacker",
    "https://idp.example/v\nSet-Cookie: session=attacker",
    "https://idp.example/v\rSet-Cookie: session=attacker",
    "https://idp.example/v\r\n\r\n<script>alert(1)</script>",
    "https://idp.example/v\x00",
    "https://idp.example/v\x1b[31m",
    "https://idp.example/v\x7f",
    "https://idp.example/a b",
    "https://idp.example/\u2028x",
]
# A GET on the listener's path; a GET with a body (aiohttp's 302); a POST (aiohttp's 401
# that carries Location too, since a browser would replay a redirected POST as a GET).
WAYS = [("GET", b""), ("GET", b"x"), ("POST", b"x")]


@pytest.mark.parametrize(
    ("method", "body"), WAYS, ids=["listener-302", "aiohttp-302", "aiohttp-401"]
)
@pytest.mark.parametrize("location", INJECTED, ids=range(len(INJECTED)))
async def test_a_redirect_with_control_characters_is_a_failing_reply(
    gate: Running,
    verdicts: VerdictService,
    upstream: Upstream,
    location: str,
    method: str,
    body: bytes,
) -> None:
    bob = gate.certs.bob
    verdicts.replies[fingerprint(bob)] = {"verdict": "validate", "redirect": location}
    with capture_logs() as events:
        response = await ask(gate, bob, method, body)
    assert response.status == 503, (response.status, response.headers)
    assert response.get("Set-Cookie") == [] and response.get("Location") == []
    assert response.one("Retry-After").isdigit()
    assert b"attacker" not in response.body and b"<script>" not in response.body
    assert any(e["event"] == "identity_unavailable" and "redirect" in e["reason"] for e in events)
    assert upstream.seen == []


@pytest.mark.parametrize(
    ("method", "body"), WAYS, ids=["listener-302", "aiohttp-302", "aiohttp-401"]
)
async def test_a_clean_redirect_still_redirects(
    gate: Running, verdicts: VerdictService, method: str, body: bytes
) -> None:
    bob = gate.certs.bob
    location = "https://idp.example/v?return=https%3A%2F%2Flocalhost%2Fapp%2Fx&x=%0D%0A"
    verdicts.replies[fingerprint(bob)] = {"verdict": "validate", "redirect": location}
    response = await ask(gate, bob, method, body)
    assert response.status == (401 if method == "POST" else 302)
    assert response.one("Location") == location


@pytest.mark.parametrize(
    "headers",
    [
        {"Location": "https://x/\r\nSet-Cookie: a=1"},
        {"Retry-After": "5\r\nX-Injected: 1"},
        {"X-Anything": "a\nb"},
        {"X-Anything": "a\x00b"},
    ],
)
def test_our_answers_refuse_control_characters_in_any_header(headers: dict[str, str]) -> None:
    location = headers.pop("Location", None)
    with pytest.raises(responses.UnsafeHeaderValue):
        responses.error(
            503, "x", request_id="r", accept=None, headers=headers or None, location=location
        )


@pytest.mark.parametrize("location", ["https://x/\r\nSet-Cookie: a=1", "https://x/a b", "/\x7f"])
def test_our_redirects_refuse_what_is_not_a_uri(location: str) -> None:
    with pytest.raises(responses.UnsafeHeaderValue):
        responses.redirect(location, request_id="r")
    with pytest.raises(responses.UnsafeHeaderValue):
        responses.redirect("https://x/", request_id="r\r\nX-Injected: 1")


async def test_an_unusable_sign_on_address_from_a_backend_is_503(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
    verdicts: VerdictService,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Defence in depth: the handler checks whatever address a backend makes (here the http
    backend's own sign-on URL, from a backend with a bug)."""
    data = config_dir.base(upstream.port)
    data["identity"] = {
        "backend": "http",
        "http": {"url": verdicts.url, "signon_url": "https://login.example/start"},
    }
    running = await start_sidecar(data)
    bob = running.certs.bob
    verdicts.replies[fingerprint(bob)] = {"verdict": "validate"}
    assert running.sidecar.handler is not None
    backend = running.sidecar.handler.plan.identity.backend

    async def sign_on(purpose: str, return_url: str) -> str:
        return "https://login.example/start\r\nSet-Cookie: session=attacker"

    monkeypatch.setattr(backend, "sign_on", sign_on)
    for method, body in WAYS:
        with capture_logs() as events:
            response = await ask(running, bob, method, body)
        assert response.status == 503, (method, body, response.headers)
        assert response.get("Set-Cookie") == [] and response.get("Location") == []
        assert [e["event"] for e in events if e["log_level"] == "error"] == ["sign_on_unusable"]


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("http", "signon_url", "https://login.example/\r\nSet-Cookie: a=1"),
        ("http", "signon_url", "https://login.example/a b"),
        ("http", "url", "https://verdicts.example/\nx"),
        ("identityplus", "signon_url", "https://signon.example/\x1b"),
    ],
)
def test_sign_on_urls_in_the_configuration_are_checked(
    config_dir: ConfigDir, section: str, key: str, value: str
) -> None:
    from sidecar.config import ConfigError, load

    data = config_dir.base()
    backend: dict[str, Any] = {"http": {"url": "https://verdicts.example/v"}}
    backend[section] = {**backend.get(section, {}), key: value}
    data["identity"] = {"backend": section, **backend}
    with pytest.raises(ConfigError) as caught:
        load(config_dir.write(data))
    assert f"identity.{section}.{key}: a URL is visible ASCII" in str(caught.value)


@pytest.mark.parametrize("incoming", ["abc\n", "abc\r\nSet-Cookie: a=1", "a b", "x" * 129])
def test_a_trusted_proxys_request_id_is_kept_only_when_clean(incoming: str) -> None:
    from multidict import CIMultiDict

    from sidecar.gateway import _request_id

    class Proxied:
        headers = CIMultiDict({"X-Request-ID": incoming})

    assert _request_id(Proxied(), trusted=True) != incoming
    Proxied.headers = CIMultiDict({"X-Request-ID": "req-1:a/b+c="})
    assert _request_id(Proxied(), trusted=True) == "req-1:a/b+c="
