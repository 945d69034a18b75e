"""What a route asks of a client besides an identity: fields of its certificate (matchers),
its network address, the device trust Identity Plus reports, and the methods a request names.

Built once per configuration (start and reload) from ``routes[]``; pure, no I/O. The checks
run per request on what is remembered of each certificate and address (bounded), so a route
with matchers costs a dictionary lookup once its client is known. Every check fails closed:
a certificate field that is not what it claims to be (a DNS name holding a wildcard or a
space, a malformed SPIFFE ID) matches nothing, and an address that does not parse is in no
network. ``policy`` decides with these; ``explain`` shows each of them, the same objects.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from decimal import Decimal
from urllib.parse import unquote_plus

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.x509.oid import NameOID

from .certs import ClientCert, spki_sha256
from .hosts import dns_name
from .identifiers import email_address, spiffe_id
from .identity import Trust, User

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: certificates and addresses whose answers are remembered, per rule (emptied when full)
_REMEMBERED = 4096
#: how far up the trust anchors an issuer is looked for (leaf, intermediates, root)
_DEPTH = 8


def client_address(text: str | None) -> IPAddress | None:
    """The client's address as one value: an IPv6 zone dropped, an IPv4-mapped IPv6 address
    (``::ffff:10.0.0.1``, what a dual-stack socket reports) read as IPv4."""
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def within(address: IPAddress, networks: Iterable[IPNetwork]) -> bool:
    return any(address.version == net.version and address in net for net in networks)


# ---- what a certificate says ------------------------------------------------------------------


class CertificateFacts:
    """The fields matchers read, parsed once per certificate (``facts``)."""

    __slots__ = ("cn", "dns", "emails", "first_san", "ips", "o", "ou", "spiffe", "uris", "x509")

    def __init__(self, cert: ClientCert) -> None:
        #: valid host names among the DNS SANs (lower case, no final dot)
        self.dns: tuple[str, ...] = ()
        #: every URI SAN as written, and the valid SPIFFE IDs among them
        self.uris: tuple[str, ...] = ()
        self.spiffe: tuple[str, ...] = ()
        self.emails: tuple[str, ...] = ()
        self.ips: tuple[IPAddress, ...] = ()
        self.cn: tuple[str, ...] = ()
        self.ou: tuple[str, ...] = ()
        self.o: tuple[str, ...] = ()
        #: the first SAN of a kind a person reads (DNS, URI, email, IP), as written
        self.first_san: str | None = None
        self.x509: x509.Certificate | None = None
        try:
            parsed = x509.load_der_x509_certificate(cert.der)
            self.x509 = parsed
            self.cn = _attributes(parsed.subject, NameOID.COMMON_NAME)
            self.ou = _attributes(parsed.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
            self.o = _attributes(parsed.subject, NameOID.ORGANIZATION_NAME)
            san: Iterable[x509.GeneralName] = parsed.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value
        except x509.ExtensionNotFound:
            return
        except ValueError:
            return  # malformed: no field to match
        dns: list[str] = []
        uris: list[str] = []
        spiffe: list[str] = []
        emails: list[str] = []
        ips: list[IPAddress] = []
        for general in san:
            text: str | None = None
            if isinstance(general, x509.DNSName):
                text = general.value
                name = dns_name(text)
                if name is not None:
                    dns.append(name)
            elif isinstance(general, x509.UniformResourceIdentifier):
                text = general.value
                uris.append(text)
                if spiffe_id(text):
                    spiffe.append(text)
            elif isinstance(general, x509.RFC822Name):
                text = general.value
                email = email_address(text)
                if email is not None:
                    emails.append(email)
            elif isinstance(general, x509.IPAddress):
                value = general.value
                if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
                    ips.append(value)
                    text = str(value)
            if text is not None and self.first_san is None:
                self.first_san = text
        self.dns, self.uris, self.spiffe = tuple(dns), tuple(uris), tuple(spiffe)
        self.emails, self.ips = tuple(emails), tuple(ips)


def _attributes(name: x509.Name, oid: x509.ObjectIdentifier) -> tuple[str, ...]:
    values = []
    for attribute in name.get_attributes_for_oid(oid):
        value = attribute.value
        values.append(value.decode("utf-8", "replace") if isinstance(value, bytes) else value)
    return tuple(values)


_facts: dict[str, CertificateFacts] = {}


def facts(cert: ClientCert) -> CertificateFacts:
    """What ``cert`` says, parsed at its first use and remembered (bounded)."""
    found = _facts.get(cert.sha256)
    if found is None:
        found = CertificateFacts(cert)
        if len(_facts) >= _REMEMBERED:
            _facts.clear()
        _facts[cert.sha256] = found
    return found


_users: dict[str, User] = {}


def certificate_user(cert: ClientCert) -> User:
    """The user announced for a certificate the route lets in by itself (``access:
    certificate``): ``sub`` its SPIFFE ID (when it has exactly one), else its first SAN, else
    its CN, else ``sha256:`` and its fingerprint; ``username`` its CN, else ``sub``; ``email``
    its first email SAN; no roles. Remembered per certificate (bounded)."""
    user = _users.get(cert.sha256)
    if user is None:
        known = facts(cert)
        common_name = known.cn[0] if known.cn and known.cn[0] else None
        if len(known.spiffe) == 1:
            sub = known.spiffe[0]
        else:
            sub = known.first_san or common_name or f"sha256:{cert.sha256}"
        user = User(
            sub=sub,
            username=common_name or sub,
            email=known.emails[0] if known.emails else None,
        )
        if len(_users) >= _REMEMBERED:
            _users.clear()
        _users[cert.sha256] = user
    return user


# ---- certificate matchers (routes[].allow) ----------------------------------------------------


class Matcher:
    """One key of ``routes[].allow``: passes when any of its values matches the certificate."""

    #: its name in the configuration, e.g. ``allow.san_dns``
    key: str
    #: the values, as configured (normalised), for people
    values: tuple[str, ...]

    def __init__(self, key: str, values: Iterable[str]) -> None:
        self.key = key
        self.values = tuple(values)

    def passes(self, cert: ClientCert) -> bool:
        raise NotImplementedError


class DNSMatcher(Matcher):
    """``san_dns``: exact names (any case, no final dot), or ``*.`` and one label."""

    def __init__(self, values: Iterable[str]) -> None:
        super().__init__("allow.san_dns", values)
        names = [v.lower().rstrip(".") for v in self.values]
        self.exact = frozenset(n for n in names if not n.startswith("*."))
        self.parents = frozenset(n[2:] for n in names if n.startswith("*."))

    def passes(self, cert: ClientCert) -> bool:
        for name in facts(cert).dns:
            if name in self.exact:
                return True
            label, dot, parent = name.partition(".")
            if dot and label and parent in self.parents:
                return True
        return False


class URIMatcher(Matcher):
    """``san_uri``: exact URIs, or SPIFFE ID prefixes ending in ``/`` (a trust domain, or a
    path under it) that only valid SPIFFE IDs below them match."""

    def __init__(self, values: Iterable[str]) -> None:
        super().__init__("allow.san_uri", values)
        self.exact = frozenset(v for v in self.values if not v.endswith("/"))
        self.prefixes = tuple(v for v in self.values if v.endswith("/"))

    def passes(self, cert: ClientCert) -> bool:
        known = facts(cert)
        if any(uri in self.exact for uri in known.uris):
            return True
        return any(
            len(sid) > len(prefix) and sid.startswith(prefix)
            for sid in known.spiffe
            for prefix in self.prefixes
        )


class EmailMatcher(Matcher):
    def __init__(self, values: Iterable[str]) -> None:
        super().__init__("allow.san_email", values)
        self.exact = frozenset(e for e in (email_address(v) for v in self.values) if e)

    def passes(self, cert: ClientCert) -> bool:
        return any(email in self.exact for email in facts(cert).emails)


class IPMatcher(Matcher):
    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self.networks = tuple(networks)
        super().__init__("allow.san_ip", (str(n) for n in self.networks))

    def passes(self, cert: ClientCert) -> bool:
        return any(within(ip, self.networks) for ip in facts(cert).ips)


class SubjectMatcher(Matcher):
    """``subject.CN``, ``subject.OU``, ``subject.O``: any value of the attribute, exactly."""

    def __init__(self, attribute: str, values: Iterable[str]) -> None:
        super().__init__(f"allow.subject.{attribute}", values)
        self.attribute = attribute
        self.exact = frozenset(self.values)

    def passes(self, cert: ClientCert) -> bool:
        known = facts(cert)
        found = (
            known.cn if self.attribute == "CN" else known.ou if self.attribute == "OU" else known.o
        )
        return any(value in self.exact for value in found)


class FingerprintMatcher(Matcher):
    def __init__(self, values: Iterable[str]) -> None:
        super().__init__("allow.fingerprint", values)
        self.exact = frozenset(self.values)

    def passes(self, cert: ClientCert) -> bool:
        return cert.sha256 in self.exact


class Anchors:
    """The listener's trust anchors (``tls.client_ca``, ``tls.pinned_certificates``), to find
    the CAs above a client certificate: Python (before 3.13) cannot show the chain OpenSSL
    verified, so the chain is followed up through the anchors, each step a verified
    signature. A CA the client sent but the anchors do not hold cannot be found."""

    def __init__(self, certificates: Iterable[x509.Certificate]) -> None:
        self._by_subject: dict[x509.Name, list[tuple[x509.Certificate, str]]] = {}
        keys = set()
        for certificate in certificates:
            key = spki_sha256(certificate)
            keys.add(key)
            self._by_subject.setdefault(certificate.subject, []).append((certificate, key))
        #: the SHA-256 of every anchor's public key
        self.keys = frozenset(keys)

    def issuer_keys(self, leaf: x509.Certificate) -> frozenset[str]:
        """The public-key SHA-256 of every CA above ``leaf`` among the anchors: the one that
        signed it, the one that signed that one, and so on (a self-signed pinned
        certificate is its own issuer)."""
        found: set[str] = set()
        frontier = [leaf]
        for _ in range(_DEPTH):
            above: list[x509.Certificate] = []
            for cert in frontier:
                for candidate, key in self._by_subject.get(cert.issuer, ()):
                    if key in found or not _signed_by(cert, candidate):
                        continue
                    found.add(key)
                    if candidate.subject != candidate.issuer:
                        above.append(candidate)
            if not above:
                break
            frontier = above
        return frozenset(found)


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


class IssuerMatcher(Matcher):
    """``issuer``: a CA above the certificate, by the SHA-256 of its public key (a CA
    certificate file is read as its keys when the configuration is loaded)."""

    def __init__(self, values: Iterable[str], keys: Iterable[str], anchors: Anchors) -> None:
        super().__init__("allow.issuer", values)
        self.keys = frozenset(keys)
        self.anchors = anchors

    def passes(self, cert: ClientCert) -> bool:
        leaf = facts(cert).x509
        return leaf is not None and not self.keys.isdisjoint(self.anchors.issuer_keys(leaf))


class CertificateRule:
    """``routes[].allow``: every key must pass (AND); within a key any value (OR)."""

    def __init__(self, matchers: Sequence[Matcher]) -> None:
        self.matchers = tuple(matchers)
        #: certificate SHA-256 -> the key of the first matcher it fails, "" when none
        self._memo: dict[str, str] = {}

    def first_failure(self, cert: ClientCert) -> str | None:
        """The key of the first matcher ``cert`` fails (``allow.san_uri``), None if none."""
        memo = self._memo
        failed = memo.get(cert.sha256)
        if failed is None:
            failed = ""
            for matcher in self.matchers:
                if not matcher.passes(cert):
                    failed = matcher.key
                    break
            if len(memo) >= _REMEMBERED:
                memo.clear()
            memo[cert.sha256] = failed
        return failed or None


# ---- network addresses (routes[].addresses) ---------------------------------------------------

_REACHES, _EXEMPT = 1, 2


class AddressRule:
    """``addresses.allow``: the networks that may reach the route at all (None: any);
    ``addresses.exempt``: those that need no certificate there. The address is the one the
    connection comes from (or the front proxy's rules, where those apply): never a header."""

    def __init__(
        self, allow: Sequence[IPNetwork] | None, exempt: Sequence[IPNetwork] | None
    ) -> None:
        self.allow = tuple(allow) if allow is not None else None
        self.exempt = tuple(exempt) if exempt is not None else ()
        self._memo: dict[str | None, int] = {}

    def _judge(self, text: str | None) -> int:
        memo = self._memo
        known = memo.get(text)
        if known is not None:
            return known
        address = client_address(text)
        bits = 0
        if self.allow is None or (address is not None and within(address, self.allow)):
            bits |= _REACHES
            if address is not None and within(address, self.exempt):
                bits |= _EXEMPT
        if len(memo) >= _REMEMBERED:
            memo.clear()
        memo[text] = bits
        return bits

    def reaches(self, address: str | None) -> bool:
        """May a client at ``address`` reach the route? (No address: only without ``allow``.)"""
        return bool(self._judge(address) & _REACHES)

    def exempts(self, address: str | None) -> bool:
        return bool(self._judge(address) & _EXEMPT)


# ---- device trust (routes[].identityplus) -----------------------------------------------------


class TrustRule:
    """``identityplus.min_trust_score`` and ``max_local_intrusions``: what the Identity Plus
    profile must say of the device. A profile that says nothing (or not a number) fails."""

    def __init__(self, min_score: Decimal | None, max_intrusions: int | None) -> None:
        self.min_score = min_score
        self.max_intrusions = max_intrusions

    def failure(self, trust: Trust | None) -> str | None:
        """The key of the first requirement ``trust`` fails, None if it meets them."""
        if self.min_score is not None:
            score = trust.score if trust is not None else None
            if score is None or score < self.min_score:
                return "identityplus.min_trust_score"
        if self.max_intrusions is not None:
            intrusions = trust.local_intrusions if trust is not None else None
            if intrusions is None or intrusions > self.max_intrusions:
                return "identityplus.max_local_intrusions"
        return None


# ---- methods a request names besides its own -------------------------------------------------

#: headers with which Rails (Rack::MethodOverride), Express (method-override), Laravel,
#: Symfony, ASP.NET helpers and Google's APIs serve a request as another method
OVERRIDE_HEADERS = frozenset({b"x-http-method-override", b"x-http-method", b"x-method-override"})


def method_overrides(raw_headers: Iterable[tuple[bytes, bytes]], raw_path: str) -> tuple[str, ...]:
    """The methods a request asks an application to serve it as instead of its own: each
    value of the override headers (any case, ``_`` read as ``-``, comma-separated) and of a
    ``_method`` query parameter, upper-cased as frameworks read them. A ``_method`` in a form
    body cannot be seen here (see the README)."""
    found: list[str] = []
    for name, value in raw_headers:
        if len(name) >= 13 and name.lower().replace(b"_", b"-") in OVERRIDE_HEADERS:
            for part in value.split(b","):
                # upper-cased as text, as frameworks do: b"\xdf" is "SS" to them, as the
                # query's _method below is
                method = part.decode("latin-1").strip().upper()
                if method:
                    found.append(method)
    _, question, query = raw_path.partition("?")
    if question and ("method" in query.lower() or "%" in query):
        for pair in re.split(r"[&;]", query):
            name_text, _, value_text = pair.partition("=")
            if unquote_plus(name_text).strip() == "_method":
                method_text = unquote_plus(value_text).strip().upper()
                if method_text:
                    found.append(method_text)
    return tuple(found)
