"""ClientCert: what is read from a certificate once, per connection."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from sidecar.certs import ClientCert, normalize_fingerprint, parse_serial

from .pki import PKI, make_leaf


@pytest.fixture(scope="module")
def pki() -> PKI:
    return PKI.create()


def test_fields_from_der(pki: PKI) -> None:
    issued = pki.client("Alice Liddell", email="alice@example.com", san_dns=["alice.example"])
    cert = ClientCert.from_der(issued.der)
    assert cert.sha256 == hashlib.sha256(issued.der).hexdigest()
    assert cert.b64 == base64.b64encode(issued.der).decode()
    assert cert.serial == issued.cert.serial_number
    assert cert.serial_hex == f"{issued.cert.serial_number:X}"
    assert cert.common_name == "Alice Liddell" and cert.subject == "CN=Alice Liddell"
    assert cert.emails == ("alice@example.com",) and cert.dns_names == ("alice.example",)
    assert cert.valid_at() and not cert.valid_at(cert.not_after_ts + 1)


@pytest.mark.parametrize(
    ("eku", "allowed"),
    [
        (None, True),
        ([ExtendedKeyUsageOID.CLIENT_AUTH], True),
        ([ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE], True),
        ([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], True),
        ([ExtendedKeyUsageOID.SERVER_AUTH], False),
        ([ExtendedKeyUsageOID.EMAIL_PROTECTION], False),
    ],
)
def test_client_auth_usage(pki: PKI, eku: object, allowed: bool) -> None:
    issued = pki.client("x", eku=eku)
    assert ClientCert.from_der(issued.der).allows_client_auth() is allowed


def test_no_common_name_is_none(pki: PKI) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    issued = make_leaf(pki.client_intermediate, "placeholder")
    # a certificate whose subject has only an O: nothing to index blindly
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Org")]))
        .issuer_name(issued.cert.issuer)
        .public_key(issued.key.public_key())
        .serial_number(7)
        .not_valid_before(issued.cert.not_valid_before_utc)
        .not_valid_after(issued.cert.not_valid_after_utc)
    )
    from cryptography.hazmat.primitives import hashes

    cert = builder.sign(pki.client_intermediate.key, hashes.SHA256())
    parsed = ClientCert.from_der(cert.public_bytes(serialization.Encoding.DER))
    assert parsed.common_name is None and parsed.subject == "O=Org"


def test_garbage_is_a_certificate_error() -> None:
    from sidecar.errors import CertificateError

    with pytest.raises(CertificateError):
        ClientCert.from_der(b"\x30\x03garbage")


@pytest.mark.parametrize(
    ("text", "value"), [("255", 255), ("0xFF", 255), ("0xff", 255), ("00:FF", 255), (" 12 ", 12)]
)
def test_parse_serial(text: str, value: int) -> None:
    assert parse_serial(text) == value


def test_fingerprints() -> None:
    fp = "AB:" * 31 + "AB"
    assert normalize_fingerprint(fp) == "ab" * 32
    assert normalize_fingerprint("sha256:" + "Ab" * 32) == "ab" * 32
    with pytest.raises(ValueError, match="64 hex"):
        normalize_fingerprint("abcd")
