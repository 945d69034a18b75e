"""Consumers of the certificate header formats, written from their documentation, not from
``sidecar.certformats``: the tests decode what the sidecar emits with these.

- ``xfcc_parse``: Envoy's X-Forwarded-Client-Cert grammar, as its documentation
  (configuration/http/http_conn_man/headers, "x-forwarded-client-cert") states it: a
  comma-separated list of elements, each a semicolon-separated list of key=value pairs; keys
  case-insensitive; a value containing ``,``, ``;`` or ``=`` double-quoted; a double quote in
  a value written as backslash-double-quote (any other backslash is itself). Nothing else
  is allowed.
- ``rfc4514_decode``: an RFC 4514 string representation of a distinguished name back into
  its attributes (section 3: ``\\`` followed by a special character or by two hex digits).
"""

from __future__ import annotations

import re

# A bare value may hold none of the characters that would need quoting, nor a quote.
_BARE = r'[^",;=]*'
# Inside quotes: any character but a quote, or a backslash and the character after it. The
# documentation defines one escape, backslash-double-quote; a backslash before anything else
# is itself (Envoy's own subjects carry RFC 2253 escapes such as "\,").
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_PAIR = rf"[A-Za-z]+=(?:{_QUOTED}|{_BARE})"
_ELEMENT = rf"{_PAIR}(?:;{_PAIR})*"
_HEADER = re.compile(rf"{_ELEMENT}(?:,{_ELEMENT})*")
_PAIR_AT = re.compile(rf"([A-Za-z]+)=({_QUOTED}|{_BARE})([;,]?)")


def xfcc_parse(value: str) -> list[list[tuple[str, str]]]:
    """Elements of (lower-case key, value) pairs; raises ``ValueError`` off the grammar."""
    if not _HEADER.fullmatch(value):
        raise ValueError(f"not an XFCC value by Envoy's documented grammar: {value[:200]!r}")
    elements: list[list[tuple[str, str]]] = [[]]
    position = 0
    while position < len(value):
        m = _PAIR_AT.match(value, position)
        assert m is not None, "the full match above guarantees one"
        raw = m.group(2)
        if raw.startswith('"'):
            raw = raw[1:-1].replace('\\"', '"')
        elements[-1].append((m.group(1).lower(), raw))
        if m.group(3) == ",":
            elements.append([])
        position = m.end()
    return elements


_SPECIALS = set(',+"\\<>;= #')


def rfc4514_decode(text: str) -> list[list[tuple[str, str]]]:
    """RDNs (as written: the last RDN of the certificate first) of (type, value) pairs."""
    rdns: list[list[tuple[str, str]]] = [[]]
    i = 0
    while i < len(text):
        eq = text.index("=", i)
        kind = text[i:eq]
        i = eq + 1
        raw = bytearray()
        while i < len(text) and text[i] not in ",+":
            c = text[i]
            if c == "\\":
                nxt = text[i + 1 : i + 3]
                if len(nxt) == 2 and all(ch in "0123456789abcdefABCDEF" for ch in nxt):
                    raw.append(int(nxt, 16))
                    i += 3
                    continue
                if text[i + 1] not in _SPECIALS:
                    raise ValueError(f"bad escape at {i}: {text[i : i + 2]!r}")
                raw += text[i + 1].encode()
                i += 2
                continue
            if c in '"<>;':
                raise ValueError(f"unescaped {c!r} at {i}")
            raw += c.encode()
            i += 1
        rdns[-1].append((kind, raw.decode("utf-8")))
        if i < len(text):
            if text[i] == ",":
                rdns.append([])
            i += 1
    return rdns
