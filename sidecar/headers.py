"""Headers sent upstream: strip what the client may not set, then add ours.

``HeaderRules`` is compiled once from configuration; ``request_fields`` runs per request, on
the header bytes as received, and does no I/O; ``response_fields`` does the same for the
upstream's answer, and takes out the application's report headers (``ResponseRules``), handing
their values back for ``identity.reports``. Names are compared as application servers read
them: letter case ignored and every character that is not a letter or digit read as ``-``
(``X_USERINFO``, ``X.USERINFO`` and ``X-UserInfo`` are one name to PHP, lighttpd and CGI; the
report headers are matched the same way), and a client header whose name holds any character
but letters, digits, ``-`` and ``_`` is dropped, as nginx does. Whatever a client sent under an
identity header's name is removed before ours are added, as are hop-by-hop headers, every
header named in ``Connection``, the headers that re-route a request inside applications
(``X-Original-URL``), every certificate header of every format (``certformats.HEADER_NAMES``,
from anyone) and the configured ``headers.strip``, and, from peers that are not trusted
proxies, the headers that re-address it (``X-Forwarded-*``,
``True-Client-IP``...).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from multidict import CIMultiDict, CIMultiDictProxy

from .certformats import HEADER_NAMES as CERTIFICATE_HEADERS
from .certformats import CertificateHeaders, OutboundFormat
from .header_names import FORWARDING as FORWARDING
from .header_names import FRAMING
from .header_names import HOP_BY_HOP as HOP_BY_HOP
from .header_names import REROUTING as REROUTING
from .identity import User

_FORWARDED_PREFIX = b"x-forwarded-"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class HeaderRules:
    certificate_header: str
    userinfo_header: str
    trusted_proxies: tuple[IPNetwork, ...] = ()
    #: more names to remove whoever sent them (``headers.strip``)
    strip: tuple[str, ...] = ()
    #: the certificate headers sent upstream (``headers.certificate_formats``)
    certificate_formats: tuple[OutboundFormat, ...] = ("app-certificate",)
    #: removed whoever sent them; from untrusted peers the forwarding headers too
    always_strip: frozenset[str] = field(init=False, repr=False)
    untrusted_strip: frozenset[str] = field(init=False, repr=False)
    always_strip_b: frozenset[bytes] = field(init=False, repr=False)
    untrusted_strip_b: frozenset[bytes] = field(init=False, repr=False)
    _identity_names: tuple[bytes, bytes] = field(init=False, repr=False)
    #: request header names as sent -> what they are to request_fields (see classify)
    request_kinds: dict[bytes, int] = field(init=False, repr=False, compare=False)
    #: (certificate base64, X-USERINFO value) -> our two identity header lines, checked
    _identity_blocks: dict[tuple[str, bytes], bytes] = field(init=False, repr=False, compare=False)
    #: the configured formats' lines, when they are not just ``app-certificate``
    _formats: CertificateHeaders | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Normalised as client names are (see _normal): "X_USER" also strips "X-User".
        names = {
            normal_name(self.certificate_header),
            normal_name(self.userinfo_header),
            "x-request-id",
        }
        names.update(normal_name(name) for name in self.strip)
        # Every certificate header of every format, whatever the configuration: an
        # application (or a framework) that reads one would believe the client that sent it.
        # A trusted proxy's is read (``front_proxy.certificate_header``), never passed on.
        always = frozenset(names) | HOP_BY_HOP | REROUTING | CERTIFICATE_HEADERS
        object.__setattr__(self, "always_strip", always)
        object.__setattr__(self, "untrusted_strip", always | FORWARDING)
        object.__setattr__(self, "always_strip_b", frozenset(n.encode() for n in always))
        object.__setattr__(
            self, "untrusted_strip_b", frozenset(n.encode() for n in always | FORWARDING)
        )
        object.__setattr__(self, "request_kinds", {})
        object.__setattr__(self, "_identity_blocks", {})
        formats = self.certificate_formats
        object.__setattr__(
            self,
            "_formats",
            None
            if formats == ("app-certificate",)
            else CertificateHeaders(formats, self.certificate_header),
        )
        object.__setattr__(
            self,
            "_identity_names",
            (self.certificate_header.encode("ascii"), self.userinfo_header.encode("ascii")),
        )

    def classify(self, name: bytes) -> int:
        """What a request header name is to ``request_fields`` (cached per spelling)."""
        norm = _normal(name)
        kind = _SPECIAL.get(name.lower(), 0)
        if _UNUSUAL_NAME.search(name) is not None:
            kind = _STRIP  # nginx's ignore_invalid_headers: whoever sent it, whatever it reads as
        elif norm in self.always_strip_b:
            kind |= _STRIP
        elif norm in _FORWARDING_B or norm.startswith(_FORWARDED_PREFIX):
            kind |= _FORWARDING
        kinds = self.request_kinds
        if len(kinds) < _NAME_CACHE:
            kinds[name] = kind
        return kind

    def identity_lines(
        self,
        certificate_b64: str,
        user: User,
        certificate: bytes = b"",
        chain: tuple[bytes, ...] = (),
    ) -> bytes:
        """Our identity headers, as header lines (made and checked once per certificate
        and user: a few KiB of base64 need not be copied and scanned on every request):
        ``X-USERINFO`` after the certificate headers of ``certificate_formats``, built from
        ``certificate`` (the leaf's DER) and ``chain`` (the validated certificates after it)."""
        formats = self._formats
        if formats is not None and certificate:
            userinfo = self._identity_names[1]
            # on every request, so on the str its bytes are encoded from (ASCII: the same CR
            # and LF), as upstream.request_head checks its target
            text = user.header_value
            if "\r" in text or "\n" in text:
                raise ValueError("CR or LF in an identity header")
            value = user.header_bytes
            # CertificateHeaders checks its own lines and keeps them per chain
            return b"%b%b: %b\r\n" % (formats.lines(certificate, chain), userinfo, value)
        key = (certificate_b64, user.header_bytes)
        lines = self._identity_blocks.get(key)
        if lines is None:
            certificate, userinfo = self._identity_names
            value = certificate_b64.encode("ascii")
            lines = b"".join(
                (certificate, b": ", value, b"\r\n", userinfo, b": ", user.header_bytes, b"\r\n")
                if value  # "": a user known without a certificate seen (Identity Plus legacy)
                else (userinfo, b": ", user.header_bytes, b"\r\n")
            )
            count = 2 if value else 1
            if lines.count(b"\n") != count or lines.count(b"\r") != count:
                raise ValueError("CR or LF in an identity header")
            if len(self._identity_blocks) >= _NAME_CACHE:
                self._identity_blocks.clear()  # bounded: a new certificate costs one join
            self._identity_blocks[key] = lines
        return lines

    @property
    def wants_chain(self) -> bool:
        """Whether the certificate headers sent upstream may carry the client's chain (any
        ``certificate_formats`` but the default): else nobody needs it, and it is not read."""
        return self._formats is not None

    def is_trusted_proxy(self, address: str | None) -> bool:
        if not self.trusted_proxies or not address:
            return False
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.trusted_proxies)


def connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    """Header names listed in Connection (lower case), except Host and Content-Length."""
    values = headers.getall("Connection", ())
    if not values:
        return set()
    joined = ",".join(values).encode("utf-8", "surrogateescape")
    return {token.decode("utf-8", "surrogateescape") for token in _named_in(joined, frozenset())}


def _named(values: list[bytes], gone: frozenset[bytes]) -> frozenset[bytes]:
    """Header names listed in Connection values (lower case), except the protected ones and
    those in ``gone`` (stripped anyway)."""
    return _named_in(values[0] if len(values) == 1 else b",".join(values), gone)


@functools.lru_cache(maxsize=256)
def _named_in(value: bytes, gone: frozenset[bytes]) -> frozenset[bytes]:
    # Connection values repeat ("keep-alive", "close"): parsed once each. Names as the header
    # names they are compared with (_normal): "Connection: X_Secret" also drops "X-Secret".
    tokens = {_normal(token.strip()) for token in value.split(b",")}
    return frozenset(tokens - _PROTECTED_BYTES - gone - {b""})


# What a request header name is to request_fields (bits; 0: an ordinary header, kept).
_STRIP = 1  # never passes (identity, hop-by-hop, X-Request-ID)
_FORWARDING = 2  # passes only from trusted proxies
_HOST, _CONNECTION, _XFF, _XFP, _XFH = 4, 8, 16, 32, 64
_FORWARDING_B = frozenset(name.encode() for name in FORWARDING)
_SPECIAL = {
    b"host": _HOST,
    b"connection": _CONNECTION,
    b"x-forwarded-for": _XFF,
    b"x-forwarded-proto": _XFP,
    b"x-forwarded-host": _XFH,
}
# Names are cached as sent (their spellings repeat); the caches stop growing at this size.
_NAME_CACHE = 1024


# Every byte that is not an ASCII letter or digit, as "-"; letters in lower case.
_NORMAL = bytes(
    c + 32 if 65 <= c <= 90 else c if 97 <= c <= 122 or 48 <= c <= 57 else 45 for c in range(256)
)
# A character no header name needs (RFC 9110 allows more punctuation, which servers then read
# as "-" or "_": PHP turns "." into "_", lighttpd every non-alphanumeric character). nginx
# drops such headers by default (ignore_invalid_headers); so does the sidecar.
_UNUSUAL_NAME = re.compile(rb"[^A-Za-z0-9_-]")


def _normal(name: bytes) -> bytes:
    # CGI-style servers read "X_USERINFO" (WSGI, Rack, PHP), "X.USERINFO" (PHP) and
    # "X~USERINFO" (lighttpd) as "X-USERINFO": names are compared with every character that is
    # not a letter or digit read as a dash, so no spelling slips past.
    return name.translate(_NORMAL)


def normal_name(name: str) -> str:
    """A header name as the rules compare it: lower case, every character that is not an
    ASCII letter or digit read as ``-``. Every name the rules are given (configured, listed in
    ``Connection``) goes through this too."""
    return _normal(name.encode("utf-8", "surrogateescape")).decode("ascii")


def request_fields(
    rules: HeaderRules,
    raw: Iterable[tuple[bytes, bytes]],
    *,
    client_ip: str | None,
    trusted: bool,
    request_id: str,
    user: User | None,
    certificate_b64: str | None,
    certificate: bytes = b"",
    chain: tuple[bytes, ...] = (),
) -> tuple[bytes, bool]:
    """The header lines (``Name: value\r\n`` each) to send upstream, in the client's order
    with ours appended, and whether the client sent a Host. Identity headers only with ``user``.

    Works on the bytes as received, so that what the upstream sees is byte for byte what the
    client sent, minus what is stripped.
    """
    # a tuple of types, not ``list | tuple``: compiled, the union would be built on every call
    raw = raw if isinstance(raw, (list, tuple)) else list(raw)
    block, kept, host, connection, prior, seen = _request_pass(rules, raw, trusted, None)
    if connection:
        named = _named(connection, rules.always_strip_b if trusted else rules.untrusted_strip_b)
        if named:  # the client named more headers as hop-by-hop: a second pass drops them
            block, kept, host, connection, prior, seen = _request_pass(rules, raw, trusted, named)
    ip = (client_ip or "").encode("ascii", "replace")
    parts = [block]  # then one line per item
    if trusted:
        joined = b", ".join(prior)
        parts.append(b"X-Forwarded-For: %b\r\n" % (joined + b", " + ip if joined else ip))
        if not seen & _XFP:
            parts.append(b"X-Forwarded-Proto: https\r\n")
        if host and not seen & _XFH:
            parts.append(b"X-Forwarded-Host: %b\r\n" % host)
    else:
        parts.append(b"X-Forwarded-For: %b\r\n" % ip)
        parts.append(b"X-Forwarded-Proto: https\r\n")
        if host:
            parts.append(b"X-Forwarded-Host: %b\r\n" % host)
        parts.append(b"X-Real-IP: %b\r\n" % ip)
    parts.append(b"X-Request-ID: %b\r\n" % request_id.encode("ascii"))
    out = b"".join(parts)
    # Both parsers let no CR or LF into the client's values, and ours have none: one here would
    # add a line, or end the head early and start a request of the client's making.
    lines = kept + len(parts) - 1
    if out.count(b"\n") != lines or out.count(b"\r") != lines:
        raise ValueError("CR or LF in a request header")
    if user is not None and certificate_b64 is not None:
        # checked where they are made
        out += rules.identity_lines(certificate_b64, user, certificate, chain)
    return out, host is not None


def _request_pass(
    rules: HeaderRules,
    raw: Iterable[tuple[bytes, bytes]],
    trusted: bool,
    named: frozenset[bytes] | None,
) -> tuple[bytes, int, bytes | None, list[bytes], list[bytes], int]:
    """One pass over the client's headers: the kept lines joined and how many, the first Host,
    the Connection values, the X-Forwarded-For values (trusted peers) and which of
    X-Forwarded-Proto and -Host a trusted peer sent."""
    kinds = rules.request_kinds
    dropped = _STRIP if trusted else _STRIP | _FORWARDING
    parts: list[bytes] = []
    host: bytes | None = None
    connection: list[bytes] = []
    prior: list[bytes] = []
    seen = 0
    for name, value in raw:
        kind = kinds.get(name)
        if kind is None:
            kind = rules.classify(name)
        if kind:
            if kind & _HOST:
                if host is None:
                    host = value
            elif kind & _CONNECTION:
                connection.append(value)
                continue
            elif trusted and kind & (_XFF | _XFP | _XFH):
                if kind & _XFF:
                    prior.append(value)  # merged and sent last, with the peer appended
                    continue
                seen |= kind
            if kind & dropped:
                continue
        if named is not None and _normal(name) in named:
            continue
        parts += (name, b": ", value, b"\r\n")
    return b"".join(parts), len(parts) // 4, host, connection, prior, seen


HAS_LENGTH, HAS_DATE, HAS_SERVER = 1, 2, 4
_R_STRIP, _R_CONNECTION, _R_REPORT = 8, 16, 32
#: a report header's kind carries its index in ``REPORT_KINDS`` from this bit up
_R_INDEX_SHIFT = 8
_RESPONSE_STRIP = frozenset(name.encode() for name in HOP_BY_HOP) | {b"x-request-id"}
_PROTECTED_BYTES = frozenset(name.encode() for name in FRAMING)  # never dropped for Connection

#: what the application can report in a response header, in the order of ``ResponseRules``
REPORT_KINDS = ("bind", "unbind", "trust", "intrusion")
DEFAULT_REPORT_HEADERS = (
    "X-Identity-Bind",
    "X-Identity-Unbind",
    "X-Identity-Trust",
    "X-Identity-Intrusion",
)

#: report headers found in a response: (index in ``REPORT_KINDS``, value as sent), in order
Captured = list[tuple[int, bytes]]


@dataclass(frozen=True, slots=True)
class ResponseRules:
    """What is removed from the upstream's responses besides hop-by-hop headers: the report
    headers (``headers.reports``), whose values ``response_fields`` hands back. Compiled once
    from configuration; names compare as request names do (``_normal``: any case, every
    character that is not a letter or digit read as ``-``), so that no spelling an application
    server would write for a report header reaches the client."""

    report_headers: tuple[str, ...] = DEFAULT_REPORT_HEADERS
    #: response header names as sent -> what they are to response_fields
    kinds: dict[bytes, int] = field(init=False, repr=False, compare=False)
    _reports: dict[bytes, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.report_headers) != len(REPORT_KINDS):
            raise ValueError(f"one report header name for each of {', '.join(REPORT_KINDS)}")
        object.__setattr__(self, "kinds", {})
        object.__setattr__(
            self,
            "_reports",
            {normal_name(name).encode("ascii"): i for i, name in enumerate(self.report_headers)},
        )

    def classify(self, name: bytes) -> int:
        """What a response header name is to ``response_fields`` (cached per spelling)."""
        key = name.lower()
        kind = {b"content-length": HAS_LENGTH, b"date": HAS_DATE, b"server": HAS_SERVER}.get(key, 0)
        if key in _RESPONSE_STRIP:
            kind |= _R_STRIP
        if key == b"connection":
            kind |= _R_CONNECTION
        index = self._reports.get(_normal(name))
        if index is not None:
            kind = _R_REPORT | (index << _R_INDEX_SHIFT)
        kinds = self.kinds
        if len(kinds) < _NAME_CACHE:
            kinds[name] = kind
        return kind


DEFAULT_RESPONSE_RULES = ResponseRules()


def response_fields(
    raw: Iterable[tuple[bytes, bytes]], rules: ResponseRules = DEFAULT_RESPONSE_RULES
) -> tuple[bytes, int, Captured | None]:
    """The upstream's response header lines minus hop-by-hop ones, X-Request-ID (framing and
    the request id are ours) and the report headers of ``rules``; which of ``HAS_LENGTH``,
    ``HAS_DATE``, ``HAS_SERVER`` it had; and the report headers' values, None when there was
    none. A report header is never passed on, whether reports are on or off."""
    # a tuple of types, not ``list | tuple``: compiled, the union would be built on every call
    raw = raw if isinstance(raw, (list, tuple)) else list(raw)
    block, flags, connection, captured = _response_pass(raw, None, rules)
    if connection:
        named = _named(connection, _RESPONSE_STRIP)
        if named:
            block, flags, _, captured = _response_pass(raw, named, rules)
    return block, flags, captured


def _response_pass(
    raw: Iterable[tuple[bytes, bytes]], named: frozenset[bytes] | None, rules: ResponseRules
) -> tuple[bytes, int, list[bytes], Captured | None]:
    kinds = rules.kinds
    parts: list[bytes] = []
    connection: list[bytes] = []
    captured: Captured | None = None
    flags = 0
    for name, value in raw:
        kind = kinds.get(name)
        if kind is None:
            kind = rules.classify(name)
        if kind:
            if kind & _R_STRIP:
                if kind & _R_CONNECTION:
                    connection.append(value)
                continue
            if kind & _R_REPORT:
                if captured is None:
                    captured = []
                captured.append((kind >> _R_INDEX_SHIFT, value))
                continue
            if named is not None and name.lower() in named:
                continue
            flags |= kind
        elif named is not None and name.lower() in named:
            continue
        parts += (name, b": ", value, b"\r\n")
    return b"".join(parts), flags, connection, captured


def lines_to_multidict(block: bytes) -> CIMultiDict[str]:
    """Header lines as a multidict, for aiohttp (decoded as aiohttp decodes the client's)."""
    out: CIMultiDict[str] = CIMultiDict()
    for line in block.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b": ")
        out.add(name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
    return out
