"""The gateway: what happens to a request, whichever protocol read it.

Certificate → verdict → decision → forward or answer, as plain calls in a fixed order; each
step takes values and returns a value. A request's life is a small state machine
(``request.Step``, whose moves are all in ``request._NEXT``), on the plan it began with
(``plan.Plan``):

- ``begin`` does everything that needs no waiting, and leaves the request at LOOK_UP or
  SIGN_ON (a wait for the identity side), FORWARD (the protocol sends it upstream) or ANSWER
  (our own answer, ``request.answer``);
- ``resume`` does the waiting and, with the protocol's ``Forwarding``, the forward: the
  request is then FORWARDED (the upstream's answer went to the client) or at ANSWER (502,
  504, 413, 408);
- ``end`` makes the request's one metrics update and one access event (ENDED), and remembers
  a refusal for the status page (``observe``).

Report headers the application's answer carried (``request.reports``, taken out of it by
``forwarder.Forward.head``) go to the trust reporter once that answer has gone to the client
(``forwarded``); they concern this request's certificate and no other.

A protocol that forwards without waiting (``http1.client``) calls ``forwarded`` (or
``fail``) and ``end`` itself. Status codes for our own answers are chosen here (policy
outcomes come from ``policy.decide``) and the answers made by ``responses``; the protocols
(``http1.client``, ``fallback``) read requests and write answers, and this module knows
neither of them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from time import perf_counter  # compiled, time.perf_counter() reads the attribute each time
from typing import Any, Final, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from . import responses
from .accesslog import access_event
from .certs import ClientCert
from .errors import IdentityUnavailable, LimitReached, UpstreamError
from .forwarder import BodyInvalid, BodyTimeout, BodyTooLarge
from .frontproxy import FrontProxy, HeaderRefusal
from .headers import Captured, request_fields
from .hosts import host_name
from .identity import LookupContext, User, Verdict
from .identity.intents import SignOnLimited
from .identity.legacy import Legacy, cookie_headers, reference, without_cookies
from .log import access_writer
from .metrics import Metrics
from .observe import REFUSED, Observations
from .plan import Plan
from .policy import (
    BadPath,
    Deny,
    Forward,
    Redirect,
    Refused,
    Route,
    Unavailable,
    accepts_session,
    certificate_refusal,
    decide,
    needs_verdict,
)
from .request import (
    ANSWER,
    ENDED,
    FORWARD,
    FORWARDED,
    LOOK_UP,
    RESOLVE,
    SIGN_ON,
    Request,
    move,
)
from .revocation.gate import PENDING, Refusal

# fullmatch: "$" alone would also match before a final newline
_REQUEST_ID_VALUE = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?$")
# Host = uri-host [ ":" port ] (RFC 9110 7.2, RFC 3986 3.2.2): an IP literal, or a reg-name of
# unreserved characters, %-escapes and sub-delims (empty allowed), then digits for the port.
_HOST_FIELD = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?"
)
_SAFE_METHODS = frozenset({"GET", "HEAD"})
RETRY_AFTER_SECONDS = "5"


#: how a protocol forwards a request (``request.upstream``, ``request.block``): it sends it
#: and writes the answer to its client, then gives the status the client got and the seconds
#: the upstream took to its response head. ``UpstreamError``, ``BodyTooLarge`` and
#: ``BodyTimeout`` are answered by the gateway (they come before any byte of an answer).
Forwarding = Callable[[Request], Awaitable[tuple[int, float]]]


class Reports(Protocol):
    """Where the report headers of a forwarded answer go (``identity.reports.Reporter``)."""

    def from_response(
        self,
        cert: ClientCert | None,
        user: User | None,
        verdict_code: str | None,
        captured: Captured,
        *,
        client_ip: str | None,
        path: str | None,
        request_id: str | None,
    ) -> None: ...


class Gateway:
    """Runs each request's steps (see the module's docstring) on the current ``plan``."""

    def __init__(
        self,
        plan: Plan,
        *,
        metrics: Metrics,
        logger: Any,
        access_log: bool = True,
        clock: Callable[[], float] = time.time,
        reports: Reports | None = None,
        observations: Observations | None = None,
    ) -> None:
        self.plan = plan
        self.metrics = metrics
        #: the trust reporter (report headers of answers), and the status page's collectors
        self.reports = reports
        self.observations = observations
        self.log = logger
        #: False when the log level is above info: skip building an event nobody will see
        self.access_log = access_log
        #: the access event's own JSON writer, when the logs are JSON (else through structlog)
        self._access = access_writer() if access_log else None
        self.clock = clock
        # bound once: labels() costs more than the rest of a front-proxy request's bookkeeping
        counter = metrics.front_proxy_certificates
        self._front_outcomes = {
            outcome: counter.labels(outcome)
            for outcome in ("accepted", "absent", "unreadable", "unverified", "untrusted")
        }

    def begin(self, request: Request) -> None:
        """Everything about ``request`` that needs no waiting: ``request.step`` then says
        what is left (see the module's docstring)."""
        plan = self.plan
        request.plan = plan
        source = request.chain_source
        if source is not None:
            request.chain_source = None
            if plan.rules.wants_chain:
                request.chain = source()
        front = plan.front
        from_front = front is not None and front.trusts(request.peer_ip, request.cert)
        trusted = request.trusted = from_front or plan.rules.is_trusted_proxy(request.peer_ip)
        request.request_id = _request_id(request, trusted)
        request.started = perf_counter()
        self.metrics.request_started()
        try:
            self._start(request, plan, from_front)
        except Exception as exc:  # the last line of defence: answer 500, never a traceback
            self.fail(request, exc)

    async def resume(self, request: Request, forward: Forwarding) -> None:
        """Do what ``begin`` left (the verdict, the sign-on address, the forward through
        ``forward``), then ``end``. The request is then ENDED, with ``request.answer`` still
        to send unless it was FORWARDED."""
        try:
            if request.step is LOOK_UP:
                await self._look_up(request)
            if request.step is SIGN_ON:
                await self._sign_on(request)
            if request.step is RESOLVE:
                await self._resolve(request)
            if request.step is FORWARD:
                try:
                    status, upstream_seconds = await forward(request)
                except (
                    UpstreamError,
                    BodyTooLarge,
                    BodyTimeout,
                    BodyInvalid,
                    LimitReached,
                ) as exc:
                    self._forward_failed(request, exc)
                else:
                    self.forwarded(request, status, upstream_seconds)
        except Exception as exc:  # the last line of defence: answer 500, never a traceback
            self.fail(request, exc)
        except BaseException:  # cancelled: no answer, and no access event
            self.metrics.request_finished()
            raise
        self.end(request)

    def forwarded(self, request: Request, status: int, upstream_seconds: float) -> None:
        """The upstream's answer went to the client with ``status``."""
        request.status = status
        request.upstream_seconds = upstream_seconds
        self.metrics.observe_upstream(upstream_seconds)
        move(request, FORWARDED)
        captured, reports = request.reports, self.reports
        if captured is not None and reports is not None:
            # trust-reports: the answer has gone to the client; what it reported goes out,
            # about this request's certificate
            self._report(request, reports, captured)

    def _report(self, request: Request, reports: Reports, captured: Captured) -> None:
        try:
            reports.from_response(
                # HTTP legacy: a session stands for the certificate Identity Plus resolved at
                # sign-on (its serial is an Identity Plus certificate's), and its verdict is
                # Identity Plus's: reported on like the certificate itself
                request.cert or request.session,
                request.user,
                request.verdict_code,
                captured,
                client_ip=request.peer_ip,
                path=request.target.split("?", 1)[0],
                request_id=request.request_id,
            )
        except Exception as exc:  # the answer is sent: a report must not turn it into a 500
            self.log.error(
                "trust_report_failed", request_id=request.request_id, error=repr(exc), exc_info=exc
            )

    def fail(self, request: Request, exc: Exception) -> None:
        """An unexpected error: the answer is 500."""
        self.log.error(
            "request_failed", request_id=request.request_id, error=repr(exc), exc_info=exc
        )
        request.route = None
        request.verdict_code = request.user = None
        request.reports = None  # the upstream's answer, if any came, did not reach the client
        request.stale = False
        self._answer(
            request,
            500,
            "error",
            "internal error",
            "The sidecar could not handle this request.",
        )

    def end(self, request: Request) -> None:
        """The request is over: one metrics update and one access event."""
        # status: the request's outcome (``request.status``, ``decision``, ``reason``) is
        # final here
        observations = self.observations
        if observations is not None and request.decision in REFUSED:
            self._refused(request, observations)
        move(request, ENDED)
        self.metrics.request_finished()
        elapsed = perf_counter() - request.started
        label = request.route_label
        self.metrics.observe_request(
            label, request.method, request.decision, request.status, elapsed
        )
        if not self.access_log:
            return
        cert, user, upstream = request.cert, request.user, request.upstream_seconds
        # durations in milliseconds, rounded to 3 decimals as they are written
        values = (
            request.request_id,
            request.client_ip,
            request.method,
            request.path,
            request.status,
            elapsed * 1000,
            label,
            request.decision,
            request.reason,
            request.verdict_code,
            request.stale or None,
            cert.serial_hex if cert is not None else None,
            cert.sha256 if cert is not None else None,
            cert.subject if cert is not None else None,
            user.sub if user is not None else None,
            upstream * 1000 if upstream is not None else None,
        )
        if self._access is not None:
            self._access.write(values)
        else:
            self.log.info("request", **access_event(values))

    def _refused(self, request: Request, observations: Observations) -> None:
        """The status page's last refusals ("I can't get in")."""
        cert = request.cert
        observations.refused(
            method=request.method[:20],
            status=request.status,
            route=request.route_label,
            decision=request.decision,
            reason=request.reason,
            verdict=request.verdict_code,
            sha256=cert.sha256 if cert is not None else None,
            request_id=request.request_id,
        )

    # ---- the steps ------------------------------------------------------------------------

    def _start(self, request: Request, plan: Plan, from_front: bool) -> None:
        problem = _malformed(request, plan)
        if problem is not None:
            self._deny(request, Deny(*problem))
            return
        front = plan.front
        if front is not None:
            # Its own name: compiled, a name is typed by its first use (``Refused`` below).
            header_denial = self._front_proxy(request, front, from_front)
            if header_denial is not None:
                self._deny(request, header_denial)
                return
        try:
            route = plan.policy.route(  # policy: the server, then the route and its methods
                request.method, request.target, request.raw_headers, request.server_name
            )
        except BadPath as exc:
            self._deny(request, Deny(400, str(exc), "bad_path"))
            return
        except Refused as refused:  # policy: a method the path's routes do not cover
            self._deny(request, refused.deny)
            return
        request.route = route
        cert = request.cert
        legacy = plan.legacy
        if legacy is not None and route is not None and self._legacy(request, legacy, route):
            return
        verdict: Verdict | None = None
        if cert is not None:
            now = self.clock()
            refusal = certificate_refusal(cert, now)  # policy: moved from here
            if refusal is not None:
                self._deny(request, Deny(403, refusal[0], refusal[1]))
                return
            # revocation: refused before any cached verdict is used, on every route (deny-list,
            # CRLs, OCSP: a dict lookup); an answer still being fetched is waited for at LOOK_UP
            revoked = plan.revocation.check(cert, now)
            if revoked is not None:
                if revoked is PENDING:
                    move(request, LOOK_UP)
                else:
                    self._revoked(request, revoked)
                return
        else:
            # HTTP legacy: a session stands for a certificate the sidecar never saw; its
            # revocation is the identity service's to say, asked again like any verdict
            cert = request.session
        if cert is not None and route is not None and needs_verdict(route, cert, request.client_ip):
            verdict = plan.identity.peek(cert)  # policy: ^ matchers
            if verdict is None:
                move(request, LOOK_UP)
                return
        self._decide(request, plan, verdict, backend_failed=False)

    def _front_proxy(self, request: Request, front: FrontProxy, from_front: bool) -> Deny | None:
        """Behind a front proxy: from a trusted one, the client's address (X-Forwarded-For)
        and the certificate of ``front_proxy.certificate_header``, verified again, in place
        of the connection's (the proxy's own); a header that does not read or verify is
        refused, never forwarded. From any other peer the header is judged absent (the
        header rules strip it), logged and counted. Fails closed."""
        outcomes = self._front_outcomes
        if not from_front:
            if front.header is not None and front.sent_header(request.raw_headers):
                outcomes["untrusted"].inc()
                self.log.warning(
                    "certificate_header_untrusted",
                    request_id=request.request_id,
                    client=request.peer_ip,
                    header=front.header,
                )
            return None
        request.client_ip = front.client_address(request.peer_ip, request.raw_headers)
        if front.header is None:
            return None
        claim = front.claim(request.raw_headers, self.clock())
        if claim is None:
            outcomes["absent"].inc()
            request.cert, request.chain = None, ()
            return None
        if isinstance(claim, HeaderRefusal):
            outcomes["unreadable" if claim.status == 400 else "unverified"].inc()
            self.log.warning(
                "certificate_header_refused",
                request_id=request.request_id,
                client=request.client_ip,
                reason=claim.reason,
            )
            request.cert, request.chain = None, ()
            return Deny(claim.status, claim.reason, claim.code)
        outcomes["accepted"].inc()
        request.cert, request.chain = claim.cert, claim.chain
        return None

    def _legacy(self, request: Request, legacy: Legacy, route: Route) -> bool:
        """Identity Plus HTTP legacy, before anything else looks at a request: a return from
        sign-on waits at RESOLVE (True); our cookies are taken out of the request; a valid
        session cookie stands for its certificate (``request.session``) on a route that a
        certificate's verdict alone decides; a browser without either may be sent to sign on
        (``request.legacy``). False: the request goes on as usual.

        Fails closed: a cookie that is not a session this service made for this host, in its
        lifetime, is ignored (and counted), and the request is one without a certificate."""
        served = _served(request)
        cookies = cookie_headers(request.raw_headers)
        found = reference(request.target)
        if found is not None:  # a return from sign-on: never forwarded with the parameter
            if served is None:
                self._deny(request, Deny(400, "the request's Host header is not valid", "bad_host"))
                return True
            ref, clean = found
            url = served[1] + clean
            if request.cert is not None:
                self._redirect_to(request, Redirect("enrol", "signed on"), url, reason="clean")
            elif request.method not in _SAFE_METHODS:
                self._deny(request, Deny(400, _NOT_A_RETURN, "legacy_not_a_return"))
            else:
                request.legacy = (served[0], ref, url)
                move(request, RESOLVE)
            return True
        if cookies:
            request.raw_headers = without_cookies(request.raw_headers)
        # policy: a route that judges the certificate itself takes no session, and sends no
        # one to sign on for one (it would come back to the same refusal)
        if request.cert is not None or served is None or not accepts_session(route):
            return False
        if cookies:
            outcome, subject = legacy.session(cookies, host=served[0])
            self.metrics.legacy_cookies.labels(outcome).inc()
            request.session = subject
        if request.method in _SAFE_METHODS and responses.wants_html(request.headers.get("Accept")):
            request.legacy = (served[0], None, served[1] + request.target)
        return False

    async def _resolve(self, request: Request) -> None:
        """A return from an HTTP-legacy sign-on: 302 to the URL without the reference, with
        the session cookie; 401 and no cookie when the reference is forged, replayed, expired
        or unresolved; 503 when Identity Plus fails."""
        plan, found = _plan(request), request.legacy
        legacy = plan.legacy
        assert legacy is not None and found is not None
        host, ref, url = found
        counter = self.metrics.legacy_returns
        try:
            if ref is None:
                outcome, cookie = "forged", None
            else:
                resolved = await legacy.resolve(
                    ref, request.headers.getall("Cookie", []), host=host
                )
                outcome, cookie = resolved.outcome, resolved.cookie
        except IdentityUnavailable as failure:
            counter.labels("failed").inc()
            self.log.warning(
                "legacy_return_unavailable",
                request_id=request.request_id,
                reason=failure.reason,
                code=failure.code,
            )
            self._unavailable(request, "sign-on unavailable")
            return
        counter.labels(outcome).inc()
        if cookie is None:
            self.log.warning(
                "legacy_return_refused", request_id=request.request_id, outcome=outcome
            )
            self._answer(
                request,
                401,
                "denied",
                f"legacy_{outcome}",
                "The sign-on could not be completed. Please open the page again to sign in.",
            )
            return
        request.status, request.decision, request.reason = 302, "redirected", "legacy_session"
        request.answer = responses.redirect(url, request_id=request.request_id, cookie=cookie)
        move(request, ANSWER)

    async def _look_up(self, request: Request) -> None:
        """A verdict the cache could not give at once (timed and counted by outcome), and a
        revocation answer still on its way; then the decision on them."""
        plan, cert = _plan(request), request.cert or request.session
        identity = plan.identity
        assert cert is not None
        verdict: Verdict | None = None
        asked = False
        route = request.route
        if route is not None and needs_verdict(route, cert, request.client_ip):  # policy:
            asked = True
            failure: IdentityUnavailable | None = None
            started = perf_counter()
            try:
                verdict = await identity.lookup(cert, LookupContext(client_ip=request.client_ip))
            except IdentityUnavailable as exc:
                failure = exc
                self.metrics.identity_lookups.labels(identity.name, exc.code or "unavailable").inc()
                self.log.warning(
                    "identity_unavailable",
                    request_id=request.request_id,
                    reason=exc.reason,
                    code=exc.code,
                )
            else:
                self.metrics.identity_lookups.labels(identity.name, verdict.code).inc()
            finally:
                seconds = perf_counter() - started
                self.metrics.identity_duration.labels(identity.name).observe(seconds)
                observations = self.observations
                if observations is not None:  # status: latency and last error, backend asked only
                    observations.looked_up(
                        seconds,
                        failure.reason if failure is not None else None,
                        failure.code if failure is not None else None,
                    )
        # revocation: the last word before the verdict is used: the answer check() was
        # waiting for, and whatever was loaded while the identity service answered
        revoked = await plan.revocation.settle(cert) if cert.seen else None
        if revoked is not None:
            self._revoked(request, revoked)
            return
        self._decide(request, plan, verdict, backend_failed=asked and verdict is None)

    def _decide(
        self, request: Request, plan: Plan, verdict: Verdict | None, *, backend_failed: bool
    ) -> None:
        cert = request.cert
        # policy: the one decision on a request, from the route, the verdict and the facts
        subject = cert if cert is not None else request.session
        decision = decide(
            request.route,
            verdict,
            has_certificate=subject is not None,
            backend_failed=backend_failed,
            enrol=plan.identity.can_enrol or request.legacy is not None,
            cert=cert,  # policy: matchers
            address=request.client_ip,  # policy: addresses
        )
        code = request.verdict_code = verdict.code if verdict is not None else None
        if isinstance(decision, Forward):
            user = decision.user
            request.block, request.has_host = request_fields(
                plan.rules,
                request.raw_headers,
                client_ip=request.peer_ip,
                trusted=request.trusted,
                request_id=request.request_id,
                user=user,
                # HTTP legacy: X-USERINFO alone, no certificate was seen
                certificate_b64=subject.b64 if (subject is not None and user is not None) else None,
                certificate=cert.der if cert is not None else b"",
                chain=request.chain,
            )
            request.upstream = plan.upstream
            request.decision, request.reason = "forwarded", "allowed"
            request.user = user
            request.stale = bool(verdict and verdict.stale)
            move(request, FORWARD)
        elif isinstance(decision, Deny):
            self._deny(request, decision)
            request.verdict_code = code or decision.code
        elif isinstance(decision, Unavailable):
            self._unavailable(request, decision.reason)
        else:
            self._redirect(request, decision)

    def _forward_failed(
        self,
        request: Request,
        exc: UpstreamError | BodyTooLarge | BodyTimeout | BodyInvalid | LimitReached,
    ) -> None:
        if isinstance(exc, BodyTimeout):
            # nginx's client_body_timeout: 408, and the connection ends (what is left of the
            # body would be read as the next request)
            self._answer(
                request,
                408,
                "denied",
                "body_timeout",
                "The request body stopped arriving before it was complete.",
                close=True,
            )
            return
        if isinstance(exc, BodyInvalid):
            # A chunk that cannot be framed: nothing after it can be read either.
            reason = "trailers_too_large" if exc.status == 431 else "bad_body"
            self._answer(request, exc.status, "denied", reason, exc.text, close=True)
            return
        if isinstance(exc, LimitReached):
            self.metrics.limit_refusals.labels(exc.limit).inc()
            text = (
                "Too many requests from your network are in progress. Please try again shortly."
                if exc.status == 429
                else "This service is busy. Please try again shortly."
            )
            self._answer(
                request,
                exc.status,
                "denied" if exc.status == 429 else "unavailable",
                exc.limit,
                text,
                headers={"Retry-After": RETRY_AFTER_SECONDS},
                close=True,
            )
            return
        if isinstance(exc, BodyTooLarge):
            self._answer(
                request,
                413,
                "denied",
                "body_too_large",
                "The request body is larger than this service accepts.",
            )
            return
        self.metrics.upstream_errors.labels(exc.kind).inc()
        status = 504 if exc.kind == "timeout" else 502
        reason = (
            "The application did not answer in time."
            if status == 504
            else "The application could not be reached."
        )
        self._answer(request, status, "upstream_error", exc.kind, reason)

    def _redirect(self, request: Request, decision: Redirect) -> None:
        legacy = request.legacy
        if legacy is not None:  # HTTP legacy: sign on to be identified, whatever the purpose
            request.redirect = (decision, legacy[2])
            move(request, SIGN_ON)
            return
        return_url = _original_url(request)
        if return_url is None:
            self._deny(request, Deny(400, "the request's Host header is not valid", "bad_host"))
            return
        if decision.location is None:  # the backend makes one: a wait
            request.redirect = (decision, return_url)
            move(request, SIGN_ON)
            return
        self._redirect_to(request, decision, decision.location)

    async def _sign_on(self, request: Request) -> None:
        """The sign-on URL from the identity side (an intent, perhaps one made earlier for the
        same URL): 429 when this address (or everyone) made too many, 503 when it fails."""
        assert request.redirect is not None
        decision, return_url = request.redirect
        counter = self.metrics.signon_intents
        plan, legacy = _plan(request), request.legacy
        try:
            if legacy is not None:
                # Never shared: the reference that comes back is the proof of who signed on.
                signed = await plan.identity.sign_on(
                    "legacy", return_url, request.client_ip, shared=False
                )
            else:
                signed = await plan.identity.sign_on(
                    decision.purpose, return_url, request.client_ip
                )
        # Two names: compiled, one name for both exceptions would be typed as the first.
        except SignOnLimited as limited:
            counter.labels("limited").inc()
            self._answer(
                request,
                429,
                "denied",
                "sign_on_limited",
                "Too many sign-on requests came from your network. Please try again shortly.",
                headers={"Retry-After": str(limited.retry_after)},
            )
            return
        except IdentityUnavailable as failure:
            counter.labels("failed").inc()
            self.log.warning(
                "sign_on_unavailable",
                request_id=request.request_id,
                reason=failure.reason,
                code=failure.code,
            )
            self._unavailable(request, "sign-on unavailable")
            return
        counter.labels("coalesced" if signed.coalesced else "registered").inc()
        cookie = None
        if legacy is not None and plan.legacy is not None:
            cookie = plan.legacy.intent_cookie(signed.location, host=legacy[0])
        self._redirect_to(request, decision, signed.location, cookie=cookie)

    def _redirect_to(
        self,
        request: Request,
        decision: Redirect,
        location: str,
        *,
        cookie: str | None = None,
        reason: str | None = None,
    ) -> None:
        if not responses.is_location(location):
            # A sign-on address from a backend (or its configuration) that is not a URI: a CR
            # or LF in it would add header lines to the visitor's answer. Failing, like any
            # reply not understood.
            self.log.error(
                "sign_on_unusable",
                request_id=request.request_id,
                purpose=decision.purpose,
                reason="the sign-on address has characters a Location header cannot carry",
            )
            self._unavailable(request, "sign-on address unusable")
            return
        if request.method in _SAFE_METHODS:
            request.status, request.decision = 302, "redirected"
            request.reason = reason or decision.purpose
            request.answer = responses.redirect(
                location, request_id=request.request_id, cookie=cookie
            )
            move(request, ANSWER)
            return
        # Redirecting a POST would make the browser replay it as GET after sign-on: say 401.
        reason = (
            "Your client certificate must be validated with the identity service first."
            if decision.purpose == "validate"
            else "A client certificate is required: get one from the identity service."
        )
        self._answer(request, 401, "redirected", decision.purpose, reason, location=location)

    # ---- answers of our own ---------------------------------------------------------------

    def _unavailable(self, request: Request, reason: str) -> None:
        """503 + Retry-After: the identity service failed and nothing cached can serve."""
        self._answer(
            request,
            503,
            "unavailable",
            reason,
            "The identity service cannot be reached right now. Please try again shortly.",
            headers={"Retry-After": RETRY_AFTER_SECONDS},
        )

    def _revoked(self, request: Request, refusal: Refusal) -> None:
        """403 ``revoked`` (and the connection is not kept), or 503 + Retry-After when the
        certificate's revocation status cannot be told now (fail closed)."""
        request.verdict_code = refusal.code
        if refusal.status == 503:
            self._answer(
                request,
                503,
                "unavailable",
                refusal.code,
                _sentence(refusal.reason),
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            )
        else:
            self._answer(
                request,
                refusal.status,
                "denied",
                refusal.code,
                _sentence(refusal.reason),
                close=True,
            )

    def connection_started(self, cert: ClientCert) -> None:
        """A connection with ``cert`` completed its TLS handshake (a resumed session too)."""
        # revocation: what its first request will need (a CRL, an OCSP answer) is fetched from
        # now; the certificate's remaining lifetime is observed
        self.plan.revocation.connection_started(cert)

    def _deny(self, request: Request, deny: Deny) -> None:
        request.verdict_code = deny.code
        self._answer(request, deny.status, "denied", deny.code, _sentence(deny.reason))

    def _answer(
        self,
        request: Request,
        status: int,
        decision: str,
        reason: str,
        text: str,
        *,
        headers: dict[str, str] | None = None,
        location: str | None = None,
        close: bool = False,
    ) -> None:
        """Our own answer: ``status`` with the sentence ``text``, and the outcome
        (``decision``, ``reason``) for the log and the metrics."""
        answer = responses.error(
            status,
            text,
            request_id=request.request_id,
            accept=request.headers.get("Accept"),
            headers=headers,
            location=location,
        )
        answer.close = close
        request.answer = answer
        request.status, request.decision, request.reason = status, decision, reason
        move(request, ANSWER)


def _plan(request: Request) -> Plan:
    plan = request.plan
    assert plan is not None  # begun
    return plan


#: Host values found valid, so that a connection's every request is not matched again (the
#: regex was 5,000 of a request's 128,000 instructions, ``tests/benchmarks/instructions.py``);
#: emptied when full, so whatever clients send, it holds at most this many, each at most
#: ``_VALID_HOST_LONGEST`` bytes (a DNS name, 253, and a port): about 80 KiB per worker. A
#: longer value is matched every time; remembered, 256 of them could have held 256 header
#: lines' worth (``limits.max_header_line``) for as long as the set lived.
_VALID_HOSTS: Final[set[bytes]] = set()
_VALID_HOSTS_MAX: Final = 256
_VALID_HOST_LONGEST: Final = 260


def _valid_host_field(value: bytes) -> bool:
    """Whether a Host field's value is ``_HOST_FIELD`` (RFC 9110 7.2)."""
    if value in _VALID_HOSTS:
        return True
    if _HOST_FIELD.fullmatch(value) is None:
        return False
    if len(value) <= _VALID_HOST_LONGEST:
        if len(_VALID_HOSTS) >= _VALID_HOSTS_MAX:
            _VALID_HOSTS.clear()
        _VALID_HOSTS.add(value)
    return True


def _malformed(request: Request, plan: Plan) -> tuple[int, str, str] | None:
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
            bad_host = bad_host or not _valid_host_field(value)
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
    misdirected = plan.policy.misdirected(request.target, host, request.server_name)  # policy:
    if misdirected is not None:
        return 421, misdirected[0], misdirected[1]
    return None


class _Headed(Protocol):
    @property
    def headers(self) -> CIMultiDict[str] | CIMultiDictProxy[str]: ...


def _request_id(request: _Headed, trusted: bool) -> str:
    """The request's id: the one a trusted proxy sent, if it is clean, else a new one."""
    if trusted:
        incoming = request.headers.get("X-Request-ID")
        if incoming and _REQUEST_ID_VALUE.fullmatch(incoming):
            return incoming
    return responses.new_request_id()


_NOT_A_RETURN = (
    "the identity-plus-intent parameter is only accepted on a return from sign-on (GET or HEAD)"
)


def _served(request: Request) -> tuple[str, str] | None:
    """The server name a request is for and its origin (``https://name[:port]``), for HTTP
    legacy: the name from the Host field, which ``_malformed`` found to be one this service
    serves (configured, or its certificate's), normalised; the port as digits only; None
    without a usable Host."""
    host = request.headers.get("Host", "")
    match = _HOST.match(host)
    name = host_name(host) if match else None
    if match is None or name is None:
        return None
    port = match.group(2) or ""
    if port == ":443":
        port = ""
    elif port and int(port[1:]) > 65535:
        return None
    literal = f"[{name}]" if ":" in name else name
    return name, f"https://{literal}{port}"


def _original_url(request: Request) -> str | None:
    """The URL to come back to after sign-on: from the Host, which ``_malformed`` has
    found to be served (and the connection's SNI), and an origin-form target."""
    host = request.headers.get("Host", "")
    if not _HOST.match(host) or not request.target.startswith("/"):
        return None
    return f"https://{host}{request.target}"


def _sentence(reason: str) -> str:
    text = reason[:1].upper() + reason[1:]
    return text if text.endswith(".") else text + "."
