"""Certificate revocation lists as values: read, verified against the trust anchors, indexed.

Pure: files in, ``CRL`` values out, no event loop. ``read_sources`` reads a configured file
or folder (PEM, several CRLs to a file, or DER); ``verify`` checks one CRL against the trust
anchors and returns what the request path needs of it: the signing CA (``ca_key``), what it
covers, when it is due to be replaced, and its revoked serial numbers as a frozenset.

A CRL is refused, with the reason in plain words, when its signature does not verify against
a trusted CA, when that CA may not sign CRLs (keyUsage without cRLSign), when it has no
nextUpdate (nobody could tell it is stale), and when it is of a kind this module does not
apply correctly: a delta CRL, an indirect CRL, one limited to some revocation reasons, or one
with a critical extension it does not know. Using such a CRL as if it were complete would
let revoked certificates through.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)
#: CRL extensions whose meaning is understood here (any other critical one refuses the CRL)
_KNOWN = frozenset(
    {
        ExtensionOID.CRL_NUMBER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        ExtensionOID.ISSUING_DISTRIBUTION_POINT,
        ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
        ExtensionOID.ISSUER_ALTERNATIVE_NAME,
        ExtensionOID.FRESHEST_CRL,
    }
)


class CRLError(ValueError):
    """A CRL that cannot be used; the message names the source and the reason."""


def ca_key(certificate: x509.Certificate) -> str:
    """The identity of a CA as a signer: its name and its public key (a renewed CA certificate
    with the same key is the same signer; another key under the same name is not)."""
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(certificate.subject.public_bytes() + spki).hexdigest()


def name_text(name: x509.Name) -> str:
    try:
        return name.rfc4514_string()
    except ValueError:
        return "<unreadable name>"


@dataclass(frozen=True, slots=True)
class CRL:
    """One verified CRL: whose it is, what it covers, until when, and what it revokes."""

    #: ``ca_key`` of the CA whose signature verified it
    ca: str
    #: that CA's name (RFC 4514): logs, readiness and the nextUpdate gauge's label
    issuer: str
    this_update: float
    next_update: float
    #: the cRLNumber extension, when there is one
    number: int | None
    #: it covers end-entity certificates (issuingDistributionPoint onlyContainsCACerts unset)
    users: bool
    #: it covers CA certificates (onlyContainsUserCerts unset)
    cas: bool
    #: the distribution point names (URIs) of a partitioned CRL; None: the CA's whole scope
    partition: frozenset[str] | None
    revoked: frozenset[int]
    #: DER bytes
    size: int
    #: the file (or URL) it came from
    source: str

    def covers(self, ca: str, is_ca: bool, urls: Iterable[str]) -> bool:
        """It speaks for a certificate that ``ca`` signed: its kind (CA or end entity) and, for
        a partitioned CRL, a distribution point the certificate names."""
        if self.ca != ca or not (self.cas if is_ca else self.users):
            return False
        return self.partition is None or not self.partition.isdisjoint(urls)

    @property
    def group(self) -> tuple[str, bool, bool, frozenset[str] | None]:
        """CRLs that speak for the same certificates: a newer one replaces an older one."""
        return (self.ca, self.users, self.cas, self.partition)


# ---- reading ------------------------------------------------------------------------------


def read_sources(path: Path) -> list[tuple[str, bytes]]:
    """The CRLs (DER) in a file, or in every visible file of a folder, with their file names.

    A PEM file may hold several CRLs. In a folder, names starting with a dot are skipped (a
    Kubernetes volume's ``..data`` and its timestamped folders). Raises ``CRLError`` for a
    missing or unreadable path and for a file that holds no CRL.
    """
    if path.is_dir():
        try:
            files = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        except OSError as exc:
            raise CRLError(f"cannot list {path}: {exc.strerror}") from None
        out: list[tuple[str, bytes]] = []
        for file in files:
            if file.is_file():
                out.extend(_read_file(file))
        return out
    return _read_file(path)


def _read_file(path: Path) -> list[tuple[str, bytes]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CRLError(f"file not found: {path}") from None
    except OSError as exc:
        raise CRLError(f"cannot read {path}: {exc.strerror}") from None
    if b"-----BEGIN" in data:
        blocks = _PEM_CRL.findall(data)
        if not blocks:
            raise CRLError(f"{path}: holds no PEM CRL (-----BEGIN X509 CRL-----)")
        out = []
        for block in blocks:
            try:
                crl = x509.load_pem_x509_crl(block)
            except ValueError:
                raise CRLError(f"{path}: unreadable PEM CRL") from None
            out.append((str(path), crl.public_bytes(serialization.Encoding.DER)))
        return out
    return [(str(path), data)]


# ---- verifying ----------------------------------------------------------------------------


def signers(anchors: Iterable[x509.Certificate]) -> list[x509.Certificate]:
    """The trust anchors that may sign CRLs: CA certificates (basicConstraints CA, or an old
    v1 certificate without extensions) whose keyUsage, if any, allows cRLSign."""
    out = []
    for anchor in anchors:
        try:
            is_ca = anchor.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = anchor.version == x509.Version.v1
        except ValueError:
            is_ca = False
        if is_ca:
            out.append(anchor)
    return out


def verify(der: bytes, anchors: Sequence[x509.Certificate], source: str) -> CRL:
    """Parse ``der`` and verify it against ``anchors`` (see ``signers``); raises ``CRLError``
    naming ``source`` and the reason. Fails closed: a CRL this module cannot apply exactly
    is refused rather than applied in part."""
    try:
        crl = x509.load_der_x509_crl(der)
    except (ValueError, x509.InvalidVersion):
        raise CRLError(f"{source}: not a PEM or DER CRL") from None
    try:
        return _verified(crl, der, anchors, source)
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion) as exc:
        if isinstance(exc, CRLError):
            raise
        # the parser reads parts lazily: a malformed part shows only when it is read
        raise CRLError(f"{source}: unreadable CRL: {exc}") from None


def _verified(
    crl: x509.CertificateRevocationList,
    der: bytes,
    anchors: Sequence[x509.Certificate],
    source: str,
) -> CRL:
    issuer = name_text(crl.issuer)
    named = [a for a in signers(anchors) if a.subject == crl.issuer]
    if not named:
        raise CRLError(f"{source}: issued by {issuer}, which is not a trusted CA (tls.client_ca)")
    signer = next((a for a in named if _signed(crl, a)), None)
    if signer is None:
        raise CRLError(
            f"{source}: its signature does not verify against the trusted CA {issuer} "
            "(tls.client_ca)"
        )
    try:
        usage = signer.extensions.get_extension_for_class(x509.KeyUsage).value
    except (x509.ExtensionNotFound, ValueError):
        usage = None
    if usage is not None and not usage.crl_sign:
        raise CRLError(f"{source}: the CA {issuer} may not sign CRLs (keyUsage lacks cRLSign)")
    next_update = crl.next_update_utc
    if next_update is None:
        raise CRLError(f"{source}: has no nextUpdate, so nobody could tell when it is stale")
    number: int | None = None
    users = cas = True
    partition: frozenset[str] | None = None
    try:
        extensions = list(crl.extensions)
    except ValueError as exc:
        raise CRLError(f"{source}: unreadable extension: {exc}") from None
    for ext in extensions:
        value = ext.value
        if isinstance(value, x509.DeltaCRLIndicator):
            raise CRLError(f"{source}: a delta CRL; only complete CRLs are supported")
        if isinstance(value, x509.CRLNumber):
            number = value.crl_number
        elif isinstance(value, x509.IssuingDistributionPoint):
            if value.indirect_crl:
                raise CRLError(f"{source}: an indirect CRL; these are not supported")
            if value.only_some_reasons:
                raise CRLError(
                    f"{source}: covers some revocation reasons only (onlySomeReasons); "
                    "only complete CRLs are supported"
                )
            if value.only_contains_attribute_certs:
                raise CRLError(f"{source}: covers attribute certificates only")
            users = not value.only_contains_ca_certs
            cas = not value.only_contains_user_certs
            if value.full_name:
                partition = frozenset(
                    n.value
                    for n in value.full_name
                    if isinstance(n, x509.UniformResourceIdentifier)
                )
            elif value.relative_name is not None:
                raise CRLError(
                    f"{source}: names its distribution point relative to the issuer; "
                    "only full names are supported"
                )
        elif ext.critical and ext.oid not in _KNOWN:
            raise CRLError(
                f"{source}: has a critical extension {ext.oid.dotted_string} not known here"
            )
    revoked = set()
    try:
        for entry in crl:
            for entry_ext in entry.extensions:
                if isinstance(entry_ext.value, x509.CertificateIssuer):
                    raise CRLError(f"{source}: an indirect CRL; these are not supported")
                if entry_ext.critical and not isinstance(
                    entry_ext.value, x509.CRLReason | x509.InvalidityDate
                ):
                    raise CRLError(
                        f"{source}: an entry has a critical extension "
                        f"{entry_ext.oid.dotted_string} not known here"
                    )
            revoked.add(entry.serial_number)
    except ValueError as exc:
        raise CRLError(f"{source}: unreadable entry: {exc}") from None
    return CRL(
        ca=ca_key(signer),
        issuer=issuer,
        this_update=crl.last_update_utc.timestamp(),
        next_update=next_update.timestamp(),
        number=number,
        users=users,
        cas=cas,
        partition=partition,
        revoked=frozenset(revoked),
        size=len(der),
        source=source,
    )


def _signed(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError, UnsupportedAlgorithm):
        return False


def newest(crls: Iterable[CRL]) -> dict[tuple[str, bool, bool, frozenset[str] | None], CRL]:
    """The newest CRL of each group (by cRLNumber, then thisUpdate)."""
    best: dict[tuple[str, bool, bool, frozenset[str] | None], CRL] = {}
    for crl in crls:
        current = best.get(crl.group)
        if current is None or _order(crl) > _order(current):
            best[crl.group] = crl
    return best


def _order(crl: CRL) -> tuple[int, float]:
    return (crl.number if crl.number is not None else -1, crl.this_update)
