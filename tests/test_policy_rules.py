"""Route policy with rules, as pure functions: methods in the route table, ``admit`` and
``decide`` with matchers, addresses, ``access: certificate`` and trust, method overrides in
``Servers.route``. Deny by default throughout."""

from __future__ import annotations

import ipaddress
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.certs import ClientCert
from sidecar.hosts import ServerNames
from sidecar.identity import Trust, User, Verdict
from sidecar.policy import (
    ADDRESS_REFUSED,
    METHOD_OVERRIDE,
    MISSING_ROLE,
    NO_CERTIFICATE,
    NO_METHOD,
    NO_ROUTE,
    Deny,
    Forward,
    Redirect,
    Refused,
    Route,
    RouteTable,
    Unavailable,
    admit,
    decide,
    needs_verdict,
)
from sidecar.rules import AddressRule, CertificateRule, TrustRule, URIMatcher
from sidecar.servers import Server, Servers

from .conftest import Certs
from .policy_helpers import leaf

GET_ONLY = frozenset({"GET", "HEAD"})
READ = Route("/api/", roles=frozenset({"reader"}), methods=GET_ONLY, label="/api/ GET")
WRITE = Route(
    "/api/",
    roles=frozenset({"writer"}),
    methods=frozenset({"POST", "DELETE"}),
    label="/api/ POST,DELETE",
)
ROOT = Route("/")
TABLE = RouteTable([ROOT, READ, WRITE])
ONLY_API = RouteTable([READ, WRITE])


def test_methods_choose_among_routes_with_one_path() -> None:
    assert TABLE.match("/api/x", "GET") is READ
    assert TABLE.match("/api/x", "HEAD") is READ  # GET brings HEAD, as nginx's limit_except
    assert TABLE.match("/api/x", "POST") is WRITE
    assert TABLE.match("/api/x", "DELETE") is WRITE


def test_a_method_no_route_covers_falls_through_to_the_next_match() -> None:
    assert TABLE.match("/api/x", "PUT") is ROOT
    assert ONLY_API.match("/api/x", "PUT") is None
    assert ONLY_API.routed("/api/x") and not ONLY_API.routed("/other")


def test_methods_are_part_of_the_cache_key() -> None:
    table = RouteTable([READ, WRITE])
    for _ in range(2):  # the second round is served from the cache
        assert table.match("/api/y", "GET") is READ
        assert table.match("/api/y", "POST") is WRITE
        assert table.match("/api/y", "PATCH") is None


def test_letter_case_readings_still_agree_with_methods() -> None:
    # /API/x under a case-insensitive application is /api/x: READ for GET, none for PUT
    from sidecar.policy import BadPath

    with pytest.raises(BadPath):
        TABLE.match("/API/x", "GET")  # ROOT as sent, READ folded: ambiguous


# ---- Servers.route: no method, and method overrides ------------------------------------------


def servers(table: RouteTable) -> Servers:
    return Servers([Server(ServerNames(["localhost"]), table, "optional")])


def test_a_path_covered_for_other_methods_only_is_refused_as_such() -> None:
    with pytest.raises(Refused) as refused:
        servers(ONLY_API).route("PUT", "/api/x", [], None)
    assert refused.value.deny == NO_METHOD
    assert servers(ONLY_API).route("PUT", "/other", [], None) is None


@pytest.mark.parametrize(
    ("headers", "target"),
    [
        ([(b"X-HTTP-Method-Override", b"DELETE")], "/api/x"),
        ([(b"x-http-method", b"post")], "/api/x"),
        ([(b"X_Method_Override", b"DELETE")], "/api/x"),
        ([], "/api/x?_method=DELETE"),
        ([(b"X-HTTP-Method-Override", b"PUT")], "/api/x"),  # PUT falls to ROOT: another route
    ],
)
def test_a_method_override_routed_elsewhere_is_refused(
    headers: list[tuple[bytes, bytes]], target: str
) -> None:
    with pytest.raises(Refused) as refused:
        servers(TABLE).route("GET", target, headers, None)
    assert refused.value.deny == METHOD_OVERRIDE


def test_a_method_override_routed_the_same_way_is_judged_the_same() -> None:
    assert (
        servers(TABLE).route("GET", "/api/x", [(b"X-HTTP-Method-Override", b"HEAD")], None) is READ
    )
    assert servers(TABLE).route("POST", "/api/x", [(b"X-HTTP-Method", b"DELETE")], None) is WRITE
    # without method rules, overrides change nothing and are not even read
    plain = servers(RouteTable([Route("/api/", roles=frozenset({"reader"}))]))
    assert plain.route("GET", "/api/x", [(b"X-HTTP-Method-Override", b"DELETE")], None) is not None


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    override=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "x", ""]),
    where=st.sampled_from(["header", "query"]),
)
def test_whatever_the_override_the_route_judged_is_the_one_the_application_serves(
    method: str, override: str, where: str
) -> None:
    """Invariant: when a request is let through, the route chosen for its own method is also
    the route of the method an application honouring the override would serve it as."""
    headers = [(b"X-HTTP-Method-Override", override.encode())] if where == "header" else []
    target = "/api/x" + (f"?_method={override}" if where == "query" else "")
    try:
        route = servers(TABLE).route(method, target, headers, None)
    except Refused:
        return
    served_as = override.upper() or method
    assert TABLE.match("/api/x", served_as) is route


# ---- admit and decide with rules -------------------------------------------------------------

ALICE = User("a", "alice", roles=("reader",))
ALLOW = Verdict.allow(ALICE)
SPIFFE = CertificateRule([URIMatcher(["spiffe://prod.example/"])])
NETS = [ipaddress.ip_network("10.0.0.0/8")]
EXEMPT = [ipaddress.ip_network("10.9.0.0/16")]


@pytest.fixture(scope="module")
def svc(certs: Certs) -> ClientCert:
    return ClientCert.from_der(
        leaf(certs.pki.client_intermediate, "orders", uris=["spiffe://prod.example/sa/orders"]).der
    )


@pytest.fixture(scope="module")
def person(certs: Certs) -> ClientCert:
    return ClientCert.from_der(certs.alice.der)


def test_certificate_only_routes_need_no_verdict(svc: ClientCert, person: ClientCert) -> None:
    route = Route("/svc/", certificate_only=True, allow=SPIFFE)
    decision = admit(route, svc, "10.0.0.1")
    assert isinstance(decision, Forward) and decision.user is not None
    assert decision.user.sub == "spiffe://prod.example/sa/orders"
    assert not needs_verdict(route, svc, "10.0.0.1")
    assert admit(route, person, None) == Deny(
        403,
        "your client certificate does not satisfy this path's rule allow.san_uri",
        "allow.san_uri",
    )
    assert admit(route, None, None) == NO_CERTIFICATE
    # decide agrees, whatever verdict it is handed
    assert decide(route, None, has_certificate=True, cert=svc) == decision
    assert code(decide(route, ALLOW, has_certificate=True, cert=person)) == "allow.san_uri"


def test_matchers_on_an_authenticated_route_come_before_the_backend(
    svc: ClientCert, person: ClientCert
) -> None:
    route = Route("/api/", allow=SPIFFE, roles=frozenset({"reader"}))
    assert not needs_verdict(route, person, None)  # refused without asking anyone
    assert needs_verdict(route, svc, None)
    assert decide(route, ALLOW, has_certificate=True, cert=svc) == Forward(ALICE)
    bob = Verdict.allow(User("b", "bob", roles=("other",)))
    assert decide(route, bob, has_certificate=True, cert=svc) == MISSING_ROLE
    assert isinstance(
        decide(route, None, has_certificate=True, backend_failed=True, cert=svc), Unavailable
    )


def test_addresses_allow_is_checked_first(svc: ClientCert) -> None:
    route = Route("/ops/", addresses=AddressRule(NETS, None))
    assert (
        decide(route, ALLOW, has_certificate=True, cert=svc, address="192.0.2.1") == ADDRESS_REFUSED
    )
    assert decide(route, ALLOW, has_certificate=True, cert=svc, address=None) == ADDRESS_REFUSED
    assert decide(route, ALLOW, has_certificate=True, cert=svc, address="10.1.1.1") == Forward(
        ALICE
    )
    public = Route("/pub/", public=True, addresses=AddressRule(NETS, None))
    assert decide(public, None, has_certificate=False, address="192.0.2.1") == ADDRESS_REFUSED
    assert decide(public, None, has_certificate=False, address="10.0.0.1") == Forward(None)


def test_an_exempt_address_needs_no_certificate_and_gets_no_unearned_identity(
    svc: ClientCert, person: ClientCert
) -> None:
    route = Route(
        "/health", roles=frozenset({"reader"}), allow=SPIFFE, addresses=AddressRule(NETS, EXEMPT)
    )
    exempt, other = "10.9.1.1", "10.1.1.1"
    assert decide(route, None, has_certificate=False, address=exempt) == Forward(None)
    assert decide(route, None, has_certificate=False, address=other) == NO_CERTIFICATE
    # identified only when every rule lets the user in; otherwise anonymous, never refused
    assert decide(route, ALLOW, has_certificate=True, cert=svc, address=exempt) == Forward(ALICE)
    assert decide(route, ALLOW, has_certificate=True, cert=person, address=exempt) == Forward(None)
    nobody = Verdict.allow(User("n", "nobody"))
    assert decide(route, nobody, has_certificate=True, cert=svc, address=exempt) == Forward(None)
    for verdict in (Verdict.deny("no"), Verdict("validate", "v", "PB 0003"), None):
        assert decide(route, verdict, has_certificate=True, cert=svc, address=exempt) == Forward(
            None
        )
    assert decide(route, None, has_certificate=True, enrol=True, address=exempt) == Forward(None)
    assert isinstance(
        decide(route, None, has_certificate=False, enrol=True, address=other), Redirect
    )


def test_trust_is_judged_after_roles(svc: ClientCert) -> None:
    route = Route("/pay/", roles=frozenset({"reader"}), trust=TrustRule(Decimal("4.2"), 0))
    good = Verdict.allow(ALICE, trust=Trust(Decimal("4.25"), 0))
    low = Verdict.allow(ALICE, trust=Trust(Decimal("4.19"), 0))
    seen = Verdict.allow(ALICE, trust=Trust(Decimal(5), 2))
    assert decide(route, good, has_certificate=True, cert=svc) == Forward(ALICE)
    assert (
        code(decide(route, low, has_certificate=True, cert=svc)) == "identityplus.min_trust_score"
    )
    assert (
        code(decide(route, seen, has_certificate=True, cert=svc))
        == "identityplus.max_local_intrusions"
    )
    assert (
        code(decide(route, ALLOW, has_certificate=True, cert=svc)) == "identityplus.min_trust_score"
    )


def code(decision: object) -> str:
    assert isinstance(decision, Deny), decision
    return decision.code


def test_no_route_is_still_refused() -> None:
    assert decide(None, ALLOW, has_certificate=True) == NO_ROUTE


def test_labels_name_routes_uniquely() -> None:
    assert READ.name == "/api/ GET" and ROOT.name == "/"
