"""Headers sent upstream: strip what the client may not set, then add ours.

``HeaderRules`` is compiled once from configuration; ``request_fields`` runs per request, on
the header bytes as received, and does no I/O (``upstream_headers`` is the same for decoded
headers). Whatever a client sent under an identity header's name (any case, repeated) is
removed before ours are added, as are hop-by-hop headers, every header named in
``Connection``, and forwarding headers from peers that are not trusted proxies.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from multidict import CIMultiDict, CIMultiDictProxy

from .identity import User

# RFC 9110 §7.6.1 plus the de-facto ones proxies drop.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
FORWARDING = frozenset(
    {
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-real-ip",
    }
)
# Never removed because a client named them in Connection: we need them to route and frame.
_PROTECTED = frozenset({"host", "content-length"})

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class HeaderRules:
    certificate_header: str
    userinfo_header: str
    trusted_proxies: tuple[IPNetwork, ...] = ()
    #: removed whoever sent them; from untrusted peers the forwarding headers too
    always_strip: frozenset[str] = field(init=False, repr=False)
    untrusted_strip: frozenset[str] = field(init=False, repr=False)
    always_strip_b: frozenset[bytes] = field(init=False, repr=False)
    untrusted_strip_b: frozenset[bytes] = field(init=False, repr=False)
    _identity_names: tuple[bytes, bytes] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = {self.certificate_header.lower(), self.userinfo_header.lower(), "x-request-id"}
        always = frozenset(names) | HOP_BY_HOP
        object.__setattr__(self, "always_strip", always)
        object.__setattr__(self, "untrusted_strip", always | FORWARDING)
        object.__setattr__(self, "always_strip_b", frozenset(n.encode() for n in always))
        object.__setattr__(
            self, "untrusted_strip_b", frozenset(n.encode() for n in always | FORWARDING)
        )
        object.__setattr__(
            self,
            "_identity_names",
            (self.certificate_header.encode("ascii"), self.userinfo_header.encode("ascii")),
        )

    def identity_lines(self, certificate_b64: str, user: User) -> bytes:
        """Our two identity headers, as header lines."""
        certificate, userinfo = self._identity_names
        return b"%b: %b\r\n%b: %b\r\n" % (
            certificate,
            certificate_b64.encode("ascii"),
            userinfo,
            user.header_bytes,
        )

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
    tokens: set[str] = set()
    for value in headers.getall("Connection", ()):
        for token in value.split(","):
            token = token.strip().lower()
            if token and token not in _PROTECTED:
                tokens.add(token)
    return tokens


def _named(values: list[bytes]) -> frozenset[bytes]:
    """Header names listed in Connection values (lower case), except the protected ones."""
    return _named_in(values[0]) if len(values) == 1 else _named_in(b",".join(values))


@functools.lru_cache(maxsize=256)
def _named_in(value: bytes) -> frozenset[bytes]:
    # Connection values repeat ("keep-alive", "close"): parsed once each.
    tokens = {token.strip().lower() for token in value.split(b",")}
    return frozenset(tokens - _PROTECTED_BYTES - {b""})


def request_fields(
    rules: HeaderRules,
    raw: Iterable[tuple[bytes, bytes]],
    *,
    client_ip: str | None,
    trusted: bool,
    request_id: str,
    user: User | None,
    certificate_b64: str | None,
) -> tuple[list[bytes], bool]:
    """The header lines (``Name: value\r\n``) to send upstream, in the client's order with
    ours appended, and whether the client sent a Host. Identity headers only with ``user``.

    Works on the bytes as received, so that what the upstream sees is byte for byte what the
    client sent (minus what we strip).
    """
    strip = rules.always_strip_b if trusted else rules.untrusted_strip_b
    kept: list[tuple[bytes, bytes]] = []
    connection: list[bytes] = []
    host: bytes | None = None
    prior: list[bytes] = []
    proto = forwarded_host = False
    for name, value in raw:
        key = name.lower()
        if key == b"host":
            if host is None:
                host = value
        elif key == b"connection":
            connection.append(value)
        elif trusted:
            if key == b"x-forwarded-for":
                prior.append(value)  # merged and sent last, with the peer appended
                continue
            proto = proto or key == b"x-forwarded-proto"
            forwarded_host = forwarded_host or key == b"x-forwarded-host"
        # CGI-style servers (PHP, WSGI, Rack) read "X_USERINFO" as "X-USERINFO": compare
        # names with underscores read as dashes, so no spelling slips past.
        if b"_" in key:
            key = key.replace(b"_", b"-")
        if key not in strip:
            kept.append((key, b"%b: %b\r\n" % (name, value)))
    named = _named(connection) - strip if connection else None  # stripped ones are gone
    if named:
        lines = [line for key, line in kept if key not in named]
    else:
        lines = [line for _, line in kept]
    ip = (client_ip or "").encode("ascii", "replace")
    if trusted:
        joined = b", ".join(prior)
        lines.append(b"X-Forwarded-For: %b\r\n" % (joined + b", " + ip if joined else ip))
        if not proto:
            lines.append(b"X-Forwarded-Proto: https\r\n")
        if host and not forwarded_host:
            lines.append(b"X-Forwarded-Host: %b\r\n" % host)
    else:
        lines.append(b"X-Forwarded-For: %b\r\nX-Forwarded-Proto: https\r\n" % ip)
        if host:
            lines.append(b"X-Forwarded-Host: %b\r\n" % host)
        lines.append(b"X-Real-IP: %b\r\n" % ip)
    lines.append(b"X-Request-ID: %b\r\n" % request_id.encode("ascii"))
    if user is not None and certificate_b64 is not None:
        lines.append(rules.identity_lines(certificate_b64, user))
    return lines, host is not None


def response_fields(raw: Iterable[tuple[bytes, bytes]]) -> tuple[list[bytes], int]:
    """The upstream's response header lines minus hop-by-hop ones and X-Request-ID (framing
    and the request id are ours), and which of ``HAS_LENGTH``, ``HAS_DATE``, ``HAS_SERVER``
    it had."""
    kept: list[tuple[bytes, bytes]] = []
    connection: list[bytes] = []
    flags = 0
    for name, value in raw:
        key = name.lower()
        if key in _RESPONSE_STRIP:
            if key == b"connection":
                connection.append(value)
            continue
        flag = _FLAGS.get(key)
        if flag is not None:
            flags |= flag
        kept.append((key, b"%b: %b\r\n" % (name, value)))
    if connection:
        named = _named(connection) - _RESPONSE_STRIP  # those are gone already
        if named:
            kept = [(key, line) for key, line in kept if key not in named]
            flags = 0
            for key, _ in kept:
                flags |= _FLAGS.get(key, 0)
    return [line for _, line in kept], flags


HAS_LENGTH, HAS_DATE, HAS_SERVER = 1, 2, 4
_FLAGS = {b"content-length": HAS_LENGTH, b"date": HAS_DATE, b"server": HAS_SERVER}
_RESPONSE_STRIP = frozenset(name.encode() for name in HOP_BY_HOP) | {b"x-request-id"}
_PROTECTED_BYTES = frozenset(name.encode() for name in _PROTECTED)


def lines_to_multidict(lines: Iterable[bytes]) -> CIMultiDict[str]:
    """Header lines as a multidict, for aiohttp (decoded as aiohttp decodes the client's)."""
    out: CIMultiDict[str] = CIMultiDict()
    for line in b"".join(lines).split(b"\r\n")[:-1]:  # an item may hold several lines
        name, _, value = line.partition(b": ")
        out.add(name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
    return out


def _encoded(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> list[tuple[bytes, bytes]]:
    return [
        (name.encode("utf-8", "surrogateescape"), value.encode("utf-8", "surrogateescape"))
        for name, value in headers.items()
    ]


def upstream_headers(
    rules: HeaderRules,
    incoming: CIMultiDictProxy[str] | CIMultiDict[str],
    *,
    client_ip: str | None,
    trusted: bool,
    request_id: str,
    user: User | None,
    certificate_b64: str | None,
) -> CIMultiDict[str]:
    """``request_fields`` for decoded headers, as a multidict."""
    lines, _ = request_fields(
        rules,
        _encoded(incoming),
        client_ip=client_ip,
        trusted=trusted,
        request_id=request_id,
        user=user,
        certificate_b64=certificate_b64,
    )
    return lines_to_multidict(lines)


def response_headers(incoming: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    """Upstream response headers minus hop-by-hop ones (framing is ours to decide)."""
    lines, _ = response_fields(_encoded(incoming))
    return lines_to_multidict(lines)
