"""OCSP for client certificates (RFC 6960): the request, the verified answer, the cache.

``request`` builds a request with ``cryptography``'s builder (SHA-1 certificate IDs, as RFC
5019 asks of every client, and a nonce); ``read_answer`` parses a response with its parser and
accepts it only when:

- its status is ``successful`` and it holds an answer for exactly this certificate (serial,
  issuer name hash and issuer key hash, in the hash algorithm the responder chose);
- it is signed by the certificate's CA itself, or by a delegated responder whose certificate
  the CA issued directly, that has the OCSP-signing extended key usage and is valid now, and
  that the response names (by name or key hash) as its responder;
- a nonce, if the responder echoes one, is ours (a replayed answer is not);
- its thisUpdate is not in the future and its nextUpdate not in the past (5 minutes' leeway
  for clocks).

Anything else raises ``OCSPError``: the answer is not used, and the responder counts as
unable to answer. ``OCSPClient`` asks, one request per certificate at a time (single-flight),
bounded by ``tls.ocsp_timeout``, and keeps answers until their nextUpdate, at most
``tls.ocsp_max_age`` (five minutes when the responder gives none), in a bounded cache. An
answer is asked for again in the background once 80 % of its time has passed. A failure is
remembered for ``FAILURE_HOLD`` seconds: meanwhile the certificate is not asked about again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, SignatureAlgorithmOID

from ..log import get_logger
from .fetch import FetchError, Transport, Transports

log = get_logger("sidecar.revocation")

#: clock differences tolerated between the responder and us
LEEWAY = 300.0
#: how long a failure to get an answer is remembered (the certificate is not asked about again)
FAILURE_HOLD = 5.0
#: an answer without nextUpdate ("newer information is always available") is kept this long
_NO_NEXT_UPDATE = 300.0
_REFRESH_SHARE = 0.8
#: the largest response read (a response with a few certificates is a few KiB)
MAX_RESPONSE = 64 * 1024
#: answers kept; least recently used dropped beyond
MAX_ENTRIES = 65536


class OCSPError(FetchError):
    """A response that cannot be used; ``kind`` as ``FetchError``'s, or ``bad-signature``,
    ``malformed``, ``error-status``, ``no-answer``, ``stale``, ``replayed``, ``no-responder``,
    ``no-issuer``."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A verified OCSP answer about one certificate."""

    status: str  # good | revoked | unknown
    this_update: float
    #: when it stops being used: its nextUpdate, bounded by ocsp_max_age
    expires: float
    #: when it is asked for again in the background
    refresh_at: float
    revoked_at: float | None = None
    reason: str | None = None


def request(cert: x509.Certificate, issuer: x509.Certificate, nonce: bytes) -> bytes:
    builder = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(cert, issuer, hashes.SHA1())  # noqa: S303 - RFC 5019 §2.1.1
        .add_extension(x509.OCSPNonce(nonce), critical=False)
    )
    return builder.build().public_bytes(serialization.Encoding.DER)


def read_answer(
    der: bytes,
    cert: x509.Certificate,
    issuer: x509.Certificate,
    nonce: bytes | None,
    *,
    now: float,
    max_age: float,
) -> Answer:
    """Verify a response (see the module's docstring); raises ``OCSPError``."""
    try:
        response = ocsp.load_der_ocsp_response(der)
    except ValueError:
        raise OCSPError("malformed", "not a DER OCSP response") from None
    try:
        return _read(response, cert, issuer, nonce, now=now, max_age=max_age)
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion) as exc:
        # the parser reads parts lazily: a malformed part shows only when it is read
        raise OCSPError("malformed", f"unreadable response: {exc}") from None


def _read(
    response: ocsp.OCSPResponse,
    cert: x509.Certificate,
    issuer: x509.Certificate,
    nonce: bytes | None,
    *,
    now: float,
    max_age: float,
) -> Answer:
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise OCSPError("error-status", f"the responder answered {response.response_status.name}")
    try:
        signer = _signer(response, issuer, now)
        single = _single(response, cert, issuer)
        extensions = list(response.extensions)
    except ValueError as exc:
        raise OCSPError("malformed", f"unreadable response: {exc}") from None
    _check_signature(response, signer)
    for ext in extensions:
        if isinstance(ext.value, x509.OCSPNonce) and nonce is not None and ext.value.nonce != nonce:
            raise OCSPError("replayed", "the response's nonce is not the request's")
    this_update = single.this_update_utc.timestamp()
    if this_update > now + LEEWAY:
        raise OCSPError("stale", "the response's thisUpdate is in the future")
    next_update = _ts(single.next_update_utc)
    if next_update is not None and next_update < now - LEEWAY:
        raise OCSPError("stale", "the response's nextUpdate has passed")
    until = min(now + max_age, next_update if next_update is not None else now + _NO_NEXT_UPDATE)
    until = max(until, now)
    refresh_at = now + _REFRESH_SHARE * (until - now)
    status = single.certificate_status
    if status == ocsp.OCSPCertStatus.REVOKED:
        reason = single.revocation_reason
        return Answer(
            "revoked",
            this_update,
            # a revocation is for good (a certificateHold may be lifted: asked again later)
            until,
            refresh_at,
            _ts(single.revocation_time_utc),
            reason.name if reason is not None else None,
        )
    return Answer(
        "good" if status == ocsp.OCSPCertStatus.GOOD else "unknown", this_update, until, refresh_at
    )


def _ts(moment: datetime | None) -> float | None:
    return moment.timestamp() if moment is not None else None


def _signer(response: ocsp.OCSPResponse, issuer: x509.Certificate, now: float) -> x509.Certificate:
    """The certificate whose key must have signed ``response``: the CA, or a delegated
    responder it authorised (RFC 6960 §4.2.2.2)."""
    if _names(response, issuer):
        return issuer
    for candidate in response.certificates:
        if not _names(response, candidate):
            continue
        try:
            candidate.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            raise OCSPError(
                "bad-signature", "the responder's certificate was not issued by the CA"
            ) from None
        try:
            usages = candidate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            usages = None
        if usages is None or ExtendedKeyUsageOID.OCSP_SIGNING not in list(usages):
            raise OCSPError(
                "bad-signature", "the responder's certificate lacks the OCSP-signing key usage"
            )
        start = candidate.not_valid_before_utc.timestamp()
        end = candidate.not_valid_after_utc.timestamp()
        if not start - LEEWAY <= now <= end + LEEWAY:
            raise OCSPError("bad-signature", "the responder's certificate is not valid now")
        return candidate
    raise OCSPError(
        "bad-signature", "signed by neither the CA nor a responder certificate the CA issued"
    )


def _names(response: ocsp.OCSPResponse, cert: x509.Certificate) -> bool:
    """The response's responder ID (by name, or by the SHA-1 of the key) is ``cert``."""
    if response.responder_name is not None:
        return response.responder_name == cert.subject
    key_hash = response.responder_key_hash
    try:
        digest = x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return key_hash is not None and key_hash == digest


def _check_signature(response: ocsp.OCSPResponse, signer: x509.Certificate) -> None:
    key = signer.public_key()
    data, signature = response.tbs_response_bytes, response.signature
    algorithm = response.signature_hash_algorithm
    try:
        if isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
            if response.signature_algorithm_oid == SignatureAlgorithmOID.RSASSA_PSS:
                pad: padding.AsymmetricPadding = padding.PSS(
                    padding.MGF1(algorithm), padding.PSS.AUTO
                )
            else:
                pad = padding.PKCS1v15()
            key.verify(signature, data, pad, algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
            key.verify(signature, data, ec.ECDSA(algorithm))
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(signature, data)
        else:
            raise OCSPError("bad-signature", f"an unsupported signature ({type(key).__name__})")
    except InvalidSignature:
        raise OCSPError("bad-signature", "the response's signature does not verify") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise OCSPError("bad-signature", f"the signature cannot be checked: {exc}") from None


def _single(
    response: ocsp.OCSPResponse, cert: x509.Certificate, issuer: x509.Certificate
) -> ocsp.OCSPSingleResponse:
    """The answer about ``cert``: same serial, and the issuer's name and key hashed with the
    algorithm the responder used (computed by the request builder, not by hand)."""
    for single in response.responses:
        if single.serial_number != cert.serial_number:
            continue
        try:
            expected = (
                ocsp.OCSPRequestBuilder()
                .add_certificate(cert, issuer, single.hash_algorithm)
                .build()
            )
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
        if (
            single.issuer_name_hash == expected.issuer_name_hash
            and single.issuer_key_hash == expected.issuer_key_hash
        ):
            return single
    raise OCSPError("no-answer", "the response holds no answer about this certificate")


# ---- asking, and remembering ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Failure:
    until: float
    reason: str


class OCSPClient:
    """Answers by certificate fingerprint (see the module's docstring)."""

    def __init__(
        self,
        *,
        timeout: float,
        max_age: float,
        transports: Transports,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.timeout = timeout
        self.max_age = max_age
        self._clock = clock
        self._answers: OrderedDict[str, Answer] = OrderedDict()
        self._failures: dict[str, Failure] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._transports = transports
        self._http: Transport | None = None
        #: exchanges by result: good, revoked, unknown, or the failure's kind
        self.results: dict[str, int] = {}
        #: told of each answer kept: (fingerprint, answer)
        self.answered: Callable[[str, Answer], None] = lambda sha256, answer: None

    def configure(self, *, timeout: float, max_age: float) -> None:
        if timeout != self.timeout and self._http is not None:
            http, self._http = self._http, None
            asyncio.get_running_loop().create_task(http.close())
        self.timeout, self.max_age = timeout, max_age

    def clear(self) -> None:
        """Forget every answer and failure (the trust anchors changed)."""
        self._answers.clear()
        self._failures.clear()

    def __len__(self) -> int:
        return len(self._answers)

    def answer(self, sha256: str, now: float) -> Answer | None:
        """The answer kept for a certificate, while it is to be used."""
        answer = self._answers.get(sha256)
        if answer is None:
            return None
        if now >= answer.expires:
            del self._answers[sha256]
            return None
        self._answers.move_to_end(sha256)
        return answer

    def failure(self, sha256: str, now: float) -> Failure | None:
        failure = self._failures.get(sha256)
        if failure is not None and now >= failure.until:
            del self._failures[sha256]
            return None
        return failure

    def fail(self, sha256: str, kind: str, reason: str) -> Failure:
        """Remember that no answer could be had (without asking: e.g. no responder known)."""
        self.results[kind] = self.results.get(kind, 0) + 1
        failure = self._failures[sha256] = Failure(self._clock() + FAILURE_HOLD, reason)
        if len(self._failures) > MAX_ENTRIES:
            self._failures.clear()
        return failure

    def asking(self, sha256: str) -> asyncio.Task[None] | None:
        return self._tasks.get(sha256)

    def ask(
        self, sha256: str, cert: x509.Certificate, issuer: x509.Certificate, url: str
    ) -> asyncio.Task[None]:
        """Start asking ``url`` about ``cert`` (once: a question in flight is shared)."""
        task = self._tasks.get(sha256)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._ask(sha256, cert, issuer, url), name="ocsp"
            )
            self._tasks[sha256] = task
        return task

    async def _ask(
        self, sha256: str, cert: x509.Certificate, issuer: x509.Certificate, url: str
    ) -> None:
        try:
            nonce = os.urandom(16)
            if self._http is None:
                self._http = self._transports(self.timeout)
            der = await self._http.exchange(
                "POST",
                url,
                limit=MAX_RESPONSE,
                body=request(cert, issuer, nonce),
                content_type="application/ocsp-request",
                accept="application/ocsp-response",
            )
            answer = read_answer(der, cert, issuer, nonce, now=self._clock(), max_age=self.max_age)
        except FetchError as exc:
            self.fail(sha256, exc.kind, exc.reason)
            log.warning(
                "ocsp_failed", responder=url, kind=exc.kind, reason=exc.reason, cert_sha256=sha256
            )
        except Exception as exc:  # a bug rather than the responder: fail closed all the same
            self.fail(sha256, "error", repr(exc))
            log.error("ocsp_failed", responder=url, kind="error", reason=repr(exc), exc_info=exc)
        else:
            self.results[answer.status] = self.results.get(answer.status, 0) + 1
            self._failures.pop(sha256, None)
            self._answers[sha256] = answer
            self._answers.move_to_end(sha256)
            while len(self._answers) > MAX_ENTRIES:
                self._answers.popitem(last=False)
            self.answered(sha256, answer)
        finally:
            self._tasks.pop(sha256, None)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._http is not None:
            with contextlib.suppress(Exception):
                await self._http.close()
            self._http = None
