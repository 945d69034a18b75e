"""``tls_groups``: the listener's contexts offer X25519, P-256 and P-384 only (in memory; the
socket tests are in test_tls_security)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from sidecar import tls
from sidecar.config import TLSConfig
from sidecar.tls_groups import restrict_groups

from .conftest import Certs
from .pki import make_ca, make_leaf


def server_hello(server: ssl.SSLContext, group: str, *, tls12: bool = False) -> bool:
    """Whether ``server`` answers a ClientHello that offers ``group`` alone (a TLS 1.2 client
    would also refuse an ECDSA certificate on another curve, so the server's first answer,
    not the whole handshake, is what is looked at)."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    if tls12:
        client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ecdh_curve(group)  # OpenSSL 3: exactly this one group
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client_obj = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    server_obj = server.wrap_bio(s_in, s_out, server_side=True)
    with pytest.raises(ssl.SSLWantReadError):
        client_obj.do_handshake()
    s_in.write(c_out.read())
    try:
        server_obj.do_handshake()
    except ssl.SSLWantReadError:
        return True  # the server sent its flight and waits for the client's
    except ssl.SSLError:
        return False
    return True


@pytest.fixture
def config(tmp_path: Path, certs: Certs) -> TLSConfig:
    certs.pki.server.write(tmp_path, "server")
    (tmp_path / "ca.pem").write_bytes(certs.pki.client_root.pem)
    return TLSConfig(
        certificate=tmp_path / "server.pem",
        key=tmp_path / "server.key",
        client_ca=(tmp_path / "ca.pem",),
    )


@pytest.mark.parametrize("tls12", [False, True])
def test_a_server_context_offers_the_intermediate_groups_only(
    config: TLSConfig, tls12: bool, tmp_path: Path
) -> None:
    if tls12:
        # an RSA certificate: a TLS 1.2 client's groups also bound an ECDSA certificate's curve
        make_leaf(
            make_ca("RSA CA", key_kind="rsa"), "localhost", server=True, key_kind="rsa"
        ).write(tmp_path, "rsa")
        config = config.model_copy(
            update={"certificate": tmp_path / "rsa.pem", "key": tmp_path / "rsa.key"}
        )
    context, _ = tls.server_context(config)
    offered = {
        g: server_hello(context, g, tls12=tls12)
        for g in ("X25519", "prime256v1", "secp384r1", "secp521r1", "X448")
    }
    assert offered == {
        "X25519": True,
        "prime256v1": True,
        "secp384r1": True,
        "secp521r1": False,
        "X448": False,
    }


def test_openssl_s_default_list_offers_more(config: TLSConfig) -> None:
    """What restrict_groups takes away (so that the test above is not vacuous)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert config.certificate is not None and config.key is not None
    context.load_cert_chain(config.certificate, config.key)
    assert server_hello(context, "secp521r1") and server_hello(context, "X448")


def test_any_context_can_be_restricted() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert restrict_groups(context) is None
    client = ssl.create_default_context()
    assert restrict_groups(client) is None


def test_where_it_cannot_be_done_the_listener_starts_and_says_why_once(
    config: TLSConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tls, "restrict_groups", lambda ctx: "not CPython here")
    monkeypatch.setattr(tls, "_groups_reported", False)
    with capture_logs() as logs:
        tls.server_context(config)
        context, _ = tls.server_context(config)
    warnings = [e for e in logs if e["event"] == "tls_groups_not_restricted"]
    assert warnings == [
        {
            "event": "tls_groups_not_restricted",
            "log_level": "warning",
            "groups": "X25519:P-256:P-384",
            "reason": "not CPython here",
        }
    ]
    assert server_hello(context, "secp521r1")  # OpenSSL's default list, then
