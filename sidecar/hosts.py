"""The names this service answers to, and whether a request was meant for one of them.

The sidecar builds the return URL of its sign-on redirects and ``X-Forwarded-Host`` from the
authority a request names, and the application may build links from ``Host``: a request is
served only when that authority is one of the names served (``listen.server_names``, by
default the server certificate's DNS and IP names) and, when the client sent a TLS server
name (SNI), that very name. Otherwise it is misdirected: 421 (RFC 9110 §15.5.20), as nginx
and Envoy answer a Host that does not match the connection. Pure functions; no I/O.

Names compare without case, port or a final dot; IPv6 literals without brackets, in their
canonical form; ``*.example.com`` covers one label, as in certificates. The authority is the
``Host`` field, or in absolute form the request target's own (RFC 9112 §3.2.2), and then the
``Host`` must name the same host: it is what the application receives.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from cryptography import x509
from cryptography.x509.oid import NameOID

_LABEL = r"[a-z0-9_-]{1,63}"
_DNS = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_PORT = re.compile(r":[0-9]*")
_ABSOLUTE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)")
_IPV4_LIKE = re.compile(r"[0-9.]+")
#: judgements remembered per (Host, SNI): enough for every spelling a real client uses
_REMEMBERED = 4096

#: (reason shown to the client, code for the log)
Misdirection = tuple[str, str]
NOT_SERVED: Misdirection = (
    "this service does not serve the host this request names",
    "misdirected_host",
)
NOT_THE_SNI: Misdirection = (
    "this request names another host than the one its TLS connection was made for",
    "misdirected_sni",
)
SNI_NOT_SERVED: Misdirection = (
    "this service does not serve the host the TLS connection was made for",
    "misdirected_sni",
)
#: what the memo holds for a request that is not misdirected (no reason)
_SERVED: Misdirection = ("", "")
HOST_NOT_TARGET: Misdirection = (
    "the Host header names another host than the request target",
    "misdirected_target",
)


def dns_name(text: str) -> str | None:
    """A DNS host name, normalised (lower case, no final dot); None when it is not one (a
    wildcard, an empty label, spaces, non-ASCII: write internationalised names as A-labels)."""
    name = text.lower()
    if name.endswith("."):
        name = name[:-1]
    if len(name) > 253 or not _DNS.fullmatch(name):
        return None
    return name


def _ipv6(text: str) -> str | None:
    try:
        return ipaddress.IPv6Address(text).compressed if "%" not in text else None
    except ValueError:
        return None


def _name(host: str) -> str | None:
    """A host name or IPv4 address, normalised; None when it is neither."""
    if _IPV4_LIKE.fullmatch(host):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            pass  # digits and dots that are no address (127.1, 010.0.0.1): a name, then
    return dns_name(host)


def host_name(authority: str) -> str | None:
    """The host an authority (a ``Host`` value) names, normalised; None when it names none."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            return None
        if end + 1 < len(authority) and not _PORT.fullmatch(authority, end + 1):
            return None
        return _ipv6(authority[1:end])
    host, colon, _ = authority.partition(":")
    if colon and not _PORT.fullmatch(authority, len(host)):
        return None
    return _name(host)


def is_address(name: str) -> bool:
    """Whether a host name (without brackets or port) is an IP address literal."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def sni_name(server_name: str | None) -> str | None:
    """The TLS server name, normalised like a host; "" (which no host equals) when it is none."""
    if server_name is None:
        return None
    return _name(server_name) or ""


def server_name(spec: str) -> str:
    """A configured name, normalised: a host name, ``*.`` and a host name, or an IP address
    (an IPv6 one with or without brackets). Raises ``ValueError`` saying what is wrong."""
    text = spec.strip()
    if not text.isascii():
        raise ValueError(f"write internationalized names as A-labels (xn--...): {spec!r}")
    if text.startswith("[") and text.endswith("]"):
        address = _ipv6(text[1:-1])
        if address is None:
            raise ValueError(f"not an IPv6 address: {spec!r}")
        return address
    try:
        return ipaddress.ip_address(text).compressed
    except ValueError:
        pass
    if text.startswith("*."):
        parent = dns_name(text[2:])
        if parent is None or _IPV4_LIKE.fullmatch(parent):
            raise ValueError(f"a wildcard is '*.' followed by a host name: {spec!r}")
        return f"*.{parent}"
    if "*" in text:
        raise ValueError(f"a wildcard is '*.' followed by a host name (one label): {spec!r}")
    name = dns_name(text)
    if name is None:
        raise ValueError(
            f"not a host name or IP address (labels of letters, digits, '-' and '_', "
            f"at most 63 characters each): {spec!r}"
        )
    return name


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The names a server certificate is for: its DNS and IP subjectAltNames, or, without
    any, its common name when that is a host name (as clients did before RFC 6125)."""
    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        san = None
    if san is not None:
        for dns in san.get_values_for_type(x509.DNSName):
            try:
                names.append(server_name(dns))
            except ValueError:
                continue  # a name no Host could match: nothing to serve under it
        for address in san.get_values_for_type(x509.IPAddress):
            names.append(address.compressed)
    if not names:
        for attribute in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            value = attribute.value
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            try:
                names.append(server_name(text))
            except ValueError:
                continue
    return list(dict.fromkeys(names))


class ServerNames:
    """The names served; ``misdirected`` judges a request (see the module's docstring)."""

    __slots__ = ("_memo", "exact", "names", "wildcards")

    def __init__(self, names: Iterable[str]) -> None:
        #: as configured (normalised), for people
        self.names = tuple(dict.fromkeys(names))
        self.exact = frozenset(n for n in self.names if not n.startswith("*."))
        #: the parents of the wildcards: "example.com" for "*.example.com"
        self.wildcards = frozenset(n[2:] for n in self.names if n.startswith("*."))
        #: (Host, SNI) -> the judgement, _SERVED for none
        self._memo: dict[tuple[bytes | None, str | None], Misdirection] = {}

    @classmethod
    def for_certificate(cls, cert: x509.Certificate) -> ServerNames:
        return cls(certificate_names(cert))

    def serves(self, name: str) -> bool:
        if name in self.exact:
            return True
        label, dot, parent = name.partition(".")
        return bool(dot) and bool(label) and parent in self.wildcards

    def misdirected(
        self, target: str, host: bytes | None, server_name: str | None
    ) -> Misdirection | None:
        """Why a request is not for this service (reason, code), or None when it is.

        ``target`` is the request target as sent, ``host`` the ``Host`` field's value (None
        without one), ``server_name`` the connection's SNI (None without one). Fails closed:
        an authority that names no host is not served.
        """
        if target.startswith("/") or target == "*":
            key = (host, server_name)
            memo = self._memo
            known = memo.get(key)
            if known is not None:
                # compared by value: compiled, a tuple of two strings is not an object to be
                return None if not known[0] else known
            judged = self._judge(None, host, server_name)
            if len(memo) < _REMEMBERED and (host is None or len(host) <= 255):
                memo[key] = _SERVED if judged is None else judged
            return judged
        match = _ABSOLUTE.match(target)
        return self._judge(match.group(1) if match else None, host, server_name)

    def _judge(
        self, target_authority: str | None, host: bytes | None, server_name: str | None
    ) -> Misdirection | None:
        sni = sni_name(server_name)
        host_text = host.decode("latin-1") if host is not None else None
        if target_authority is not None:
            name = host_name(target_authority)
            if name is None or not self.serves(name):
                return NOT_SERVED
            if host_text is not None and host_name(host_text) != name:
                return HOST_NOT_TARGET
        elif host_text is not None:
            name = host_name(host_text)
            if name is None or not self.serves(name):
                return NOT_SERVED
        elif sni is None:
            return None  # HTTP/1.0 without Host nor SNI: no authority named, none misdirected
        else:
            return None if self.serves(sni) else SNI_NOT_SERVED
        if sni is not None and sni != name:
            return NOT_THE_SNI
        return None


#: server names (SNI) whose server is remembered: enough for every name a real client uses
_CHOSEN = 4096


class ServerChoice:
    """Which of several servers a TLS server name (SNI) asks for: the one that lists it
    exactly, else the one whose ``*.`` wildcard covers it, else the first (a client without
    SNI, or with a name no server lists, as nginx's default server). Configurations list each
    name once (``check-config``), so the choice never depends on the order of the others."""

    __slots__ = ("_exact", "_memo", "_wildcards")

    def __init__(self, servers: Iterable[ServerNames]) -> None:
        self._exact: dict[str, int] = {}
        self._wildcards: dict[str, int] = {}
        for index, names in enumerate(servers):
            for name in names.exact:
                self._exact.setdefault(name, index)
            for parent in names.wildcards:
                self._wildcards.setdefault(parent, index)
        self._memo: dict[str | None, int] = {}

    def index(self, server_name: str | None) -> int:
        """The position of the server chosen for ``server_name`` (None: no SNI)."""
        memo = self._memo
        known = memo.get(server_name)
        if known is not None:
            return known
        chosen = 0
        name = sni_name(server_name)
        if name:
            found = self._exact.get(name)
            if found is None:
                label, dot, parent = name.partition(".")
                if dot and label:
                    found = self._wildcards.get(parent)
            if found is not None:
                chosen = found
        # A name OpenSSL passes is at most 255 bytes; one read from a ClientHello may not be.
        if len(memo) < _CHOSEN and (server_name is None or len(server_name) <= 255):
            memo[server_name] = chosen
        return chosen
