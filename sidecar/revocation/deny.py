"""The deny-list: certificates refused whatever the CA, a CRL, OCSP or the identity backend says.

Entries come from two places: ``tls.deny`` (SHA-256 fingerprints, or an issuer name and a
serial number), replaced as a whole by a reload, and run-time fingerprints added and removed
through the admin listener, which a reload keeps. Pure: sets, no I/O.

Issuer names are compared as RFC 4514 text without letter case (``CN=Test CA,O=Example`` and
``cn=test ca, o=example`` are one name): an entry that matches more spellings refuses more,
never less.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from cryptography import x509

from ..certs import ClientCert

_AROUND_SEPARATORS = re.compile(r"(?<!\\)\s*([,+=])\s*")


#: RFC 4514's attribute type names (§3), which are case-insensitive
_KEYWORDS = frozenset({"CN", "L", "ST", "O", "OU", "C", "STREET", "DC", "UID"})
_TYPE = re.compile(r"(^|(?<!\\)[,+])([A-Za-z][A-Za-z0-9-]*)=")


def _upper_types(text: str) -> str:
    def upper(match: re.Match[str]) -> str:
        kind = match.group(2).upper()
        return match.group(1) + (kind if kind in _KEYWORDS else match.group(2)) + "="

    return _TYPE.sub(upper, text)


def issuer_key(text: str) -> str:
    """An issuer name as entries and certificates are compared; raises ``ValueError`` naming
    the problem when ``text`` is not an RFC 4514 name."""
    try:
        name = x509.Name.from_rfc4514_string(text.strip())
    except ValueError:
        # "CN=A, O=B", OpenSSL's "CN = A", and "cn=a": RFC 4514 has no spaces around these,
        # and its attribute type names are case-insensitive
        try:
            loose = _upper_types(_AROUND_SEPARATORS.sub(r"\1", text.strip()))
            name = x509.Name.from_rfc4514_string(loose)
        except ValueError:
            raise ValueError(
                f"not an RFC 4514 name: {text!r} (e.g. CN=Example Client CA,O=Example)"
            ) from None
    if not len(name):
        raise ValueError("an empty name")
    return _fold(name.rfc4514_string())


def _fold(text: str) -> str:
    return " ".join(text.casefold().split())


class DenyList:
    """Fingerprints and (issuer, serial) pairs from the configuration, and run-time fingerprints."""

    def __init__(
        self,
        fingerprints: Iterable[str] = (),
        pairs: Iterable[tuple[str, int]] = (),
        runtime: Iterable[str] = (),
    ) -> None:
        self.fingerprints = frozenset(fingerprints)
        #: (``issuer_key`` of the issuer name, serial number)
        self.pairs = frozenset(pairs)
        self.runtime: set[str] = set(runtime)

    def __bool__(self) -> bool:
        return bool(self.fingerprints or self.pairs or self.runtime)

    def matches(self, cert: ClientCert) -> str | None:
        """Why ``cert`` is on the list (``tls.deny`` or run time), or None."""
        if cert.sha256 in self.fingerprints:
            return "tls.deny"
        if cert.sha256 in self.runtime:
            return "the deny-list (run time)"
        if self.pairs and (_fold(cert.issuer), cert.serial) in self.pairs:
            return "tls.deny"
        return None

    def replaced(self, fingerprints: Iterable[str], pairs: Iterable[tuple[str, int]]) -> DenyList:
        """The configured entries replaced (a reload), the run-time ones kept."""
        return DenyList(fingerprints, pairs, self.runtime)
