"""The identityplus backend: asks the Identity Plus API about each certificate, over mutual TLS.

Owns the long-lived API session (this service's own "agent" certificate, reloaded when its
files change; optional server pins checked on every new connection), the inquiry and its
outcome table, the intents that send a browser to Identity Plus sign-on, and the
trust-community calls that trust reports make (bind, unbind, trust, intrusion report).
See ``/spec/identityplus.md`` for the protocol as the official clients speak it.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from ..certs import ClientCert, file_signature, sha256_fingerprint
from ..config import IdentityPlusConfig
from ..errors import CertificateError, IdentityUnavailable
from ..tls import load_chain, load_chain_files
from . import LookupContext, SignOnPurpose, Trust, User, Verdict
from .http import client_ssl_context, exchange_json, new_session
from .issuers import Issuers
from .report_values import CommunityReply


def _log() -> Any:
    # Looked up per event (they are rare): a logger cached at import would keep whatever
    # configuration was current on its first use, and escape structlog.testing.capture_logs.
    return structlog.get_logger(__name__)


SERVICE = "Identity Plus"

#: Verdict codes meaning "Identity Plus knows no such certificate": the handler answers 401,
#: or with ``can_enrol`` the enrolment redirect, like a request without a certificate.
NO_CERTIFICATE_CODES = frozenset({"PB 0000", "PB 0001"})

#: PB outcomes answered 403, with the plain reason shown to the visitor.
_DENY_REASONS = {
    "PB 0004": "the certificate has been revoked",
    "PB 0005": "the certificate has been reported as an intruder",
    "PB 0006": "the certificate is not recognised",
    "PB 0007": "the certificate has been tampered with",
    "PB 0008": "the certificate's authorization has expired",
}
_VALIDATE_REASONS = {
    "PB 0002": "the certificate has expired and must be validated",
    "PB 0003": "the certificate must be validated",
}
_CREDENTIAL_CODES = frozenset(f"ER 110{i}" for i in range(7))
_CREDENTIAL_HINT = (
    "Identity Plus refused this service's own API certificate (identity.identityplus."
    "certificate, or p12): it is missing, unknown, expired, revoked, suspended, or the "
    "account is over its plan. Renew or replace the certificate, or check the account."
)
_CREDENTIAL_LOG_EVERY = 60.0
_OUTCOME = re.compile(r"^(OK|PB|ER) \d{4}$")
#: "General Identity Plus API Problem" (the Java client's Outcome): transient, for a report
GENERAL_PROBLEM = "ER 1106"
#: the envelopes a trust-community call is answered in
_COMMUNITY_ENVELOPES = ("Simple-Response", "Reference-Number", "Identity-Profile")
_SERIAL = re.compile(r"0[xX][0-9A-Fa-f]{1,40}|[0-9]{1,49}")


class IdentityPlusBackend:
    """Verdicts from the Identity Plus API; ``credential_problem`` for readiness.

    Fails closed: anything but a well-formed reply with a known outcome raises
    ``IdentityUnavailable``; with ``issuers`` configured, a certificate none of them signed is
    refused without a call (Identity Plus would answer for the serial, whoever issued it).
    ``reload_interval`` bounds how often the agent certificate's files are stat'ed (on a
    call, never in the background). The constructor raises
    ``CertificateError`` when the agent certificate cannot be used; the session itself is
    made on the first call, inside the running event loop.
    """

    name = "identityplus"

    def __init__(
        self,
        config: IdentityPlusConfig,
        *,
        reload_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self.can_enrol = config.enrol_missing
        self._roles = RoleTranslation(config.roles, remove_org_prefix=config.remove_org_prefix)
        self._issuers = Issuers(config.issuer_certificates()) if config.issuers else None
        #: set while Identity Plus refuses our own API certificate (ER 1100..ER 1106); the
        #: next well-formed non-ER answer clears it
        self.credential_problem: str | None = None
        self._credential_logged: tuple[str, float] | None = None
        self._clock = clock
        self._reload_interval = reload_interval
        self._files = _credential_files(config)
        self._signature = file_signature(self._files)
        self._next_check = clock() + reload_interval
        self._credentials = _load_credentials(config)
        self._channel: _Channel | None = None
        self._retired: set[_Channel] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def agent_sha256(self) -> str:
        """Fingerprint of the API certificate new connections present."""
        return self._credentials.sha256

    @property
    def agent_expiry(self) -> float:
        """When the API certificate new connections present expires (POSIX time), for a gauge."""
        return datetime.fromisoformat(self._credentials.not_after).timestamp()

    # ---- the calls ------------------------------------------------------------------------

    async def lookup(self, cert: ClientCert, context: LookupContext) -> Verdict:
        """The ``Identity-Inquiry`` for ``cert``'s serial, classified by the outcome table;
        a certificate from another issuer than ``issuers`` is refused without asking."""
        # A certificate known by its serial only (HTTP legacy) was presented to Identity
        # Plus itself at sign-on: there is no issuer here to check.
        if self._issuers is not None and cert.seen and not self._issuers.issued(cert):
            return Verdict.deny(f"the certificate was not issued by {SERVICE}", "foreign_issuer")
        inquiry: dict[str, str] = {"serial-number": self._serial_text(cert.serial)}
        if self._config.service:
            inquiry["service"] = self._config.service
        if self._config.send_ip_address and context.client_ip:
            inquiry["ip-address"] = context.client_ip
        reply = await self._call("GET", {"Identity-Inquiry": inquiry})
        envelope, code = self._outcome(reply)
        return _classify(envelope, code, cert, self._roles)

    async def sign_on(self, purpose: SignOnPurpose, return_url: str) -> str:
        """Register an intent and return the sign-on URL (``<signon_url>/<reference>``).

        ``validate`` for PB 0002/PB 0003; ``enrol`` asks for a new certificate (type
        ``request``): ``strict-massl``, the browser comes back with its certificate.
        ``legacy`` (type ``request``, not ``strict-massl``): Identity Plus does the mutual
        TLS itself and sends the browser back with ``identity-plus-intent=<reference>``
        (``resolve_intent``).
        """
        intent = {
            "type": "validate" if purpose == "validate" else "request",
            "return-url": return_url,
            "strict-massl": purpose != "legacy",
        }
        reply = await self._call("PUT", {"Intent": intent})
        if isinstance(reply, dict) and "Intent-Reference" not in reply:
            self._outcome(reply)  # an ER outcome raises with its code; others fail below
        reference = reply.get("Intent-Reference") if isinstance(reply, dict) else None
        value = reference.get("value") if isinstance(reference, dict) else None
        outcome = reference.get("outcome", "OK") if isinstance(reference, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise IdentityUnavailable(
                f"{SERVICE} answered an intent without a reference", code="malformed"
            )
        if not isinstance(outcome, str) or not outcome.strip().upper().startswith("OK"):
            raise IdentityUnavailable(
                f"{SERVICE} refused the intent ({str(outcome)[:7]})", code="malformed"
            )
        self._clear_credential_problem()
        return f"{self._config.signon_url}/{quote(value.strip(), safe='')}"

    async def resolve_intent(self, reference: str) -> tuple[int, Verdict] | None:
        """Who signed on with the intent ``reference`` (HTTP legacy): the ``Identity-Inquiry``
        with the reference as ``serial-number``. Returns the serial of the certificate the
        person presented to Identity Plus (the profile's ``authorizing-certificate``) and the
        verdict for it, or None when the reference does not resolve to an allowing profile
        that names that certificate.

        Fails closed: a profile without a usable ``authorizing-certificate`` is None, since
        nothing could be asked about again and a revocation would never be noticed. Raises
        ``IdentityUnavailable`` for ER outcomes and malformed replies, like ``lookup``."""
        inquiry: dict[str, str] = {"serial-number": reference}
        if self._config.service:
            inquiry["service"] = self._config.service
        reply = await self._call("GET", {"Identity-Inquiry": inquiry})
        envelope, code = self._outcome(reply)
        if code not in ("OK 0001", "OK 0002"):
            return None
        serial = _serial(envelope.get("authorizing-certificate"))
        if serial is None:
            _log().error(
                "identityplus.legacy_unresolvable",
                code=code,
                reason="the profile names no authorizing-certificate serial to check again",
            )
            return None
        subject = ClientCert.known_by_serial(serial)
        return serial, _classify(envelope, code, subject, self._roles)

    async def ping(self) -> None:
        """``PUT`` with an empty body (answered ``OK 0000``): does the API accept our certificate?

        Sets or clears ``credential_problem`` like any call; raises ``IdentityUnavailable``
        when the service fails. Readiness uses it so that a fixed credential is noticed
        without waiting for a visitor (an unready pod gets no visitors).
        """
        self._outcome(await self._call("PUT", None))

    async def close(self) -> None:
        """Close every session, the current one and any retired one still open."""
        self._closed = True
        channels = [*self._retired, *([self._channel] if self._channel else [])]
        self._channel = None
        self._retired.clear()
        for channel in channels:
            await channel.session.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # ---- trust-community calls (trust reports) -------------------------------------------

    async def bind(self, serial: int, local_user_name: str) -> CommunityReply:
        """Bind a site-local user to the certificate (later inquiries: ``OK 0002``)."""
        return await self._community(
            "PUT",
            {
                "Local-User-Information": {
                    "serial-number": self._serial_text(serial),
                    "local-user-name": local_user_name,
                }
            },
        )

    async def unbind(self, local_user_name: str) -> CommunityReply:
        """Unbind a site-local user (Identity Plus knows the binding by the name alone)."""
        return await self._community(
            "DELETE", {"Local-User-Reference": {"local-user-name": local_user_name}}
        )

    async def trust(
        self,
        serial: int,
        trust_type: str,
        *,
        tokens: int | None = None,
        local_user_name: str | None = None,
    ) -> CommunityReply:
        """Vouch for the certificate's owner (``Trust``; the bound name too when known)."""
        fields: dict[str, object] = {
            "serial-number": self._serial_text(serial),
            "trust-type": trust_type,
        }
        if tokens is not None:
            fields["tokens-of-trust"] = tokens
        if local_user_name is not None:
            fields["local-user-name"] = local_user_name
        return await self._community("PUT", {"Trust": fields})

    async def report_intrusion(
        self,
        serial: int,
        severity: str,
        *,
        message: str | None = None,
        ip_address: str | None = None,
        url: str | None = None,
    ) -> CommunityReply:
        """Report the certificate as an intruder; the reply carries a reference number."""
        fields: dict[str, object] = {
            "intruding-certificate-uid": self._serial_text(serial),
            "severity": severity,
        }
        if message is not None:
            fields["message"] = message
        if ip_address is not None:
            fields["intruder-ip-address"] = ip_address
        if url is not None:
            fields["intruded-url"] = url
        return await self._community("PUT", {"Intrusion-Report": fields})

    async def _community(self, method: str, document: dict[str, object]) -> CommunityReply:
        """One trust-community call and its outcome, ER outcomes included (the caller decides
        what they mean for its report), except this service's own credential problems
        (ER 1100..ER 1105), which are recorded and raised as for an inquiry. Raises
        ``IdentityUnavailable`` when the service fails or answers what is not understood."""
        reply = await self._call(method, document)
        if not isinstance(reply, dict):
            raise IdentityUnavailable(
                f"{SERVICE} answered JSON that is not an object", code="malformed"
            )
        envelope = next((reply[k] for k in _COMMUNITY_ENVELOPES if k in reply), None)
        if envelope is None and len(reply) == 1:
            envelope = next(iter(reply.values()))
        if not isinstance(envelope, dict):
            raise IdentityUnavailable(
                f"{SERVICE} answered without an envelope this client knows", code="malformed"
            )
        outcome = envelope.get("outcome")
        if not isinstance(outcome, str) or not _OUTCOME.match(outcome.strip()[:7].upper()):
            raise IdentityUnavailable(
                f"{SERVICE} answered without a recognised outcome", code="malformed"
            )
        code = outcome.strip()[:7].upper()
        message = envelope.get("message")
        text = (message if isinstance(message, str) else outcome.strip()[7:]).strip()[:200]
        if code in _CREDENTIAL_CODES and code != GENERAL_PROBLEM:
            self._refused(code, text)
        if not code.startswith("ER"):
            self._clear_credential_problem()
        value = envelope.get("value")
        reference = _text(value) if code.startswith("OK") else None
        return CommunityReply(code, text, reference[:100] if reference else None)

    def _serial_text(self, serial: int) -> str:
        return f"0x{serial:X}" if self._config.serial_format == "hex" else str(serial)

    async def _call(self, method: str, body: object) -> object:
        channel = self._acquire()
        try:
            return await exchange_json(
                channel.session, method, self._config.endpoint, body, service=SERVICE
            )
        finally:
            self._release(channel)

    # ---- outcomes -------------------------------------------------------------------------

    def _outcome(self, reply: object) -> tuple[Mapping[str, Any], str]:
        """(envelope, 7-character code) of a reply; raises for ER and malformed ones."""
        if not isinstance(reply, dict):
            raise IdentityUnavailable(
                f"{SERVICE} answered JSON that is not an object", code="malformed"
            )
        envelope = reply.get("Identity-Profile", reply.get("Simple-Response"))
        if envelope is None:
            raise IdentityUnavailable(
                f"{SERVICE} answered neither Identity-Profile nor Simple-Response", code="malformed"
            )
        if not isinstance(envelope, dict):
            raise IdentityUnavailable(
                f"{SERVICE} answered an envelope that is not an object", code="malformed"
            )
        outcome = envelope.get("outcome")
        if not isinstance(outcome, str) or not outcome.strip():
            raise IdentityUnavailable(f"{SERVICE} answered without an outcome", code="malformed")
        # Classify on the first 7 characters only; the words after them are not stable.
        code = outcome.strip()[:7].upper()
        if not _OUTCOME.match(code):
            raise IdentityUnavailable(
                f"{SERVICE} answered an unrecognised outcome", code="malformed"
            )
        if code.startswith("ER"):
            message = envelope.get("message")
            text = message if isinstance(message, str) else outcome.strip()[7:]
            self._refused(code, text.strip()[:200])
        self._clear_credential_problem()
        return envelope, code

    def _refused(self, code: str, message: str) -> None:
        """An ER outcome: log it (our credentials: loudly, once a minute) and raise."""
        if code in _CREDENTIAL_CODES:
            self.credential_problem = f"{code}: {message or 'API certificate refused'}"
            now = self._clock()
            last = self._credential_logged
            if last is None or last[0] != code or now - last[1] >= _CREDENTIAL_LOG_EVERY:
                self._credential_logged = (code, now)
                _log().error(
                    "identityplus.credential_problem",
                    code=code,
                    message=message,
                    hint=_CREDENTIAL_HINT,
                    agent_sha256=self.agent_sha256,
                )
            raise IdentityUnavailable(
                f"{SERVICE} refused this service's API certificate ({code})", code=code
            )
        _log().error("identityplus.request_refused", code=code, message=message)
        raise IdentityUnavailable(f"{SERVICE} refused the request ({code})", code=code)

    def _clear_credential_problem(self) -> None:
        if self.credential_problem is not None:
            _log().info("identityplus.credential_problem_cleared", previous=self.credential_problem)
            self.credential_problem = None
            self._credential_logged = None

    # ---- sessions and agent certificate reload ---------------------------------------------

    def _acquire(self) -> _Channel:
        if self._closed:
            raise IdentityUnavailable(f"the {SERVICE} backend is closed", code="closed")
        self._check_reload()
        channel = self._channel
        if channel is None:
            channel = _Channel(new_session(self._credentials.context, self._config.timeout))
            self._channel = channel
        channel.active += 1
        return channel

    def _release(self, channel: _Channel) -> None:
        channel.active -= 1
        if channel.retired and channel.active == 0:
            self._close_later(channel)

    def _close_later(self, channel: _Channel) -> None:
        self._retired.discard(channel)
        task = asyncio.get_running_loop().create_task(channel.session.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _check_reload(self) -> None:
        """Swap in new credentials when the agent certificate's files changed.

        Calls in flight finish on the old session, which is then closed; new calls use a new
        session. Files that cannot be used keep the old credentials (and are logged).
        """
        now = self._clock()
        if now < self._next_check:
            return
        self._next_check = now + self._reload_interval
        signature = file_signature(self._files)
        if signature == self._signature:
            return
        self._signature = signature
        try:
            credentials = _load_credentials(self._config)
        except CertificateError as exc:
            _log().error(
                "identityplus.agent_reload_failed",
                reason=str(exc),
                hint="keeping the previous API certificate until the files are fixed",
                agent_sha256=self.agent_sha256,
            )
            return
        previous = self._credentials
        self._credentials = credentials
        old = self._channel
        self._channel = None
        if old is not None:
            old.retired = True
            self._retired.add(old)
            if old.active == 0:
                self._close_later(old)
        _log().info(
            "identityplus.agent_reloaded",
            agent_sha256=credentials.sha256,
            previous_sha256=previous.sha256,
            not_after=credentials.not_after,
        )


@dataclass(eq=False)
class _Channel:
    """One session (one agent certificate) and the calls currently using it."""

    session: aiohttp.ClientSession
    active: int = 0
    retired: bool = False


def _classify(
    envelope: Mapping[str, Any],
    code: str,
    cert: ClientCert,
    roles: RoleTranslation | None = None,
) -> Verdict:
    """The outcome table (ER outcomes never get here: they raise)."""
    if code in ("OK 0001", "OK 0002"):
        return Verdict.allow(_user(envelope, cert, roles), code=code, trust=_trust(envelope))
    if code in NO_CERTIFICATE_CODES:
        return Verdict("unknown", "the identity service does not know this certificate", code)
    if code in _VALIDATE_REASONS:
        return Verdict("validate", _VALIDATE_REASONS[code], code)
    if code in _DENY_REASONS:
        return Verdict.deny(_DENY_REASONS[code], code=code)
    if code.startswith("PB"):
        # A problem code this client does not know: refuse rather than guess.
        return Verdict.deny("the identity service refused the certificate", code=code)
    raise IdentityUnavailable(
        f"{SERVICE} answered an unexpected outcome ({code})", code="malformed"
    )


def _user(
    profile: Mapping[str, Any], cert: ClientCert, translation: RoleTranslation | None = None
) -> User:
    """Identity-Profile fields → ``User``, with the certificate's serial and CN as fallbacks;
    the roles translated to local names (``identity.identityplus.roles``)."""
    reference = _text(profile.get("organizational-reference"))
    local_name = _text(profile.get("local-user-name"))
    serial = str(cert.serial)
    given = family = None
    name = _text(profile.get("organizational-name"))
    if name:
        first, _, rest = name.partition(" ")
        given, family = first or None, rest.strip() or None
    roles = profile.get("service-roles")
    if isinstance(roles, str):
        roles = [roles]
    names = tuple(r for r in (_text(x) for x in roles) if r) if isinstance(roles, list) else ()
    return User(
        sub=reference or local_name or serial,
        username=local_name or reference or cert.common_name or serial,
        given_name=given,
        family_name=family,
        email=_text(profile.get("organizational-email")),
        roles=translation.translate(names) if translation is not None else names,
    )


class RoleTranslation:
    """``identity.identityplus.roles`` and ``remove_org_prefix``, as the Identity Plus
    gateway's role translator: a role named in the table (in any case) becomes its local
    name(s); with ``remove_org_prefix``, an organisation role (``org. administrator``) that
    the table does not name is read without its prefix and then translated; any other role
    is kept as it is. The result has no duplicates, in the profile's order."""

    def __init__(self, table: Mapping[str, tuple[str, ...]], *, remove_org_prefix: bool) -> None:
        self._table = {canonical.lower(): local for canonical, local in table.items()}
        self._remove_org_prefix = remove_org_prefix

    def translate(self, roles: tuple[str, ...]) -> tuple[str, ...]:
        if not self._table and not self._remove_org_prefix:
            return roles
        out: list[str] = []
        for role in roles:
            local = self._table.get(role.lower())
            if local is None and self._remove_org_prefix:
                match = _ORG_PREFIX.match(role)
                if match is not None and match.end() < len(role):
                    role = role[match.end() :]
                    local = self._table.get(role.lower())
            out.extend(local if local is not None else (role,))
        return tuple(dict.fromkeys(out))


_ORG_PREFIX = re.compile(r"org\.\s*", re.IGNORECASE)
#: the trust-score scale (spec/identityplus.md: a decimal up to 5)
_MAX_SCORE = Decimal(5)


def _trust(profile: Mapping[str, Any]) -> Trust:
    """``trust-score`` and ``local-intrusions`` for route policy. A score is a decimal from 0
    to 5 (not an integer, as the Go gateway reads it): a JSON number or a numeric string,
    read as written (3.7 stays 3.7, no binary fraction). Anything else (true, NaN, out of
    range, not a number) is unknown, and a route that asks for a score refuses it."""
    return Trust(score=_score(profile.get("trust-score")), local_intrusions=_count(profile))


def _score(value: object) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        text = repr(value)
    elif isinstance(value, int | str):
        text = str(value).strip()
    else:
        return None
    try:
        score = Decimal(text)
    except InvalidOperation:
        return None
    if not score.is_finite() or score < 0 or score > _MAX_SCORE:
        return None
    return score


def _count(profile: Mapping[str, Any]) -> int | None:
    value = profile.get("local-intrusions")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value.strip())
    return None


def _serial(value: object) -> int | None:
    """A certificate serial as the service writes one: a decimal or ``0x`` hex string (or a
    JSON integer), positive and at most 20 bytes (RFC 5280); anything else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        serial = value
    elif isinstance(value, str) and _SERIAL.fullmatch(value.strip()):
        text = value.strip()
        serial = int(text[2:], 16) if text[:2].lower() == "0x" else int(text, 10)
    else:
        return None
    return serial if 0 < serial < 1 << 160 else None


def _text(value: object) -> str | None:
    """A profile field as text: strings stripped, integers written out, anything else None."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


# ---- agent credentials --------------------------------------------------------------------


@dataclass(frozen=True)
class _Credentials:
    context: ssl.SSLContext
    sha256: str
    not_after: str


def _credential_files(config: IdentityPlusConfig) -> tuple[Path, ...]:
    files = (config.certificate, config.key, config.p12, config.p12_password_file)
    return tuple(f for f in files if f is not None)


def _load_credentials(config: IdentityPlusConfig) -> _Credentials:
    """A client ``SSLContext`` presenting the agent certificate; raises ``CertificateError``."""
    try:
        context = client_ssl_context(ca=config.ca)
        if config.p12 is not None:
            leaf = _load_p12(context, config.p12, config.p12_password_file)
        elif config.certificate is not None and config.key is not None:
            leaf = load_chain_files(context, config.certificate, config.key)
        else:
            raise CertificateError("no API certificate is configured")
    except ssl.SSLError as exc:
        raise CertificateError(
            f"the API certificate and key cannot be used: {exc.reason or exc}"
        ) from None
    except OSError as exc:
        raise CertificateError(f"cannot read the API certificate: {exc.strerror or exc}") from None
    if config.server_pins:
        context.sslobject_class = _pinned_ssl_object(frozenset(config.server_pins))
    return _Credentials(
        context,
        sha256_fingerprint(leaf.public_bytes(serialization.Encoding.DER)),
        leaf.not_valid_after_utc.isoformat(),
    )


def _load_p12(context: ssl.SSLContext, path: Path, password_file: Path | None) -> x509.Certificate:
    password = password_file.read_bytes().rstrip(b"\r\n") if password_file else b""
    try:
        key, leaf, chain = pkcs12.load_key_and_certificates(path.read_bytes(), password or None)
    except ValueError:
        raise CertificateError(f"cannot open {path}: not PKCS#12, or the wrong password") from None
    if key is None or leaf is None:
        raise CertificateError(f"{path} must hold the certificate and its private key")
    load_chain(context, [leaf, *chain], key)
    return leaf


# ---- server pins --------------------------------------------------------------------------


class PinMismatchError(ssl.SSLCertVerificationError):
    """The server's certificate matches none of ``server_pins``."""


def _pinned_ssl_object(pins: frozenset[str]) -> type[ssl.SSLObject]:
    """An ``SSLObject`` class that, after a verified handshake, also requires a pin to match.

    Set as the context's ``sslobject_class``: asyncio (and uvloop) make every TLS
    connection through ``wrap_bio``, so each new connection is checked once, before any
    request is written on it. Failing here fails the connection as a certificate error.
    """

    class PinnedSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()
            der = self.getpeercert(binary_form=True)
            if der is None or not _pin_matches(der, pins):
                raise PinMismatchError(
                    1, "the server certificate matches none of identity.identityplus.server_pins"
                )

    return PinnedSSLObject


def _pin_matches(der: bytes, pins: frozenset[str]) -> bool:
    if hashlib.sha256(der).hexdigest() in pins:
        return True
    spki = (
        x509.load_der_x509_certificate(der)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return hashlib.sha256(spki).hexdigest() in pins
