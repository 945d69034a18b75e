"""Client certificates in HTTP headers: read from a trusted front proxy, written for the upstream.

Reading (``read``): the five formats a proxy that terminated TLS uses to pass the client's
certificate on, each parsed strictly into the leaf and the rest of the chain as DER, or
refused with ``CertificateHeaderError`` naming the header and what is wrong; never a partial
result. What is read is only a claim: the caller verifies it again, as it verifies a TLS
client certificate. Headers are bounded (``MAX_FIELD_BYTES``, ``MAX_CHAIN``).

Writing (``CertificateHeaders``): the formats applications and frameworks read, built only
from a chain the sidecar validated. Every value is visible ASCII: whatever a certificate's
subject or subjectAltNames hold (quotes, commas, CR, LF, NUL, non-ASCII), it is escaped, so
no certificate can add a header line or a field (Envoy's GHSA-w5w5-487h-qv8q).

``HEADER_NAMES`` is every header name these formats use: a client may send none of them,
whatever the configuration. Pure functions and values; no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, unquote_to_bytes

from cryptography import x509

from . import sfv, xfcc

#: where a trusted front proxy puts the client certificate (``front_proxy.certificate_header``)
InboundFormat = Literal["client-cert", "xfcc", "ssl-client-cert", "traefik", "amzn-mtls"]
#: what the upstream may be sent (``headers.certificate_formats``)
OutboundFormat = Literal["app-certificate", "client-cert", "xfcc", "ssl-client-cert", "traefik"]
INBOUND: tuple[InboundFormat, ...] = (
    "client-cert",
    "xfcc",
    "ssl-client-cert",
    "traefik",
    "amzn-mtls",
)
OUTBOUND: tuple[OutboundFormat, ...] = (
    "app-certificate",
    "client-cert",
    "xfcc",
    "ssl-client-cert",
    "traefik",
)

CLIENT_CERT = "Client-Cert"
CLIENT_CERT_CHAIN = "Client-Cert-Chain"
XFCC = "X-Forwarded-Client-Cert"
SSL_CLIENT_CERT = "ssl-client-cert"
TRAEFIK = "X-Forwarded-Tls-Client-Cert"
AMZN = "X-Amzn-Mtls-Clientcert"
AMZN_LEAF = "X-Amzn-Mtls-Clientcert-Leaf"

#: every header of every format, lower case: stripped from every client request, whatever the
#: configuration and the route (the sidecar's own are then added from the validated chain).
#: With the certificate itself, the headers the same proxies send about it: a framework that
#: reads one of them would believe a client that sent it.
HEADER_NAMES: frozenset[str] = frozenset(
    {
        "client-cert",
        "client-cert-chain",
        "x-forwarded-client-cert",
        "ssl-client-cert",
        "x-forwarded-tls-client-cert",
        "x-forwarded-tls-client-cert-info",
        "x-amzn-mtls-clientcert",
        "x-amzn-mtls-clientcert-leaf",
        "x-amzn-mtls-clientcert-serial-number",
        "x-amzn-mtls-clientcert-issuer",
        "x-amzn-mtls-clientcert-subject",
        "x-amzn-mtls-clientcert-validity",
    }
)

#: the most bytes the header lines of one format may hold together. A chain of ten 4096-bit
#: RSA certificates as URL-encoded PEM is about 25 KiB; the listener's header limits
#: (``limits.max_header_line``, 8190 bytes by default) usually refuse far less first.
MAX_FIELD_BYTES = 65536
#: the most certificates one header may carry, the leaf included
MAX_CHAIN = 10


class CertificateHeaderError(ValueError):
    """A certificate header that cannot be read; the message names the header and the
    problem, in words the trusted proxy's operator can act on (the client gets 400)."""


@dataclass(frozen=True, slots=True)
class PresentedChain:
    """What a front proxy says the client presented: the leaf and the certificates sent with
    it (intermediates, maybe a root), in the order sent, as DER. Not yet verified."""

    leaf: bytes
    chain: tuple[bytes, ...] = ()


# ---- reading ------------------------------------------------------------------------------

Fields = Iterable[tuple[bytes, bytes]]


def read(fmt: InboundFormat, fields: Fields) -> PresentedChain | None:
    """The certificate a trusted proxy passed in ``fields`` (a request's header lines as
    received, names in any case) in format ``fmt``; None when it sent none (no client
    certificate). Raises ``CertificateHeaderError`` for anything that cannot be read whole.
    """
    reader = _READERS.get(fmt)
    if reader is None:
        raise ValueError(f"not a certificate header format: {fmt!r}")
    return reader(fields)


def _lines(fields: Fields, *names: str) -> dict[str, list[str]]:
    """The values sent under each of ``names``, compared as header names are (any case, "_"
    read as "-", as CGI-style servers read them: a client's ``Client_Cert`` is not another
    header), checked and bounded."""
    wanted = {name.lower().encode(): name for name in names}
    found: dict[str, list[str]] = {name: [] for name in names}
    total = 0
    for raw_name, raw_value in fields:
        name = wanted.get(raw_name.lower().replace(b"_", b"-"))
        if name is None:
            continue
        total += len(raw_value)
        if total > MAX_FIELD_BYTES:
            raise CertificateHeaderError(
                f"{name}: more than the {MAX_FIELD_BYTES} bytes accepted for a certificate header"
            )
        if not _VISIBLE.fullmatch(raw_value):
            raise CertificateHeaderError(
                f"{name}: holds a byte that is not visible ASCII (a control or non-ASCII byte)"
            )
        found[name].append(raw_value.decode("ascii").strip(" \t"))
    return found


def _single(found: dict[str, list[str]], name: str) -> str | None:
    """The one value of a header, or None when it is absent or empty (HAProxy-style setups
    send an empty value for "no certificate": that is what it means)."""
    values = found[name]
    if len(values) > 1:
        raise CertificateHeaderError(
            f"{name}: sent {len(values)} times; the front proxy must replace it, not add to it"
        )
    return values[0] or None if values else None


def _read_client_cert(fields: Fields) -> PresentedChain | None:
    # RFC 9440: Client-Cert is one Byte Sequence (the leaf's DER); Client-Cert-Chain a List of
    # them, the leaf excluded.
    found = _lines(fields, CLIENT_CERT, CLIENT_CERT_CHAIN)
    leaf_text = _single(found, CLIENT_CERT)
    chain_lines = found[CLIENT_CERT_CHAIN]
    if leaf_text is None:
        if chain_lines:
            raise CertificateHeaderError(f"{CLIENT_CERT_CHAIN}: sent without {CLIENT_CERT}")
        return None
    try:
        leaf = sfv.byte_item(leaf_text)
    except ValueError as exc:
        raise CertificateHeaderError(f"{CLIENT_CERT}: {exc}") from None
    try:
        chain = sfv.byte_list(", ".join(chain_lines))
    except ValueError as exc:
        raise CertificateHeaderError(f"{CLIENT_CERT_CHAIN}: {exc}") from None
    return _presented(CLIENT_CERT, [leaf, *chain])


def _escaped_pem(value: str, name: str) -> list[bytes]:
    # nginx's $ssl_client_escaped_cert (the leaf) and AWS ALB's headers (the chain as
    # presented, or the leaf it verified; "+=/" left unescaped): URL-encoded PEM. "+" is a
    # plus, never a space.
    return _pem_certificates(_percent_decoded(value, name), name)


def _read_escaped_pem(fields: Fields, name: str) -> PresentedChain | None:
    value = _single(_lines(fields, name), name)
    if value is None:
        return None
    return _presented(name, _escaped_pem(value, name))


def _read_traefik(fields: Fields) -> PresentedChain | None:
    # Traefik 2.9.4 and later: each certificate's base64 DER without PEM armour, comma
    # separated, leaf first. Earlier versions URL-escaped it; "%" never occurs in base64, so
    # both read the same.
    value = _single(_lines(fields, TRAEFIK), TRAEFIK)
    if value is None:
        return None
    if "%" in value:
        value = _percent_decoded(value, TRAEFIK)
    if value.count(",") >= MAX_CHAIN:
        raise CertificateHeaderError(_TOO_MANY.format(name=TRAEFIK))
    ders = []
    for i, item in enumerate(value.split(","), 1):
        try:
            ders.append(base64.b64decode(item.strip(" \t"), validate=True))
        except binascii.Error:
            raise CertificateHeaderError(
                f"{TRAEFIK}: certificate {i} is not base64 (DER without PEM armour expected)"
            ) from None
    return _presented(TRAEFIK, ders)


def _read_xfcc(fields: Fields) -> PresentedChain | None:
    lines = _lines(fields, XFCC)[XFCC]
    if not any(lines):
        return None
    try:
        elements = xfcc.elements(",".join(lines))
    except ValueError as exc:
        raise CertificateHeaderError(f"{XFCC}: {exc}") from None
    # Each proxy on the way appends its element: the last one is the nearest proxy's, the
    # trusted one. Elements before it may come from anyone (Envoy's own XFCC_VALUE reads the
    # first: that is right only behind SANITIZE_SET, where there is one).
    pairs = elements[-1]
    values: dict[str, list[str]] = {"cert": [], "chain": [], "hash": []}
    for key, value in pairs:
        if key in values:
            values[key].append(value)
    for key, found in values.items():
        if len(found) > 1:
            raise CertificateHeaderError(f"{XFCC}: the last element has {key.title()} twice")
    cert, chain, digest = (v[0] if v else None for v in values.values())
    if chain is not None:
        ders = _pem_certificates(_percent_decoded(chain, XFCC), f"{XFCC} Chain")
    elif cert is not None:
        ders = _pem_certificates(_percent_decoded(cert, XFCC), f"{XFCC} Cert")
        if len(ders) != 1:
            raise CertificateHeaderError(f"{XFCC}: Cert holds {len(ders)} certificates, not one")
    else:
        raise CertificateHeaderError(
            f"{XFCC}: the last element has neither Cert nor Chain (Envoy: set "
            "set_current_client_cert_details cert: true)"
        )
    if cert is not None and chain is not None:
        alone = _pem_certificates(_percent_decoded(cert, XFCC), f"{XFCC} Cert")
        if alone != ders[:1]:
            raise CertificateHeaderError(f"{XFCC}: Cert is not the first certificate of Chain")
    if digest is not None and digest.lower() != hashlib.sha256(ders[0]).hexdigest():
        raise CertificateHeaderError(f"{XFCC}: Hash is not the SHA-256 of the certificate")
    return _presented(XFCC, ders)


_VISIBLE = re.compile(rb"[\x20-\x7e]*")
_TOO_MANY = "{name}: more than " + str(MAX_CHAIN) + " certificates (the leaf and its chain)"
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_PEM = re.compile(r"-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]*?)-----END CERTIFICATE-----")
_SPACE = re.compile(r"[ \t\r\n]+")


def _percent_decoded(value: str, name: str) -> str:
    if _BAD_ESCAPE.search(value):
        raise CertificateHeaderError(f"{name}: a '%' that starts no %XX escape")
    try:
        return unquote_to_bytes(value).decode("ascii")
    except UnicodeDecodeError:
        raise CertificateHeaderError(f"{name}: an escape decodes to a non-ASCII byte") from None


def _pem_certificates(text: str, name: str) -> list[bytes]:
    """The DER of each PEM certificate in ``text``; nothing but whitespace may lie between."""
    ders: list[bytes] = []
    position = 0
    for m in _PEM.finditer(text):
        if text[position : m.start()].strip(" \t\r\n"):
            raise CertificateHeaderError(f"{name}: text outside the PEM certificates")
        if len(ders) == MAX_CHAIN:
            raise CertificateHeaderError(_TOO_MANY.format(name=name))
        try:
            ders.append(base64.b64decode(_SPACE.sub("", m.group(1)), validate=True))
        except binascii.Error:
            raise CertificateHeaderError(
                f"{name}: PEM certificate {len(ders) + 1} is not base64"
            ) from None
        position = m.end()
    if text[position:].strip(" \t\r\n"):
        raise CertificateHeaderError(
            f"{name}: not PEM certificates (-----BEGIN CERTIFICATE----- ... -----END "
            "CERTIFICATE-----), or text outside them"
        )
    return ders


def _read_ssl_client_cert(fields: Fields) -> PresentedChain | None:
    return _read_escaped_pem(fields, SSL_CLIENT_CERT)


def _read_amzn(fields: Fields) -> PresentedChain | None:
    # An ALB in passthrough mode sends the chain as presented; in verify mode, the leaf it
    # verified, in a header of its own. One ALB never sends both: both is no certificate
    # anyone can stand behind.
    found = _lines(fields, AMZN, AMZN_LEAF)
    chain, leaf = _single(found, AMZN), _single(found, AMZN_LEAF)
    if chain is not None and leaf is not None:
        raise CertificateHeaderError(
            f"{AMZN} and {AMZN_LEAF}: both sent (an ALB sends the first in passthrough mode, "
            "the second in verify mode)"
        )
    if chain is not None:
        return _presented(AMZN, _escaped_pem(chain, AMZN))
    if leaf is None:
        return None
    ders = _escaped_pem(leaf, AMZN_LEAF)
    if len(ders) != 1:
        raise CertificateHeaderError(f"{AMZN_LEAF}: holds {len(ders)} certificates, not one")
    return _presented(AMZN_LEAF, ders)


_READERS: dict[str, Callable[[Fields], PresentedChain | None]] = {
    "client-cert": _read_client_cert,
    "xfcc": _read_xfcc,
    "ssl-client-cert": _read_ssl_client_cert,
    "traefik": _read_traefik,
    "amzn-mtls": _read_amzn,
}


def _presented(name: str, ders: Sequence[bytes]) -> PresentedChain:
    if not ders:
        raise CertificateHeaderError(f"{name}: holds no certificate")
    if len(ders) > MAX_CHAIN:
        raise CertificateHeaderError(_TOO_MANY.format(name=name))
    for i, der in enumerate(ders, 1):
        try:
            x509.load_der_x509_certificate(der)
        except ValueError:
            which = "the leaf" if i == 1 else f"certificate {i}"
            raise CertificateHeaderError(f"{name}: {which} is not a DER certificate") from None
    return PresentedChain(ders[0], tuple(ders[1:]))


# ---- writing ------------------------------------------------------------------------------


def app_certificate(leaf: bytes) -> str:
    """``X-APP-CERTIFICATE`` (the contract's): standard base64 of the DER, padded, one line."""
    return base64.b64encode(leaf).decode("ascii")


def client_cert(leaf: bytes) -> str:
    """RFC 9440 ``Client-Cert``: the leaf's DER as a structured-field Byte Sequence."""
    return sfv.serialize_bytes(leaf)


def client_cert_chain(chain: Sequence[bytes]) -> str:
    """RFC 9440 ``Client-Cert-Chain``: the certificates after the leaf, a List of Byte
    Sequences (the first one signed the leaf)."""
    return ", ".join(sfv.serialize_bytes(der) for der in chain)


def escaped_pem(ders: Sequence[bytes]) -> str:
    """URL-encoded PEM, as nginx's ``$ssl_client_escaped_cert`` and Envoy's ``Cert`` write
    it: everything but letters, digits and ``-._~`` percent-encoded."""
    return quote("".join(_pem(der) for der in ders), safe="")


def traefik(leaf: bytes, chain: Sequence[bytes]) -> str:
    """Traefik's ``X-Forwarded-Tls-Client-Cert``: each certificate's base64 DER without PEM
    armour, leaf first, comma separated (as Traefik 2.9.4 and later write it)."""
    return ",".join(base64.b64encode(der).decode("ascii") for der in (leaf, *chain))


def forwarded_client_cert(leaf: bytes, chain: Sequence[bytes]) -> str:
    """Envoy's ``X-Forwarded-Client-Cert`` as ``forward_client_cert_details: SANITIZE_SET``
    with every detail writes it: one element of ``Hash`` (SHA-256 of the DER, hex),
    ``Cert``, ``Chain`` (when certificates came with the leaf; the leaf first), ``Subject``
    (always, quoted), ``URI`` (one per URI subjectAltName; empty when there is none) and
    ``DNS`` (one per DNS subjectAltName).

    Values hold no ``"`` and no ``\\``: the subject's RFC 4514 escapes for them are the hex
    forms ``\\22`` and ``\\5C``, and URIs and DNS names are percent-encoded outside visible
    ASCII and for ``"``, ``\\`` (and, in DNS names, every character a DNS name does not use).
    Whatever unquoting a consumer does (Envoy's own unescapes ``\\"`` and ``\\\\``), it reads
    the same text.
    """
    certificate = x509.load_der_x509_certificate(leaf)
    uris, names = _san_values(certificate)
    parts = [
        f"Hash={hashlib.sha256(leaf).hexdigest()}",
        f'Cert="{escaped_pem([leaf])}"',
    ]
    if chain:
        parts.append(f'Chain="{escaped_pem([leaf, *chain])}"')
    parts.append(f'Subject="{xfcc.dn_text(certificate.subject)}"')
    parts.extend(f"URI={xfcc.quoted(xfcc.uri_text(uri))}" for uri in uris or [""])
    parts.extend(f"DNS={xfcc.dns_text(name)}" for name in names)
    return ";".join(parts)


def _pem(der: bytes) -> str:
    body = base64.b64encode(der).decode("ascii")
    lines = "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return f"-----BEGIN CERTIFICATE-----\n{lines}\n-----END CERTIFICATE-----\n"


def _san_values(certificate: x509.Certificate) -> tuple[list[str], list[str]]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    names = san.get_values_for_type(x509.DNSName)
    return list(uris), list(names)


# ---- the upstream's headers, compiled once --------------------------------------------------

#: chains whose header lines are remembered (a few KiB each with every format); the table is
#: emptied when full. Only validated chains get here, so clients cannot fill it at will.
_REMEMBERED = 256


class CertificateHeaders:
    """The header lines of the configured formats for a validated chain, made once per chain.

    ``certificate_name`` is the name of the ``app-certificate`` header (``headers.certificate``).
    """

    def __init__(self, formats: Sequence[OutboundFormat], certificate_name: str) -> None:
        if len(set(formats)) != len(formats):
            raise ValueError("a certificate format is listed twice")
        unknown = [fmt for fmt in formats if fmt not in OUTBOUND]
        if unknown:
            raise ValueError(f"not a certificate format: {unknown[0]!r}")
        self.formats = tuple(formats)
        self.certificate_name = certificate_name
        self._made: dict[tuple[bytes, tuple[bytes, ...]], bytes] = {}

    def __repr__(self) -> str:
        return f"CertificateHeaders({list(self.formats)!r}, {self.certificate_name!r})"

    def fields(self, leaf: bytes, chain: Sequence[bytes] = ()) -> list[tuple[str, str]]:
        """(name, value) of every header of the configured formats, in their order."""
        out: list[tuple[str, str]] = []
        for fmt in self.formats:
            if fmt == "app-certificate":
                out.append((self.certificate_name, app_certificate(leaf)))
            elif fmt == "client-cert":
                out.append((CLIENT_CERT, client_cert(leaf)))
                if chain:
                    out.append((CLIENT_CERT_CHAIN, client_cert_chain(chain)))
            elif fmt == "xfcc":
                out.append((XFCC, forwarded_client_cert(leaf, chain)))
            elif fmt == "ssl-client-cert":
                out.append((SSL_CLIENT_CERT, escaped_pem([leaf])))
            elif fmt == "traefik":
                out.append((TRAEFIK, traefik(leaf, chain)))
        return out

    def lines(self, leaf: bytes, chain: Sequence[bytes] = ()) -> bytes:
        """The header lines (``Name: value\\r\\n`` each) for a validated chain.

        Raises ``ValueError`` if ``leaf`` is not a readable certificate, or if a value held
        anything but visible ASCII (it cannot: every value is escaped; this is the last check
        before bytes reach the upstream)."""
        key = (leaf, tuple(chain))
        made = self._made.get(key)
        if made is None:
            parts = []
            for name, value in self.fields(leaf, chain):
                raw = value.encode("ascii")
                if not _VISIBLE.fullmatch(raw):
                    raise ValueError(f"{name}: a value that is not visible ASCII")
                parts.append(b"%b: %b\r\n" % (name.encode("ascii"), raw))
            made = b"".join(parts)
            if len(self._made) >= _REMEMBERED:
                self._made.clear()
            self._made[key] = made
        return made
