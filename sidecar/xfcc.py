"""Envoy's X-Forwarded-Client-Cert syntax: reading its elements, and writing its values.

Envoy documents the header as comma-separated elements (one per proxy), each of
semicolon-separated ``key=value`` pairs, keys in any case, a value holding ``,``, ``;`` or
``=`` double-quoted with ``\\"`` for a quote inside (``elements``). What goes into a value
here is escaped so that it needs no unquoting at all (``dn_text``, ``uri_text``,
``dns_text``): no ``"``, no ``\\\\``, nothing outside visible ASCII, whatever a certificate
holds. Then Envoy's own reader (which also unescapes ``\\\\``), readers that follow the
documentation and naive ones all read the same text, and no character of a subject or a
subjectAltName can end a value, a field or the header (Envoy GHSA-w5w5-487h-qv8q). Pure.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from cryptography import x509

_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_BARE = re.compile(r'[^,;"]*')
# Envoy's two escapes are backslash-quote and backslash-backslash; any other backslash is
# itself (Envoy's own subjects carry RFC 2253 escapes such as "\,")
_QUOTED = re.compile(r'"((?:[^"\\]|\\["\\]|\\(?!["\\]))*+)"')
_ESCAPED = re.compile(r'\\(["\\])')


def elements(text: str) -> list[list[tuple[str, str]]]:
    """An X-Forwarded-Client-Cert value as Envoy documents it: elements separated by ``,``,
    each of ``key=value`` pairs separated by ``;``; keys in any case (returned lower case);
    a value containing ``,``, ``;`` or ``=`` double-quoted, with ``\\"`` for a quote (and,
    as Envoy reads it, ``\\\\`` for a backslash; any other backslash is itself) inside.
    Raises ``ValueError`` where the text leaves that grammar.
    """
    found: list[list[tuple[str, str]]] = []
    pairs: list[tuple[str, str]] = []
    i, end = 0, len(text)
    while True:
        i = _skip_ows(text, i)
        key = _KEY.match(text, i)
        if key is None:
            raise ValueError(f"a key expected at character {i + 1}")
        i = _skip_ows(text, key.end())
        if i == end or text[i] != "=":
            raise ValueError(f"'=' expected after the key {key.group()!r}")
        i = _skip_ows(text, i + 1)
        if i < end and text[i] == '"':
            value, i = _quoted_string(text, i)
        else:
            bare = _BARE.match(text, i)
            assert bare is not None  # the pattern matches the empty string
            value, i = bare.group().rstrip(" \t"), bare.end()
        pairs.append((key.group().lower(), value))
        i = _skip_ows(text, i)
        if i == end:
            found.append(pairs)
            return found
        if text[i] == ",":
            found.append(pairs)
            pairs = []
        elif text[i] != ";":
            raise ValueError(f"',' or ';' expected at character {i + 1}, not {text[i]!r}")
        i += 1


def _quoted_string(text: str, i: int) -> tuple[str, int]:
    m = _QUOTED.match(text, i)
    if m is None:
        raise ValueError("a quoted value is not closed")
    return _ESCAPED.sub(r"\1", m.group(1)), m.end()


def _skip_ows(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t":
        i += 1
    return i


#: RFC 4514 section 2.4: characters escaped with a backslash wherever they are in a value
_DN_SPECIALS = frozenset(",+;<>")
_ATTRIBUTE_NAMES = {
    "2.5.4.3": "CN",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "2.5.4.6": "C",
    "2.5.4.9": "STREET",
    "0.9.2342.19200300.100.1.25": "DC",
    "0.9.2342.19200300.100.1.1": "UID",
}


def dn_text(name: x509.Name) -> str:
    """A distinguished name as RFC 4514 (and RFC 2253, Envoy's and AWS's form) writes it,
    last RDN first, in visible ASCII only: ``"``, ``\\``, controls and non-ASCII characters
    as ``\\XX`` escapes of their UTF-8 bytes (which RFC 4514 allows for any character), the
    other specials with a backslash. Types without a short name are dotted OIDs."""
    rdns = []
    for rdn in reversed(name.rdns):
        attributes = []
        for attribute in rdn:
            oid = attribute.oid.dotted_string
            label = _ATTRIBUTE_NAMES.get(oid, oid)
            value = attribute.value
            text = "#" + value.hex() if isinstance(value, bytes) else _dn_value(value)
            attributes.append(f"{label}={text}")
        rdns.append("+".join(attributes))
    return ",".join(rdns)


def _dn_value(value: str) -> str:
    out = []
    last = len(value) - 1
    for i, c in enumerate(value):
        code = ord(c)
        if c in _DN_SPECIALS:
            out.append("\\" + c)
        elif c in '"\\' or code < 0x20 or code > 0x7E or (c == " " and i in (0, last)):
            out.extend(f"\\{byte:02X}" for byte in c.encode("utf-8", "surrogatepass"))
        elif c == "#" and i == 0:
            out.append("\\23")
        else:
            out.append(c)
    return "".join(out)


#: what a DNS name is written with; anything else in a DNS subjectAltName is percent-encoded
_DNS_SAFE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._*"
#: visible ASCII that a URI may hold as it is (RFC 3986 reserved and unreserved, and "%")
_URI_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"\\<>^`{|}')


def dns_text(name: str) -> str:
    """A DNS subjectAltName as an XFCC value: anything but letters, digits and ``-._*``
    percent-encoded (UTF-8), so it needs no quoting."""
    return quote(name, safe=_DNS_SAFE, encoding="utf-8", errors="surrogatepass")


def uri_text(uri: str) -> str:
    """A URI subjectAltName in visible ASCII: what RFC 3986 does not allow in a URI (controls,
    spaces, non-ASCII, ``"``, ``\\``, ...) percent-encoded (UTF-8); existing escapes kept, so
    percent-decoding it gives what percent-decoding the original gives."""
    return quote(uri, safe=_URI_SAFE, encoding="utf-8", errors="surrogatepass")


def quoted(value: str) -> str:
    """A value as XFCC writes it: double-quoted when it holds ``,``, ``;`` or ``=``. The value
    holds no ``"`` or ``\\`` (``uri_text`` and ``dns_text`` encode them)."""
    if any(c in value for c in ",;="):
        return f'"{value}"'
    return value
