"""The whole sidecar over real TLS: identity headers, policy answers, streaming, WebSockets."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
from typing import Any

import aiohttp
import pytest
from yarl import URL

from .conftest import ALICE_SUB, BOB_SUB, Running, SidecarFactory, Upstream, decode_userinfo
from .pki import Issued
from .servers import serve_app


async def get(
    running: Running,
    path: str,
    who: Issued | None = None,
    *,
    method: str = "GET",
    headers: Any = None,
    data: Any = None,
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            URL(running.url + path, encoded=True),
            ssl=running.client_ssl(who),
            headers=headers,
            data=data,
        ) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


async def test_allowed_request_carries_exactly_the_contract_headers(
    running: Running, upstream: Upstream
) -> None:
    alice = running.certs.alice
    status, headers, body = await get(running, "/admin/reports?x=1", alice)
    assert status == 200, body
    assert headers["X-Request-ID"]
    seen = upstream.last
    assert seen.raw_path == "/admin/reports?x=1"
    [cert_b64] = seen.header("X-APP-CERTIFICATE")
    assert base64.b64decode(cert_b64, validate=True) == alice.der
    assert cert_b64 == base64.b64encode(alice.der).decode()  # padded, one line
    [info] = seen.header("X-USERINFO")
    assert decode_userinfo(info) == {
        "sub": ALICE_SUB,
        "username": "alice",
        "given_name": "Alice",
        "family_name": "Liddell",
        "email": "alice@example.com",
        "roles": ["administrator"],
    }
    assert seen.header("X-Forwarded-Proto") == ["https"]
    assert seen.header("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.header("X-Forwarded-Host") == [f"localhost:{running.sidecar.port}"]
    assert seen.header("Host") == [f"localhost:{running.sidecar.port}"]
    assert seen.header("X-Request-ID") == [headers["X-Request-ID"]]


async def test_userinfo_omits_unknown_fields(running: Running, upstream: Upstream) -> None:
    status, _, _ = await get(running, "/app/", running.certs.bob)
    assert status == 200
    assert decode_userinfo(upstream.last.header("X-USERINFO")[0]) == {
        "sub": BOB_SUB,
        "username": "bob",
        "roles": ["member"],
    }


async def test_spoofed_identity_and_forwarding_headers_are_replaced(
    running: Running, upstream: Upstream
) -> None:
    forged = base64.b64encode(
        json.dumps({"sub": "admin", "username": "admin", "roles": ["administrator"]}).encode()
    ).decode()
    spoof = [
        ("X-USERINFO", forged),
        ("x-userinfo", forged),
        ("X_USERINFO", forged),  # what CGI-style servers read as X-USERINFO
        ("X-App-Certificate", "Zm9yZ2Vk"),
        ("X-Forwarded-For", "6.6.6.6"),
        ("x-forwarded-proto", "http"),
        ("X-Forwarded-Host", "evil.example"),
        ("Forwarded", "for=6.6.6.6;proto=http"),
        ("X-Request-ID", "attacker-chosen"),
        ("Connection", "X-Keep-Me-Not"),
        ("X-Keep-Me-Not", "1"),
    ]
    # bob is identified: the forged admin identity must not survive
    status, headers, _ = await get(running, "/app/", running.certs.bob, headers=spoof)
    assert status == 200
    seen = upstream.last
    assert [decode_userinfo(v)["sub"] for v in seen.header("X-USERINFO")] == [BOB_SUB]
    assert [base64.b64decode(v) for v in seen.header("X-APP-CERTIFICATE")] == [
        running.certs.bob.der
    ]
    assert seen.header("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.header("X-Forwarded-Proto") == ["https"]
    assert seen.header("X-Forwarded-Host") == [f"localhost:{running.sidecar.port}"]
    assert seen.header("Forwarded") == [] and seen.header("X-Keep-Me-Not") == []
    assert seen.header("X_USERINFO") == []
    assert headers["X-Request-ID"] != "attacker-chosen"
    # a forged identity on a public route without a certificate: anonymous upstream
    status, _, _ = await get(running, "/public/x", None, headers=spoof)
    assert status == 200
    assert (
        upstream.last.header("X-USERINFO") == [] and upstream.last.header("X-APP-CERTIFICATE") == []
    )


async def test_trusted_proxy_keeps_forwarding_headers(
    start_sidecar: SidecarFactory, config_dir: Any, upstream: Upstream
) -> None:
    running = await start_sidecar(config_dir.base(upstream.port, trusted_proxies=["127.0.0.0/8"]))
    status, headers, _ = await get(
        running,
        "/app/",
        running.certs.bob,
        headers={
            "X-Forwarded-For": "203.0.113.9",
            "X-Request-ID": "edge-123",
            "X-Forwarded-Proto": "https",
        },
    )
    assert status == 200
    assert upstream.last.header("X-Forwarded-For") == ["203.0.113.9, 127.0.0.1"]
    assert headers["X-Request-ID"] == "edge-123"
    assert upstream.last.header("X-Request-ID") == ["edge-123"]


async def test_public_route_without_certificate_is_anonymous(
    running: Running, upstream: Upstream
) -> None:
    status, _, _ = await get(running, "/public/page")
    assert status == 200
    assert upstream.last.header("X-USERINFO") == []


async def test_public_route_with_certificate_is_identified(
    running: Running, upstream: Upstream
) -> None:
    status, _, _ = await get(running, "/public/page", running.certs.alice)
    assert status == 200
    assert decode_userinfo(upstream.last.header("X-USERINFO")[0])["username"] == "alice"


async def test_no_certificate_on_protected_route_is_401(
    running: Running, upstream: Upstream
) -> None:
    status, headers, body = await get(running, "/app/")
    assert status == 401
    assert headers["Content-Type"].startswith("application/problem+json")
    doc = json.loads(body)
    assert doc["status"] == 401 and "certificate" in doc["detail"].lower()
    assert upstream.seen == []


async def test_browser_gets_html(running: Running) -> None:
    status, headers, body = await get(
        running, "/app/", headers={"Accept": "text/html,application/xhtml+xml"}
    )
    assert status == 401
    assert headers["Content-Type"].startswith("text/html")
    assert b"<h1>401" in body and headers["X-Request-ID"].encode() in body


async def test_unbound_certificate_is_403(running: Running, upstream: Upstream) -> None:
    status, _, body = await get(running, "/app/", running.certs.stranger)
    assert status == 403
    assert "not bound" in json.loads(body)["detail"]
    # even on the admin route, and without leaking internals
    status, _, body = await get(running, "/admin/", running.certs.stranger)
    assert status == 403 and b"Traceback" not in body
    assert upstream.seen == []


async def test_missing_role_is_403(running: Running, upstream: Upstream) -> None:
    status, _, body = await get(running, "/admin/users", running.certs.bob)
    assert status == 403
    assert "role" in json.loads(body)["detail"]
    status, _, _ = await get(running, "/admin", running.certs.bob)
    assert status == 403
    assert upstream.seen == []


async def test_ambiguous_paths_are_refused(running: Running, upstream: Upstream) -> None:
    for path in ("/public/%2e%2e/admin/users", "/public/..;/admin/", "/a\\b"):
        status, _, _ = await get(running, path, running.certs.bob)
        assert status == 400, path
    assert upstream.seen == []


async def test_every_method_and_exact_path(running: Running, upstream: Upstream) -> None:
    path = "/app/a%2Fb/%C3%A9t%C3%A9?q=a+b&q=c%26d&empty=&x=%20"
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"):
        status, _, _ = await get(
            running,
            path,
            running.certs.bob,
            method=method,
            data=b"x" if method in ("POST", "PUT") else None,
        )
        assert status == 200, method
        assert upstream.last.method == method
        assert upstream.last.raw_path == path


async def test_large_upload_and_download_are_intact(running: Running, upstream: Upstream) -> None:
    payload = os.urandom(5 * 1024 * 1024)
    status, _, body = await get(
        running, "/app/upload", running.certs.bob, method="POST", data=io.BytesIO(payload)
    )
    assert status == 200
    assert upstream.last.body_sha256 == hashlib.sha256(payload).hexdigest()
    assert upstream.last.body_len == len(payload)

    async def chunks() -> Any:
        for i in range(0, len(payload), 65536):
            yield payload[i : i + 65536]

    status, _, _ = await get(running, "/app/upload", running.certs.bob, method="PUT", data=chunks())
    assert status == 200
    assert upstream.last.body_sha256 == hashlib.sha256(payload).hexdigest()

    size = 20 * 1024 * 1024
    status, _, body = await get(running, f"/download/{size}", running.certs.bob)
    assert status == 200 and len(body) == size
    block = bytes(range(256)) * 256
    expected = hashlib.sha256()
    for i in range(0, size, len(block)):
        expected.update(block[: min(len(block), size - i)])
    assert hashlib.sha256(body).hexdigest() == expected.hexdigest()


async def test_websocket_echoes_through(running: Running, upstream: Upstream) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(running.url + "/ws", ssl=running.client_ssl(running.certs.bob)) as ws,
    ):
        await ws.send_str("hello")
        msg = await ws.receive(timeout=5)
        assert msg.data == "echo:hello"
        await ws.send_bytes(b"\x00\x01binary")
        msg = await ws.receive(timeout=5)
        assert msg.data == b"\x00\x01binary"
    assert upstream.seen[-1].raw_path == "/ws"
    assert decode_userinfo(upstream.seen[-1].header("X-USERINFO")[0])["username"] == "bob"


async def test_websocket_needs_identity_too(running: Running, upstream: Upstream) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await session.ws_connect(running.url + "/ws", ssl=running.client_ssl(None))
    assert info.value.status == 401
    assert upstream.seen == []


async def test_upstream_down_is_502(start_sidecar: SidecarFactory, config_dir: Any) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead_port = s.getsockname()[1]
    s.close()
    running = await start_sidecar(config_dir.base(dead_port))
    status, headers, body = await get(running, "/app/", running.certs.bob)
    assert status == 502
    assert json.loads(body)["status"] == 502 and "X-Request-ID" in headers
    assert b"Connect" not in body and b"refused" not in body.lower()  # no internals


async def test_upstream_too_slow_is_504(start_sidecar: SidecarFactory, config_dir: Any) -> None:
    from aiohttp import web

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/{tail:.*}", slow)
    runner, port = await serve_app(app, shutdown_timeout=0.1)
    data = config_dir.base(port)
    data["upstream"]["timeout"]["read"] = "300ms"
    running = await start_sidecar(data)
    try:
        status, _, body = await get(running, "/app/", running.certs.bob)
        assert status == 504
        assert json.loads(body)["status"] == 504
    finally:
        await runner.cleanup()
