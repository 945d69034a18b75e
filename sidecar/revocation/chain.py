"""Who issued a client certificate, found among the trust anchors, and what revocation needs
to know about it: ``Anchors.facts``.

Python 3.11 cannot show the chain OpenSSL verified (``SSLObject.get_verified_chain`` is 3.13),
so the chain is rebuilt here from the configured anchors: the certificate's issuer is the
anchor whose name is the certificate's issuer name and whose key made its signature, and so on
up to a self-signed root. ``tls.client_ca`` may hold roots and intermediates; an intermediate
the client sent itself, and that is not listed there, is not known here (``Facts.complete``
is False then): list the intermediates that issue client certificates in ``tls.client_ca``.

Pure and cheap to call twice: the facts of a certificate are computed once (signature checks
are the expensive part) and remembered, bounded, until the anchors change.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import AuthorityInformationAccessOID

from ..certs import ClientCert
from ..identity.issuers import signed_by
from .crl import ca_key, name_text

#: certificates whose facts are remembered; beyond that the memory is emptied and refilled
_REMEMBERED = 16384
#: a chain longer than this is not followed further (a loop among anchors, or a mistake)
_MAX_DEPTH = 8


@dataclass(frozen=True, slots=True)
class Link:
    """One certificate of the chain whose revocation is checked, and its issuer."""

    serial: int
    #: the certificate checked is a CA certificate (an intermediate), not the client's own
    is_ca: bool
    #: ``crl.ca_key`` of its issuer (an anchor), and the issuer's name
    issuer: str
    issuer_name: str
    #: the http URLs of its CRL distribution points
    crl_urls: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Facts:
    """What revocation needs to know about one client certificate."""

    #: a pinned or self-signed certificate: trusted as itself, so no CA can revoke it (only
    #: ``tls.deny`` can)
    self_trusted: bool
    #: the client certificate first, then each intermediate above it among the anchors (up
    #: to, not including, the self-signed root)
    links: tuple[Link, ...]
    #: the client certificate's issuer is among the anchors (else ``links`` is empty)
    complete: bool
    #: that issuer (for OCSP: its name and key identify the certificate to the responder)
    issuer: x509.Certificate | None
    #: the client certificate's own certificate object (for OCSP)
    certificate: x509.Certificate | None
    #: the OCSP responders its authorityInfoAccess names (http and https)
    ocsp_urls: tuple[str, ...]
    #: the issuer's name, RFC 4514, for messages when it is not among the anchors
    issuer_name: str


class Anchors:
    """The trust anchors (``tls.client_ca`` and ``tls.pinned_certificates``), indexed by name."""

    def __init__(
        self, client_ca: Iterable[x509.Certificate], pinned: Iterable[x509.Certificate] = ()
    ) -> None:
        self._by_subject: dict[x509.Name, list[x509.Certificate]] = {}
        seen: set[bytes] = set()
        for cert in (*client_ca, *pinned):
            der = cert.public_bytes(serialization.Encoding.DER)
            if der in seen:
                continue
            seen.add(der)
            self._by_subject.setdefault(cert.subject, []).append(cert)
        self._pinned = frozenset(cert.public_bytes(serialization.Encoding.DER) for cert in pinned)
        #: OpenSSL stops a chain at its first trusted certificate (VERIFY_X509_PARTIAL_CHAIN,
        #: set with pinned certificates: tls.server_context)
        self._partial = bool(self._pinned)
        self._facts: dict[str, Facts] = {}
        self._paths: dict[str, tuple[bytes, ...] | None] = {}

    def certificates(self) -> list[x509.Certificate]:
        return [cert for group in self._by_subject.values() for cert in group]

    def facts(self, cert: ClientCert) -> Facts:
        """The facts of ``cert``, computed on first use (see the module's docstring)."""
        known = self._facts.get(cert.sha256)
        if known is None:
            known = self._compute(cert)
            if len(self._facts) >= _REMEMBERED:
                self._facts.clear()
            self._facts[cert.sha256] = known
        return known

    def path_above(self, cert: ClientCert) -> tuple[bytes, ...] | None:
        """The DER of the anchors between ``cert`` and the top of its chain (that top left
        out), as OpenSSL's verified chain lists them after the leaf, computed on first use:
        for a connection that resumed a session another worker made (OpenSSL verified
        nothing on it and keeps no chain in a session). () for an anchor itself (pinned or
        self-signed), and wherever OpenSSL stops at the first trusted certificate (partial
        chains: on with ``tls.pinned_certificates``); None when it is not known for certain:
        the issuer is not among the anchors (an intermediate only the client sent), or two
        anchors could issue one certificate of the path (cross-signed, or renewed beside the
        old copy: OpenSSL's choice is not guessed here)."""
        if cert.sha256 in self._paths:
            return self._paths[cert.sha256]
        facts = self.facts(cert)
        path: tuple[bytes, ...] | None = None
        if facts.self_trusted:
            path = ()
        elif facts.certificate is not None:
            path = self._path(facts.certificate)
        if len(self._paths) >= _REMEMBERED:
            self._paths.clear()
        self._paths[cert.sha256] = path
        return path

    def _path(self, leaf: x509.Certificate) -> tuple[bytes, ...] | None:
        """``path_above`` for a certificate that is no anchor itself; None without an issuer
        among the anchors."""
        above: list[x509.Certificate] = []
        current = leaf
        for _ in range(_MAX_DEPTH):
            issuers = [c for c in self._by_subject.get(current.issuer, ()) if signed_by(current, c)]
            if len(issuers) > 1:
                return None
            if not issuers:
                break  # an anchor trusted as itself, at the top
            above.append(issuers[0])
            current = issuers[0]
            if self._partial or _self_signed(current):
                break
        if not above:
            return None
        return tuple(c.public_bytes(serialization.Encoding.DER) for c in above[:-1])

    def issuer_of(self, cert: x509.Certificate) -> x509.Certificate | None:
        """The anchor that signed ``cert``: its name is ``cert``'s issuer and its key verifies
        ``cert``'s signature (fails closed: anything that does not verify is no issuer)."""
        for candidate in self._by_subject.get(cert.issuer, ()):
            if signed_by(cert, candidate):
                return candidate
        return None

    def _compute(self, cert: ClientCert) -> Facts:
        try:
            leaf = x509.load_der_x509_certificate(cert.der)
        except ValueError:  # OpenSSL accepted it: not expected, and nothing can be checked
            return Facts(False, (), False, None, None, (), cert.issuer)
        ocsp = _ocsp_urls(leaf)
        if cert.der in self._pinned or _self_signed(leaf):
            return Facts(True, (), True, None, leaf, ocsp, cert.issuer)
        issuer = self.issuer_of(leaf)
        if issuer is None:
            return Facts(False, (), False, None, leaf, ocsp, cert.issuer)
        links = [_link(leaf, issuer, is_ca=False)]
        current = issuer
        for _ in range(_MAX_DEPTH):
            if _self_signed(current):
                break
            above = self.issuer_of(current)
            if above is None:
                break  # an anchor trusted as itself (tls.pinned_certificates allows that)
            links.append(_link(current, above, is_ca=True))
            current = above
        return Facts(False, tuple(links), True, issuer, leaf, ocsp, cert.issuer)


def _link(cert: x509.Certificate, issuer: x509.Certificate, *, is_ca: bool) -> Link:
    return Link(
        cert.serial_number, is_ca, ca_key(issuer), name_text(issuer.subject), crl_urls(cert)
    )


def _self_signed(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer and signed_by(cert, cert)


def crl_urls(cert: x509.Certificate) -> tuple[str, ...]:
    """The http URLs of a certificate's CRL distribution points (RFC 5280 §4.2.1.13). Points
    limited to some reasons, or naming another CRL issuer, are left out: their CRL alone
    would not say whether the certificate is revoked."""
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except (x509.ExtensionNotFound, ValueError):
        return ()
    urls: list[str] = []
    for point in points:
        if point.reasons or point.crl_issuer or not point.full_name:
            continue
        for name in point.full_name:
            if isinstance(name, x509.UniformResourceIdentifier) and name.value.lower().startswith(
                "http://"
            ):
                urls.append(name.value)
    return tuple(dict.fromkeys(urls))


def _ocsp_urls(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        access = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except (x509.ExtensionNotFound, ValueError):
        return ()
    urls = [
        d.access_location.value
        for d in access
        if d.access_method == AuthorityInformationAccessOID.OCSP
        and isinstance(d.access_location, x509.UniformResourceIdentifier)
        and d.access_location.value.lower().startswith(("http://", "https://"))
    ]
    return tuple(dict.fromkeys(urls))
