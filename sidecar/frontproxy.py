"""Proxies in front of the sidecar (``front_proxy``): who is one, what client address it
speaks for, and the client certificate it passes in a header, verified again.

``FrontProxy`` is built once per plan from ``front_proxy`` and the trust anchors of ``tls``
(``client_ca``, ``pinned_certificates``). Per request, the gateway asks ``trusts`` (the
connection's address in a trusted network, or its TLS client certificate's SHA-256 among the
trusted fingerprints), ``client_address`` (``X-Forwarded-For`` read right to left, skipping
trusted hops, never the leftmost) and ``claim``: the certificate in the configured header,
parsed (``certformats.read``) and verified as the TLS handshake verifies a client's: a chain
to a configured anchor (or a pinned certificate itself), every certificate valid now, the
clientAuth usage. What does not read or verify is a ``HeaderRefusal``, never a certificate. No I/O.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import (
    ClientVerifier,
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from . import certformats
from .certformats import CertificateHeaderError
from .certs import ClientCert, read_certificates
from .config import FrontProxyConfig, TLSConfig
from .errors import CertificateError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: verified claims remembered, by the header values that made them (a proxy sends the same
#: certificate on every request of a client); the table is emptied when full
_REMEMBERED: Final = 4096
#: a remembered verification is redone after this many seconds (a reload's new anchors make
#: a new ``FrontProxy``; this bounds how long a chain is trusted without a look at the clock)
_RECHECK_SECONDS: Final = 60.0


@dataclass(frozen=True, slots=True)
class Accepted:
    """A certificate from a trusted proxy that verified: the leaf, parsed, and the validated
    certificates after it (its issuers up to the trust anchor, the anchor left out)."""

    cert: ClientCert
    chain: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class HeaderRefusal:
    """A certificate header from a trusted proxy that cannot be used: 400 (unreadable) or
    403 (does not verify), with the reason for the client and a code for the log."""

    status: int
    reason: str
    code: str


class FrontProxy:
    """The trusted front proxies and their certificate header (see the module's docstring)."""

    def __init__(self, config: FrontProxyConfig, tls: TLSConfig) -> None:
        self.networks: tuple[IPNetwork, ...] = config.networks()
        self.fingerprints: frozenset[str] = config.fingerprints()
        self.header: certformats.InboundFormat | None = config.certificate_header
        self._names: frozenset[bytes] = frozenset(
            name.encode() for name in _FORMAT_NAMES.get(self.header or "", ())
        )
        anchors: list[x509.Certificate] = []
        for path in (*tls.client_ca, *tls.pinned_certificates):
            anchors.extend(read_certificates(path))
        self._pinned: frozenset[bytes] = frozenset(
            cert.public_bytes(_DER)
            for path in tls.pinned_certificates
            for cert in read_certificates(path)
        )
        self._store = Store(anchors) if anchors else None
        self._claims: dict[tuple[bytes, ...], tuple[Accepted | HeaderRefusal | None, float]] = {}
        self._addresses: dict[str, bool] = {}

    # ---- who is a proxy ------------------------------------------------------------------

    def trusts(self, address: str | None, cert: ClientCert | None) -> bool:
        """Whether the connection is a trusted proxy's: its address in ``front_proxy.trusted``
        networks, or its TLS client certificate's fingerprint listed there."""
        if cert is not None and cert.sha256 in self.fingerprints:
            return True
        if address is None:
            return False
        known = self._addresses.get(address)
        if known is None:  # parsed once per address: the same few proxies connect all day
            ip = _ip(address)
            known = ip is not None and self._in_networks(ip)
            if len(self._addresses) >= _REMEMBERED:
                self._addresses.clear()
            self._addresses[address] = known
        return known

    def _in_networks(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(ip in network for network in self.networks)

    def client_address(self, peer: str | None, raw: Sequence[tuple[bytes, bytes]]) -> str | None:
        """The client's address behind a trusted proxy at ``peer``: the ``X-Forwarded-For``
        entries read right to left, each trusted hop (an address in the trusted networks)
        skipped; the first other one is the client. When every entry is a trusted hop, or an
        entry is not an address (a hop we cannot read past), the last hop read is the answer,
        as nginx's ``real_ip_recursive`` does; never the leftmost entry on its own say."""
        entries: list[bytes] = []
        for name, value in raw:
            if len(name) == 15 and name.lower() == b"x-forwarded-for":
                entries.extend(value.split(b","))
        client = peer
        for entry in reversed(entries):
            text = entry.strip(b" \t").decode("ascii", "replace")
            ip = _ip(_without_port(text))
            if ip is None:
                break
            client = str(ip)
            if not self._in_networks(ip):
                break
        return client

    # ---- the certificate a trusted proxy passes ------------------------------------------

    def sent_header(self, raw: Sequence[tuple[bytes, bytes]]) -> bool:
        """Whether ``raw`` holds a header of the configured format (from an untrusted peer:
        stripped, and counted)."""
        names = self._names
        return any(name.lower().replace(b"_", b"-") in names for name, _ in raw)

    def claim(
        self, raw: Sequence[tuple[bytes, bytes]], now: float
    ) -> Accepted | HeaderRefusal | None:
        """The certificate a trusted proxy passed in the configured header: ``Accepted`` when
        it reads and verifies at POSIX time ``now``, a ``HeaderRefusal`` when it does not, None when
        the proxy passed none (the request has no certificate). Fails closed: anything that
        is not a whole, verified chain is refused."""
        fmt = self.header
        if fmt is None:
            return None
        names = self._names
        key = tuple(
            b"%b:%b" % (name.lower(), value)
            for name, value in raw
            if name.lower().replace(b"_", b"-") in names
        )
        if not key:
            return None
        known = self._claims.get(key)
        if known is not None and known[1] > now:
            return known[0]
        outcome = self._verify(fmt, raw, now)
        if len(self._claims) >= _REMEMBERED:
            self._claims.clear()
        until = now + _RECHECK_SECONDS
        if isinstance(outcome, Accepted):
            until = min(until, outcome.cert.not_after_ts)
        self._claims[key] = (outcome, until)
        return outcome

    def _verify(
        self,
        fmt: certformats.InboundFormat,
        raw: Sequence[tuple[bytes, bytes]],
        now: float,
    ) -> Accepted | HeaderRefusal | None:
        try:
            presented = certformats.read(fmt, raw)
        # One name per exception: compiled, a name is typed by its first use.
        except CertificateHeaderError as unreadable:
            return HeaderRefusal(
                400,
                f"the front proxy's certificate header cannot be read: {unreadable}",
                "bad_certificate_header",
            )
        if presented is None:
            return None
        try:
            cert = ClientCert.from_der(presented.leaf)
        except CertificateError as unparsed:
            return HeaderRefusal(
                400,
                f"the front proxy's certificate cannot be read: {unparsed}",
                "bad_certificate_header",
            )
        if presented.leaf in self._pinned:
            return Accepted(cert, ())  # a pinned certificate is its own anchor
        store = self._store
        if store is None:
            return HeaderRefusal(
                403,
                "no trust anchor is configured for client certificates",
                "certificate_unverified",
            )
        leaf = x509.load_der_x509_certificate(presented.leaf)
        intermediates = [x509.load_der_x509_certificate(der) for der in presented.chain]
        try:
            verified = _verifier(store, now).verify(leaf, intermediates)
        except VerificationError as failed:
            why = str(failed).split(" (encountered", 1)[0].removeprefix("validation failed: ")
            return HeaderRefusal(
                403,
                f"the client certificate from the front proxy does not verify: {why}",
                "certificate_unverified",
            )
        # the chain as validated: the leaf first, the trust anchor last (left out)
        chain = tuple(c.public_bytes(_DER) for c in verified.chain[1:-1])
        return Accepted(cert, chain)


_DER = serialization.Encoding.DER

#: the header names each format reads the certificate from
_FORMAT_NAMES: Final[dict[str, tuple[str, ...]]] = {
    "client-cert": ("client-cert", "client-cert-chain"),
    "xfcc": ("x-forwarded-client-cert",),
    "ssl-client-cert": ("ssl-client-cert",),
    "traefik": ("x-forwarded-tls-client-cert",),
    "amzn-mtls": ("x-amzn-mtls-clientcert", "x-amzn-mtls-clientcert-leaf"),
}


def _verifier(store: Store, now: float) -> ClientVerifier:
    # The Web PKI profile of cryptography's verifier, less two requirements client
    # certificates commonly do not meet (OpenSSL, which verifies TLS clients here, does not
    # make them either): a subjectAltName (many client certificates name their holder in the
    # subject only) and, on the leaf, an authorityKeyIdentifier.
    leaf_policy = (
        ExtensionPolicy.webpki_defaults_ee()
        .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
        .may_be_present(x509.AuthorityKeyIdentifier, Criticality.NON_CRITICAL, None)
    )
    return (
        PolicyBuilder()
        .store(store)
        .time(dt.datetime.fromtimestamp(now, dt.UTC))
        .max_chain_depth(certformats.MAX_CHAIN)
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=leaf_policy)
        .build_client_verifier()
    )


def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text:
        return None
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _without_port(text: str) -> str:
    # "[2001:db8::1]:443" and "192.0.2.1:443" (Azure and some proxies add the port)
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    if text.count(":") == 1:
        return text.split(":", 1)[0]
    return text
