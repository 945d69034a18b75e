"""Forged request headers, attacked from outside over real TLS.

Identity headers under configured names with underscores, and names a client lists in
``Connection`` with underscores: none may reach the application from a client, whatever
its spelling (CGI-style servers read ``X_USER`` as ``X-USER``), on
the listener's path and on aiohttp's (a request with a body).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import ConfigError, load
from sidecar.headers import FORWARDING, HOP_BY_HOP

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
    ],
)
def test_header_names_are_checked(
    config_dir: ConfigDir, headers: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(load_with(config_dir, headers))
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_reserved_names_cover_what_the_headers_module_sets() -> None:
    from sidecar.config import SIDECAR_HEADERS

    ours = HOP_BY_HOP | FORWARDING | {"host", "content-length", "x-request-id"}
    assert ours <= SIDECAR_HEADERS, ours - SIDECAR_HEADERS


def test_underscored_names_are_accepted(config_dir: ConfigDir) -> None:
    config = load(load_with(config_dir, {"userinfo": "X_USER"}))
    assert config.headers.userinfo == "X_USER"
