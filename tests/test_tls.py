"""Client certificate verification at the listener: what never reaches the upstream."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import warnings
from typing import Any

import aiohttp
import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from .conftest import ConfigDir, SidecarFactory, Upstream
from .pki import PKI, Issued, make_ca, make_leaf


async def fetch(url: str, ctx: ssl.SSLContext) -> int:
    async with aiohttp.ClientSession() as session, session.get(url, ssl=ctx) as resp:
        await resp.read()
        return resp.status


def bind(data: dict[str, Any], issued: Issued, username: str = "carol") -> None:
    data["identity"]["static"]["users"].append(
        {
            "sub": f"sub-{username}",
            "username": username,
            "certificates": [{"sha256": hashlib.sha256(issued.der).hexdigest()}],
        }
    )


async def refused(url: str, ctx: ssl.SSLContext) -> bool:
    """True when the server refuses the handshake (TLS 1.3 reports it on first read)."""
    try:
        await fetch(url, ctx)
    except (aiohttp.ClientError, ssl.SSLError, ConnectionError):
        return True
    return False


@pytest.mark.parametrize(
    ("label", "kwargs"),
    [
        ("server-auth only EKU", {"eku": [ExtendedKeyUsageOID.SERVER_AUTH]}),
        ("email-protection EKU", {"eku": [ExtendedKeyUsageOID.EMAIL_PROTECTION]}),
        ("expired", {"days_valid": (-30, -1)}),
        ("not yet valid", {"days_valid": (2, 30)}),
    ],
)
async def test_bad_certificates_never_reach_upstream(
    label: str,
    kwargs: dict[str, Any],
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
) -> None:
    bad = config_dir.certs.pki.client(f"bad {label}", **kwargs)
    data = config_dir.base(upstream.port)
    bind(data, bad)  # even when bound to a user
    running = await start_sidecar(data)
    assert await refused(running.url + "/app/", running.client_ssl(bad)), label
    assert upstream.seen == []


async def test_certificate_without_eku_extension_is_accepted(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    plain = config_dir.certs.pki.client("no eku", eku=None)
    data = config_dir.base(upstream.port)
    bind(data, plain)
    running = await start_sidecar(data)
    assert await fetch(running.url + "/app/", running.client_ssl(plain)) == 200


async def test_unknown_ca_is_refused(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    other = PKI.create()
    outsider = other.client("outsider")
    data = config_dir.base(upstream.port)
    bind(data, outsider)
    running = await start_sidecar(data)
    assert await refused(running.url + "/app/", running.client_ssl(outsider))
    assert upstream.seen == []


async def test_pinned_self_signed_certificate(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    pinned = make_leaf(None, "device-42")
    unpinned = make_leaf(None, "device-43")
    pinned.write(config_dir.path, "device-42")
    data = config_dir.base(upstream.port)
    data["tls"]["client_ca"] = []
    data["tls"]["pinned_certificates"] = ["device-42.pem"]
    bind(data, pinned, "device42")
    bind(data, unpinned, "device43")
    running = await start_sidecar(data)
    assert await fetch(running.url + "/app/", running.client_ssl(pinned)) == 200
    assert upstream.last.header("X-USERINFO")
    assert await refused(running.url + "/app/", running.client_ssl(unpinned))
    assert len(upstream.seen) == 1


async def test_required_mode_refuses_handshake_without_certificate(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    data = config_dir.base(upstream.port)
    data["tls"]["client_certificate"] = "required"
    running = await start_sidecar(data)
    assert await refused(running.url + "/public/x", running.client_ssl(None))
    assert await fetch(running.url + "/public/x", running.client_ssl(running.certs.alice)) == 200
    assert len(upstream.seen) == 1


async def test_chain_sent_by_client_with_root_only_trusted(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    pki = config_dir.certs.pki
    (config_dir.path / "root-only.pem").write_bytes(pki.client_root.pem)
    data = config_dir.base(upstream.port)
    data["tls"]["client_ca"] = ["root-only.pem"]
    running = await start_sidecar(data)
    alice = config_dir.certs.alice
    assert await refused(running.url + "/app/", running.client_ssl(alice))  # intermediate unknown
    ctx = running.client_ssl(alice, chain=[pki.client_intermediate])
    assert await fetch(running.url + "/app/", ctx) == 200


async def test_rsa_server_key_and_tls_versions(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    rsa_ca = make_ca("RSA server CA", key_kind="rsa")
    rsa_server = make_leaf(rsa_ca, "localhost", server=True, key_kind="rsa")
    rsa_server.write(config_dir.path, "rsa-server")
    data = config_dir.base(upstream.port)
    data["tls"]["certificate"] = "rsa-server.pem"
    data["tls"]["key"] = "rsa-server.key"
    running = await start_sidecar(data)
    ctx = ssl.create_default_context(cadata=rsa_ca.pem.decode())
    assert await fetch(running.url + "/public/", ctx) == 200
    _, writer = await asyncio.open_connection(
        "127.0.0.1", running.sidecar.port, ssl=ctx, server_hostname="localhost"
    )
    tls = writer.get_extra_info("ssl_object")
    assert tls.version() == "TLSv1.3"
    assert tls.selected_alpn_protocol() in (None, "http/1.1")
    writer.close()
    # TLS 1.2 still works with a modern suite; TLS 1.1 does not
    ctx12 = ssl.create_default_context(cadata=rsa_ca.pem.decode())
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    assert await fetch(running.url + "/public/", ctx12) == 200
    ctx11 = ssl.create_default_context(cadata=rsa_ca.pem.decode())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # offering TLS 1.1 is the point here
        ctx11.minimum_version = ssl.TLSVersion.TLSv1
        ctx11.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        ctx11.set_ciphers("DEFAULT:@SECLEVEL=0")
    except ssl.SSLError:
        pytest.skip("this OpenSSL cannot offer TLS 1.1 at all")
    assert await refused(running.url + "/public/", ctx11)
