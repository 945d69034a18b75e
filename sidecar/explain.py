"""Why a request would be let in or refused: the request path's policy, step by step.

``explain`` calls what the request path calls, in its order: ``Servers.select`` (the server
SNI chooses), ``Servers.misdirected`` (421), ``policy.certificate_refusal``, revocation
(``revocation.gate.Revocation.status``, when given),
``Servers.route`` (the route, its methods and method overrides), ``policy.admit`` and
``policy.decide``; and shows, beside them, every rule of the route it found, each through
the very object that decides it (every matcher's ``passes``, ``AddressRule``, the roles,
``TrustRule``), so that the rule that refused is named even when an earlier one would
already have. ``sidecar explain`` asks it about a configuration file and a certificate file;
the admin listener's ``GET /explain`` about the running configuration and a certificate
that connected recently. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from http import HTTPStatus
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .certs import ClientCert
from .hosts import host_name, is_address
from .identity import Trust, User, Verdict
from .policy import (
    NO_ROUTE,
    BadPath,
    Decision,
    Deny,
    Forward,
    Redirect,
    Refused,
    Route,
    Unavailable,
    admit,
    certificate_refusal,
    decide,
    needs_verdict,
)
from .revocation.gate import PENDING, Refusal
from .rules import Anchors, certificate_user, method_overrides
from .servers import Servers


@dataclass(frozen=True)
class Step:
    #: what was checked: "server", "route", "allow.san_uri", "roles", ...
    check: str
    #: pass | fail | info
    outcome: str
    detail: str


@dataclass
class Question:
    """The request to explain."""

    path: str
    method: str = "GET"
    #: the Host header (None: the chosen server's first name)
    host: str | None = None
    #: the TLS server name (SNI) the client sends; None: none
    server_name: str | None = None
    #: the client's address (None: unknown, as no address: address rules refuse it)
    address: str | None = None
    cert: ClientCert | None = None
    #: header lines besides Host (method overrides)
    headers: Sequence[tuple[str, str]] = ()


@dataclass(frozen=True)
class Assumption:
    """What to assume of an identity backend that explain does not ask (not static)."""

    roles: tuple[str, ...] = ()
    trust_score: Decimal | None = None
    local_intrusions: int | None = None


#: the verdict for a certificate, and how it was found (or why there is none)
VerdictSource = Callable[[ClientCert], tuple[Verdict | None, str]]


@dataclass
class Explanation:
    steps: list[Step] = field(default_factory=list)
    #: where the request ends: "forwarded", or a status code and reason
    decision: str = ""
    status: int | None = None
    #: the decision rests on an assumed verdict (the backend was not asked)
    assumed: bool = False

    def add(self, check: str, outcome: str, detail: str) -> None:
        self.steps.append(Step(check, outcome, detail))

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": [
                {"check": s.check, "outcome": s.outcome, "detail": s.detail} for s in self.steps
            ],
            "decision": self.decision,
            "status": self.status,
            "assumed_verdict": self.assumed,
        }

    def text(self) -> str:
        width = max((len(s.check) for s in self.steps), default=8)
        marks = {"pass": "pass", "fail": "FAIL", "info": "    "}
        lines = [
            f"{marks.get(s.outcome, s.outcome)}  {s.check:<{width}}  {s.detail}" for s in self.steps
        ]
        lines.append(f"decision  {self.decision}")
        return "\n".join(lines)


def explain(
    servers: Servers,
    question: Question,
    *,
    verdict_of: VerdictSource,
    enrol: bool,
    now: float,
    anchors: Sequence[x509.Certificate] | None = None,
    chain: Sequence[x509.Certificate] = (),
    assumption: Assumption | None = None,
    revocation: Callable[[ClientCert], Refusal | None] | None = None,
    revocation_note: str = "",
) -> Explanation:
    """What the request path would do with ``question`` (see the module's docstring).

    ``anchors``: the listener's trust anchors, to say whether the TLS handshake would accept
    the certificate (``chain``: the intermediates the client sends with it); None when the
    certificate already passed a handshake. ``verdict_of`` gives the identity verdict; when it
    gives none, ``assumption`` stands for an allowing one (said so in the answer).
    ``revocation`` says whether the certificate is refused now (``revocation_note`` adds what
    it did not ask)."""
    out = Explanation()
    cert = question.cert
    sni = question.server_name
    server = servers.select(sni)
    mode = server.client_certificate
    how = f"SNI {sni!r}" if sni else "no SNI: the first server"
    out.add("server", "info", f"{server.title}, chosen by {how}; client_certificate: {mode}")
    if cert is not None and mode == "none":
        out.add("certificate", "info", "this server asks for none: the client presents none")
        cert = None
    if cert is None and mode == "required":
        out.add("certificate", "fail", "none presented, and this server requires one")
        return _end(out, "refused during the TLS handshake (alert certificate_required)", None)
    if cert is not None:
        out.add("certificate", "info", f"{cert.subject or '(empty subject)'}, sha256 {cert.sha256}")
        if anchors is not None and not _chains(cert, anchors, chain):
            out.add(
                "tls",
                "fail",
                "no chain from it to a trust anchor (tls.client_ca, tls.pinned_certificates), "
                "through those and the certificates sent with it",
            )
            return _end(out, "refused during the TLS handshake (alert unknown_ca)", None)
        if anchors is not None:
            out.add("tls", "pass", "it chains to a trust anchor")
        refusal = certificate_refusal(cert, now)
        if refusal is not None:
            out.add("certificate", "fail", refusal[0])
            return _deny(out, Deny(403, refusal[0], refusal[1]))
        if revocation is not None:
            revoked = revocation(cert)
            if revoked is None:
                out.add("revocation", "pass", "not revoked" + revocation_note)
            elif revoked is PENDING:
                out.add(
                    "revocation",
                    "info",
                    "a CRL or OCSP answer for it is being fetched: the request waits for it",
                )
            else:
                out.add("revocation", "fail", f"{revoked.reason}: {revoked.detail}")
                return _deny(out, Deny(revoked.status, revoked.reason, revoked.code))
    host = question.host if question.host is not None else (server.names.names or ("",))[0]
    misdirected = servers.misdirected(question.path, host.encode("latin-1", "replace"), sni)
    if misdirected is not None:
        out.add("host", "fail", f"{host!r}: {misdirected[0]}")
        return _deny(out, Deny(421, misdirected[0], misdirected[1]))
    out.add("host", "pass", f"{host!r} is one of this server's names")
    raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in question.headers]
    try:
        route = servers.route(question.method, question.path, raw_headers, sni)
    except BadPath as exc:
        out.add("path", "fail", str(exc))
        return _deny(out, Deny(400, str(exc), "bad_path"))
    except Refused as refused:
        overrides = method_overrides(raw_headers, question.path)
        detail = refused.deny.reason + (
            f" (overrides: {', '.join(overrides)})" if overrides else ""
        )
        out.add("route", "fail", detail)
        return _deny(out, refused.deny)
    if route is None:
        out.add("route", "fail", f"no route covers {question.method} {question.path}")
        return _deny(out, NO_ROUTE)
    out.add("route", "pass", _route_text(route))
    _rules(out, route, cert, question.address)
    early = admit(route, cert, question.address)
    verdict: Verdict | None = None
    if needs_verdict(route, cert, question.address):
        assert cert is not None
        verdict, note = verdict_of(cert)
        if verdict is None:
            assumed = assumption or Assumption()
            verdict = _assumed(cert, assumed)
            out.assumed = True
            out.add(
                "verdict",
                "info",
                f"{note}; assumed: it allows the certificate{_assumed_text(assumed)}",
            )
        else:
            out.add(
                "verdict",
                "pass" if verdict.kind == "allow" else "fail",
                f"{note}: {_verdict_text(verdict)}",
            )
        if verdict.kind == "allow" and verdict.user is not None:
            _identity_rules(out, route, verdict)
    elif early is None and cert is None and not route.public:
        out.add("verdict", "info", "no certificate: the identity backend is not asked")
    decision = decide(
        route,
        verdict,
        has_certificate=cert is not None,
        enrol=enrol,
        cert=cert,
        address=question.address,
    )
    return _decided(out, decision)


def _chains(
    cert: ClientCert, anchors: Sequence[x509.Certificate], chain: Sequence[x509.Certificate]
) -> bool:
    """Whether verified signatures lead from the certificate to a trust anchor, through the
    anchors and the certificates sent with it, or it is an anchor itself (pinned). OpenSSL
    checks more at the handshake (the CAs' own validity and constraints)."""
    if any(anchor.public_bytes(Encoding.DER) == cert.der for anchor in anchors):
        return True
    leaf = x509.load_der_x509_certificate(cert.der)
    return not Anchors(anchors).keys.isdisjoint(Anchors([*anchors, *chain]).issuer_keys(leaf))


def _route_text(route: Route) -> str:
    access = (
        "public" if route.public else "certificate" if route.certificate_only else "authenticated"
    )
    parts = [f"{route.origin or 'route'} {route.name}", f"access: {access}"]
    if route.methods is not None:
        parts.append(f"methods: {', '.join(sorted(route.methods))}")
    if route.roles:
        parts.append(f"roles: any of {', '.join(sorted(route.roles))}")
    return "; ".join(parts)


def _rules(out: Explanation, route: Route, cert: ClientCert | None, address: str | None) -> None:
    """Every rule the route applies before the identity verdict, each as it judges."""
    addresses = route.addresses
    if addresses is not None:
        where = address or "(no address given)"
        if addresses.allow is not None:
            reaches = addresses.reaches(address)
            nets = ", ".join(str(n) for n in addresses.allow)
            out.add(
                "addresses.allow",
                "pass" if reaches else "fail",
                f"{where} {'is' if reaches else 'is not'} within {nets}",
            )
        if addresses.exempt:
            exempt = addresses.exempts(address)
            nets = ", ".join(str(n) for n in addresses.exempt)
            out.add(
                "addresses.exempt",
                "info",
                f"{where} is within {nets}: no certificate needed, anonymous unless identified"
                if exempt
                else f"{where} is not within {nets}",
            )
    allow = route.allow
    if allow is not None:
        for matcher in allow.matchers:
            values = ", ".join(matcher.values)
            if cert is None:
                out.add(matcher.key, "fail", f"no certificate to match against {values}")
            elif matcher.passes(cert):
                out.add(matcher.key, "pass", f"the certificate matches one of {values}")
            else:
                out.add(matcher.key, "fail", f"the certificate matches none of {values}")


def _identity_rules(out: Explanation, route: Route, verdict: Verdict) -> None:
    user = verdict.user
    assert user is not None
    if route.roles:
        has = not route.roles.isdisjoint(user.roles)
        out.add(
            "roles",
            "pass" if has else "fail",
            f"{user.username} has {', '.join(user.roles) or 'no role'}; the route needs any of "
            f"{', '.join(sorted(route.roles))}",
        )
    trust = route.trust
    if trust is not None:
        failed = trust.failure(verdict.trust)
        told = verdict.trust or Trust()
        if trust.min_score is not None:
            ok = failed != "identityplus.min_trust_score"
            out.add(
                "identityplus.min_trust_score",
                "pass" if ok else "fail",
                f"trust score {told.score if told.score is not None else 'unknown'}; at least {trust.min_score} needed",
            )
        if trust.max_intrusions is not None and failed != "identityplus.min_trust_score":
            ok = failed is None
            out.add(
                "identityplus.max_local_intrusions",
                "pass" if ok else "fail",
                f"local intrusions {told.local_intrusions if told.local_intrusions is not None else 'unknown'}; at most {trust.max_intrusions} allowed",
            )


def _assumed(cert: ClientCert, assumed: Assumption) -> Verdict:
    base = certificate_user(cert)
    user = User(sub=base.sub, username=base.username, email=base.email, roles=assumed.roles)
    trust = Trust(score=assumed.trust_score, local_intrusions=assumed.local_intrusions)
    return Verdict.allow(user, code="assumed", trust=trust)


def _assumed_text(assumed: Assumption) -> str:
    parts = [f"roles {', '.join(assumed.roles)}" if assumed.roles else "no roles"]
    if assumed.trust_score is not None:
        parts.append(f"trust score {assumed.trust_score}")
    if assumed.local_intrusions is not None:
        parts.append(f"{assumed.local_intrusions} local intrusions")
    return " with " + ", ".join(parts)


def _verdict_text(verdict: Verdict) -> str:
    if verdict.kind == "allow" and verdict.user is not None:
        roles = ", ".join(verdict.user.roles) or "no role"
        return f"{verdict.code}: {verdict.user.username} ({verdict.user.sub}), roles {roles}"
    return f"{verdict.kind} ({verdict.code}): {verdict.reason}"


def _decided(out: Explanation, decision: Decision) -> Explanation:
    if isinstance(decision, Forward):
        who = (
            f"as {decision.user.username} ({decision.user.sub})" if decision.user else "anonymously"
        )
        return _end(out, f"forwarded {who}", None)
    if isinstance(decision, Deny):
        return _deny(out, decision)
    if isinstance(decision, Redirect):
        return _end(
            out,
            f"302 to the identity service's sign-on page ({decision.purpose}): {decision.reason}",
            302,
        )
    assert isinstance(decision, Unavailable)
    return _end(out, f"503 Service Unavailable: {decision.reason}", 503)


def _deny(out: Explanation, deny: Deny) -> Explanation:
    phrase = HTTPStatus(deny.status).phrase
    return _end(out, f"{deny.status} {phrase}: {deny.reason} ({deny.code})", deny.status)


def _end(out: Explanation, decision: str, status: int | None) -> Explanation:
    prefix = "if the identity backend allows the certificate as assumed: " if out.assumed else ""
    out.decision, out.status = prefix + decision, status
    return out


def default_server_name(host: str | None) -> str | None:
    """The SNI a browser sends for a ``Host``: its host name; none for an IP address."""
    if not host:
        return None
    name = host_name(host)
    if name is None or is_address(name):
        return None
    return name
