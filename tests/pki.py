"""Test PKI made with cryptography: CAs, intermediates, server and client certificates.

Every variant the sidecar must judge can be made here: expired, not yet valid, without the
clientAuth EKU, self-signed, RSA or ECDSA, from an unknown CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def new_key(kind: str = "ec") -> Key:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


@dataclass
class Issued:
    cert: x509.Certificate
    key: Key

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(
        self, folder: Path, name: str, *, chain: list[Issued] | None = None
    ) -> tuple[Path, Path]:
        """Write ``name.pem`` (with ``chain`` appended) and ``name.key``; return both paths."""
        folder.mkdir(parents=True, exist_ok=True)
        cert_path = folder / f"{name}.pem"
        key_path = folder / f"{name}.key"
        cert_path.write_bytes(self.pem + b"".join(c.pem for c in chain or []))
        key_path.write_bytes(self.key_pem)
        return cert_path, key_path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_ca(
    cn: str = "Test Root CA", *, issuer: Issued | None = None, key_kind: str = "ec"
) -> Issued:
    """A root CA, or an intermediate when ``issuer`` is given."""
    key = new_key(key_kind)
    signer_key = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.cert.subject if issuer else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(days=1))
        .not_valid_after(_now() + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    return Issued(builder.sign(signer_key, hashes.SHA256()), key)


def make_leaf(
    issuer: Issued | None,
    cn: str,
    *,
    server: bool = False,
    eku: list[x509.ObjectIdentifier] | str | None = "default",
    days_valid: tuple[int, int] = (-1, 30),
    key_kind: str = "ec",
    serial: int | None = None,
    san_dns: list[str] | None = None,
    email: str | None = None,
) -> Issued:
    """A leaf certificate. ``issuer=None`` makes it self-signed.

    ``eku="default"`` gives serverAuth for servers and clientAuth for clients; ``None`` omits
    the extension; a list sets exactly those usages.
    """
    key = new_key(key_kind)
    start, end = days_valid
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.cert.subject if issuer else _name(cn))
        .public_key(key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(_now() + dt.timedelta(days=start))
        .not_valid_after(_now() + dt.timedelta(days=end))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    if eku == "default":
        eku = [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
    if eku is not None:
        assert not isinstance(eku, str)
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in (san_dns or [])]
    if server and not san_dns:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    if email:
        names.append(x509.RFC822Name(email))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return Issued(builder.sign(issuer.key if issuer else key, hashes.SHA256()), key)


@dataclass
class PKI:
    """A complete PKI for one test: server side and a client CA with an intermediate."""

    server_ca: Issued
    server: Issued
    client_root: Issued
    client_intermediate: Issued

    @classmethod
    def create(cls, key_kind: str = "ec") -> PKI:
        server_ca = make_ca("Test Server CA", key_kind=key_kind)
        server = make_leaf(server_ca, "localhost", server=True, key_kind=key_kind)
        root = make_ca("Test Client Root")
        intermediate = make_ca("Test Client Intermediate", issuer=root)
        return cls(server_ca, server, root, intermediate)

    def client(self, cn: str, **kwargs: object) -> Issued:
        return make_leaf(self.client_intermediate, cn, **kwargs)  # type: ignore[arg-type]
