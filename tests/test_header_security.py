"""Forged request headers, attacked from outside over real TLS.

Identity headers under configured names with underscores, names a client lists in
``Connection`` with underscores, and headers with which applications re-route a request
(``X-Original-URL``) or re-address it (``True-Client-IP``): none may reach the application
from a client, whatever its spelling (CGI-style servers read ``X_USER`` as ``X-USER``), on
the listener's path and on aiohttp's (a request with a body).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from sidecar import headers
from sidecar.config import ConfigError, load

from .conftest import ConfigDir, Running, SidecarFactory, Upstream, decode_userinfo
from .pki import Issued
from .test_listener import read_response

PATHS = [("GET", b""), ("POST", b"body")]
PATH_IDS = ["listener", "aiohttp"]


async def send(
    running: Running, path: str, headers: list[tuple[str, str]], who: Issued | None, method: str
) -> int:
    """One request with exactly these header lines; the status."""
    body = b"body" if method == "POST" else b""
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        running.sidecar.port,
        ssl=running.client_ssl(who),
        server_hostname="localhost",
    )
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        async with asyncio.timeout(10):
            return (await read_response(reader, method)).status
    finally:
        writer.close()


def names_received(upstream: Upstream) -> set[str]:
    """The header names the application got, normalised as a CGI-style server reads them."""
    return {name.lower().replace("_", "-") for name, _ in upstream.last.headers}


# ---- identity header names with underscores (issue #12, item 3) ------------------------------


@pytest.fixture
async def underscored(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> Running:
    data = config_dir.base(upstream.port)
    data["headers"] = {"certificate": "X_CERT", "userinfo": "X_USER"}
    running: Running = await start_sidecar(data)
    return running


FORGED = [
    ("X-USER", "forged"),
    ("X_USER", "forged"),
    ("x_user", "forged"),
    ("X-User", "forged"),
    ("X-CERT", "forged"),
    ("X_Cert", "forged"),
]


@pytest.mark.parametrize(("method", "body"), PATHS, ids=PATH_IDS)
async def test_configured_names_with_underscores_strip_every_spelling(
    underscored: Running, upstream: Upstream, method: str, body: bytes
) -> None:
    # A public route: whatever the client sent is the only such header there.
    assert await send(underscored, "/public/x", FORGED, None, method) == 200
    received = upstream.last.headers
    assert not [(k, v) for k, v in received if v == "forged"], received
    # With an identity: ours, once, under the configured name.
    bob = underscored.certs.bob
    assert await send(underscored, "/app/x", FORGED, bob, method) == 200
    assert not [(k, v) for k, v in upstream.last.headers if v == "forged"]
    [userinfo] = upstream.last.header("X_USER")
    assert decode_userinfo(userinfo)["username"] == "bob"
    assert len(upstream.last.header("X_CERT")) == 1
    assert upstream.last.header("X-USER") == [] and upstream.last.header("X-CERT") == []


@pytest.mark.parametrize(("method", "body"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize(
    ("listed", "sent"),
    [("X_Secret", "X-Secret"), ("X_Secret", "X_Secret"), ("x-secret", "X_SECRET")],
)
async def test_names_listed_in_connection_are_normalised_like_header_names(
    running: Running, upstream: Upstream, method: str, body: bytes, listed: str, sent: str
) -> None:
    headers = [("Connection", f"keep-alive, {listed}"), (sent, "hop-by-hop only")]
    assert await send(running, "/public/x", headers, None, method) == 200
    assert "x-secret" not in names_received(upstream), upstream.last.headers


# ---- headers that re-route or re-address a request (item 10) --------------------------------

REROUTING = [
    ("X-Original-URL", "/admin/users"),  # IIS URL Rewrite, Symfony before 3.4.14
    ("X-Rewrite-URL", "/admin/users"),  # IIS, Zend
    ("X_Original_URL", "/admin/users"),
    ("x-rewrite_url", "/admin/users"),
]
READDRESSING = [
    ("X-Forwarded-Prefix", "/admin"),  # Spring, Symfony, Traefik: the path prefix
    ("True-Client-IP", "10.6.6.6"),  # Akamai, Cloudflare Enterprise
    ("X-Client-IP", "10.6.6.6"),
    ("CF-Connecting-IP", "10.6.6.6"),  # Cloudflare
    ("X-Cluster-Client-IP", "10.6.6.6"),  # Rackspace, Riverbed
    ("X-Forwarded-Server", "evil"),  # the README promises every X-Forwarded-*
    ("X-Forwarded-Ssl", "on"),
    ("X-Forwarded-Uri", "/admin/"),  # Traefik's forward-auth
    ("X_Forwarded_Prefix", "/admin"),
    ("true_client_ip", "10.6.6.6"),
]


@pytest.mark.parametrize(("method", "body"), PATHS, ids=PATH_IDS)
async def test_rerouting_and_readdressing_headers_are_stripped_from_clients(
    running: Running, upstream: Upstream, method: str, body: bytes
) -> None:
    for who in (None, running.certs.bob):
        assert await send(running, "/public/x", REROUTING + READDRESSING, who, method) == 200
        received = names_received(upstream)
        for name, _ in REROUTING + READDRESSING:
            assert name.lower().replace("_", "-") not in received, upstream.last.headers


@pytest.fixture
async def behind_a_proxy(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> Running:
    data = config_dir.base(upstream.port)
    data["trusted_proxies"] = ["127.0.0.1/32"]
    data["headers"] = {"strip": ["X-Debug-User", "X-Legacy-Auth"]}
    running: Running = await start_sidecar(data)
    return running


@pytest.mark.parametrize(("method", "body"), PATHS, ids=PATH_IDS)
async def test_a_trusted_proxy_may_readdress_but_never_reroute(
    behind_a_proxy: Running, upstream: Upstream, method: str, body: bytes
) -> None:
    sent = REROUTING + READDRESSING[:5] + [("X_Debug_User", "root"), ("X-LEGACY-AUTH", "x")]
    assert await send(behind_a_proxy, "/public/x", sent, None, method) == 200
    received = names_received(upstream)
    # The sidecar judged the request line; a path in a header would be judged by nobody.
    assert not received & {"x-original-url", "x-rewrite-url"}
    # headers.strip: from every peer, trusted proxies included, in every spelling.
    assert not received & {"x-debug-user", "x-legacy-auth"}
    for name, value in READDRESSING[:5]:
        assert upstream.last.header(name) == [value]


async def test_configured_strip_list_applies_to_clients_too(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    data = config_dir.base(upstream.port)
    data["headers"] = {"strip": ["X-Debug-User"]}
    running = await start_sidecar(data)
    headers = [("X-Debug-User", "root"), ("x_debug_user", "root"), ("X-Kept", "yes")]
    assert await send(running, "/public/x", headers, None, "GET") == 200
    assert "x-debug-user" not in names_received(upstream)
    assert upstream.last.header("X-Kept") == ["yes"]


# ---- configuration ---------------------------------------------------------------------------


def load_with(config_dir: ConfigDir, headers: dict[str, Any]) -> Path:
    data = config_dir.base()
    data["headers"] = headers
    return config_dir.write(data)


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ({"userinfo": "X USER"}, "headers.userinfo: not a valid header name"),
        ({"userinfo": "X-USERé"}, "headers.userinfo: not a valid header name"),
        ({"certificate": "X:CERT"}, "headers.certificate: not a valid header name"),
        ({"certificate": "X_A", "userinfo": "x-a"}, "headers.userinfo: must differ"),
        ({"userinfo": "Host"}, "headers.userinfo: 'Host' is a header the sidecar"),
        ({"userinfo": "X_Forwarded_For"}, "headers.userinfo: 'X_Forwarded_For' is a header"),
        ({"certificate": "X-Request-ID"}, "headers.certificate: 'X-Request-ID' is a header"),
        ({"certificate": "Connection"}, "headers.certificate: 'Connection' is a header"),
        ({"strip": ["X-Ok", "X Bad"]}, "headers.strip[1]: not a valid header name"),
        ({"strip": ["Content_Length"]}, "headers.strip[0]: 'Content_Length' cannot be stripped"),
        ({"strip": ["host"]}, "headers.strip[0]: 'host' cannot be stripped"),
        ({"strip": "X-One"}, "headers.strip"),
    ],
)
def test_header_names_are_checked(
    config_dir: ConfigDir, headers: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(load_with(config_dir, headers))
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_reserved_names_cover_what_the_headers_module_sets() -> None:
    from sidecar.header_names import SIDECAR_HEADERS

    ours = headers.HOP_BY_HOP | headers.FORWARDING | headers.REROUTING
    ours |= {"host", "content-length", "x-request-id"}
    assert ours <= SIDECAR_HEADERS, ours - SIDECAR_HEADERS


def test_underscored_names_are_accepted(config_dir: ConfigDir) -> None:
    config = load(load_with(config_dir, {"userinfo": "X_USER", "strip": ["X_Debug"]}))
    assert config.headers.userinfo == "X_USER"
    assert config.headers.strip == ("X_Debug",)
