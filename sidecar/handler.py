"""The one request path: certificate → verdict → decision → forward or answer.

Every request runs ``Handler.__call__`` once, as plain calls in a fixed order; each step takes
values and returns a value. Status codes for the sidecar's own answers are chosen in
``_answer`` (policy outcomes come from ``policy.decide``). One log event and one metrics
update are made per request, in ``_finish``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from . import responses
from .certs import ClientCert
from .errors import IdentityUnavailable, UpstreamError
from .headers import HeaderRules, lines_to_multidict, request_fields
from .hosts import ServerNames
from .identity import LookupContext, SignOnPurpose, Verdict
from .identity.intents import SignOn, SignOnLimited
from .log import ACCESS_FIELDS, access_writer
from .metrics import Metrics
from .policy import (
    BadPath,
    Deny,
    Forward,
    Redirect,
    Route,
    RouteTable,
    Unavailable,
    decide,
)
from .revocation.gate import PENDING, Refusal, Revocation
from .server import last_on_connection
from .tls import requested_server_name
from .upstream import BodyTimeout, BodyTooLarge, Forwarded, UpstreamClient

# fullmatch: "$" alone would also match before a final newline
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?$")
# Host = uri-host [ ":" port ] (RFC 9110 7.2, RFC 3986 3.2.2): an IP literal, or a reg-name of
# unreserved characters, %-escapes and sub-delims (empty allowed), then digits for the port.
_HOST_FIELD = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?"
)
_SAFE_METHODS = frozenset({"GET", "HEAD"})
RETRY_AFTER_SECONDS = "5"


class Identity(Protocol):
    """What the handler needs of the identity side (the verdict cache)."""

    @property
    def name(self) -> str: ...

    @property
    def can_enrol(self) -> bool: ...

    def peek(self, cert: ClientCert) -> Verdict | None:
        """A fresh cached verdict without awaiting, or None."""
        ...

    async def lookup(self, cert: ClientCert, context: LookupContext) -> Verdict: ...

    async def sign_on(
        self, purpose: SignOnPurpose, return_url: str, client_ip: str | None
    ) -> SignOn: ...


class Request(Protocol):
    """What the handler reads of a request: aiohttp's ``BaseRequest`` or the listener's own."""

    @property
    def method(self) -> str: ...

    @property
    def raw_path(self) -> str:
        """The request target as sent (origin-, absolute- or asterisk-form)."""
        ...

    @property
    def path(self) -> str:
        """The target's path, %-decoded (for the log only)."""
        ...

    @property
    def headers(self) -> CIMultiDictProxy[str] | CIMultiDict[str]: ...

    @property
    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]: ...


#: sends the request upstream with the header lines given (from ``headers.request_fields``:
#: the lines, whether the client sent a Host, the request id) and the response to the client
Forward_ = Callable[[UpstreamClient, bytes, bool, str], Awaitable[Forwarded]]


class PeerSource(Protocol):
    """The connection side of a request: the peer's parsed certificate (once per connection)."""

    def peer_certificate(self) -> ClientCert | None: ...


@dataclass(slots=True)
class Outcome:
    """What happened to one request; the single input of the log event and the metrics."""

    status: int
    decision: str
    reason: str
    route: str
    user: str | None = None
    verdict_code: str | None = None
    upstream_seconds: float | None = None
    stale: bool = False


#: what is left of a request after ``Handler.begin`` (``Ticket.step``)
DONE, FORWARD, LOOKUP, SIGN_ON = range(4)


class Ticket:
    """One request from ``Handler.begin`` to ``Handler.end``: what is known so far."""

    __slots__ = (
        "block",
        "cert",
        "has_host",
        "outcome",
        "peer_ip",
        "plan",
        "redirect",
        "request",
        "request_id",
        "response",
        "route",
        "started",
        "step",
        "trusted",
        "verdict_code",
    )

    def __init__(
        self,
        request: Request,
        cert: ClientCert | None,
        peer_ip: str | None,
        request_id: str,
        started: float,
        plan: Plan,
        trusted: bool,
    ) -> None:
        self.request = request
        self.cert = cert
        self.peer_ip = peer_ip
        self.request_id = request_id
        self.started = started
        self.plan = plan
        self.trusted = trusted
        self.step = DONE
        self.route: Route | None = None
        self.verdict_code: str | None = None
        self.response: web.StreamResponse | None = None
        self.outcome: Outcome | None = None
        #: for FORWARD: the header lines and whether the client sent a Host
        self.block = b""
        self.has_host = False
        #: for SIGN_ON: the decision and the URL to come back to
        self.redirect: tuple[Redirect, str] | None = None

    @property
    def route_label(self) -> str:
        return self.route.path if self.route is not None else "-"

    def done(self, response: web.StreamResponse, outcome: Outcome) -> None:
        self.response = response
        self.outcome = outcome
        self.step = DONE


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything a reload can change, swapped in as one value: a request uses one plan."""

    routes: RouteTable
    identity: Identity
    upstream: UpstreamClient
    rules: HeaderRules
    max_header_block: int
    #: the names requests may address (Host, SNI); any other is 421
    server_names: ServerNames
    #: whether a certificate is refused now (long-lived: the same object in every plan)
    revocation: Revocation


class Handler:
    def __init__(
        self,
        plan: Plan,
        *,
        metrics: Metrics,
        logger: Any,
        access_log: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.plan = plan
        self.metrics = metrics
        self.log = logger
        #: False when the log level is above info: skip building an event nobody will see
        self.access_log = access_log
        #: the access event's own JSON writer, when the logs are JSON (else through structlog)
        self._access = access_writer() if access_log else None
        self.clock = clock

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        """aiohttp's entry point (the listener's fallback path, see ``listener``)."""
        response = await self.process(
            request,
            _peer_certificate(request),
            _peer_ip(request),
            _server_name(request),
            lambda upstream, block, _host, _rid: upstream.forward(
                request, lines_to_multidict(block)
            ),
        )
        assert response is not None  # aiohttp's forward always hands its response back
        if not response.prepared:  # our own answer (a forwarded one was prepared already)
            last_on_connection(request, response)
        return response

    async def process(
        self,
        request: Request,
        cert: ClientCert | None,
        peer_ip: str | None,
        server_name: str | None,
        forward: Forward_,
    ) -> web.StreamResponse | None:
        """Handle one request: the response to send, or None when ``forward`` sent one."""
        return await self.resume(self.begin(request, cert, peer_ip, server_name), forward)

    def begin(
        self,
        request: Request,
        cert: ClientCert | None,
        peer_ip: str | None,
        server_name: str | None,
    ) -> Ticket:
        """Everything about a request that needs no waiting. ``ticket.step`` then says what
        is left: ``DONE`` (``ticket.response`` is the answer), ``FORWARD`` (the request is to
        go upstream with ``ticket.block``), or a wait for the identity service. ``resume``
        does whatever is left; a caller that does it itself (``forwarded``) calls ``end``.
        ``server_name`` is the connection's TLS server name (SNI), None when it sent none."""
        plan = self.plan
        trusted = plan.rules.is_trusted_proxy(peer_ip)
        ticket = Ticket(
            request,
            cert,
            peer_ip,
            _request_id(request, trusted),
            time.perf_counter(),
            plan,
            trusted,
        )
        self.metrics.request_started()
        try:
            self._start(ticket, server_name)
        except Exception as exc:  # the last line of defence: answer 500, never a traceback
            self.fail(ticket, exc)
        return ticket

    async def resume(self, ticket: Ticket, forward: Forward_) -> web.StreamResponse | None:
        """Do what ``begin`` left (the verdict, the sign-on address, the upstream exchange
        through ``forward``), then ``end``: the response to send, or None when ``forward``
        sent one."""
        try:
            if ticket.step == LOOKUP:
                await self._look_up(ticket)
            if ticket.step == SIGN_ON:
                await self._sign_on(ticket)
            if ticket.step == FORWARD:
                try:
                    forwarded = await forward(
                        ticket.plan.upstream, ticket.block, ticket.has_host, ticket.request_id
                    )
                except (UpstreamError, BodyTooLarge, BodyTimeout) as exc:
                    self._forward_failed(ticket, exc)
                else:
                    self.forwarded(ticket, forwarded)
        except Exception as exc:  # the last line of defence: answer 500, never a traceback
            self.fail(ticket, exc)
        except BaseException:  # cancelled: no answer, and no access event
            self.metrics.request_finished()
            raise
        self.end(ticket)
        return ticket.response

    def forwarded(self, ticket: Ticket, forwarded: Forwarded) -> None:
        """The upstream's response went to the client (``FORWARD`` done)."""
        outcome = ticket.outcome
        assert outcome is not None
        outcome.status = forwarded.status
        outcome.upstream_seconds = forwarded.upstream_seconds
        self.metrics.observe_upstream(forwarded.upstream_seconds)
        ticket.response = forwarded.response
        ticket.step = DONE

    def fail(self, ticket: Ticket, exc: Exception) -> None:
        """An unexpected error: the answer is 500."""
        self.log.error(
            "request_failed", request_id=ticket.request_id, error=repr(exc), exc_info=exc
        )
        ticket.done(
            self._error(
                ticket.request,
                500,
                "The sidecar could not handle this request.",
                ticket.request_id,
            ),
            Outcome(500, "error", "internal error", "-"),
        )

    def end(self, ticket: Ticket) -> None:
        """The request is over: one metrics update and one access event."""
        self.metrics.request_finished()
        self._finish(ticket)

    # ---- the steps ------------------------------------------------------------------------

    def _start(self, ticket: Ticket, server_name: str | None) -> None:
        plan, request, cert = ticket.plan, ticket.request, ticket.cert
        problem = _malformed(request, plan, server_name)
        if problem is not None:
            self._deny(ticket, Deny(*problem))
            return
        try:
            route = plan.routes.match(request.raw_path)
        except BadPath as exc:
            self._deny(ticket, Deny(400, str(exc), "bad_path"))
            return
        ticket.route = route
        verdict: Verdict | None = None
        if cert is not None:
            now = self.clock()
            refusal = _certificate_refusal(cert, now)
            if refusal is not None:
                self._deny(ticket, Deny(403, refusal[0], refusal[1]))
                return
            # revocation: refused before any cached verdict is used (deny-list, CRLs, OCSP);
            # an answer still being fetched is waited for in _look_up (PENDING)
            revoked = plan.revocation.check(cert, now)
            if revoked is not None and revoked is not PENDING:
                self._revoked(ticket, revoked)
                return
            if route is not None:
                verdict = plan.identity.peek(cert) if revoked is None else None
                if verdict is None:
                    ticket.step = LOOKUP
                    return
        self._decide(ticket, verdict, backend_failed=False)

    async def _look_up(self, ticket: Ticket) -> None:
        """A verdict the cache could not give at once (timed and counted by outcome), then
        the decision on it."""
        identity, cert = ticket.plan.identity, ticket.cert
        assert cert is not None
        verdict: Verdict | None = None
        started = time.perf_counter()
        try:
            verdict = await identity.lookup(cert, LookupContext(client_ip=ticket.peer_ip))
        except IdentityUnavailable as exc:
            self.metrics.identity_lookups.labels(identity.name, exc.code or "unavailable").inc()
            self.log.warning(
                "identity_unavailable",
                request_id=ticket.request_id,
                reason=exc.reason,
                code=exc.code,
            )
        else:
            self.metrics.identity_lookups.labels(identity.name, verdict.code).inc()
        finally:
            self.metrics.identity_duration.labels(identity.name).observe(
                time.perf_counter() - started
            )
        # revocation: the last word before the verdict is used: the answer check() was
        # waiting for, and whatever was loaded while the identity service answered
        revoked = await ticket.plan.revocation.settle(cert)
        if revoked is not None:
            self._revoked(ticket, revoked)
            return
        self._decide(ticket, verdict, backend_failed=verdict is None)

    def _decide(self, ticket: Ticket, verdict: Verdict | None, *, backend_failed: bool) -> None:
        plan, cert = ticket.plan, ticket.cert
        decision = decide(
            ticket.route,
            verdict,
            has_certificate=cert is not None,
            backend_failed=backend_failed,
            enrol=plan.identity.can_enrol,
        )
        code = ticket.verdict_code = verdict.code if verdict is not None else None
        if isinstance(decision, Forward):
            user = decision.user
            ticket.block, ticket.has_host = request_fields(
                plan.rules,
                ticket.request.raw_headers,
                client_ip=ticket.peer_ip,
                trusted=ticket.trusted,
                request_id=ticket.request_id,
                user=user,
                certificate_b64=cert.b64 if (cert is not None and user is not None) else None,
            )
            ticket.outcome = Outcome(
                0,
                "forwarded",
                "allowed",
                ticket.route_label,
                user=user.sub if user else None,
                verdict_code=code,
                stale=bool(verdict and verdict.stale),
            )
            ticket.step = FORWARD
        elif isinstance(decision, Deny):
            self._deny(ticket, decision)
            assert ticket.outcome is not None
            ticket.outcome.verdict_code = code or decision.code
        elif isinstance(decision, Unavailable):
            self._unavailable(ticket, decision.reason)
        else:
            self._redirect(ticket, decision)

    def _forward_failed(
        self, ticket: Ticket, exc: UpstreamError | BodyTooLarge | BodyTimeout
    ) -> None:
        outcome = ticket.outcome
        assert outcome is not None
        if isinstance(exc, BodyTimeout):
            # nginx's client_body_timeout: 408, and the connection ends (what is left of the
            # body would be read as the next request)
            outcome.status, outcome.decision, outcome.reason = 408, "denied", "body_timeout"
            response = self._error(
                ticket.request,
                408,
                "The request body stopped arriving before it was complete.",
                ticket.request_id,
            )
            response.force_close()
            ticket.done(response, outcome)
            return
        if isinstance(exc, BodyTooLarge):
            outcome.status, outcome.decision, outcome.reason = 413, "denied", "body_too_large"
            ticket.done(
                self._error(
                    ticket.request,
                    413,
                    "The request body is larger than this service accepts.",
                    ticket.request_id,
                ),
                outcome,
            )
            return
        self.metrics.upstream_errors.labels(exc.kind).inc()
        status = 504 if exc.kind == "timeout" else 502
        reason = (
            "The application did not answer in time."
            if status == 504
            else "The application could not be reached."
        )
        outcome.status, outcome.decision, outcome.reason = status, "upstream_error", exc.kind
        ticket.done(self._error(ticket.request, status, reason, ticket.request_id), outcome)

    def _redirect(self, ticket: Ticket, decision: Redirect) -> None:
        return_url = _original_url(ticket.request)
        if return_url is None:
            self._deny(ticket, Deny(400, "the request's Host header is not valid", "bad_host"))
            return
        if decision.location is None:  # the backend makes one: a wait
            ticket.redirect = (decision, return_url)
            ticket.step = SIGN_ON
            return
        self._redirect_to(ticket, decision, decision.location)

    async def _sign_on(self, ticket: Ticket) -> None:
        """The sign-on URL from the identity side (an intent, perhaps one made earlier for the
        same URL): 429 when this address (or everyone) made too many, 503 when it fails."""
        assert ticket.redirect is not None
        decision, return_url = ticket.redirect
        counter = self.metrics.signon_intents
        try:
            signed = await ticket.plan.identity.sign_on(
                decision.purpose, return_url, ticket.peer_ip
            )
        # Two names: compiled, one name for both exceptions would be typed as the first.
        except SignOnLimited as limited:
            counter.labels("limited").inc()
            self._too_many(ticket, limited.retry_after)
            return
        except IdentityUnavailable as failure:
            counter.labels("failed").inc()
            self.log.warning(
                "sign_on_unavailable",
                request_id=ticket.request_id,
                reason=failure.reason,
                code=failure.code,
            )
            self._unavailable(ticket, "sign-on unavailable")
            return
        counter.labels("coalesced" if signed.coalesced else "registered").inc()
        self._redirect_to(ticket, decision, signed.location)

    def _redirect_to(self, ticket: Ticket, decision: Redirect, location: str) -> None:
        request, code = ticket.request, ticket.verdict_code
        if not responses.is_location(location):
            # A sign-on address from a backend (or its configuration) that is not a URI: a CR
            # or LF in it would add header lines to the visitor's answer. Failing, like any
            # reply not understood.
            self.log.error(
                "sign_on_unusable",
                request_id=ticket.request_id,
                purpose=decision.purpose,
                reason="the sign-on address has characters a Location header cannot carry",
            )
            self._unavailable(ticket, "sign-on address unusable")
            return
        if request.method in _SAFE_METHODS:
            outcome = Outcome(
                302, "redirected", decision.purpose, ticket.route_label, verdict_code=code
            )
            ticket.done(responses.redirect(location, request_id=ticket.request_id), outcome)
            return
        # Redirecting a POST would make the browser replay it as GET after sign-on: say 401.
        status = 401
        outcome = Outcome(
            status, "redirected", decision.purpose, ticket.route_label, verdict_code=code
        )
        reason = (
            "Your client certificate must be validated with the identity service first."
            if decision.purpose == "validate"
            else "A client certificate is required: get one from the identity service."
        )
        ticket.done(
            self._error(request, status, reason, ticket.request_id, location=location), outcome
        )

    # ---- answers of our own ---------------------------------------------------------------

    def _unavailable(self, ticket: Ticket, reason: str) -> None:
        """503 + Retry-After: the identity service failed and nothing cached can serve."""
        outcome = Outcome(
            503, "unavailable", reason, ticket.route_label, verdict_code=ticket.verdict_code
        )
        response = self._error(
            ticket.request,
            503,
            "The identity service cannot be reached right now. Please try again shortly.",
            ticket.request_id,
            headers={"Retry-After": RETRY_AFTER_SECONDS},
        )
        ticket.done(response, outcome)

    def _too_many(self, ticket: Ticket, retry_after: int) -> None:
        """429 + Retry-After: too many sign-on intents asked for from this address."""
        outcome = Outcome(
            429, "denied", "sign_on_limited", ticket.route_label, verdict_code=ticket.verdict_code
        )
        response = self._error(
            ticket.request,
            429,
            "Too many sign-on requests came from your network. Please try again shortly.",
            ticket.request_id,
            headers={"Retry-After": str(retry_after)},
        )
        ticket.done(response, outcome)

    def _revoked(self, ticket: Ticket, refusal: Refusal) -> None:
        """403 ``revoked`` (the connection is not kept), or 503 + Retry-After when the
        certificate's revocation status cannot be told now (fail closed)."""
        if refusal.status == 503:
            outcome = Outcome(
                503, "unavailable", refusal.code, ticket.route_label, verdict_code=refusal.code
            )
            response = self._error(
                ticket.request,
                503,
                _sentence(refusal.reason),
                ticket.request_id,
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            )
        else:
            outcome = Outcome(
                refusal.status,
                "denied",
                refusal.code,
                ticket.route_label,
                verdict_code=refusal.code,
            )
            response = self._error(
                ticket.request, refusal.status, _sentence(refusal.reason), ticket.request_id
            )
            response.force_close()
        ticket.done(response, outcome)

    def _deny(self, ticket: Ticket, deny: Deny) -> None:
        outcome = Outcome(
            deny.status, "denied", deny.code, ticket.route_label, verdict_code=deny.code
        )
        ticket.done(
            self._error(ticket.request, deny.status, _sentence(deny.reason), ticket.request_id),
            outcome,
        )

    def _error(
        self,
        request: Request,
        status: int,
        reason: str,
        request_id: str,
        *,
        headers: dict[str, str] | None = None,
        location: str | None = None,
    ) -> web.Response:
        return responses.error(
            status,
            reason,
            request_id=request_id,
            accept=request.headers.get("Accept"),
            headers=headers,
            location=location,
        )

    # ---- one log event and one metrics update per request -------------------------------

    def _finish(self, ticket: Ticket) -> None:
        outcome, request, cert = ticket.outcome, ticket.request, ticket.cert
        assert outcome is not None
        elapsed = time.perf_counter() - ticket.started
        self.metrics.observe_request(
            outcome.route, request.method, outcome.decision, outcome.status, elapsed
        )
        if not self.access_log:
            return
        values = (
            ticket.request_id,
            ticket.peer_ip,
            request.method,
            request.path,
            outcome.status,
            round(elapsed * 1000, 3),
            outcome.route,
            outcome.decision,
            outcome.reason,
            outcome.verdict_code,
            outcome.stale or None,
            cert.serial_hex if cert else None,
            cert.sha256 if cert else None,
            cert.subject if cert else None,
            outcome.user,
            round(outcome.upstream_seconds * 1000, 3)
            if outcome.upstream_seconds is not None
            else None,
        )
        if self._access is not None:
            self._access(values)
        else:
            self.log.info("request", **dict(zip(ACCESS_FIELDS, values, strict=True)))


def _malformed(
    request: Request, plan: Plan, server_name: str | None
) -> tuple[int, str, str] | None:
    """Requests refused before policy: ambiguous framing, an oversized header block, and a
    Host (or target authority) that names no host this service serves, or another host than
    the connection's SNI: 421, before any identity lookup or sign-on intent (``hosts``)."""
    size = 0
    lengths: set[bytes] = set()
    length_headers = 0
    chunked = False
    bad_host = False
    host: bytes | None = None
    for name, value in request.raw_headers:
        size += len(name) + len(value) + 4
        if len(name) == 4 and name.lower() == b"host":
            bad_host = bad_host or _HOST_FIELD.fullmatch(value) is None
            host = value
        elif len(name) == 14 and name.lower() == b"content-length":
            length_headers += 1
            lengths.add(value.strip())
        elif len(name) == 17 and name.lower() == b"transfer-encoding":
            chunked = True
    if bad_host:
        # RFC 9112 3.2: 400. An application reading it as a host name, a URL or a cache key
        # must not be handed spaces, slashes or an '@' it may split on.
        return 400, "the request's Host header is not valid", "bad_host"
    if len(lengths) > 1:
        return 400, "the request has conflicting Content-Length headers", "ambiguous_length"
    if length_headers and chunked:
        return 400, "the request has both Content-Length and Transfer-Encoding", "ambiguous_length"
    if size > plan.max_header_block:
        return 431, "the request headers are too large", "headers_too_large"
    misdirected = plan.server_names.misdirected(request.raw_path, host, server_name)
    if misdirected is not None:
        return 421, misdirected[0], misdirected[1]
    return None


def _peer_certificate(request: web.BaseRequest) -> ClientCert | None:
    protocol = request.protocol
    source: Callable[[], ClientCert | None] | None = getattr(protocol, "peer_certificate", None)
    return source() if source is not None else None


def _server_name(request: web.BaseRequest) -> str | None:
    transport = request.transport
    return requested_server_name(transport.get_extra_info("ssl_object") if transport else None)


def _peer_ip(request: web.BaseRequest) -> str | None:
    transport = request.transport
    if transport is None:
        return None
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return None


def _request_id(request: Request, trusted: bool) -> str:
    if trusted:
        incoming = request.headers.get("X-Request-ID")
        if incoming and _REQUEST_ID.fullmatch(incoming):
            return incoming
    return responses.new_request_id()


def _certificate_refusal(cert: ClientCert, now: float) -> tuple[str, str] | None:
    """Checks OpenSSL made at the handshake, made again per request: a connection can outlive
    its certificate, and defence in depth costs two comparisons."""
    if now > cert.not_after_ts:
        return "your client certificate has expired", "cert_expired"
    if now < cert.not_before_ts:
        return "your client certificate is not valid yet", "cert_not_yet_valid"
    if not cert.allows_client_auth():
        return (
            "your client certificate is not meant for client authentication",
            "cert_no_client_auth",
        )
    return None


def _original_url(request: Request) -> str | None:
    """The URL to come back to after sign-on: from the Host, which ``_malformed`` has
    found to be served (and the connection's SNI), and an origin-form target."""
    host = request.headers.get("Host", "")
    if not _HOST.match(host) or not request.raw_path.startswith("/"):
        return None
    return f"https://{host}{request.raw_path}"


def _sentence(reason: str) -> str:
    text = reason[:1].upper() + reason[1:]
    return text if text.endswith(".") else text + "."
