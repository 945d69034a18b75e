"""Certificate headers a client sends, attacked from outside over real TLS (issue #15).

Every header name of every certificate format the sidecar reads or writes
(``certformats.HEADER_NAMES``: RFC 9440 ``Client-Cert``, Envoy's XFCC, nginx's
``ssl-client-cert``, Traefik's, AWS ALB's) is removed from every client request, on every
route (public ones included), from trusted proxies too, in any spelling, on the listener's
path and on aiohttp's; what the application gets is only what the sidecar built from the
chain it validated.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import socket
import ssl
from typing import Any
from urllib.parse import unquote

import pytest
from cryptography import x509
from http_sfv.item import Item as SfItem
from http_sfv.list import List as SfList

from sidecar import certformats

from .conftest import ConfigDir, Running, SidecarFactory, Upstream, decode_userinfo
from .header_oracles import rfc4514_decode, xfcc_parse
from .test_header_security import PATH_IDS, PATHS, names_received, send


def spellings(name: str) -> list[str]:
    return [name, name.upper(), name.replace("-", "_"), name.title()]


FORGED = [
    (spelled, "forged") for name in sorted(certformats.HEADER_NAMES) for spelled in spellings(name)
]


@pytest.fixture(params=[False, True], ids=["client", "trusted-proxy"])
async def sidecar(
    request: pytest.FixtureRequest,
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
) -> Running:
    data: dict[str, Any] = config_dir.base(upstream.port)
    if request.param:
        data["trusted_proxies"] = ["127.0.0.1/32"]
    running: Running = await start_sidecar(data)
    return running


@pytest.mark.parametrize(("method", "body"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("path", ["/public/x", "/admin/x", "/x"])
async def test_no_certificate_header_of_any_format_passes(
    sidecar: Running, upstream: Upstream, method: str, body: bytes, path: str
) -> None:
    who = None if path.startswith("/public/") else sidecar.certs.alice
    status = await send(sidecar, path, FORGED, who, method)
    assert status == 200
    received = names_received(upstream)
    assert not received & certformats.HEADER_NAMES, received & certformats.HEADER_NAMES
    assert all(value != "forged" for _, value in upstream.last.headers)


# ---- headers.certificate_formats: built from the validated chain -----------------------------

ALL_FORMATS: list[certformats.OutboundFormat] = list(certformats.OUTBOUND)


@pytest.fixture
async def every_format(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> Running:
    data: dict[str, Any] = config_dir.base(upstream.port)
    data["headers"] = {"certificate_formats": ALL_FORMATS}
    running: Running = await start_sidecar(data)
    return running


def only(upstream: Upstream, name: str) -> str:
    values = upstream.last.header(name)
    assert len(values) == 1, (name, values)
    return values[0]


@pytest.mark.parametrize(("method", "body"), PATHS, ids=PATH_IDS)
async def test_every_format_carries_the_validated_certificate_not_the_clients(
    every_format: Running, upstream: Upstream, method: str, body: bytes
) -> None:
    alice = every_format.certs.alice
    # Mallory's certificate in every header, sent by Alice's connection: replaced by hers.
    mallory = every_format.certs.stranger
    forged = [
        (name, v)
        for name, v in certformats.CertificateHeaders(ALL_FORMATS[1:], "X").fields(mallory.der)
    ]
    status = await send(every_format, "/x", forged, alice, method)
    assert status == 200
    # RFC 9440, decoded by http-sfv (RFC 8941), not by our own code
    item = SfItem()
    item.parse(only(upstream, "Client-Cert").encode())
    assert item.value == alice.der
    # the chain OpenSSL verified (client-ca.pem holds the root and the intermediate):
    # the intermediate, the trust anchor left out, whatever the client sent with its leaf
    chain = SfList()
    chain.parse(only(upstream, "Client-Cert-Chain").encode())
    assert [m.value for m in chain] == [every_format.certs.pki.client_intermediate.der]
    # Envoy's XFCC by its documented grammar: one element, Alice's
    (element,) = xfcc_parse(only(upstream, "X-Forwarded-Client-Cert"))
    got = dict(element)
    assert got["hash"] == hashlib.sha256(alice.der).hexdigest()
    assert x509.load_pem_x509_certificate(
        unquote(got["cert"]).encode()
    ) == x509.load_der_x509_certificate(alice.der)
    assert rfc4514_decode(got["subject"]) == [[("CN", "Alice Liddell")]]
    # nginx: URL-encoded PEM
    pem = unquote(only(upstream, "ssl-client-cert")).encode()
    assert x509.load_pem_x509_certificate(pem) == x509.load_der_x509_certificate(alice.der)
    # Traefik: base64 DER, no armour, comma-separated (below)
    assert base64.b64decode(only(upstream, "X-APP-CERTIFICATE"), validate=True) == alice.der
    intermediate = every_format.certs.pki.client_intermediate.der
    traefik = only(upstream, "X-Forwarded-Tls-Client-Cert").split(",")
    assert [base64.b64decode(part, validate=True) for part in traefik] == [alice.der, intermediate]
    assert x509.load_pem_x509_certificates(unquote(got["chain"]).encode()) == [
        x509.load_der_x509_certificate(alice.der),
        x509.load_der_x509_certificate(intermediate),
    ]
    assert decode_userinfo(only(upstream, "X-USERINFO"))["username"] == "alice"


async def test_without_app_certificate_the_contracts_header_is_not_sent(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    data: dict[str, Any] = config_dir.base(upstream.port)
    data["headers"] = {"certificate_formats": ["client-cert"]}
    running: Running = await start_sidecar(data)
    status = await send(
        running, "/x", [("X-APP-CERTIFICATE", "forged")], running.certs.alice, "GET"
    )
    assert status == 200
    assert not upstream.last.header("X-APP-CERTIFICATE")
    assert upstream.last.header("Client-Cert") and upstream.last.header("X-USERINFO")


async def test_no_certificate_no_certificate_headers(
    every_format: Running, upstream: Upstream
) -> None:
    assert await send(every_format, "/public/x", [], None, "GET") == 200
    assert not names_received(upstream) & (
        certformats.HEADER_NAMES | {"x-app-certificate", "x-userinfo"}
    )


# ---- a resumed session: the same headers as the full handshake ------------------------------

#: every certificate header the sidecar writes with every format on
WRITTEN = sorted(certformats.HEADER_NAMES | {"X-APP-CERTIFICATE"})


def _exchange(
    port: int, ctx: ssl.SSLContext, request: bytes, session: ssl.SSLSession | None
) -> tuple[bytes, bool, ssl.SSLSession | None]:
    """``request`` on a new connection resuming ``session``: the answer's head, whether the
    session was resumed, and the connection's session (blocking: run it in a thread)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
    ):
        tls.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data and (chunk := tls.recv(65536)):
            data += chunk
        if data.startswith(b"HTTP/1.1 101 "):
            tls.sendall(b"\x88\x80" + bytes(4))  # a WebSocket close, masked, no payload
            while tls.recv(65536):  # until the sidecar closes too
                pass
        return data.split(b"\r\n\r\n", 1)[0], bool(tls.session_reused), tls.session


REQUESTS = {
    "listener": b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    # a WebSocket upgrade: aiohttp's server (the fallback) builds the headers there
    "websocket": b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n",
}


@pytest.mark.parametrize("path", list(REQUESTS))
@pytest.mark.parametrize("tls12", [False, True], ids=["TLS 1.3", "TLS 1.2"])
@pytest.mark.parametrize("where", ["same worker", "other worker"])
@pytest.mark.parametrize("pinned", [False, True], ids=["", "pinned"])
async def test_a_resumed_connection_carries_the_chain_it_was_verified_with(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
    path: str,
    tls12: bool,
    where: str,
    pinned: bool,
) -> None:
    """OpenSSL verifies nothing on a resumed connection and keeps no chain in a session:
    before, every resumed connection's chain headers (``Client-Cert-Chain``, XFCC's
    ``Chain``, Traefik's list) were empty. Now the worker that verified the certificate
    gives the chain it verified, and another worker (the session from the workers' table)
    the chain rebuilt from the trust anchors: every certificate header as on the full
    handshake, on both request paths."""
    from .test_tls_sessions import two

    data: dict[str, Any] = config_dir.base(upstream.port)
    data["headers"] = {"certificate_formats": ALL_FORMATS}
    if pinned:  # partial chains: OpenSSL stops at the first trusted certificate
        device, _ = config_dir.certs.pki.client("Pinned Device").write(config_dir.path, "device")
        data["tls"]["pinned_certificates"] = [str(device)]
    a, b = await two(start_sidecar, data)
    there = a if where == "same worker" else b
    ctx = a.client_ssl(a.certs.alice)
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    request = REQUESTS[path]
    head, _, session = await asyncio.to_thread(_exchange, a.sidecar.port, ctx, request, None)
    head_again, reused, _ = await asyncio.to_thread(
        _exchange, there.sidecar.port, ctx, request, session
    )
    expected = b"HTTP/1.1 101 " if path == "websocket" else b"HTTP/1.1 200 "
    assert head.startswith(expected) and head_again.startswith(expected), (head, head_again)
    assert reused
    first, resumed = upstream.seen
    for name in WRITTEN:
        assert resumed.header(name) == first.header(name), name
    if pinned:
        assert first.header("Client-Cert-Chain") == []  # the intermediate is trusted itself
    else:
        chain = SfList()
        chain.parse(only(upstream, "Client-Cert-Chain").encode())
        assert [m.value for m in chain] == [a.certs.pki.client_intermediate.der]


class _Connection:
    """What ``PeerCertificates.chain_of`` reads of an ``SSLObject``."""

    def __init__(self, context: ssl.SSLContext, reused: bool, chain: list[bytes]) -> None:
        self.context, self.session_reused, self._chain = context, reused, chain

    def get_verified_chain(self) -> list[bytes]:
        return self._chain


def test_a_remembered_chain_is_the_contexts_and_a_failed_rebuild_is_no_chain(
    config_dir: ConfigDir,
) -> None:
    """A chain verified under one context (one trust) is never given for a connection of
    another: a reload that changes trust makes new contexts. Where the rebuild raises, the
    headers carry no chain; the connection is not dropped."""
    from sidecar.certs import ClientCert
    from sidecar.tls import PeerCertificates

    pki = config_dir.certs.pki
    alice = ClientCert.from_der(config_dir.certs.alice.der)
    before, after = (ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER) for _ in range(2))
    verified = [alice.der, pki.client_intermediate.der, pki.client_root.der]
    peers = PeerCertificates()
    full = _Connection(before, False, verified)
    assert peers.chain_of(full, alice) == (pki.client_intermediate.der,)  # type: ignore[arg-type]
    resumed_before = _Connection(before, True, [])
    resumed_after = _Connection(after, True, [])
    assert peers.chain_of(resumed_before, alice) == (pki.client_intermediate.der,)  # type: ignore[arg-type]
    assert peers.chain_of(resumed_after, alice) == ()  # type: ignore[arg-type]

    def broken(cert: ClientCert) -> tuple[bytes, ...] | None:
        raise ValueError("an anchor that cannot be read")

    peers.chains_from = broken
    assert peers.chain_of(resumed_after, alice) == ()  # type: ignore[arg-type]
