"""Certificate headers a client sends, attacked from outside over real TLS (issue #15).

Every header name of every certificate format the sidecar reads or writes
(``certformats.HEADER_NAMES``: RFC 9440 ``Client-Cert``, Envoy's XFCC, nginx's
``ssl-client-cert``, Traefik's, AWS ALB's) is removed from every client request, on every
route (public ones included), from trusted proxies too, in any spelling, on the listener's
path and on aiohttp's; what the application gets is only what the sidecar built from the
chain it validated.
"""

from __future__ import annotations

import base64
import hashlib
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
