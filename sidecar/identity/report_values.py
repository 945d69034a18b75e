"""What a trust report says, checked before anything is sent: the values of the application's
report headers and of the admin listener's JSON bodies (pure, no I/O).

The vocabularies are the Identity Plus clients' own. Trust types are the Java client's
``Object_Of_Trust`` and intrusion severities its ``Object_Of_Intrusion``
(``IdentityPlus/Integration-API-Client-Java``, ``src/identity/plus/api/``); that client
sends an enum as its name with ``_`` written as a space (``API_Object.json_build``), so
``email_validation`` goes on the wire as ``email validation``. Header values may spell the
words with spaces, dashes or underscores, in any case. ``tokens-of-trust`` is the PHP
client's ``Trust`` field (``IdentityPlus/Integration-WordPress``, ``Communication.php``);
the Java client clamps a bind's tokens to 10..2500 per call, and 2500 is the bound here.

Header grammar (RFC 9110 field values; parameters as in ``Content-Type``)::

    X-Identity-Bind: <local user name>
    X-Identity-Unbind: <local user name>
    X-Identity-Trust: <trust type>[; tokens=<1..2500>]
    X-Identity-Intrusion: <severity>[; message="<text>"]

Anything else is refused with the reason (``InvalidReport``): unknown words, unknown or
repeated parameters, a user name that is empty, too long, or holds characters that could
split, fold or disguise it (controls, format characters, ``;`` ``,`` ``"`` ``\\``), bytes
that are not UTF-8. A report is never sent half-understood.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

ReportKind = Literal["bind", "unbind", "trust", "intrusion"]
#: in the order of ``headers.REPORT_KINDS``, whose indexes ``Captured`` holds
KINDS: tuple[ReportKind, ...] = ("bind", "unbind", "trust", "intrusion")
#: report headers found in a response (``headers.response_fields``): (index, value as sent)
Captured = list[tuple[int, bytes]]

#: Object_Of_Trust, as sent
TRUST_TYPES = frozenset(
    {
        "random",
        "social",
        "transaction",
        "billing",
        "editorial",
        "email validation",
        "phone validation",
        "true identity",
        "true identity by proxy",
        "mfa",
        "community effort",
    }
)
#: Object_Of_Intrusion, as sent
SEVERITIES = frozenset(
    {
        "mistake",
        "policy violation",
        "intrusive",
        "fraud",
        "material damage",
        "inappropriate content",
        "false information",
        "harassment",
    }
)
MAX_USER_NAME = 200
MAX_MESSAGE = 500
MAX_TOKENS = 2500
#: header values longer than this are refused before they are parsed
MAX_VALUE = 2048

# Characters that would make a user name mean several names (list and parameter syntax of
# HTTP fields, a proxy folding two headers into one with ", ") or hide what it is.
_NAME_FORBIDDEN = frozenset(';,"\\')
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_WORD_SEPARATORS = re.compile(r"[\s_-]+")


class InvalidReport(ValueError):
    """A report that cannot be sent as given; the message says why."""


@dataclass(frozen=True, slots=True)
class ReportRequest:
    """One report, checked: what to tell Identity Plus (the certificate comes separately)."""

    kind: ReportKind
    #: bind and unbind: the site-local user name
    local_user_name: str | None = None
    #: trust: one of ``TRUST_TYPES``; ``tokens``: tokens of trust, when given
    trust_type: str | None = None
    tokens: int | None = None
    #: intrusion: one of ``SEVERITIES``, and the message for the certificate's owner
    severity: str | None = None
    message: str | None = None

    @property
    def subject(self) -> str:
        """What makes two reports about one certificate the same report (deduplication):
        an intrusion is reported once per certificate, whatever its wording."""
        if self.kind in ("bind", "unbind"):
            return self.local_user_name or ""
        if self.kind == "trust":
            return f"{self.trust_type}/{self.tokens}"
        return ""

    def fields(self) -> dict[str, object]:
        """For logs and the status page."""
        out: dict[str, object] = {}
        for key in ("local_user_name", "trust_type", "tokens", "severity", "message"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@dataclass(frozen=True, slots=True)
class CommunityReply:
    """What Identity Plus answered a trust-community call: the 7-character outcome code,
    its words, and the reference number when it gave one (an intrusion report)."""

    code: str
    message: str
    reference: str | None = None


# ---- response headers ---------------------------------------------------------------------


def from_headers(
    captured: Captured,
) -> tuple[list[ReportRequest], list[tuple[ReportKind, str]]]:
    """The reports in a response's report headers, in the order sent, and the refused ones
    (kind, reason). The same header twice with the same value is one report; twice with
    different values, none (which one would the application mean?)."""
    values: dict[int, list[bytes]] = {}
    order: list[int] = []
    for index, raw in captured:
        if index not in values:
            values[index] = []
            order.append(index)
        values[index].append(raw)
    reports: list[ReportRequest] = []
    refused: list[tuple[ReportKind, str]] = []
    for index in order:
        kind = KINDS[index]
        distinct = list(dict.fromkeys(values[index]))
        if len(distinct) > 1:
            refused.append((kind, f"{len(distinct)} different values for one report header"))
            continue
        try:
            reports.append(from_header(kind, distinct[0]))
        except InvalidReport as exc:
            refused.append((kind, str(exc)))
    return reports, refused


def from_header(kind: ReportKind, raw: bytes) -> ReportRequest:
    """One report header's value; raises ``InvalidReport``."""
    if len(raw) > MAX_VALUE:
        raise InvalidReport(f"the header value is longer than {MAX_VALUE} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidReport("the header value is not UTF-8") from None
    if kind in ("bind", "unbind"):
        return ReportRequest(kind, local_user_name=user_name(text))
    head, params = _parameters(text)
    if kind == "trust":
        _only(params, {"tokens"})
        tokens = params.get("tokens")
        return ReportRequest(
            kind,
            trust_type=trust_type(head),
            tokens=None if tokens is None else token_count(tokens),
        )
    _only(params, {"message"})
    message = params.get("message")
    return ReportRequest(
        kind,
        severity=severity(head),
        message=None if message is None else message_text(message),
    )


def _parameters(text: str) -> tuple[str, dict[str, str]]:
    """``word[; name=value]*``, values a token or a quoted-string (RFC 9110 5.6.6)."""
    head, sep, rest = text.partition(";")
    params: dict[str, str] = {}
    while sep:
        rest = rest.lstrip(" \t")
        match = _TOKEN.match(rest)
        if match is None:
            raise InvalidReport("a parameter without a name (expected name=value after ';')")
        name = match.group().lower()
        rest = rest[match.end() :].lstrip(" \t")
        if not rest.startswith("="):
            raise InvalidReport(f"the parameter {name!r} has no value")
        rest = rest[1:].lstrip(" \t")
        if rest.startswith('"'):
            value, rest = _quoted(rest)
        else:
            match = _TOKEN.match(rest)
            if match is None:
                raise InvalidReport(f"the parameter {name!r} has no value")
            value, rest = match.group(), rest[match.end() :]
        if name in params:
            raise InvalidReport(f"the parameter {name!r} is given twice")
        params[name] = value
        rest = rest.lstrip(" \t")
        if rest and not rest.startswith(";"):
            raise InvalidReport(f"unexpected text after the parameter {name!r}")
        sep, rest = rest[:1], rest[1:]
    return head.strip(" \t"), params


def _quoted(text: str) -> tuple[str, str]:
    """A quoted-string at the start of ``text``: its content, and what follows it."""
    out: list[str] = []
    i = 1
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
            continue
        if char == '"':
            return "".join(out), text[i + 1 :]
        out.append(char)
        i += 1
    raise InvalidReport("a quoted parameter value is not closed")


def _only(params: Mapping[str, str], allowed: set[str]) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise InvalidReport(f"unknown parameter {unknown[0]!r}")


# ---- the values, for headers and admin bodies alike -------------------------------------------


def user_name(value: object) -> str:
    """A site-local user name: 1..200 characters, none of them a control, format or separator
    character, a space other than U+0020 (a look-alike of another name), nor ``; , " \\``;
    surrounding white space dropped."""
    if not isinstance(value, str):
        raise InvalidReport("the local user name must be a string")
    name = value.strip()
    if not name:
        raise InvalidReport("the local user name is empty")
    if len(name) > MAX_USER_NAME:
        raise InvalidReport(f"the local user name is longer than {MAX_USER_NAME} characters")
    for char in name:
        if char in _NAME_FORBIDDEN:
            raise InvalidReport(f"the local user name holds {char!r}")
        if char != " " and unicodedata.category(char) == "Zs":
            raise InvalidReport(f"the local user name holds the space U+{ord(char):04X}")
    _printable(name, "the local user name")
    return name


def trust_type(value: object) -> str:
    """One of ``TRUST_TYPES``, spelt with spaces, dashes or underscores, in any case."""
    word = _word(value, "trust type")
    if word not in TRUST_TYPES:
        raise InvalidReport(
            f"unknown trust type {str(value)[:40]!r} (one of: {', '.join(sorted(TRUST_TYPES))})"
        )
    return word


def severity(value: object) -> str:
    """One of ``SEVERITIES``, spelt with spaces, dashes or underscores, in any case."""
    word = _word(value, "severity")
    if word not in SEVERITIES:
        raise InvalidReport(
            f"unknown severity {str(value)[:40]!r} (one of: {', '.join(sorted(SEVERITIES))})"
        )
    return word


def token_count(value: object) -> int:
    """Tokens of trust: an integer from 1 to ``MAX_TOKENS`` (digits only, in a header)."""
    if isinstance(value, str):
        if not value.isascii() or not value.isdigit() or len(value) > 6:
            raise InvalidReport(f"tokens must be a whole number from 1 to {MAX_TOKENS}")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOKENS:
        raise InvalidReport(f"tokens must be a whole number from 1 to {MAX_TOKENS}")
    return value


def message_text(value: object) -> str:
    """The message for the owner of an intruding certificate: 1..500 characters, no control
    or format characters."""
    if not isinstance(value, str):
        raise InvalidReport("the message must be a string")
    text = value.strip()
    if not text:
        raise InvalidReport("the message is empty")
    if len(text) > MAX_MESSAGE:
        raise InvalidReport(f"the message is longer than {MAX_MESSAGE} characters")
    _printable(text, "the message")
    return text


def _word(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidReport(f"no {what} given")
    if len(value) > 64:
        raise InvalidReport(f"the {what} is longer than 64 characters")
    return _WORD_SEPARATORS.sub(" ", value.strip().lower())


def _printable(text: str, what: str) -> None:
    for char in text:
        category = unicodedata.category(char)
        if category[0] == "C" or category in ("Zl", "Zp"):
            raise InvalidReport(f"{what} holds the character U+{ord(char):04X}")


# ---- admin bodies -------------------------------------------------------------------------

#: the keys each kind's JSON body may have besides the certificate's (``sha256``, ``serial``)
ADMIN_KEYS: dict[ReportKind, frozenset[str]] = {
    "bind": frozenset({"local_user_name"}),
    "unbind": frozenset({"local_user_name"}),
    "trust": frozenset({"trust_type", "tokens"}),
    "intrusion": frozenset({"severity", "message", "ip_address", "url"}),
}


def from_admin(kind: ReportKind, body: Mapping[str, object]) -> ReportRequest:
    """The report in an admin call's JSON body (the certificate aside); raises
    ``InvalidReport`` for a missing or unknown key or a bad value."""
    allowed = ADMIN_KEYS[kind] | {"sha256", "serial"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidReport(
            f"unknown key {unknown[0]!r} (a {kind} takes: {', '.join(sorted(allowed))})"
        )
    if kind in ("bind", "unbind"):
        if "local_user_name" not in body:
            raise InvalidReport("local_user_name is required")
        return ReportRequest(kind, local_user_name=user_name(body["local_user_name"]))
    if kind == "trust":
        if "trust_type" not in body:
            raise InvalidReport("trust_type is required")
        tokens = body.get("tokens")
        if isinstance(tokens, str):
            raise InvalidReport(f"tokens must be a number from 1 to {MAX_TOKENS}, not a string")
        return ReportRequest(
            kind,
            trust_type=trust_type(body["trust_type"]),
            tokens=None if tokens is None else token_count(tokens),
        )
    if "severity" not in body:
        raise InvalidReport("severity is required")
    message = body.get("message")
    return ReportRequest(
        kind,
        severity=severity(body["severity"]),
        message=None if message is None else message_text(message),
    )
