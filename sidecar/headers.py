"""Headers sent upstream: strip what the client may not set, then add ours.

``HeaderRules`` is compiled once from configuration; ``upstream_headers`` runs per request and
does no I/O. Whatever a client sent under an identity header's name (any case, repeated) is
removed before ours are added, as are hop-by-hop headers, every header named in
``Connection``, and forwarding headers from peers that are not trusted proxies.
"""

from __future__ import annotations

import ipaddress
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

    def __post_init__(self) -> None:
        names = {self.certificate_header.lower(), self.userinfo_header.lower(), "x-request-id"}
        always = frozenset(names) | HOP_BY_HOP
        object.__setattr__(self, "always_strip", always)
        object.__setattr__(self, "untrusted_strip", always | FORWARDING)

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
    """The headers to send upstream, in the client's order, with ours appended.

    Identity headers are added only when ``user`` is given.
    """
    strip = rules.always_strip if trusted else rules.untrusted_strip
    named = connection_tokens(incoming)
    if named:
        strip = strip | named
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        # CGI-style servers (PHP, WSGI, Rack) read "X_USERINFO" as "X-USERINFO": compare
        # names with underscores read as dashes, so no spelling slips past.
        if name.lower().replace("_", "-") not in strip:
            out.add(name, value)
    host = incoming.get("Host", "")
    if trusted:
        prior = ", ".join(incoming.getall("X-Forwarded-For", ()))
        _set(out, "X-Forwarded-For", f"{prior}, {client_ip}" if prior else (client_ip or ""))
        out.setdefault("X-Forwarded-Proto", "https")
        if host:
            out.setdefault("X-Forwarded-Host", host)
    else:
        out["X-Forwarded-For"] = client_ip or ""
        out["X-Forwarded-Proto"] = "https"
        if host:
            out["X-Forwarded-Host"] = host
        out["X-Real-IP"] = client_ip or ""
    out["X-Request-ID"] = request_id
    if user is not None and certificate_b64 is not None:
        out[rules.certificate_header] = certificate_b64
        out[rules.userinfo_header] = user.header_value
    return out


def _set(headers: CIMultiDict[str], name: str, value: str) -> None:
    headers.popall(name, None)
    headers[name] = value


def response_headers(incoming: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    """Upstream response headers minus hop-by-hop ones (framing is ours to decide)."""
    strip = set(HOP_BY_HOP) | connection_tokens(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if name.lower() not in strip:
            out.add(name, value)
    return out
