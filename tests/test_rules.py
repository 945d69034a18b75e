"""Route rules as pure values (``sidecar.rules``): certificate matchers, addresses, trust, and
the methods a request names. The same rules through the real TLS listener are in
``test_route_policy_security.py``."""

from __future__ import annotations

import ipaddress
from decimal import Decimal

import pytest
from cryptography import x509
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sidecar.certs import ClientCert
from sidecar.identifiers import spiffe_id
from sidecar.identity import Trust
from sidecar.rules import (
    AddressRule,
    Anchors,
    CertificateRule,
    DNSMatcher,
    EmailMatcher,
    FingerprintMatcher,
    IPMatcher,
    IssuerMatcher,
    SubjectMatcher,
    TrustRule,
    URIMatcher,
    certificate_user,
    client_address,
    facts,
    method_overrides,
)

from .conftest import Certs
from .pki import make_ca
from .policy_helpers import leaf, sha256_of, spki_of


def client(issued: object) -> ClientCert:
    return ClientCert.from_der(issued.der)  # type: ignore[attr-defined]


# ---- SANs ---------------------------------------------------------------------------------------


def test_dns_exact_and_one_label_wildcard(certs: Certs) -> None:
    ca = certs.pki.client_intermediate
    matcher = DNSMatcher(["api.example.com", "*.svc.example.com"])
    assert matcher.passes(client(leaf(ca, dns=["API.Example.com."])))  # any case, final dot
    assert matcher.passes(client(leaf(ca, dns=["orders.svc.example.com"])))
    assert not matcher.passes(client(leaf(ca, dns=["svc.example.com"])))  # the parent
    assert not matcher.passes(client(leaf(ca, dns=["a.orders.svc.example.com"])))  # two labels
    assert not matcher.passes(client(leaf(ca, dns=["evilsvc.example.com"])))
    assert not matcher.passes(client(leaf(ca, dns=["api.example.com.evil.net"])))
    assert not matcher.passes(client(leaf(ca)))  # no SAN at all


def test_a_wildcard_san_in_a_client_certificate_matches_nothing(certs: Certs) -> None:
    """A client certificate that claims "*.svc.example.com" claims no name: it satisfies
    neither the wildcard rule nor a name under it."""
    ca = certs.pki.client_intermediate
    wild = client(leaf(ca, dns=["*.svc.example.com"]))
    assert not DNSMatcher(["*.svc.example.com"]).passes(wild)
    assert not DNSMatcher(["orders.svc.example.com"]).passes(wild)
    assert facts(wild).dns == ()


def test_names_with_characters_that_are_no_host_name_match_nothing(certs: Certs) -> None:
    ca = certs.pki.client_intermediate
    for bad in ("api.example.com\r\nX-Evil: 1", "api example.com", "api..example.com"):
        cert = client(leaf(ca, dns=[bad]))
        assert not DNSMatcher(["api.example.com", "*.example.com"]).passes(cert), bad


def test_spiffe_ids_exact_and_by_trust_domain(certs: Certs) -> None:
    ca = certs.pki.client_intermediate
    exact = URIMatcher(["spiffe://prod.example/ns/shop/sa/orders"])
    domain = URIMatcher(["spiffe://prod.example/"])
    below = URIMatcher(["spiffe://prod.example/ns/shop/"])
    orders = client(leaf(ca, uris=["spiffe://prod.example/ns/shop/sa/orders"]))
    other_ns = client(leaf(ca, uris=["spiffe://prod.example/ns/admin/sa/x"]))
    other_domain = client(leaf(ca, uris=["spiffe://prod.example.evil/ns/shop/sa/orders"]))
    assert exact.passes(orders) and domain.passes(orders) and below.passes(orders)
    assert not exact.passes(other_ns) and domain.passes(other_ns) and not below.passes(other_ns)
    assert not domain.passes(other_domain) and not below.passes(other_domain)
    # the trust domain alone is no workload
    assert not domain.passes(client(leaf(ca, uris=["spiffe://prod.example"])))


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://prod.example/ns/shop/../admin",  # dot segments
        "spiffe://prod.example/ns/shop/./sa",
        "spiffe://prod.example/ns/shop//sa",  # an empty segment
        "spiffe://prod.example/ns/shop/sa/",  # a trailing slash
        "spiffe://Prod.Example/ns/shop/sa",  # an upper-case trust domain
        "spiffe://prod.example/ns/shop/sa%2fx",  # percent-encoding
        "spiffe://prod.example/ns/shop/sa?x=1",
        "spiffe://prod.example/ns/shop/sa#x",
        "spiffe://user@prod.example/ns/shop/sa",
        "spiffe://prod.example:443/ns/shop/sa",
        "SPIFFE://prod.example/ns/shop/sa",
    ],
)
def test_invalid_spiffe_ids_match_no_prefix(certs: Certs, uri: str) -> None:
    cert = client(leaf(certs.pki.client_intermediate, uris=[uri]))
    assert not URIMatcher(["spiffe://prod.example/", "spiffe://prod.example/ns/shop/"]).passes(cert)
    assert not spiffe_id(uri)


_SEGMENT = st.text(alphabet="abcXYZ019.-_/%?#:@ ", min_size=0, max_size=12)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    path=st.lists(_SEGMENT, max_size=5).map("/".join),
    domain=st.sampled_from(["prod.example", "prod.example.evil", "prod", "Prod.example"]),
)
@example(path="ns/shop/../admin", domain="prod.example")
@example(path="ns/shopping/x", domain="prod.example")
@example(path="ns/shop/sa", domain="prod.example")
def test_a_spiffe_prefix_admits_only_valid_ids_below_it(
    certs: Certs, path: str, domain: str
) -> None:
    """Invariant: whatever the URI SAN, the prefix matcher passes it only when it is a valid
    SPIFFE ID in that trust domain whose path lies below the prefix, segment by segment."""
    uri = f"spiffe://{domain}/{path}"
    cert = client(leaf(certs.pki.client_intermediate, uris=[uri]))
    passes = URIMatcher(["spiffe://prod.example/ns/shop/"]).passes(cert)
    segments = uri.removeprefix("spiffe://prod.example/").split("/")
    below = (
        uri.startswith("spiffe://prod.example/")
        and len(segments) > 2
        and segments[:2] == ["ns", "shop"]
        and spiffe_id(uri)
    )
    assert passes == below


def test_email_local_part_as_written_domain_in_any_case(certs: Certs) -> None:
    ca = certs.pki.client_intermediate
    matcher = EmailMatcher(["Ops@Example.COM"])
    assert matcher.passes(client(leaf(ca, emails=["Ops@example.com"])))
    assert not matcher.passes(client(leaf(ca, emails=["ops@example.com"])))
    assert not matcher.passes(client(leaf(ca, emails=["Ops@example.com.evil"])))


def test_ip_sans_by_network(certs: Certs) -> None:
    ca = certs.pki.client_intermediate
    matcher = IPMatcher([ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("fd00::/8")])
    assert matcher.passes(client(leaf(ca, ips=["10.1.2.3"])))
    assert matcher.passes(client(leaf(ca, ips=["fd12::1"])))
    assert not matcher.passes(client(leaf(ca, ips=["10.2.0.1"])))
    assert not matcher.passes(client(leaf(ca, ips=["::ffff:10.1.2.3"])))  # another family
    assert not matcher.passes(client(leaf(ca, dns=["10.1.2.3"])))  # a DNS name is no address


def test_subject_attributes_exactly_any_value(certs: Certs) -> None:
    ca = certs.pki.client_intermediate
    cert = client(leaf(ca, "orders", ou=["Payments", "Billing"], o=["Acme"]))
    assert SubjectMatcher("CN", ["orders"]).passes(cert)
    assert not SubjectMatcher("CN", ["Orders"]).passes(cert)  # case matters
    assert SubjectMatcher("OU", ["Billing"]).passes(cert)  # any of the certificate's OUs
    assert SubjectMatcher("O", ["Acme", "Other"]).passes(cert)
    assert not SubjectMatcher("OU", ["Acme"]).passes(cert)
    assert not SubjectMatcher("OU", ["x"]).passes(client(leaf(ca, "no-ou")))


def test_rules_are_anded_across_keys_and_ored_within(certs: Certs) -> None:
    ca = certs.pki.client_intermediate
    rule = CertificateRule([DNSMatcher(["a.example", "b.example"]), SubjectMatcher("O", ["Acme"])])
    assert rule.first_failure(client(leaf(ca, dns=["b.example"], o=["Acme"]))) is None
    assert rule.first_failure(client(leaf(ca, dns=["b.example"], o=["Other"]))) == "allow.subject.O"
    assert rule.first_failure(client(leaf(ca, dns=["c.example"], o=["Acme"]))) == "allow.san_dns"


def test_issuer_by_any_ca_above_the_certificate(certs: Certs) -> None:
    pki = certs.pki
    anchors = Anchors([pki.client_root.cert, pki.client_intermediate.cert])
    cert = client(leaf(pki.client_intermediate))
    by_intermediate = IssuerMatcher(["i"], [spki_of(pki.client_intermediate)], anchors)
    by_root = IssuerMatcher(["r"], [spki_of(pki.client_root)], anchors)
    assert by_intermediate.passes(cert) and by_root.passes(cert)
    # same names, another key: a forged CA does not count
    impostor_root = make_ca("Test Client Root")
    impostor = make_ca("Test Client Intermediate", issuer=impostor_root)
    forged = client(leaf(impostor))
    assert not by_intermediate.passes(forged) and not by_root.passes(forged)
    other = IssuerMatcher(["o"], [spki_of(impostor)], anchors)  # not among the anchors
    assert not other.passes(forged)


def test_fingerprint(certs: Certs) -> None:
    matcher = FingerprintMatcher([sha256_of(certs.alice)])
    assert matcher.passes(client(certs.alice)) and not matcher.passes(client(certs.bob))


# ---- the user of a certificate-only route ---------------------------------------------------


def test_the_user_of_a_certificate_is_its_spiffe_id_and_cn(certs: Certs) -> None:
    ca = certs.pki.client_intermediate
    svc = certificate_user(
        client(
            leaf(ca, "orders", dns=["orders.svc"], uris=["spiffe://prod.example/ns/shop/sa/orders"])
        )
    )
    assert (svc.sub, svc.username, svc.roles) == (
        "spiffe://prod.example/ns/shop/sa/orders",
        "orders",
        (),
    )
    first = certificate_user(
        client(leaf(ca, "box", dns=["box.example"], emails=["ops@example.com"]))
    )
    assert (first.sub, first.username, first.email) == ("box.example", "box", "ops@example.com")
    bare = client(leaf(ca, None, ips=["10.0.0.7"]))
    assert (certificate_user(bare).sub, certificate_user(bare).username) == ("10.0.0.7", "10.0.0.7")
    nothing = client(leaf(ca, "only-cn"))
    assert (certificate_user(nothing).sub, certificate_user(nothing).username) == (
        "only-cn",
        "only-cn",
    )


# ---- addresses ---------------------------------------------------------------------------------


def test_addresses_allow_and_exempt_ipv4_ipv6() -> None:
    rule = AddressRule(
        [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")],
        [ipaddress.ip_network("10.9.0.0/16"), ipaddress.ip_network("2001:db8:9::/48")],
    )
    assert rule.reaches("10.1.2.3") and not rule.exempts("10.1.2.3")
    assert rule.reaches("10.9.0.1") and rule.exempts("10.9.0.1")
    assert rule.reaches("::ffff:10.9.0.1") and rule.exempts("::ffff:10.9.0.1")  # dual stack
    assert rule.reaches("2001:db8:9::1%eth0") and rule.exempts("2001:db8:9::1")
    assert not rule.reaches("192.0.2.1") and not rule.exempts("192.0.2.1")
    assert not rule.reaches(None) and not rule.reaches("not-an-address")
    exempt_only = AddressRule(None, [ipaddress.ip_network("127.0.0.0/8")])
    assert exempt_only.reaches("192.0.2.1") and exempt_only.reaches(None)
    assert exempt_only.exempts("127.0.0.1") and not exempt_only.exempts(None)


def test_client_address_forms() -> None:
    assert client_address("::ffff:127.0.0.1") == ipaddress.ip_address("127.0.0.1")
    assert client_address("fe80::1%lo") == ipaddress.ip_address("fe80::1")
    assert client_address("") is None and client_address(None) is None


# ---- trust -------------------------------------------------------------------------------------


def test_trust_score_and_intrusions_fail_closed() -> None:
    rule = TrustRule(Decimal("3.5"), 0)
    assert rule.failure(Trust(Decimal("3.5"), 0)) is None
    assert rule.failure(Trust(Decimal("3.49"), 0)) == "identityplus.min_trust_score"
    assert rule.failure(Trust(None, 0)) == "identityplus.min_trust_score"
    assert rule.failure(None) == "identityplus.min_trust_score"
    assert rule.failure(Trust(Decimal(5), 1)) == "identityplus.max_local_intrusions"
    assert rule.failure(Trust(Decimal(5), None)) == "identityplus.max_local_intrusions"


# ---- method overrides --------------------------------------------------------------------------


def test_method_overrides_from_headers_and_query() -> None:
    headers = [
        (b"X-HTTP-Method-Override", b"delete"),
        (b"x_http_method", b"PUT, patch"),
        (b"X-Method-Override", b" "),
        (b"X-Other", b"POST"),
    ]
    assert method_overrides(headers, "/x") == ("DELETE", "PUT", "PATCH")
    assert method_overrides([], "/x?a=1&_method=delete") == ("DELETE",)
    assert method_overrides([], "/x?%5Fmethod=put;b=2") == ("PUT",)
    assert method_overrides([], "/x?_%6Dethod=patch") == ("PATCH",)
    assert method_overrides([], "/x?method=delete&_methods=x") == ()


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    st.lists(st.tuples(st.binary(max_size=30), st.binary(max_size=30)), max_size=6),
    st.text(max_size=40),
)
def test_method_overrides_never_fail(headers: list[tuple[bytes, bytes]], query: str) -> None:
    found = method_overrides(headers, "/p?" + query)
    assert all(m == m.upper() and m == m.strip() and m for m in found)


def test_facts_of_a_malformed_extension_match_nothing(certs: Certs) -> None:
    ca = certs.pki.client_intermediate
    odd = client(leaf(ca, "x", raw_sans=[x509.RegisteredID(x509.ObjectIdentifier("1.2.3.4"))]))
    known = facts(odd)
    assert known.first_san is None and known.dns == () and known.uris == ()
