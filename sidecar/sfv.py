"""The part of HTTP Structured Field Values (RFC 8941) that RFC 9440's headers use.

``byte_item`` reads a field whose value is an Item holding a Byte Sequence (``Client-Cert``),
``byte_list`` one whose value is a List of them (``Client-Cert-Chain``), and
``serialize_bytes`` writes one. Parameters on an item are parsed by the RFC's grammar and
ignored, as RFC 8941 asks of parameters a field does not define; an item of any other type,
an Inner List, or anything the grammar does not allow raises ``ValueError`` naming it. Pure
functions over text that has already been checked to be visible ASCII.
"""

from __future__ import annotations

import base64
import binascii
import re

_SP = " "
_OWS = " \t"
_BYTES = re.compile(r":([A-Za-z0-9+/=]*):")
_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*")
# Bare items a parameter may carry (RFC 8941 section 3.3, and RFC 9651's Date and Display
# String, which parsers of either version must not trip over).
_BARE = re.compile(
    r"-?(?:[0-9]{1,12}\.[0-9]{1,3}|[0-9]{1,15})(?![0-9.])"  # integer or decimal
    r'|"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*"'  # string
    r"|[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*"  # token
    r"|:[A-Za-z0-9+/=]*:"  # byte sequence
    r"|\?[01]"  # boolean
    r"|@-?[0-9]{1,15}(?![0-9.])"  # date
    r'|%"(?:[\x20\x21\x23\x24\x26-\x5b\x5d-\x7e]|%[0-9a-f]{2})*"'  # display string
)


def byte_item(text: str) -> bytes:
    """The bytes of a field value that is one Byte Sequence Item (parameters ignored)."""
    i = _skip(text, 0, _SP)
    value, i = _byte_sequence(text, i)
    i = _parameters(text, i)
    if _skip(text, i, _SP) != len(text):
        raise ValueError(f"unexpected {text[i]!r} after the byte sequence (one item expected)")
    return value


def byte_list(text: str) -> list[bytes]:
    """The bytes of each member of a field value that is a List of Byte Sequences (several
    field lines are one list once joined with commas, RFC 9110 section 5.3)."""
    out: list[bytes] = []
    i = _skip(text, 0, _SP)
    while i < len(text):
        if text[i] == "(":
            raise ValueError(f"member {len(out) + 1} is an inner list, not a byte sequence")
        value, i = _byte_sequence(text, i, member=len(out) + 1)
        i = _parameters(text, i)
        out.append(value)
        i = _skip(text, i, _OWS)
        if i == len(text):
            break
        if text[i] != ",":
            raise ValueError(f"unexpected {text[i]!r} after member {len(out)} (a comma expected)")
        i = _skip(text, i + 1, _OWS)
        if i == len(text):
            raise ValueError("the list ends with a comma")
    return out


def serialize_bytes(value: bytes) -> str:
    """A Byte Sequence as RFC 8941 serializes it: base64 with padding, between colons."""
    return ":" + base64.b64encode(value).decode("ascii") + ":"


def _skip(text: str, i: int, chars: str) -> int:
    while i < len(text) and text[i] in chars:
        i += 1
    return i


def _byte_sequence(text: str, i: int, member: int = 0) -> tuple[bytes, int]:
    where = f"member {member}" if member else "the value"
    m = _BYTES.match(text, i)
    if m is None:
        raise ValueError(f"{where} is not a byte sequence (':' base64 ':')")
    content = m.group(1)
    # RFC 8941 section 4.2.7: padding may be missing (it is synthesized); "=" elsewhere than at
    # the end is not base64.
    stripped = content.rstrip("=")
    if "=" in stripped or len(stripped) % 4 == 1:
        raise ValueError(f"{where} is not valid base64")
    try:
        value = base64.b64decode(stripped + "=" * (-len(stripped) % 4), validate=True)
    except binascii.Error:
        raise ValueError(f"{where} is not valid base64") from None
    return value, m.end()


def _parameters(text: str, i: int) -> int:
    """Skips the parameters after an item (RFC 8941 section 4.2.3.2); returns where they end."""
    while i < len(text) and text[i] == ";":
        i = _skip(text, i + 1, _SP)
        key = _KEY.match(text, i)
        if key is None:
            raise ValueError("a parameter without a valid key (lower case, starting a-z or *)")
        i = key.end()
        if i < len(text) and text[i] == "=":
            value = _BARE.match(text, i + 1)
            if value is None:
                raise ValueError(f"parameter {key.group()!r} has no valid value")
            i = value.end()
    return i
