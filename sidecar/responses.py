"""The sidecar's own answers: short HTML for browsers, RFC 9457 problem+json otherwise.

An ``Answer`` is neutral: a status, checked header lines and a body, which either protocol
writes (``http1.client`` as it is, ``fallback`` as an aiohttp response). Reasons are plain words chosen by the caller from a small set; nothing from an exception,
a backend reply or the request itself is echoed, so no internals leak. Every header value
is checked before an answer is made: one with a CR, an LF or another control character
would add lines of someone else's choosing to the response (``Set-Cookie``), so it raises
``UnsafeHeaderValue`` and nothing is written. A value from elsewhere (a backend's sign-on
address) is checked by its caller first (``is_location``), to answer 503 instead.
"""

from __future__ import annotations

import json
import re
import secrets
from html import escape
from http import HTTPStatus
from typing import Final

from .headers import HAS_SERVER

#: the last two hex digits of a request id, made once
_HEX_PAIRS: Final[tuple[str, ...]] = tuple(f"{n:02x}" for n in range(256))


class _RequestIds:
    """Request ids: a random prefix per process and a counter; unique, 32 hex digits like a
    UUID's, and a fraction of uuid4's cost on every request. Not secrets.

    The counter's last two hex digits come from ``_HEX_PAIRS``; the rest is formatted once
    per 256 ids (formatting an int as hex was about 6,000 of a request's 128,000
    instructions, ``tests/benchmarks/instructions.py``)."""

    __slots__ = ("count", "head", "prefix")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.count = 0
        self.head = prefix + "0" * 14

    def next(self) -> str:
        count = self.count = self.count + 1
        low = count & 0xFF
        if low == 0:
            self.head = f"{self.prefix}{count >> 8:014x}"
        return self.head + _HEX_PAIRS[low]


_IDS: Final = _RequestIds(secrets.token_hex(8))


def new_request_id() -> str:
    return _IDS.next()


#: our own answers say who answered, without a version (aiohttp would announce Python's)
SERVER = "sidecar"


class UnsafeHeaderValue(ValueError):
    """A header value that is not one clean header line; never written."""


# What our header values may hold: visible ASCII, spaces and tabs (RFC 9110 §5.5 without
# obs-text, which we never need).
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")
# A URI is visible ASCII (RFC 3986: anything else is percent-encoded).
_URI = re.compile(r"[\x21-\x7e]+")


def is_location(value: str) -> bool:
    """Whether ``value`` can be sent as a ``Location``: a URI, nothing a header line cannot
    carry (CR, LF, controls, spaces, non-ASCII)."""
    return _URI.fullmatch(value) is not None


class Answer:
    """One of our own answers, as any protocol writes it."""

    __slots__ = ("body", "close", "fields", "flags", "reason", "status")

    def __init__(self, status: int, fields: bytes, body: bytes, *, close: bool = False) -> None:
        self.status = status
        #: the status line's phrase (aiohttp's: the standard one)
        self.reason = _reason(status)
        #: header lines (``Name: value\r\n`` each): checked, with Server, without framing
        self.fields = fields
        #: which of ``headers.HAS_LENGTH``, ``HAS_DATE``, ``HAS_SERVER`` ``fields`` has
        self.flags = HAS_SERVER
        self.body = body
        #: the connection ends after it
        self.close = close


def _answer(status: int, headers: dict[str, str], content_type: str, body: bytes) -> Answer:
    """An answer with ``headers`` (checked here), then its Content-Type."""
    for name, value in headers.items():
        if _FIELD_VALUE.fullmatch(value) is None:
            raise UnsafeHeaderValue(f"{name}: a character a header line cannot carry")
    location = headers.get("Location")
    if location is not None and not is_location(location):
        raise UnsafeHeaderValue("Location: not a URI")
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    fields = f"{lines}Content-Type: {content_type}\r\n".encode("ascii")
    return Answer(status, fields, body)


_TITLES = {
    400: "Bad request",
    401: "Client certificate required",
    403: "Access denied",
    404: "Not found",
    413: "Request body too large",
    414: "Request line too long",
    431: "Request headers too large",
    500: "Internal error",
    502: "Upstream unavailable",
    503: "Identity service unavailable",
    504: "Upstream timed out",
}

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>{status} {title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:36em;margin:4em auto;padding:0 1em;color:#222}}
h1{{font-size:1.4em}}p{{line-height:1.5}}code{{color:#555}}</style></head>
<body><h1>{status} {title}</h1><p>{reason}</p>{extra}<p><code>request id: {request_id}</code></p></body></html>
"""


def wants_html(accept: str | None) -> bool:
    return bool(accept) and "text/html" in accept.lower()  # type: ignore[union-attr]


_REASONS: dict[int, str] = {}


def _reason(status: int) -> str:
    reason = _REASONS.get(status)
    if reason is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        _REASONS[status] = reason
    return reason


def title_of(status: int) -> str:
    return _TITLES.get(status) or _reason(status) or "Error"


def error(
    status: int,
    reason: str,
    *,
    request_id: str,
    accept: str | None,
    headers: dict[str, str] | None = None,
    location: str | None = None,
) -> Answer:
    """An error answer. ``location`` (a sign-on URL) is given as a link and a header.
    Raises ``UnsafeHeaderValue`` for a header value that is not one clean line."""
    title = title_of(status)
    out_headers = {"X-Request-ID": request_id, "Cache-Control": "no-store", "Server": SERVER}
    if headers:
        out_headers.update(headers)
    if location:
        out_headers["Location"] = location
    if wants_html(accept):
        extra = ""
        if location:
            extra = f'<p><a href="{escape(location, quote=True)}">Continue to sign in</a></p>'
        body = _PAGE.format(
            status=status,
            title=escape(title),
            reason=escape(reason),
            extra=extra,
            request_id=escape(request_id),
        )
        return _answer(status, out_headers, "text/html; charset=utf-8", body.encode("utf-8"))
    doc: dict[str, object] = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": reason,
    }
    if location:
        doc["sign_on_url"] = location
    doc["request_id"] = request_id
    return _answer(status, out_headers, "application/problem+json", json.dumps(doc).encode("utf-8"))


def redirect(location: str, *, request_id: str, cookie: str | None = None) -> Answer:
    """302 to the identity service (or back from it); the body is a one-line link for clients
    that do not follow; ``cookie``: a ``Set-Cookie`` value. Raises ``UnsafeHeaderValue`` for a
    ``location`` that is not a URI."""
    headers = {
        "Location": location,
        "X-Request-ID": request_id,
        "Cache-Control": "no-store",
        "Server": SERVER,
    }
    if cookie is not None:
        headers["Set-Cookie"] = cookie
    body = f'<a href="{escape(location, quote=True)}">Continue</a>\n'
    return _answer(302, headers, "text/html; charset=utf-8", body.encode("utf-8"))
