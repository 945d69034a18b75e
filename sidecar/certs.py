"""Certificates as values: the client certificate of a connection, fingerprints, file loading.

Pure functions over bytes and files; no event loop, no network. Everything the request path
needs to know about a peer certificate is computed once here, when the connection's
certificate is first seen, and then read as plain attributes.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import CertificateError

_HEX_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")
_CLIENT_AUTH_USAGES = frozenset(
    {
        ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string,
        ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE.dotted_string,
    }
)

PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


def sha256_fingerprint(der: bytes) -> str:
    """The SHA-256 of a certificate's DER, lowercase hex without separators."""
    return hashlib.sha256(der).hexdigest()


def spki_sha256(cert: x509.Certificate) -> str:
    """The SHA-256 of a certificate's public key (SubjectPublicKeyInfo, DER), lower-case hex."""
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def normalize_fingerprint(text: str) -> str:
    """Accept ``AB:CD:..``, ``abcd..``, with or without colons/spaces; return lowercase hex.

    Raises ``ValueError`` naming the problem when the text is not a SHA-256 fingerprint.
    """
    cleaned = text.strip().lower()
    if cleaned.startswith("sha256:"):
        cleaned = cleaned[len("sha256:") :]
    cleaned = re.sub(r"[\s:]", "", cleaned)
    if not _HEX_FINGERPRINT.match(cleaned):
        raise ValueError(
            "not a SHA-256 fingerprint (expected 64 hex digits, colons optional), "
            f"got {len(cleaned)} characters"
        )
    return cleaned


def parse_serial(text: str) -> int:
    """A serial number as operators write it: decimal, or ``0x`` + hex, or colon-separated hex."""
    t = text.strip()
    try:
        if t.lower().startswith("0x"):
            return int(t[2:], 16)
        if ":" in t:
            return int(t.replace(":", ""), 16)
        return int(t, 10)
    except ValueError:
        raise ValueError(f"not a certificate serial number: {text!r}") from None


@dataclass(frozen=True, slots=True)
class ClientCert:
    """A parsed client certificate. Built once per TLS connection (see ``from_der``)."""

    der: bytes
    sha256: str
    serial: int
    subject: str
    common_name: str | None
    issuer: str
    not_before: datetime
    not_after: datetime
    #: None when the certificate has no EKU extension (RFC 5280: any use allowed).
    extended_key_usage: tuple[str, ...] | None
    dns_names: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()
    #: base64 of the DER, the exact value of the X-APP-CERTIFICATE header.
    b64: str = field(default="", repr=False)
    #: validity as POSIX timestamps, for a cheap per-request check
    not_before_ts: float = 0.0
    not_after_ts: float = 0.0
    #: decided once at parse time (see ``allows_client_auth``): checked on every request
    client_auth: bool = True
    #: the serial in uppercase hex without prefix, as logs and ``openssl x509 -serial`` show
    #: it; made once (``__post_init__``): the access log writes it for every request, and one
    #: string object per certificate lets the log's writer skip escaping it again
    serial_hex: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.serial_hex:
            object.__setattr__(self, "serial_hex", f"{self.serial:X}")

    @classmethod
    def from_der(cls, der: bytes) -> ClientCert:
        """Parse DER bytes; raises ``CertificateError`` when they are not a certificate."""
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError as exc:
            raise CertificateError(f"not a DER certificate: {exc}") from None
        return cls.from_x509(cert)

    @classmethod
    def from_x509(cls, cert: x509.Certificate) -> ClientCert:
        der = cert.public_bytes(serialization.Encoding.DER)
        try:
            eku_ext = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
            eku: tuple[str, ...] | None = tuple(o.dotted_string for o in eku_ext.value)
        except x509.ExtensionNotFound:
            eku = None
        except ValueError as exc:  # a malformed extension
            raise CertificateError(f"unreadable extension: {exc}") from None
        dns: tuple[str, ...] = ()
        emails: tuple[str, ...] = ()
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns = tuple(san.get_values_for_type(x509.DNSName))
            emails = tuple(san.get_values_for_type(x509.RFC822Name))
        except x509.ExtensionNotFound:
            pass
        except ValueError as exc:
            raise CertificateError(f"unreadable subjectAltName: {exc}") from None
        return cls(
            der=der,
            sha256=sha256_fingerprint(der),
            serial=cert.serial_number,
            subject=_name_text(cert.subject),
            common_name=_first_attribute(cert.subject, NameOID.COMMON_NAME),
            issuer=_name_text(cert.issuer),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            extended_key_usage=eku,
            dns_names=dns,
            emails=emails,
            b64=base64.b64encode(der).decode("ascii"),
            not_before_ts=cert.not_valid_before_utc.timestamp(),
            not_after_ts=cert.not_valid_after_utc.timestamp(),
            client_auth=eku is None or not _CLIENT_AUTH_USAGES.isdisjoint(eku),
        )

    @classmethod
    def known_by_serial(cls, serial: int) -> ClientCert:
        """A certificate the sidecar never saw, known by its serial only: the one a person
        presented to Identity Plus sign-on in the HTTP-legacy flow (``identity.legacy``).
        ``der`` is empty (nothing to send upstream or to match); ``sha256`` is a digest of the
        serial under a label no certificate's DER can have, so that it keys the verdict cache
        apart from every real certificate; validity is the identity service's to judge."""
        return cls(
            der=b"",
            sha256=hashlib.sha256(b"identityplus-serial\x00%d" % serial).hexdigest(),
            serial=serial,
            subject="",
            common_name=None,
            issuer="",
            not_before=datetime.fromtimestamp(0, UTC),
            not_after=datetime.max.replace(tzinfo=UTC),
            extended_key_usage=None,
            not_before_ts=0.0,
            not_after_ts=float("inf"),
        )

    @property
    def seen(self) -> bool:
        """False for a certificate ``known_by_serial`` only."""
        return bool(self.der)

    def allows_client_auth(self) -> bool:
        """RFC 5280 §4.2.1.12: with an EKU extension, clientAuth (or anyExtendedKeyUsage) is needed."""
        return self.client_auth

    def valid_at(self, when: float | None = None) -> bool:
        """Within its validity period at POSIX time ``when`` (now by default)."""
        now = time.time() if when is None else when
        return self.not_before_ts <= now <= self.not_after_ts


def _name_text(name: x509.Name) -> str:
    try:
        return name.rfc4514_string()
    except ValueError:
        return "<unreadable name>"


def _first_attribute(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    # An attribute may be missing (no CN) or repeated; never index blindly.
    for attr in name.get_attributes_for_oid(oid):
        value = attr.value
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if value:
            return value
    return None


# ---- files ---------------------------------------------------------------------------------


def read_certificates(path: Path) -> list[x509.Certificate]:
    """Every certificate in a PEM file (one or several) or a DER file.

    Raises ``CertificateError`` with a plain reason: missing, unreadable, or holding none.
    """
    data = _read(path)
    if b"-----BEGIN" in data:
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise CertificateError(f"unreadable PEM certificate in {path}: {exc}") from None
        return certs
    try:
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise CertificateError(f"not a PEM or DER certificate: {path}") from None


def read_private_key(path: Path, password: bytes | None = None) -> PrivateKey:
    data = _read(path)
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=password)
        else:
            key = serialization.load_der_private_key(data, password=password)
    except TypeError:
        raise CertificateError(
            f"private key is encrypted and no password was given: {path}"
        ) from None
    except ValueError:
        raise CertificateError(f"not a readable private key: {path}") from None
    if not isinstance(
        key,
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        raise CertificateError(f"unsupported private key type {type(key).__name__}: {path}")
    return key


def key_matches_certificate(key: PrivateKey, cert: x509.Certificate) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return key.public_key().public_bytes(enc, fmt) == cert.public_key().public_bytes(enc, fmt)


def to_pem(certs: list[x509.Certificate]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in certs)


FileSignature = tuple[tuple[int, ...] | None, ...]


def file_signature(files: Sequence[Path]) -> FileSignature:
    """What changes when one of ``files`` is rewritten, replaced or its symlink swapped
    (stat follows links, so Kubernetes' ``..data`` swaps are seen); None for a missing file."""
    out: list[tuple[int, ...] | None] = []
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
            continue
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise CertificateError(f"is a folder, not a file: {path}") from None
    except OSError as exc:
        raise CertificateError(f"cannot read {path}: {exc.strerror}") from None
