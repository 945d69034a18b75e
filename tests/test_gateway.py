"""The gateway without a protocol: a request in, its steps, its answer or forward, its outcome.

Table-driven: each case is a request (target, headers, certificate), what the identity side
does (a cached verdict, a lookup, a sign-on address) and what the forward does (the status the
client got, or a failure), and the outcome expected: where ``begin`` leaves the request, where
it ends, and the status, decision and reason logged. The identity side and the forward are
fakes of our own protocols (``gateway.Identity``, ``gateway.Forwarding``); nothing here opens a
socket.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest
import structlog
from structlog.testing import capture_logs

from sidecar.certs import ClientCert
from sidecar.config import UpstreamConfig
from sidecar.errors import IdentityUnavailable, UpstreamError
from sidecar.forwarder import BodyTimeout, BodyTooLarge, Forwarder
from sidecar.gateway import Gateway
from sidecar.headers import HeaderRules
from sidecar.hosts import ServerNames
from sidecar.identity import LookupContext, SignOnPurpose, User, Verdict
from sidecar.identity.intents import SignOn, SignOnLimited
from sidecar.metrics import Metrics
from sidecar.plan import Plan
from sidecar.policy import Route, RouteTable
from sidecar.request import (
    _NEXT,
    ANSWER,
    ENDED,
    FORWARD,
    FORWARDED,
    LOOK_UP,
    NEW,
    SIGN_ON,
    Request,
    Step,
    move,
)
from sidecar.servers import Server, Servers

from .pki import Issued, make_ca, make_leaf
from .revocation_parts import no_revocation

ALICE = User("s-alice", "alice", roles=("administrator",))
BOB = User("s-bob", "bob", roles=("member",))
HOST = ((b"Host", b"localhost"),)
SIGN_ON_URL = "https://signon.example/intent/1"
SIGNED_ON = SignOn(SIGN_ON_URL, coalesced=False)


@dataclass
class FakeIdentity:
    """``gateway.Identity``: verdicts by certificate fingerprint, as cached (``peek``) and as
    the backend would give them (``lookup``); a sign-on address or a failure."""

    cached: dict[str, Verdict] = field(default_factory=dict)
    backend: dict[str, Verdict | Exception] = field(default_factory=dict)
    signing_on: SignOn | Exception = SIGNED_ON
    can_enrol: bool = False
    name: str = "fake"
    lookups: list[tuple[str, str | None]] = field(default_factory=list)
    sign_ons: list[tuple[str, str]] = field(default_factory=list)

    def peek(self, cert: ClientCert) -> Verdict | None:
        return self.cached.get(cert.sha256)

    async def lookup(self, cert: ClientCert, context: LookupContext) -> Verdict:
        self.lookups.append((cert.sha256, context.client_ip))
        answer = self.backend[cert.sha256]
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def sign_on(
        self,
        purpose: SignOnPurpose,
        return_url: str,
        client_ip: str | None,
        *,
        shared: bool = True,
    ) -> SignOn:
        self.sign_ons.append((purpose, return_url))
        if isinstance(self.signing_on, Exception):
            raise self.signing_on
        return self.signing_on


@dataclass
class FakeForward:
    """``gateway.Forwarding``: what the protocol would have done, and what it was given."""

    outcome: tuple[int, float] | Exception = (200, 0.25)
    sent: list[Request] = field(default_factory=list)

    async def __call__(self, request: Request) -> tuple[int, float]:
        self.sent.append(request)
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


@pytest.fixture(scope="module")
def certs() -> dict[str, ClientCert]:
    ca = make_ca("Gateway test CA")

    def cert(issued: Issued) -> ClientCert:
        return ClientCert.from_der(issued.der)

    return {
        "alice": cert(make_leaf(ca, "Alice")),
        "bob": cert(make_leaf(ca, "Bob")),
        "stranger": cert(make_leaf(ca, "Stranger")),
        "expired": cert(make_leaf(ca, "Old", days_valid=(-30, -1))),
        "server-only": cert(make_leaf(ca, "Server", server=True)),
    }


def gateway(identity: FakeIdentity, *, trusted: bool = False) -> Gateway:
    import ipaddress

    plan = Plan(
        policy=Servers(
            [
                Server(
                    ServerNames(["localhost"]),
                    RouteTable(
                        [
                            Route("/public/", public=True),
                            Route("/admin/", roles=frozenset({"administrator"})),
                            Route("/"),
                        ]
                    ),
                    client_certificate="required",
                )
            ]
        ),
        identity=identity,
        upstream=Forwarder(UpstreamConfig(url="http://127.0.0.1:9")),  # never started
        rules=HeaderRules(
            "X-APP-CERTIFICATE",
            "X-USERINFO",
            (ipaddress.ip_network("10.0.0.0/8"),) if trusted else (),
        ),
        max_header_block=32 * 1024,
        revocation=no_revocation(),
    )
    return Gateway(plan, metrics=Metrics(), logger=structlog.get_logger("test"), clock=time.time)


@dataclass(frozen=True)
class Case:
    name: str
    #: where begin leaves the request, and how it ends
    begun: Step
    ended: Step
    status: int
    decision: str
    reason: str
    target: str = "/app/x"
    method: str = "GET"
    headers: tuple[tuple[bytes, bytes], ...] = HOST
    cert: str | None = None
    cached: tuple[tuple[str, Verdict], ...] = ()
    backend: tuple[tuple[str, Verdict | Exception], ...] = ()
    signing_on: SignOn | Exception = SIGNED_ON
    enrol: bool = False
    forward: tuple[int, float] | Exception = (200, 0.25)


CASES = [
    Case("public, anonymous", FORWARD, FORWARDED, 200, "forwarded", "allowed", "/public/p"),
    Case("no certificate", ANSWER, ANSWER, 401, "denied", "no_certificate"),
    Case(
        "cached allow",
        FORWARD,
        FORWARDED,
        200,
        "forwarded",
        "allowed",
        cert="alice",
        cached=(("alice", Verdict.allow(ALICE)),),
    ),
    Case(
        "looked up allow",
        LOOK_UP,
        FORWARDED,
        201,
        "forwarded",
        "allowed",
        cert="alice",
        backend=(("alice", Verdict.allow(ALICE)),),
        forward=(201, 0.5),
    ),
    Case(
        "looked up deny",
        LOOK_UP,
        ANSWER,
        403,
        "denied",
        "unbound",
        cert="stranger",
        backend=(("stranger", Verdict.deny("not bound", "unbound")),),
    ),
    Case(
        "identity service down",
        LOOK_UP,
        ANSWER,
        503,
        "unavailable",
        "the identity service is unavailable",
        cert="alice",
        backend=(("alice", IdentityUnavailable("timeout")),),
    ),
    Case(
        "missing role",
        ANSWER,
        ANSWER,
        403,
        "denied",
        "missing_role",
        "/admin/x",
        cert="bob",
        cached=(("bob", Verdict.allow(BOB)),),
    ),
    Case("expired certificate", ANSWER, ANSWER, 403, "denied", "cert_expired", cert="expired"),
    Case(
        "certificate not for clients",
        ANSWER,
        ANSWER,
        403,
        "denied",
        "cert_no_client_auth",
        cert="server-only",
    ),
    Case("ambiguous path", ANSWER, ANSWER, 400, "denied", "bad_path", "/app/%2e%2e/admin/"),
    Case(
        "host of another service",
        ANSWER,
        ANSWER,
        421,
        "denied",
        "misdirected_host",
        headers=((b"Host", b"elsewhere.example"),),
    ),
    Case("invalid host", ANSWER, ANSWER, 400, "denied", "bad_host", headers=((b"Host", b"a b"),)),
    Case(
        "two lengths",
        ANSWER,
        ANSWER,
        400,
        "denied",
        "ambiguous_length",
        headers=(*HOST, (b"Content-Length", b"1"), (b"Content-Length", b"2")),
    ),
    Case(
        "upstream too slow",
        FORWARD,
        ANSWER,
        504,
        "upstream_error",
        "timeout",
        "/public/p",
        forward=UpstreamError("timeout", "no answer"),
    ),
    Case(
        "upstream refused",
        FORWARD,
        ANSWER,
        502,
        "upstream_error",
        "connect",
        "/public/p",
        forward=UpstreamError("connect", "refused"),
    ),
    Case(
        "body too large",
        FORWARD,
        ANSWER,
        413,
        "denied",
        "body_too_large",
        "/public/p",
        forward=BodyTooLarge("big"),
    ),
    Case(
        "body stopped",
        FORWARD,
        ANSWER,
        408,
        "denied",
        "body_timeout",
        "/public/p",
        forward=BodyTimeout("slow"),
    ),
    Case(
        "forward broke",
        FORWARD,
        ANSWER,
        500,
        "error",
        "internal error",
        "/public/p",
        forward=RuntimeError("a bug"),
    ),
    Case("enrol", SIGN_ON, ANSWER, 302, "redirected", "enrol", enrol=True),
    Case("enrol a POST", SIGN_ON, ANSWER, 401, "redirected", "enrol", method="POST", enrol=True),
    Case(
        "enrol, too many",
        SIGN_ON,
        ANSWER,
        429,
        "denied",
        "sign_on_limited",
        enrol=True,
        signing_on=SignOnLimited(7),
    ),
    Case(
        "enrol, sign-on down",
        SIGN_ON,
        ANSWER,
        503,
        "unavailable",
        "sign-on unavailable",
        enrol=True,
        signing_on=IdentityUnavailable("down"),
    ),
    Case(
        "enrol, unusable address",
        SIGN_ON,
        ANSWER,
        503,
        "unavailable",
        "sign-on address unusable",
        enrol=True,
        signing_on=SignOn("https://x/\r\nSet-Cookie: a=1", coalesced=False),
    ),
    Case(
        "validate, address known",
        ANSWER,
        ANSWER,
        302,
        "redirected",
        "validate",
        cert="alice",
        cached=(("alice", Verdict("validate", "validate it", "PB 0003", redirect=SIGN_ON_URL)),),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_a_request_goes_through_its_steps(case: Case, certs: dict[str, ClientCert]) -> None:
    identity = FakeIdentity(
        cached={certs[who].sha256: verdict for who, verdict in case.cached},
        backend={certs[who].sha256: verdict for who, verdict in case.backend},
        signing_on=case.signing_on,
        can_enrol=case.enrol,
    )
    cert = certs[case.cert] if case.cert else None
    gate = gateway(identity)
    forward = FakeForward(case.forward)
    request = Request(
        case.method,
        case.target,
        list(case.headers),
        cert=cert,
        peer_ip="192.0.2.7",
        server_name="localhost",
    )
    with capture_logs() as logs:
        gate.begin(request)
        assert request.step is case.begun
        if request.step is ANSWER:
            gate.end(request)
        else:
            await gate.resume(request, forward)
    assert request.step is ENDED
    assert (request.status, request.decision, request.reason) == (
        case.status,
        case.decision,
        case.reason,
    )
    if case.ended is FORWARDED:
        assert request.answer is None
        assert forward.sent == [request]
    else:
        assert request.answer is not None and request.answer.status == case.status
    assert gate.metrics.in_flight == 0
    [event] = [e for e in logs if e["event"] == "request"]
    assert (event["status"], event["decision"], event["reason"]) == (
        case.status,
        case.decision,
        case.reason,
    )
    assert event["request_id"] == request.request_id


async def test_identity_headers_go_upstream_only_for_an_identified_client(
    certs: dict[str, ClientCert],
) -> None:
    alice = certs["alice"]
    identity = FakeIdentity(cached={alice.sha256: Verdict.allow(ALICE)})
    gate = gateway(identity)
    forged = (*HOST, (b"X-USERINFO", b"forged"), (b"x_app_certificate", b"forged"))
    for cert, target in ((alice, "/app/x"), (None, "/public/p")):
        request = Request(
            "GET", target, list(forged), cert=cert, peer_ip="192.0.2.7", server_name=None
        )
        gate.begin(request)
        assert request.step is FORWARD and request.upstream is gate.plan.upstream
        assert b"forged" not in request.block
        assert (b"X-USERINFO: " + ALICE.header_bytes in request.block) is (cert is not None)
        assert request.has_host


async def test_a_lookup_is_given_the_client_address(certs: dict[str, ClientCert]) -> None:
    alice = certs["alice"]
    identity = FakeIdentity(backend={alice.sha256: Verdict.allow(ALICE)})
    request = Request("GET", "/", list(HOST), cert=alice, peer_ip="192.0.2.9", server_name=None)
    gate = gateway(identity)
    gate.begin(request)
    await gate.resume(request, FakeForward())
    assert identity.lookups == [(alice.sha256, "192.0.2.9")]


def test_a_trusted_proxys_request_id_is_kept() -> None:
    gate = gateway(FakeIdentity(), trusted=True)
    headers = [*HOST, (b"X-Request-ID", b"from-the-proxy")]
    from_proxy = Request("GET", "/", headers, cert=None, peer_ip="10.1.2.3", server_name=None)
    from_anyone = Request("GET", "/", headers, cert=None, peer_ip="192.0.2.1", server_name=None)
    gate.begin(from_proxy)
    gate.begin(from_anyone)
    assert from_proxy.request_id == "from-the-proxy"
    assert from_anyone.request_id != "from-the-proxy"


def test_every_step_is_reachable_and_ends() -> None:
    reached = {NEW}
    todo = [NEW]
    while todo:
        for step in _NEXT[todo.pop()]:
            if step not in reached:
                reached.add(step)
                todo.append(step)
    assert reached == set(Step)
    assert _NEXT[ENDED] == frozenset()
    # every step still at work may fail into our own answer (500)
    assert all(ANSWER in _NEXT[step] for step in (NEW, LOOK_UP, SIGN_ON, FORWARD))


def test_a_move_the_table_does_not_allow_is_refused() -> None:
    request = Request("GET", "/", [], cert=None, peer_ip=None, server_name=None)
    with pytest.raises(RuntimeError, match="from NEW to FORWARDED"):
        move(request, FORWARDED)
    move(request, ANSWER)
    move(request, ENDED)
    with pytest.raises(RuntimeError, match="from ENDED to ENDED"):
        move(request, ENDED)
