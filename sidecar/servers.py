"""The sites the listener serves and the routes of each: policy's entry on the request path.

``Servers`` holds one ``Server`` per configured site (``servers[]``), or one for the short
form (``tls``, ``listen.server_names``, ``routes``). A request's server is the one its
connection's TLS server name (SNI) chose during the handshake (``hosts.ServerChoice``, the
same choice ``tls`` made of the certificate and of whether to ask for a client
certificate); its ``Host`` must be one of that server's names (421 otherwise, ``hosts``); its
route is looked up in that server's table under its method and under every method it asks
the application to read it as (``rules.method_overrides``): a request the two would route
differently is refused. Built from the configuration at start and on reload; pure.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .certs import read_certificates
from .config import AllowConfig, Config, RouteConfig, covered_methods
from .hosts import Misdirection, ServerChoice, ServerNames
from .policy import METHOD_OVERRIDE, NO_METHOD, Refused, Route, RouteTable
from .rules import (
    AddressRule,
    Anchors,
    CertificateRule,
    DNSMatcher,
    EmailMatcher,
    FingerprintMatcher,
    IPMatcher,
    IssuerMatcher,
    Matcher,
    SubjectMatcher,
    TrustRule,
    URIMatcher,
    method_overrides,
)


@dataclass(frozen=True, slots=True)
class Server:
    """One site: the names it answers to, its routes, whether its handshake asks for a
    client certificate, and where it was configured (``servers[1]``; "" for the short form)."""

    names: ServerNames
    routes: RouteTable
    client_certificate: str
    origin: str = ""

    @property
    def title(self) -> str:
        where = self.origin or "the server"
        return f"{where} ({', '.join(self.names.names) or 'no names'})"


class Servers:
    """Every site, and the calls the request path makes (see the module's docstring)."""

    __slots__ = ("_choice", "_only", "servers")

    def __init__(self, servers: Sequence[Server]) -> None:
        if not servers:
            raise ValueError("at least one server")
        self.servers = tuple(servers)
        self._choice = ServerChoice(s.names for s in self.servers)
        self._only = self.servers[0] if len(self.servers) == 1 else None

    def select(self, server_name: str | None) -> Server:
        """The server a connection that sent ``server_name`` (SNI; None: none) talks to."""
        only = self._only
        if only is not None:
            return only
        return self.servers[self._choice.index(server_name)]

    def misdirected(
        self, target: str, host: bytes | None, server_name: str | None
    ) -> Misdirection | None:
        """Why a request is not for the server its connection chose (421), or None."""
        return self.select(server_name).names.misdirected(target, host, server_name)

    def route(
        self,
        method: str,
        raw_path: str,
        raw_headers: Iterable[tuple[bytes, bytes]],
        server_name: str | None,
    ) -> Route | None:
        """The route of a request, or None when none covers it (denied). Raises ``BadPath``
        for a target no reading makes safe, ``Refused`` when the path is covered for other
        methods only, or when a method override would be routed differently."""
        table = self.select(server_name).routes
        route = table.match(raw_path, method)
        if not table.by_method:
            return route
        if route is None:
            if table.routed(raw_path):
                raise Refused(NO_METHOD)
            return None
        for other in method_overrides(raw_headers, raw_path):
            if other != method and table.match(raw_path, other) is not route:
                raise Refused(METHOD_OVERRIDE)
        return route


# ---- from the configuration ---------------------------------------------------------------------


def build_servers(config: Config) -> Servers:
    """The servers of ``config``. Reads the trust anchors (for ``allow.issuer``) and, in the
    short form without ``listen.server_names``, the server certificate (for its names);
    raises ``CertificateError`` when a file cannot be read."""
    anchors = Anchors(
        cert
        for path in (*config.tls.client_ca, *config.tls.pinned_certificates)
        for cert in read_certificates(path)
    )
    if config.servers is None:
        listed = config.listen.server_names
        certificate = config.tls.certificate
        if listed is not None:
            names = ServerNames(listed)
        elif certificate is not None:
            names = ServerNames.for_certificate(read_certificates(certificate)[0])
        else:  # configuration refuses it: listen.tls: false needs listen.server_names
            raise ValueError("listen.server_names: required without a server certificate")
        table = _table(config.routes, "routes", "", anchors)
        return Servers([Server(names, table, config.tls.client_certificate)])
    several = len(config.servers) > 1
    servers = []
    for i, entry in enumerate(config.servers):
        where = f"servers[{i}]"
        # With several servers, labels name the server too: "/admin/" may be on each.
        prefix = entry.names[0] if several else ""
        servers.append(
            Server(
                ServerNames(entry.names),
                _table(entry.routes, f"{where}.routes", prefix, anchors),
                entry.client_certificate or config.tls.client_certificate,
                where,
            )
        )
    return Servers(servers)


def _table(routes: Sequence[RouteConfig], where: str, prefix: str, anchors: Anchors) -> RouteTable:
    repeated = Counter(r.path for r in routes)
    built = []
    for i, entry in enumerate(routes):
        # Labels stay bounded (one per configured route) and unique: a path configured more
        # than once (for different methods) is named with its methods.
        label = prefix + entry.path
        if repeated[entry.path] > 1 and entry.methods is not None:
            label += " " + ",".join(entry.methods)
        trust = entry.identityplus
        addresses = entry.addresses
        built.append(
            Route(
                entry.path,
                public=entry.access == "public",
                roles=frozenset(entry.roles),
                methods=covered_methods(entry.methods),
                certificate_only=entry.access == "certificate",
                allow=_allow(entry.allow, anchors) if entry.allow is not None else None,
                addresses=(
                    AddressRule(addresses.allow, addresses.exempt)
                    if addresses is not None
                    else None
                ),
                trust=(
                    TrustRule(trust.min_trust_score, trust.max_local_intrusions)
                    if trust is not None
                    else None
                ),
                label=label,
                origin=f"{where}[{i}]",
            )
        )
    return RouteTable(built)


def _allow(allow: AllowConfig, anchors: Anchors) -> CertificateRule:
    """The matchers in the order the README lists them (the first one failed is named)."""
    matchers: list[Matcher] = []
    if allow.san_dns is not None:
        matchers.append(DNSMatcher(allow.san_dns))
    if allow.san_uri is not None:
        matchers.append(URIMatcher(allow.san_uri))
    if allow.san_email is not None:
        matchers.append(EmailMatcher(allow.san_email))
    if allow.san_ip is not None:
        matchers.append(IPMatcher(allow.san_ip))
    if allow.subject is not None:
        for attribute, values in allow.subject.attributes():
            matchers.append(SubjectMatcher(attribute, values))
    if allow.issuer is not None:
        keys = allow.issuer_keys()
        matchers.append(IssuerMatcher(keys, frozenset().union(*keys.values()), anchors))
    if allow.fingerprint is not None:
        matchers.append(FingerprintMatcher(allow.fingerprint))
    return CertificateRule(matchers)
