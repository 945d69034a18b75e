"""The http backend against a small real verdict service over HTTPS (with and without mTLS)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import ValidationError

from sidecar.certs import ClientCert
from sidecar.config import HttpBackendConfig
from sidecar.errors import IdentityUnavailable
from sidecar.identity import LookupContext, User
from sidecar.identity.http import HttpBackend
from tests.pki import PKI, make_leaf
from tests.servers import serve_app

CTX = LookupContext(client_ip="203.0.113.9")


class VerdictService:
    """An in-house identity service: answers each certificate as programmed by fingerprint."""

    def __init__(self, folder: Path, *, require_client_certificate: bool = True) -> None:
        pki = PKI.create()
        self.pki = pki
        self.ca_file = folder / "service-ca.pem"
        self.ca_file.write_bytes(pki.server_ca.pem)
        self._server_files = pki.server.write(folder, "service")
        self.client_ca_file = folder / "sidecar-ca.pem"
        self.client_ca_file.write_bytes(pki.client_root.pem)
        self.client_certificate, self.client_key = make_leaf(pki.client_root, "sidecar").write(
            folder, "sidecar"
        )
        self.require_client_certificate = require_client_certificate
        self.replies: dict[str, Any] = {}
        self.default: Any = {"verdict": "deny"}
        self.status = 200
        self.raw_body: bytes | None = None
        self.delay = 0.0
        self.requests: list[tuple[str, str, Any]] = []
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()
        self.port = 0

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}/verdict"

    def config(self, **overrides: object) -> HttpBackendConfig:
        data: dict[str, object] = {
            "url": self.url,
            "ca": str(self.ca_file),
            "certificate": str(self.client_certificate),
            "key": str(self.client_key),
            "timeout": 0.3,
        }
        data.update(overrides)
        return HttpBackendConfig.model_validate({k: v for k, v in data.items() if v is not None})

    async def start(self) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*(str(p) for p in self._server_files))
        if self.require_client_certificate:
            context.load_verify_locations(cafile=str(self.client_ca_file))
            context.verify_mode = ssl.CERT_REQUIRED
        app = web.Application()
        app.router.add_post("/verdict", self._handle)
        self._runner, self.port = await serve_app(
            app, ssl_context=context, handler_cancellation=True, shutdown_timeout=1.0
        )

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append((request.method, request.content_type, body))
        if self.delay:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.delay)
        if self.raw_body is not None:
            return web.Response(status=self.status, body=self.raw_body)
        reply = self.replies.get(body.get("sha256"), self.default)
        return web.json_response(reply, status=self.status)


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[VerdictService]:
    svc = VerdictService(tmp_path)
    await svc.start()
    yield svc
    await svc.close()


@pytest.fixture
async def backend(service: VerdictService) -> AsyncIterator[HttpBackend]:
    b = HttpBackend(service.config())
    yield b
    await b.close()


def visitor(service: VerdictService, cn: str = "bob") -> ClientCert:
    return ClientCert.from_x509(service.pki.client(cn, serial=0x1F2E3D4C5B6A).cert)


async def test_the_request_describes_the_certificate(
    service: VerdictService, backend: HttpBackend
) -> None:
    cert = visitor(service)
    await backend.lookup(cert, CTX)
    await backend.lookup(cert, LookupContext())
    (method, content_type, body), (_, _, anonymous) = service.requests
    assert (method, content_type) == ("POST", "application/json")
    assert body == {
        "certificate": base64.b64encode(cert.der).decode(),
        "sha256": cert.sha256,
        "serial": str(0x1F2E3D4C5B6A),
        "serial_hex": "1F2E3D4C5B6A",
        "subject": "CN=bob",
        "issuer": "CN=Test Client Intermediate",
        "client_ip": "203.0.113.9",
    }
    assert anonymous["client_ip"] is None


async def test_allow_with_a_user(service: VerdictService, backend: HttpBackend) -> None:
    cert = visitor(service)
    service.replies[cert.sha256] = {
        "verdict": "allow",
        "user": {
            "sub": "u-1",
            "username": "bob",
            "given_name": "Bob",
            "family_name": "Builder",
            "email": "bob@example.com",
            "roles": ["member", "builder"],
            "department": "construction",
        },
        "ttl": 60,
        "comment": "unknown keys are ignored",
    }
    verdict = await backend.lookup(cert, CTX)
    assert verdict.kind == "allow"
    assert verdict.ttl == 60
    assert verdict.user == User(
        sub="u-1",
        username="bob",
        given_name="Bob",
        family_name="Builder",
        email="bob@example.com",
        roles=("member", "builder"),
    )


async def test_a_minimal_allow(service: VerdictService, backend: HttpBackend) -> None:
    cert = visitor(service)
    service.replies[cert.sha256] = {
        "verdict": "allow",
        "user": {"sub": "u-1", "username": "bob", "email": None},
    }
    verdict = await backend.lookup(cert, CTX)
    assert verdict.user == User(sub="u-1", username="bob")
    assert verdict.ttl is None


async def test_deny_with_and_without_reason(service: VerdictService, backend: HttpBackend) -> None:
    cert = visitor(service)
    service.replies[cert.sha256] = {"verdict": "deny", "reason": "contract ended", "ttl": 5.5}
    verdict = await backend.lookup(cert, CTX)
    assert (verdict.kind, verdict.reason, verdict.ttl) == ("deny", "contract ended", 5.5)
    service.replies[cert.sha256] = {"verdict": "deny"}
    assert (await backend.lookup(cert, CTX)).reason == "refused by the identity service"


async def test_validate_carries_its_redirect(service: VerdictService, backend: HttpBackend) -> None:
    cert = visitor(service)
    service.replies[cert.sha256] = {
        "verdict": "validate",
        "redirect": "https://idp.example/validate?c=1",
        "reason": "please confirm it is you",
    }
    verdict = await backend.lookup(cert, CTX)
    assert verdict.kind == "validate"
    assert verdict.redirect == "https://idp.example/validate?c=1"
    assert verdict.reason == "please confirm it is you"


async def test_validate_without_redirect_needs_a_signon_url(service: VerdictService) -> None:
    cert = visitor(service)
    service.replies[cert.sha256] = {"verdict": "validate"}
    without = HttpBackend(service.config())
    with_signon = HttpBackend(service.config(signon_url="https://idp.example/start"))
    try:
        with pytest.raises(IdentityUnavailable, match="redirect"):
            await without.lookup(cert, CTX)
        verdict = await with_signon.lookup(cert, CTX)
        assert (verdict.kind, verdict.redirect) == ("validate", None)
        assert await with_signon.sign_on("validate", "https://app.example/a?b=c") == (
            "https://idp.example/start?purpose=validate&return_url=https%3A%2F%2Fapp.example%2Fa%3Fb%3Dc"
        )
        with pytest.raises(IdentityUnavailable):
            await without.sign_on("validate", "https://app.example/")
    finally:
        await without.close()
        await with_signon.close()


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        ({"verdict": "allow"}, "without a user"),
        ({"verdict": "maybe"}, "verdict"),
        ({"verdict": True}, "verdict"),
        ({}, "verdict"),
        ({"verdict": "allow", "user": {"sub": "u", "username": "b", "roles": "admin"}}, "roles"),
        ({"verdict": "allow", "user": {"sub": "u", "username": "b", "roles": [1]}}, "roles"),
        ({"verdict": "allow", "user": {"sub": "", "username": "b"}}, "user.sub"),
        ({"verdict": "allow", "user": {"sub": 7, "username": "b"}}, "user.sub"),
        ({"verdict": "allow", "user": {"username": "b"}}, "user.sub"),
        ({"verdict": "allow", "user": "bob"}, "user"),
        ({"verdict": "deny", "ttl": "60"}, "ttl"),
        ({"verdict": "deny", "ttl": -1}, "ttl"),
        ({"verdict": "deny", "reason": 3}, "reason"),
        ({"verdict": "validate", "redirect": "/relative"}, "redirect"),
        (["allow"], "not an object"),
        ("allow", "not an object"),
    ],
)
async def test_an_invalid_reply_is_unavailable_and_named(
    service: VerdictService, backend: HttpBackend, reply: object, problem: str
) -> None:
    service.default = reply
    with pytest.raises(IdentityUnavailable) as caught:
        await backend.lookup(visitor(service), CTX)
    assert problem in caught.value.reason
    assert caught.value.code == "malformed"


@pytest.mark.parametrize("status", [404, 500, 503])
async def test_another_status_is_unavailable(
    service: VerdictService, backend: HttpBackend, status: int
) -> None:
    service.status = status
    service.default = {"verdict": "allow", "user": {"sub": "u", "username": "b"}}
    with pytest.raises(IdentityUnavailable, match=str(status)) as caught:
        await backend.lookup(visitor(service), CTX)
    assert caught.value.code == "http-status"


async def test_a_body_that_is_not_json_is_unavailable(
    service: VerdictService, backend: HttpBackend
) -> None:
    service.raw_body = b"<html>oops</html>"
    with pytest.raises(IdentityUnavailable, match="not JSON"):
        await backend.lookup(visitor(service), CTX)


async def test_a_slow_service_times_out(service: VerdictService, backend: HttpBackend) -> None:
    service.delay = 30
    with pytest.raises(IdentityUnavailable) as caught:
        await backend.lookup(visitor(service), CTX)
    assert caught.value.code == "timeout"


async def test_mutual_tls_is_used_when_configured(service: VerdictService) -> None:
    anonymous = HttpBackend(service.config(certificate=None, key=None))
    try:
        with pytest.raises(IdentityUnavailable):
            await anonymous.lookup(visitor(service), CTX)
    finally:
        await anonymous.close()
    assert service.requests == []


async def test_plain_https_without_a_client_certificate(tmp_path: Path) -> None:
    service = VerdictService(tmp_path, require_client_certificate=False)
    await service.start()
    backend = HttpBackend(service.config(certificate=None, key=None))
    try:
        assert (await backend.lookup(visitor(service), CTX)).kind == "deny"
    finally:
        await backend.close()
        await service.close()


async def test_an_untrusted_service_is_unavailable(service: VerdictService) -> None:
    backend = HttpBackend(service.config(ca=None))
    try:
        with pytest.raises(IdentityUnavailable) as caught:
            await backend.lookup(visitor(service), CTX)
        assert caught.value.code == "tls"
    finally:
        await backend.close()


def test_configuration_shapes(tmp_path: Path) -> None:
    service = VerdictService(tmp_path)
    assert HttpBackend(service.config()).can_enrol is False
    enrolling = HttpBackend(service.config(signon_url="https://idp.example/", enrol_missing=True))
    assert enrolling.can_enrol is True
    assert enrolling.name == "http"
    with pytest.raises(ValidationError, match="signon_url"):
        service.config(enrol_missing=True)
    with pytest.raises(ValidationError, match="together"):
        service.config(key=None)
