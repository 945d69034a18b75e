"""Who issued a client certificate: the check that keeps Identity Plus to its own certificates.

Identity Plus identifies a certificate by its serial number alone, and serials are unique
only per issuer. ``Issuers`` says whether a certificate was signed by one of the configured
Identity Plus CA certificates (``identity.identityplus.issuers``); ``issuer_risk`` says, for
check-config and start-up, when the listener trusts more than one issuer and nothing
restricts which certificates are asked about (it reads the trust anchors' files).
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from ..certs import ClientCert, read_certificates
from ..config import IdentityConfig, TLSConfig

#: certificates whose answer is remembered (the verdict cache remembers most of them anyway)
_REMEMBERED = 4096


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """``issuer``'s name is ``cert``'s issuer and its key made ``cert``'s signature."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


class Issuers:
    """The CA certificates a client certificate must be signed by (directly).

    Python (before 3.13) cannot show the chain OpenSSL verified, so the certificate that
    signed the client's own must be listed itself: a root vouches only for what it signs
    directly, and the intermediates that sign client certificates are listed beside it.
    Fails closed: anything that does not verify (another key under the same name, an
    unsupported algorithm) is not issued by them. Answers are remembered per certificate.
    """

    def __init__(self, certificates: Sequence[x509.Certificate]) -> None:
        self._by_name: dict[x509.Name, list[x509.Certificate]] = {}
        for certificate in certificates:
            self._by_name.setdefault(certificate.subject, []).append(certificate)
        self._answers: dict[str, bool] = {}

    def issued(self, cert: ClientCert) -> bool:
        answer = self._answers.get(cert.sha256)
        if answer is None:
            answer = self._check(cert)
            if len(self._answers) >= _REMEMBERED:
                self._answers.clear()
            self._answers[cert.sha256] = answer
        return answer

    def _check(self, cert: ClientCert) -> bool:
        try:
            parsed = x509.load_der_x509_certificate(cert.der)
        except ValueError:
            return False
        candidates = self._by_name.get(parsed.issuer, ())
        return any(signed_by(parsed, issuer) for issuer in candidates)


def trusted_issuers(anchors: Sequence[x509.Certificate]) -> list[x509.Name]:
    """The separate hierarchies among trust anchors, one name each (the topmost subject).

    A root and the intermediates it signed are one issuer; so is a pinned certificate that a
    trusted CA signed. Anything else (another root, a self-signed pinned certificate) is one
    more.
    """
    unique: dict[bytes, x509.Certificate] = {}
    for anchor in anchors:
        unique.setdefault(anchor.public_bytes(serialization.Encoding.DER), anchor)
    certs = list(unique.values())
    parent = list(range(len(certs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    has_issuer = [False] * len(certs)
    for i, cert in enumerate(certs):
        for j, other in enumerate(certs):
            if i != j and other.subject == cert.issuer and signed_by(cert, other):
                has_issuer[i] = True
                parent[find(i)] = find(j)
    tops: dict[int, x509.Name] = {}
    for i, cert in enumerate(certs):
        root = find(i)
        if root not in tops or not has_issuer[i]:
            tops[root] = cert.subject
    return list(tops.values())


def issuer_risk(tls: TLSConfig, identity: IdentityConfig) -> str | None:
    """What to warn about when Identity Plus may be asked about other issuers' certificates:
    the identityplus backend, no ``issuers``, and more than one issuer trusted. None if safe."""
    settings = identity.identityplus
    if identity.backend != "identityplus" or settings is None or settings.issuers:
        return None
    anchors: list[x509.Certificate] = []
    for path in (*tls.client_ca, *tls.pinned_certificates):
        anchors.extend(read_certificates(path))
    names = trusted_issuers(anchors)
    if len(names) <= 1:
        return None
    listed = "; ".join(name.rfc4514_string() for name in names)
    return (
        f"identity.identityplus.issuers is not set and the listener trusts {len(names)} "
        f"certificate issuers (tls.client_ca, tls.pinned_certificates: {listed}). Identity "
        "Plus identifies a certificate by its serial number alone: whoever holds a "
        "certificate from another of these issuers with the serial number of an Identity Plus "
        "user's certificate is identified as that user, with that user's roles. Set "
        "identity.identityplus.issuers to the Identity Plus client CA certificates."
    )
