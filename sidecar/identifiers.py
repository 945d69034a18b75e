"""The syntax of the identifiers a certificate's SANs carry besides host names (``hosts``):
SPIFFE IDs and email addresses. Checked alike where the configuration names them (``config``)
and where a certificate holds them (``rules``); pure.
"""

from __future__ import annotations

import re

from .hosts import dns_name

# SPIFFE ID (spiffe.io, SPIFFE-ID.md §2): lower-case trust domain; path segments of letters,
# digits, ".", "-", "_", none empty, "." or ".."; no trailing "/", query, fragment, port, user.
_SPIFFE = re.compile(r"spiffe://([a-z0-9._-]{1,255})((?:/[A-Za-z0-9._-]+)*)")
_SPIFFE_MAX = 2048
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")


def spiffe_id(text: str) -> bool:
    """A valid SPIFFE ID (``spiffe://trust-domain/path``, the path optional)."""
    if len(text) > _SPIFFE_MAX:
        return False
    match = _SPIFFE.fullmatch(text)
    if match is None:
        return False
    return all(segment not in (".", "..") for segment in match.group(2).split("/")[1:])


def email_address(text: str) -> str | None:
    """``local@domain`` with the domain in lower case (the local part is compared as
    written, RFC 5321 §2.4); None when it is not one."""
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain or _CONTROL_OR_SPACE.search(text):
        return None
    name = dns_name(domain)
    return f"{local}@{name}" if name is not None else None
