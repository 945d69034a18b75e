"""The http backend: an in-house identity service answers one JSON POST per certificate.

Also home to the two pieces every HTTPS backend needs: the client ``SSLContext`` built from
configuration, and ``exchange_json``, which makes one JSON call and turns every aiohttp, ssl
and JSON failure into ``IdentityUnavailable`` with a plain reason.

The exchange
------------

For each certificate the cache does not know, the sidecar sends::

    POST <identity.http.url>
    Content-Type: application/json

    {
      "certificate": "<standard base64 of the certificate's DER>",
      "sha256": "<SHA-256 of the DER, 64 lowercase hex digits>",
      "serial": "<serial number, decimal>",
      "serial_hex": "<serial number, uppercase hex, no 0x>",
      "subject": "<subject, RFC 4514>",
      "issuer": "<issuer, RFC 4514>",
      "client_ip": "<the visitor's address>" | null
    }

over HTTPS with the configured ``ca`` (system store otherwise) and, when ``certificate`` and
``key`` are set, the sidecar's own client certificate (mutual TLS). The service answers HTTP
200 with one JSON object::

    {
      "verdict": "allow" | "deny" | "validate" | "unknown",
      "user": {                             # required for allow, ignored otherwise
        "sub": "<non-empty>", "username": "<non-empty>",
        "given_name": "...", "family_name": "...", "email": "...",   # optional
        "roles": ["...", ...]                                        # optional, default []
      },
      "reason": "<plain words the visitor may see>",  # optional; deny and validate
      "redirect": "<absolute http(s) URL>",           # validate: where the browser is sent;
                                                      #   visible ASCII only (percent-encoded)
      "ttl": <seconds>                                # optional: cache this answer at most so long
    }

Unknown keys are ignored; known keys must have exactly these types (``ttl`` a non-negative
number). ``allow`` → the request goes on with the user in ``X-USERINFO``; ``deny`` → 403
(the answer is cached for ``cache.negative_ttl`` at most); ``unknown`` → the service has
never seen this certificate: treated like no certificate (401, or with ``enrol_missing`` the
enrolment redirect; cached like a refusal); ``validate`` → 302 to
``redirect`` as given (include your own way back in it), never cached. A ``validate``
without ``redirect`` is accepted only when ``signon_url`` is configured, in which case the
browser goes to ``<signon_url>?purpose=validate&return_url=<the original URL>``; with
``enrol_missing`` a request without any certificate goes to ``...?purpose=enrol&...``.

Anything else (another status, a redirect, a body that is not JSON or not that object or
larger than 1 MiB, an ``allow`` without a valid user, a timeout, a refused connection or TLS
handshake) makes the sidecar answer 503 with ``Retry-After`` (fail closed), unless
``cache.stale_if_error`` lets it reuse a recently expired allowing verdict.
"""

from __future__ import annotations

import json
import re
import ssl
from pathlib import Path
from typing import Literal
from urllib.parse import urlencode

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..certs import ClientCert, read_certificates, to_pem
from ..config import HttpBackendConfig
from ..errors import CertificateError, IdentityUnavailable
from ..tls import load_chain_files
from . import LookupContext, SignOnPurpose, User, Verdict

# identity: a compressed reply would be inflated before its size could be bounded.
_JSON_HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json",
    "Accept-Encoding": "identity",
}
_MAX_REASON = 200
#: a URI as it may be sent in a header: visible ASCII (RFC 3986)
_URI = re.compile(r"[\x21-\x7e]+")
#: the largest reply body read from an identity service; a verdict is a few hundred bytes
MAX_REPLY_BYTES = 1024 * 1024


# ---- shared by the HTTPS backends ---------------------------------------------------------


def client_ssl_context(
    *, ca: Path | None, certificate: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """Verify the server against the system store plus ``ca``; present ``certificate``/``key``.

    Verification is always on. Files may be PEM or DER, like every certificate file. Raises
    ``CertificateError`` for unreadable files, ``ssl.SSLError`` when OpenSSL refuses them.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca is not None:
        context.load_verify_locations(cadata=to_pem(read_certificates(ca)))
    if certificate is not None:
        if key is None:
            raise CertificateError(f"{certificate}: a client certificate needs its key")
        load_chain_files(context, certificate, key)
    return context


def new_session(context: ssl.SSLContext, timeout: float) -> aiohttp.ClientSession:
    """A keep-alive session for one service: one ``SSLContext``, ``timeout`` for a whole call."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=context, limit=100, keepalive_timeout=60.0),
        timeout=aiohttp.ClientTimeout(total=timeout),
        raise_for_status=False,
        trust_env=False,
        # Bodies are read as sent, so that their size is the size held (see exchange_json).
        auto_decompress=False,
    )


async def exchange_json(
    session: aiohttp.ClientSession, method: str, url: str, body: object, *, service: str
) -> object:
    """Send ``body`` as JSON, return the parsed JSON reply of an HTTP 200.

    Raises ``IdentityUnavailable`` (with a plain reason naming ``service``, and a short
    ``code`` fit for a metrics label) for any other status, a non-JSON body, a timeout, a
    refused or reset connection, or a failed TLS handshake. Fails closed on two more: a
    redirect is never followed (it could lead to plain HTTP, past the TLS verification and
    ``server_pins`` of this call) but is a failing status, and a body larger than
    ``MAX_REPLY_BYTES`` is read no further (``too-large``): the connection is dropped.
    """
    try:
        async with session.request(
            method, url, json=body, headers=_JSON_HEADERS, allow_redirects=False
        ) as response:
            status = response.status
            if status == 200:
                raw = await _read_bounded(response)
            else:
                raw = b""
                _abandon(response)  # its body is of no use; nor is waiting for it
    except TimeoutError:
        limit = session.timeout.total
        within = f"within {limit:g} s" if limit else "in time"
        raise IdentityUnavailable(f"{service} did not answer {within}", code="timeout") from None
    except aiohttp.ClientConnectorCertificateError as exc:
        raise IdentityUnavailable(
            f"the TLS certificate of {service} was refused: {exc.certificate_error}", code="tls"
        ) from None
    except aiohttp.ClientSSLError as exc:
        raise IdentityUnavailable(
            f"the TLS handshake with {service} failed: {exc}", code="tls"
        ) from None
    except aiohttp.ClientConnectorError as exc:
        raise IdentityUnavailable(
            f"cannot connect to {service}: {exc.strerror or exc}", code="connect"
        ) from None
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError):
        raise IdentityUnavailable(f"the connection to {service} was reset", code="reset") from None
    except aiohttp.ClientError as exc:
        raise IdentityUnavailable(
            f"the call to {service} failed ({type(exc).__name__})", code="protocol"
        ) from None
    if raw is None:
        raise IdentityUnavailable(
            f"{service} answered with a body larger than {MAX_REPLY_BYTES} bytes",
            code="too-large",
        )
    if status != 200:
        what = " (a redirect, not followed)" if 300 <= status < 400 else ""
        raise IdentityUnavailable(f"{service} answered HTTP {status}{what}", code="http-status")
    try:
        return json.loads(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        raise IdentityUnavailable(
            f"{service} answered with a body that is not JSON", code="malformed"
        ) from None


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes | None:
    """The whole body, or None (and the connection aborted) once it passes ``MAX_REPLY_BYTES``."""
    length = response.content_length
    if length is not None and length > MAX_REPLY_BYTES:
        _abandon(response)
        return None
    body = bytearray()
    while chunk := await response.content.readany():
        body += chunk
        if len(body) > MAX_REPLY_BYTES:
            _abandon(response)
            return None
    return bytes(body)


def _abandon(response: aiohttp.ClientResponse) -> None:
    """Drop the connection at once. Closing it would wait for the TLS shutdown, reading (and
    discarding) whatever the service still sends for as long as it sends."""
    connection = response.connection
    transport = connection.transport if connection is not None else None
    if transport is not None:
        transport.abort()
    response.close()


# ---- the reply -----------------------------------------------------------------------------


class _UserReply(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    sub: str = Field(min_length=1)
    username: str = Field(min_length=1)
    given_name: str | None = None
    family_name: str | None = None
    email: str | None = None
    roles: list[str] = Field(default_factory=list)


class _Reply(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    verdict: Literal["allow", "deny", "validate", "unknown"]
    user: _UserReply | None = None
    reason: str | None = None
    redirect: str | None = None
    ttl: float | None = Field(default=None, ge=0)

    @field_validator("redirect")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        if v is not None and not (v.startswith(("https://", "http://")) and len(v) > 8):
            raise ValueError("must be an absolute http(s) URL")
        # It becomes the Location header: a CR or LF would add lines to the visitor's answer.
        if v is not None and _URI.fullmatch(v) is None:
            raise ValueError(
                "must be visible ASCII characters only (percent-encode spaces, controls and "
                "other characters)"
            )
        return v


def _problems(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False)[:3]:
        where = ".".join(str(p) for p in error["loc"]) or "reply"
        message = str(error["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


# ---- the backend ---------------------------------------------------------------------------


class HttpBackend:
    """Asks an in-house identity service; see the module docstring for the exchange.

    Fails closed: a reply that is not exactly understood raises ``IdentityUnavailable``.
    """

    name = "http"

    def __init__(self, config: HttpBackendConfig) -> None:
        self._config = config
        self.can_enrol = config.enrol_missing
        self._ssl = client_ssl_context(ca=config.ca, certificate=config.certificate, key=config.key)
        self._session: aiohttp.ClientSession | None = None
        self._service = "the identity service"

    def _get_session(self) -> aiohttp.ClientSession:
        # Made on first use, inside the running event loop (aiohttp wants one).
        if self._session is None:
            self._session = new_session(self._ssl, self._config.timeout)
        return self._session

    async def lookup(self, cert: ClientCert, context: LookupContext) -> Verdict:
        body = {
            "certificate": cert.b64,
            "sha256": cert.sha256,
            "serial": str(cert.serial),
            "serial_hex": cert.serial_hex,
            "subject": cert.subject,
            "issuer": cert.issuer,
            "client_ip": context.client_ip,
        }
        reply = await exchange_json(
            self._get_session(), "POST", self._config.url, body, service=self._service
        )
        return self._verdict(reply)

    def _verdict(self, document: object) -> Verdict:
        if not isinstance(document, dict):
            raise IdentityUnavailable(
                f"{self._service} answered JSON that is not an object", code="malformed"
            )
        try:
            reply = _Reply.model_validate(document)
        except ValidationError as exc:
            raise IdentityUnavailable(
                f"{self._service} answered an invalid reply: {_problems(exc)}", code="malformed"
            ) from None
        reason = (reply.reason or "").strip()[:_MAX_REASON]
        if reply.verdict == "allow":
            if reply.user is None:
                raise IdentityUnavailable(
                    f"{self._service} answered allow without a user", code="malformed"
                )
            u = reply.user
            user = User(
                sub=u.sub,
                username=u.username,
                given_name=u.given_name or None,
                family_name=u.family_name or None,
                email=u.email or None,
                roles=tuple(u.roles),
            )
            return Verdict.allow(user, code="allow", ttl=reply.ttl)
        if reply.verdict == "deny":
            return Verdict.deny(
                reason or "refused by the identity service", code="deny", ttl=reply.ttl
            )
        if reply.verdict == "unknown":
            return Verdict(
                "unknown",
                reason or "the identity service does not know this certificate",
                "unknown",
                ttl=reply.ttl,
            )
        if reply.redirect is None and self._config.signon_url is None:
            raise IdentityUnavailable(
                f"{self._service} answered validate without a redirect, and no signon_url "
                "is configured",
                code="malformed",
            )
        return Verdict(
            "validate",
            reason or "the certificate needs validation",
            "validate",
            redirect=reply.redirect,
        )

    async def sign_on(self, purpose: SignOnPurpose, return_url: str) -> str:
        """``<signon_url>?purpose=validate|enrol&return_url=<url>``; needs ``signon_url``."""
        if self._config.signon_url is None:
            raise IdentityUnavailable("no signon_url is configured for the http identity backend")
        separator = "&" if "?" in self._config.signon_url else "?"
        query = urlencode({"purpose": purpose, "return_url": return_url})
        return f"{self._config.signon_url}{separator}{query}"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
