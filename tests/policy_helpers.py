"""Helpers for the route-policy tests (issue #16): client certificates that carry every kind
of field a matcher reads, and one request over real TLS with its answer and what the
upstream received.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .conftest import Running, Seen, Upstream
from .pki import Issued, new_key
from .test_listener import Conn, Response, req


def leaf(
    issuer: Issued,
    cn: str | None = "client",
    *,
    dns: Sequence[str] = (),
    uris: Sequence[str] = (),
    emails: Sequence[str] = (),
    ips: Sequence[str] = (),
    ou: Sequence[str] = (),
    o: Sequence[str] = (),
    raw_sans: Sequence[x509.GeneralName] = (),
) -> Issued:
    """A client certificate (clientAuth) signed by ``issuer``, with the SANs in the order
    given (DNS, URI, email, IP, then ``raw_sans``) and the subject attributes given."""
    key = new_key()
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn is not None else []
    attributes += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, v) for v in ou]
    attributes += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, v) for v in o]
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    names += [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.RFC822Name(e) for e in emails]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    names += list(raw_sans)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=not attributes)
    return Issued(builder.sign(issuer.key, hashes.SHA256()), key)


def sha256_of(who: Issued) -> str:
    return hashlib.sha256(who.der).hexdigest()


def spki_of(who: Issued) -> str:
    der = who.cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


@dataclass
class Answer:
    response: Response
    #: what the upstream received for this request, None when nothing reached it
    seen: Seen | None

    @property
    def status(self) -> int:
        return self.response.status

    @property
    def reason(self) -> str:
        """The problem+json detail of one of the sidecar's own answers."""
        doc = self.response.json()
        return str(doc.get("detail", ""))


def client_context(
    running: Running, who: Issued | None, chain: Sequence[Issued] = ()
) -> ssl.SSLContext:
    return running.client_ssl(who, chain=list(chain) or None)


async def ask(
    running: Running,
    upstream: Upstream,
    path: str,
    *,
    who: Issued | None = None,
    method: str = "GET",
    headers: Sequence[str] = (),
    host: str = "localhost",
    server_name: str | None = "localhost",
    address: str = "127.0.0.1",
    context: ssl.SSLContext | None = None,
    body: bytes = b"",
) -> Answer:
    """One request on a new TLS connection from ``address`` (any 127.0.0.0/8 address, to the
    listener on 127.0.0.1; or ::1)."""
    before = len(upstream.seen)
    ctx = context or client_context(running, who)
    if server_name is None or server_name != "localhost":
        ctx.check_hostname = False  # the server name is the test's choice, not a check
    reader, writer = await asyncio.open_connection(
        "::1" if ":" in address else "127.0.0.1",
        running.sidecar.port,
        ssl=ctx,
        server_hostname=server_name or "",
        local_addr=(address, 0),
    )
    conn = Conn(reader, writer)
    try:
        conn.send(req(method, path, *headers, host=host, body=body))
        response = await conn.response(method)
    finally:
        await conn.close()
    seen = upstream.seen[before] if len(upstream.seen) > before else None
    return Answer(response, seen)


def write_pem(folder: Path, name: str, *certs: Issued) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.pem"
    path.write_bytes(b"".join(c.pem for c in certs))
    return str(path)
