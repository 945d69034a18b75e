"""Behind a front proxy (issue #15, item 1), attacked from outside over real sockets.

A trusted proxy (``front_proxy.trusted``: its address, or its TLS client certificate's
fingerprint) passes the client certificate in ``front_proxy.certificate_header``; the sidecar
verifies it again (chain to ``tls.client_ca`` or a pin, validity, clientAuth) and it then
goes through the identity and policy path a TLS client certificate goes through. From any
other peer the header is stripped and judged absent, logged and counted. A header that does
not read gets 400, a chain that does not verify 403; neither is forwarded. The client's
address is read from ``X-Forwarded-For`` right to left, skipping trusted hops.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ssl
from typing import Any
from urllib.parse import quote

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID
from structlog.testing import capture_logs

from sidecar import certformats
from sidecar.config import ConfigError, parse

from .conftest import ALICE_SUB, ConfigDir, Running, SidecarFactory, Upstream, decode_userinfo
from .pki import PKI, Issued, make_ca, make_leaf
from .test_listener import Response, read_response


def escaped(*certs: Issued) -> str:
    """nginx's $ssl_client_escaped_cert (URL-encoded PEM)."""
    return quote("".join(c.pem.decode() for c in certs), safe="")


def front_config(
    config_dir: ConfigDir,
    upstream: Upstream,
    *,
    trusted: list[str],
    fmt: str = "ssl-client-cert",
    tls: bool = False,
) -> dict[str, Any]:
    data: dict[str, Any] = config_dir.base(upstream.port)
    data["listen"] = {"host": "127.0.0.1", "port": 0, "tls": tls, "server_names": ["localhost"]}
    data["front_proxy"] = {"trusted": trusted, "certificate_header": fmt}
    data["routes"] = [
        {"path": "/public/", "access": "public"},
        {"path": "/admin/", "roles": ["administrator"]},
        {"path": "/office/", "addresses": {"allow": ["203.0.113.0/24"]}},
        {"path": "/"},
    ]
    return data


async def request(
    running: Running,
    path: str,
    headers: list[tuple[str, str]],
    *,
    tls: ssl.SSLContext | None = None,
) -> Response:
    lines = [f"GET {path} HTTP/1.1", "Host: localhost", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        running.sidecar.port,
        ssl=tls,
        server_hostname="localhost" if tls is not None else None,
    )
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        async with asyncio.timeout(10):
            return await read_response(reader)
    finally:
        writer.close()


def counted(running: Running, outcome: str) -> float:
    value = running.sidecar.metrics.registry.get_sample_value(
        "sidecar_front_proxy_certificates_total", {"outcome": outcome}
    )
    return value or 0.0


# ---- a trusted proxy over plain HTTP (listen.tls: false) ----------------------------------------


@pytest.fixture
async def behind(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> Running:
    running: Running = await start_sidecar(
        front_config(config_dir, upstream, trusted=["127.0.0.1/32"])
    )
    return running


async def test_a_certificate_from_a_trusted_proxy_is_the_clients_identity(
    behind: Running, upstream: Upstream
) -> None:
    alice = behind.certs.alice
    answer = await request(behind, "/admin/x", [("ssl-client-cert", escaped(alice))])
    assert answer.status == 200, answer.body
    seen = upstream.last
    assert decode_userinfo(seen.header("X-USERINFO")[0])["sub"] == ALICE_SUB
    assert seen.header("X-APP-CERTIFICATE") == [base64.b64encode(alice.der).decode()]
    assert not seen.header("ssl-client-cert")  # read, never passed on
    assert counted(behind, "accepted") == 1


async def test_a_trusted_proxy_without_a_certificate_means_no_certificate(
    behind: Running, upstream: Upstream
) -> None:
    assert (await request(behind, "/x", [])).status == 401
    assert (await request(behind, "/public/x", [])).status == 200
    assert not upstream.last.header("X-USERINFO")


@pytest.mark.parametrize(
    ("make", "status", "words"),
    [
        (lambda pki, alice: escaped(PKI.create().client("Mallory")), 403, "does not verify"),
        (
            lambda pki, alice: escaped(pki.client("Old", days_valid=(-30, -1))),
            403,
            "does not verify",
        ),
        (
            lambda pki, alice: escaped(pki.client("Server", eku=[ExtendedKeyUsageOID.SERVER_AUTH])),
            403,
            "does not verify",
        ),
        (lambda pki, alice: escaped(alice)[:-40], 400, "cannot be read"),
        (lambda pki, alice: "-----BEGIN%20CERTIFICATE-----%0Agarbage", 400, "cannot be read"),
        (lambda pki, alice: escaped(alice) + "%", 400, "cannot be read"),
    ],
    ids=["other-ca", "expired", "server-eku", "truncated", "garbage", "bad-escape"],
)
async def test_a_certificate_that_does_not_verify_or_read_is_refused_never_forwarded(
    behind: Running, upstream: Upstream, make: Any, status: int, words: str
) -> None:
    value = make(behind.certs.pki, behind.certs.alice)
    with capture_logs() as logs:
        answer = await request(behind, "/public/x", [("ssl-client-cert", value)])
    assert answer.status == status, answer.body
    assert words.encode() in answer.body
    assert not upstream.seen
    assert any(e["event"] == "certificate_header_refused" for e in logs)
    assert counted(behind, "unverified" if status == 403 else "unreadable") == 1


async def test_the_same_header_twice_is_refused(behind: Running, upstream: Upstream) -> None:
    alice, bob = behind.certs.alice, behind.certs.bob
    answer = await request(
        behind, "/x", [("ssl-client-cert", escaped(alice)), ("SSL_Client_Cert", escaped(bob))]
    )
    assert answer.status == 400
    assert not upstream.seen


async def test_x_forwarded_for_is_read_right_to_left_skipping_trusted_hops(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    data = front_config(config_dir, upstream, trusted=["127.0.0.1/32", "10.0.0.0/8"])
    running: Running = await start_sidecar(data)
    alice = [("ssl-client-cert", escaped(running.certs.alice))]
    # the client (203.0.113.9) behind two trusted hops; whatever it wrote itself is further left
    ok = await request(
        running, "/office/x", [*alice, ("X-Forwarded-For", "6.6.6.6, 203.0.113.9, 10.1.2.3")]
    )
    assert ok.status == 200
    # a client writing an allowed address leftmost does not become it
    forged = await request(
        running, "/office/x", [*alice, ("X-Forwarded-For", "203.0.113.9, 6.6.6.6")]
    )
    assert forged.status == 403
    # the header split over two lines is one list
    split = await request(
        running,
        "/office/x",
        [*alice, ("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "203.0.113.9")],
    )
    assert split.status == 200
    # the upstream gets the list as sent, with the proxy appended
    assert upstream.last.header("X-Forwarded-For") == ["6.6.6.6, 203.0.113.9, 127.0.0.1"]


# ---- an untrusted peer -----------------------------------------------------------------------


async def test_from_an_untrusted_peer_the_header_is_stripped_and_judged_absent(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    running: Running = await start_sidecar(
        front_config(config_dir, upstream, trusted=["10.0.0.0/8"])
    )
    forged = [("ssl-client-cert", escaped(running.certs.alice)), ("X-Forwarded-For", "203.0.113.9")]
    with capture_logs() as logs:
        assert (await request(running, "/x", forged)).status == 401  # no certificate
        assert (await request(running, "/public/x", forged)).status == 200
    seen = upstream.last
    assert not seen.header("ssl-client-cert") and not seen.header("X-USERINFO")
    assert seen.header("X-Forwarded-For") == ["127.0.0.1"]
    assert [e["event"] for e in logs].count("certificate_header_untrusted") == 2
    assert counted(running, "untrusted") == 2
    # not the client's address either
    assert (await request(running, "/office/x", forged)).status == 403


# ---- a proxy trusted by its TLS client certificate ---------------------------------------------


async def test_a_proxy_trusted_by_its_certificate_fingerprint(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    proxy = config_dir.certs.pki.client("Front Proxy")
    fingerprint = hashlib.sha256(proxy.der).hexdigest()
    data = front_config(config_dir, upstream, trusted=[fingerprint], fmt="xfcc", tls=True)
    running: Running = await start_sidecar(data)
    alice, bob = running.certs.alice, running.certs.bob
    xfcc = [("X-Forwarded-Client-Cert", certformats.forwarded_client_cert(alice.der, []))]
    # the proxy's connection: Alice's identity, not the proxy's
    answer = await request(running, "/admin/x", xfcc, tls=running.client_ssl(proxy))
    assert answer.status == 200, answer.body
    assert decode_userinfo(upstream.last.header("X-USERINFO")[0])["sub"] == ALICE_SUB
    # Bob's own TLS connection with Alice's header: Bob, the header stripped
    answer = await request(running, "/x", xfcc, tls=running.client_ssl(bob))
    assert answer.status == 200
    assert decode_userinfo(upstream.last.header("X-USERINFO")[0])["username"] == "bob"
    assert not upstream.last.header("X-Forwarded-Client-Cert")
    assert (await request(running, "/admin/x", xfcc, tls=running.client_ssl(bob))).status == 403


# ---- configuration -------------------------------------------------------------------------


def test_front_proxy_mode_needs_trusted_proxies(config_dir: ConfigDir) -> None:
    data = front_config(config_dir, Upstream(1), trusted=[])
    with pytest.raises(ConfigError) as info:
        parse(data, base_dir=config_dir.path, env={})
    assert any(
        p.startswith("front_proxy.trusted: empty, but listen.tls is false")
        for p in info.value.problems
    )
    data["listen"]["tls"] = True
    with pytest.raises(ConfigError) as info:
        parse(data, base_dir=config_dir.path, env={})
    assert any("front_proxy.certificate_header is set" in p for p in info.value.problems)
    data["front_proxy"]["trusted"] = ["0.0.0.0/0"]
    with pytest.raises(ConfigError) as info:
        parse(data, base_dir=config_dir.path, env={})
    assert info.value.problems == [
        "front_proxy.trusted[0]: 0.0.0.0/0 trusts every address: list the proxies' own addresses"
    ]


async def test_a_request_with_a_body_takes_the_same_path(
    behind: Running, upstream: Upstream
) -> None:
    """aiohttp's path (a request with a body): the same certificate, the same refusals."""
    alice = behind.certs.alice
    for value, status in ((escaped(alice), 200), (escaped(PKI.create().client("M")), 403)):
        reader, writer = await asyncio.open_connection("127.0.0.1", behind.sidecar.port)
        writer.write(
            b"POST /admin/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            b"Content-Length: 4\r\nssl-client-cert: " + value.encode() + b"\r\n\r\nbody"
        )
        async with asyncio.timeout(10):
            answer = await read_response(reader, "POST")
        writer.close()
        assert answer.status == status, answer.body
    seen = upstream.last
    assert seen.method == "POST" and seen.body_len == 4
    assert decode_userinfo(seen.header("X-USERINFO")[0])["sub"] == ALICE_SUB
    assert len(upstream.seen) == 1  # the refused one never reached it


async def test_a_revoked_certificate_from_a_trusted_proxy_is_refused(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    """Revocation (tls.crl) judges a certificate from a front proxy as it judges a TLS one."""
    from .revocation_parts import make_crl, pem

    certs = config_dir.certs
    crl = make_crl(certs.pki.client_intermediate, [int(certs.alice.cert.serial_number)])
    (config_dir.path / "crl.pem").write_bytes(pem(crl))
    data = front_config(config_dir, upstream, trusted=["127.0.0.1/32"])
    data["tls"]["crl"] = ["crl.pem"]
    running: Running = await start_sidecar(data)
    answer = await request(running, "/public/x", [("ssl-client-cert", escaped(certs.alice))])
    assert answer.status == 403, answer.body
    assert not upstream.seen
    answer = await request(running, "/x", [("ssl-client-cert", escaped(certs.bob))])
    assert answer.status == 200


async def test_an_alb_in_verify_mode_passes_the_leaf_in_its_own_header(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    """AWS ALB with mutual TLS in verify mode sends the leaf it verified as
    ``X-Amzn-Mtls-Clientcert-Leaf`` (URL-encoded PEM, "+=/" unescaped), not the chain header of
    passthrough mode: ``amzn-mtls`` reads either, verifies it again, and refuses both at once."""
    running = await start_sidecar(
        front_config(config_dir, upstream, trusted=["127.0.0.1/32"], fmt="amzn-mtls")
    )
    alice, bob = running.certs.alice, running.certs.bob
    leaf = quote(alice.pem.decode(), safe="+=/")
    answer = await request(running, "/admin/x", [("X-Amzn-Mtls-Clientcert-Leaf", leaf)])
    assert answer.status == 200, answer.body
    seen = upstream.last
    assert decode_userinfo(seen.header("X-USERINFO")[0])["sub"] == ALICE_SUB
    assert not seen.header("X-Amzn-Mtls-Clientcert-Leaf")
    forwarded = len(upstream.seen)

    both = [("X-Amzn-Mtls-Clientcert", leaf), ("X-Amzn-Mtls-Clientcert-Leaf", leaf)]
    answer = await request(running, "/admin/x", both)
    assert answer.status == 400 and b"both" in answer.body, answer.body
    two = quote(alice.pem.decode() + bob.pem.decode(), safe="+=/")
    answer = await request(running, "/admin/x", [("X-Amzn-Mtls-Clientcert-Leaf", two)])
    assert answer.status == 400 and b"not one" in answer.body, answer.body
    # a leaf that does not chain to tls.client_ca is refused
    other = make_ca("Not The Client CA")
    outsider = quote(make_leaf(other, "Eve Outsider").pem.decode(), safe="+=/")
    answer = await request(running, "/admin/x", [("X-Amzn-Mtls-Clientcert-Leaf", outsider)])
    assert answer.status == 403, answer.body
    assert len(upstream.seen) == forwarded


async def test_without_tls_no_server_certificate_is_needed(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    """``listen.tls: false`` serves no certificate, so none is asked for: behind a load balancer
    that terminates TLS the operator has no certificate to give. With ``listen.tls: true``
    both stay required, each named."""
    data = front_config(config_dir, upstream, trusted=["127.0.0.1/32"])
    del data["tls"]["certificate"], data["tls"]["key"]
    running = await start_sidecar(data)
    alice = running.certs.alice
    answer = await request(running, "/admin/x", [("ssl-client-cert", escaped(alice))])
    assert answer.status == 200, answer.body
    assert decode_userinfo(upstream.last.header("X-USERINFO")[0])["sub"] == ALICE_SUB

    data["listen"]["tls"] = True
    with pytest.raises(ConfigError) as info:
        parse(data, base_dir=config_dir.path, env={})
    assert any(p.startswith("tls.certificate: required") for p in info.value.problems), info
    data["tls"]["certificate"] = str(config_dir.path / "server.pem")
    with pytest.raises(ConfigError) as info:
        parse(data, base_dir=config_dir.path, env={})
    assert any(p.startswith("tls.key: required") for p in info.value.problems), info
