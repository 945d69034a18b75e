"""Route policy that says who (issue #16), through the real TLS listener: certificate
matchers (``routes[].allow``), ``access: certificate``, address rules, methods and method
overrides, and a reload that changes any of them taking effect on the next request.

Every answer is checked on both sides: what the client got, and what the application
received (nothing, for a refusal). Reasons name the rule, never the certificate's contents.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest

from sidecar.identity.cache import VerdictCache

from .conftest import ALICE_SUB, ConfigDir, Running, SidecarFactory, Upstream, decode_userinfo
from .pki import Issued, make_ca
from .policy_helpers import Answer, ask, leaf, sha256_of, spki_of, write_pem
from .test_listener import connect, req

SPIFFE_ORDERS = "spiffe://prod.example/ns/shop/sa/orders"


async def start(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
    routes: list[dict[str, Any]],
    **overrides: Any,
) -> Running:
    running: Running = await start_sidecar(
        config_dir.base(upstream.port, routes=routes, **overrides)
    )
    return running


def userinfo(answer: Answer) -> dict[str, Any]:
    assert answer.seen is not None, "nothing reached the application"
    [value] = answer.seen.header("X-USERINFO")
    return decode_userinfo(value)


def refused(answer: Answer, status: int, rule: str) -> None:
    assert answer.status == status, answer.response.body
    assert answer.seen is None, "a refused request reached the application"
    assert rule.lower() in answer.reason.lower(), answer.reason
    assert answer.response.json()["detail"] == answer.reason


# ---- access: certificate, SPIFFE ----------------------------------------------------------------


async def test_a_spiffe_service_certificate_decides_alone(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    """A service with a SPIFFE ID reaches a certificate-only route without any identity
    backend (the static backend knows no such certificate and would refuse it); the
    application gets the certificate and an X-USERINFO made from it."""
    running = await start(
        start_sidecar,
        config_dir,
        upstream,
        [
            {
                "path": "/svc/",
                "access": "certificate",
                "allow": {"san_uri": ["spiffe://prod.example/ns/shop/"]},
            },
            {"path": "/"},
        ],
    )
    ca = config_dir.certs.pki.client_intermediate
    orders = leaf(ca, "orders", dns=["orders.shop.svc"], uris=[SPIFFE_ORDERS])
    answer = await ask(
        running,
        upstream,
        "/svc/pay",
        who=orders,
        headers=["X-USERINFO: forged", "X-APP-CERTIFICATE: forged"],
    )
    assert answer.status == 200
    assert userinfo(answer) == {"sub": SPIFFE_ORDERS, "username": "orders", "roles": []}
    assert answer.seen is not None
    assert answer.seen.header("X-APP-CERTIFICATE") == [base64.b64encode(orders.der).decode()]
    # the same certificate elsewhere is a person's request: the backend knows it not
    assert (await ask(running, upstream, "/other", who=orders)).status == 403

    intruder = leaf(ca, "orders", uris=["spiffe://prod.example/ns/admin/sa/orders"])
    answer = await ask(running, upstream, "/svc/pay", who=intruder)
    refused(answer, 403, "allow.san_uri")
    assert "spiffe" not in answer.reason and "admin" not in answer.reason
    refused(await ask(running, upstream, "/svc/pay"), 401, "client certificate is required")
    # a person's certificate, however well identified, is no service
    refused(
        await ask(running, upstream, "/svc/pay", who=config_dir.certs.alice), 403, "allow.san_uri"
    )


async def test_a_wildcard_dns_san_rule_admits_one_label(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    running = await start(
        start_sidecar,
        config_dir,
        upstream,
        [{"path": "/", "access": "certificate", "allow": {"san_dns": ["*.jobs.example"]}}],
    )
    ca = config_dir.certs.pki.client_intermediate
    one = await ask(running, upstream, "/x", who=leaf(ca, "a", dns=["nightly.jobs.example"]))
    assert one.status == 200 and userinfo(one)["sub"] == "nightly.jobs.example"
    for names in (
        ["a.nightly.jobs.example"],
        ["jobs.example"],
        ["*.jobs.example"],
        ["nightly.jobs.example.evil"],
    ):
        refused(
            await ask(running, upstream, "/x", who=leaf(ca, "a", dns=names)), 403, "allow.san_dns"
        )


#: a second client CA, with the name of the test PKI's intermediate and another key
IMPOSTOR = make_ca("Test Client Intermediate")


MATCHERS: list[
    tuple[
        str,
        Callable[[ConfigDir], dict[str, Any]],
        Callable[[Issued], Issued],
        Callable[[Issued], Issued],
    ]
] = [
    (
        "san_dns",
        lambda d: {"san_dns": ["orders.svc.example"]},
        lambda ca: leaf(ca, dns=["ORDERS.svc.example"]),
        lambda ca: leaf(ca, dns=["orders.svc.example.evil"]),
    ),
    (
        "san_email",
        lambda d: {"san_email": ["ops@example.com"]},
        lambda ca: leaf(ca, emails=["ops@EXAMPLE.com"]),
        lambda ca: leaf(ca, emails=["Ops@example.com"]),
    ),
    (
        "san_ip",
        lambda d: {"san_ip": ["10.20.0.0/16", "fd00::/8"]},
        lambda ca: leaf(ca, ips=["fd00::20"]),
        lambda ca: leaf(ca, ips=["10.21.0.1"]),
    ),
    (
        "subject.CN",
        lambda d: {"subject": {"CN": ["orders", "billing"]}},
        lambda ca: leaf(ca, "billing"),
        lambda ca: leaf(ca, "Billing"),
    ),
    (
        "subject.OU",
        lambda d: {"subject": {"OU": ["Payments"]}},
        lambda ca: leaf(ca, "x", ou=["Support", "Payments"]),
        lambda ca: leaf(ca, "x", ou=["Support"]),
    ),
    (
        "subject.O",
        lambda d: {"subject": {"O": ["Acme"], "CN": ["x"]}},
        lambda ca: leaf(ca, "x", o=["Acme"]),
        lambda ca: leaf(ca, "x", o=["Acme Evil"]),
    ),
    (
        "issuer",
        lambda d: {"issuer": [write_pem(d.path, "issuing", d.certs.pki.client_intermediate)]},
        lambda ca: leaf(ca),
        lambda ca: leaf(IMPOSTOR),  # a CA the listener trusts too: only the matcher tells
    ),
    (
        "issuer",
        lambda d: {"issuer": [spki_of(d.certs.pki.client_root)]},  # the root, two levels up
        lambda ca: leaf(ca),
        lambda ca: leaf(IMPOSTOR),
    ),
    (
        "fingerprint",
        lambda d: {"fingerprint": [sha256_of(d.certs.bob)]},
        lambda ca: ca,  # replaced below: bob's own certificate
        lambda ca: leaf(ca, "Bob Builder"),  # bob's name, another certificate
    ),
]


@pytest.mark.parametrize(("key", "allow", "good", "bad"), MATCHERS, ids=[m[0] for m in MATCHERS])
async def test_each_matcher_through_the_listener(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
    key: str,
    allow: Callable[[ConfigDir], dict[str, Any]],
    good: Callable[[Issued], Issued],
    bad: Callable[[Issued], Issued],
) -> None:
    pki = config_dir.certs.pki
    passing = config_dir.certs.bob if key == "fingerprint" else good(pki.client_intermediate)
    failing = bad(pki.client_intermediate)
    tls = config_dir.base()["tls"]
    tls["client_ca"] = ["client-ca.pem", write_pem(config_dir.path, "impostor", IMPOSTOR)]
    running = await start(
        start_sidecar,
        config_dir,
        upstream,
        [{"path": "/", "access": "certificate", "allow": allow(config_dir)}],
        tls=tls,
    )
    assert (await ask(running, upstream, "/x", who=passing)).status == 200
    refused(await ask(running, upstream, "/x", who=failing), 403, f"allow.{key}")
    # a body moves the request to aiohttp's protocol: the matcher holds there too
    posted = await ask(running, upstream, "/x", who=failing, method="POST", body=b"{}")
    refused(posted, 403, f"allow.{key}")


async def test_a_san_that_could_break_a_header_never_does(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    """A certificate whose SANs and CN hold CR, LF, quotes and a header line: the
    application receives them only inside X-USERINFO's base64 JSON, the refusal's reason
    holds none of them, and no header of the certificate's making reaches the application."""
    ca = config_dir.certs.pki.client_intermediate
    nasty = leaf(
        ca,
        'evil"\r\nX-Evil: cn',
        uris=["urn:x\r\nX-Evil: uri"],
        dns=["a\r\nX-Evil: dns.example"],
        emails=['"x\r\ny"@example.com'],
    )
    running = await start(
        start_sidecar,
        config_dir,
        upstream,
        [
            {
                "path": "/svc/",
                "access": "certificate",
                "allow": {"fingerprint": [sha256_of(nasty)]},
            },
            {
                "path": "/strict/",
                "access": "certificate",
                "allow": {"san_uri": ["spiffe://prod.example/"]},
            },
            {"path": "/"},
        ],
    )
    answer = await ask(running, upstream, "/svc/x", who=nasty)
    assert answer.status == 200 and answer.seen is not None
    assert all("evil" not in name.lower() for name, _ in answer.seen.headers), answer.seen.headers
    doc = userinfo(answer)
    assert doc["sub"] == "a\r\nX-Evil: dns.example" and doc["username"] == 'evil"\r\nX-Evil: cn'
    denied = await ask(running, upstream, "/strict/x", who=nasty)
    refused(denied, 403, "allow.san_uri")
    raw = denied.response.body.decode()
    assert "Evil" not in raw and "\\r" not in raw and "urn:" not in raw


async def test_roles_still_apply_on_top_of_matchers(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    running = await start(
        start_sidecar,
        config_dir,
        upstream,
        [
            {
                "path": "/admin/",
                "roles": ["administrator"],
                "allow": {"subject": {"CN": ["Alice Liddell", "Bob Builder"]}},
            },
            {"path": "/"},
        ],
    )
    certs = config_dir.certs
    answer = await ask(running, upstream, "/admin/x", who=certs.alice)
    assert answer.status == 200 and userinfo(answer)["sub"] == ALICE_SUB
    refused(await ask(running, upstream, "/admin/x", who=certs.bob), 403, "lacks a role")
    # bound to nobody and failing the matcher: refused by the matcher, before any lookup
    refused(await ask(running, upstream, "/admin/x", who=certs.stranger), 403, "allow.subject.CN")


# ---- addresses ------------------------------------------------------------------------------


async def test_addresses_allow_and_exempt_ipv4(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    running = await start(
        start_sidecar,
        config_dir,
        upstream,
        [
            {"path": "/ops/", "addresses": {"allow": ["127.0.0.2/32"]}},
            {"path": "/healthz", "addresses": {"exempt": ["127.0.0.2"]}},
            {"path": "/"},
        ],
    )
    alice = config_dir.certs.alice
    refused(await ask(running, upstream, "/ops/x", who=alice), 403, "addresses.allow")
    assert (await ask(running, upstream, "/ops/x", who=alice, address="127.0.0.2")).status == 200
    # a header naming another client changes nothing: the address is the connection's
    spoof = await ask(
        running,
        upstream,
        "/ops/x",
        who=alice,
        headers=["X-Forwarded-For: 127.0.0.2", "X-Real-IP: 127.0.0.2"],
    )
    refused(spoof, 403, "addresses.allow")

    refused(await ask(running, upstream, "/healthz"), 401, "client certificate is required")
    exempt = await ask(
        running,
        upstream,
        "/healthz",
        address="127.0.0.2",
        headers=["X-USERINFO: forged", "X_APP_CERTIFICATE: forged"],
    )
    assert exempt.status == 200 and exempt.seen is not None
    assert not exempt.seen.header("X-USERINFO") and not exempt.seen.header("X-APP-CERTIFICATE")
    assert not exempt.seen.header("X_APP_CERTIFICATE")
    # the exemption is the route's, whatever the query says (oauth2-proxy GHSA-7rh7-c77v-6434)
    refused(
        await ask(running, upstream, "/ops/x?/healthz", address="127.0.0.3"), 403, "addresses.allow"
    )
    refused(await ask(running, upstream, "/x?/healthz", address="127.0.0.2"), 401, "certificate")
    # an identified client on an exempt address is still identified
    named = await ask(running, upstream, "/healthz", who=alice, address="127.0.0.2")
    assert named.status == 200 and userinfo(named)["sub"] == ALICE_SUB
    # one the backend refuses is let through, anonymously
    anonymous = await ask(
        running, upstream, "/healthz", who=config_dir.certs.stranger, address="127.0.0.2"
    )
    assert anonymous.status == 200 and anonymous.seen is not None
    assert not anonymous.seen.header("X-USERINFO")


async def test_an_ipv6_address_rule(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    data = config_dir.base(
        upstream.port,
        routes=[
            {"path": "/lan/", "addresses": {"allow": ["2001:db8::/32"]}},
            {"path": "/local/", "addresses": {"allow": ["::1/128"], "exempt": ["::1"]}},
            {"path": "/"},
        ],
    )
    data["listen"] = {"host": "::1", "port": 0}
    running: Running = await start_sidecar(data)
    alice = config_dir.certs.alice
    refused(
        await ask(running, upstream, "/lan/x", who=alice, address="::1"), 403, "addresses.allow"
    )
    local = await ask(running, upstream, "/local/x", address="::1")  # exempt: no certificate
    assert local.status == 200 and local.seen is not None and not local.seen.header("X-USERINFO")
    assert local.seen.header("X-Forwarded-For") == ["::1"]


# ---- methods ---------------------------------------------------------------------------------


async def test_methods_choose_routes_and_fall_through(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    running = await start(
        start_sidecar,
        config_dir,
        upstream,
        [
            {"path": "/api/", "methods": ["GET"], "roles": ["member", "administrator"]},
            {"path": "/api/", "methods": ["POST", "DELETE"], "roles": ["administrator"]},
            {"path": "/only/", "methods": ["GET"]},
            {"path": "/", "roles": ["member"]},
        ],
    )
    certs = config_dir.certs
    assert (await ask(running, upstream, "/api/x", who=certs.bob)).status == 200
    assert (await ask(running, upstream, "/api/x", who=certs.bob, method="HEAD")).status == 200
    # a body moves the request to aiohttp's path: judged the same
    refused(
        await ask(running, upstream, "/api/x", who=certs.bob, method="POST", body=b"x"),
        403,
        "lacks a role",
    )
    assert (
        await ask(running, upstream, "/api/x", who=certs.alice, method="POST", body=b"x")
    ).status == 200
    # PUT is no /api/ route's: it falls through to "/", where members may
    put = await ask(running, upstream, "/api/x", who=certs.bob, method="PUT", body=b"x")
    assert put.status == 200 and put.seen is not None and put.seen.method == "PUT"
    # /only/ covers GET alone, and nothing else covers /only/... but "/" does: falls through
    assert (await ask(running, upstream, "/only/x", who=certs.bob, method="DELETE")).status == 200

    # method overrides that another route would judge are refused, never forwarded
    for header in (
        "X-HTTP-Method-Override: DELETE",
        "X-HTTP-Method: POST",
        "X_Method_Override: DELETE",
    ):
        refused(
            await ask(running, upstream, "/api/x", who=certs.bob, headers=[header]),
            403,
            "another method",
        )
    refused(
        await ask(running, upstream, "/api/x?_method=DELETE", who=certs.bob), 403, "another method"
    )
    same = await ask(
        running, upstream, "/api/x", who=certs.bob, headers=["X-HTTP-Method-Override: HEAD"]
    )
    assert same.status == 200


async def test_a_method_no_route_covers_is_403(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    running = await start(
        start_sidecar, config_dir, upstream, [{"path": "/api/", "methods": ["GET", "POST"]}]
    )
    alice = config_dir.certs.alice
    assert (await ask(running, upstream, "/api/x", who=alice)).status == 200
    refused(
        await ask(running, upstream, "/api/x", who=alice, method="DELETE"),
        403,
        "no route allows this method",
    )
    refused(
        await ask(running, upstream, "/api/x", who=alice, method="PATCH", body=b"{}"),
        403,
        "no route allows this method",
    )
    refused(await ask(running, upstream, "/other", who=alice), 403, "no route allows this path")


async def test_route_labels_stay_bounded_and_unique(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    running = await start(
        start_sidecar,
        config_dir,
        upstream,
        [
            {"path": "/api/", "methods": ["GET"]},
            {"path": "/api/", "methods": ["POST"]},
            {"path": "/"},
        ],
    )
    alice = config_dir.certs.alice
    await ask(running, upstream, "/api/a", who=alice)
    await ask(running, upstream, "/api/b", who=alice, method="POST", body=b"x")
    await ask(running, upstream, "/api/c", who=alice, method="PUT", body=b"x")
    await ask(running, upstream, "/x?y", who=alice)
    samples = {
        s.labels["route"]
        for metric in running.sidecar.metrics.registry.collect()
        if metric.name == "sidecar_requests"
        for s in metric.samples
    }
    assert samples == {"/api/ GET", "/api/ POST", "/"}


# ---- reload -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after", "who", "status", "rule"),
    [
        (
            {"allow": {"subject": {"CN": ["Alice Liddell"]}}},
            {"allow": {"subject": {"CN": ["Someone Else"]}}},
            "alice",
            403,
            "allow.subject.CN",
        ),
        ({}, {"addresses": {"allow": ["10.0.0.0/8"]}}, "alice", 403, "addresses.allow"),
        ({}, {"methods": ["POST"]}, "alice", 403, "no route allows this method"),
        ({"allow": {"fingerprint": ["0" * 64]}}, {}, "alice", 200, ""),
        ({}, {"addresses": {"exempt": ["127.0.0.1"]}}, None, 200, ""),
    ],
    ids=["matcher", "addresses-allow", "methods", "matcher-removed", "exempt"],
)
async def test_a_reload_takes_effect_on_the_next_request(
    start_sidecar: SidecarFactory,
    config_dir: ConfigDir,
    upstream: Upstream,
    before: dict[str, Any],
    after: dict[str, Any],
    who: str | None,
    status: int,
    rule: str,
) -> None:
    """On the same keep-alive connection, with no restart."""
    running = await start(start_sidecar, config_dir, upstream, [{"path": "/", **before}])
    client = config_dir.certs.alice if who else None
    async with connect(running, client) as conn:
        conn.send(req("GET", "/first"))
        first = await conn.response()
        assert first.status == (200 if status != 200 else (401 if who is None else 403))
        config_dir.write(config_dir.base(upstream.port, routes=[{"path": "/", **after}]))
        assert await running.sidecar.reload("test")
        conn.send(req("GET", "/second"))
        second = await conn.response()
    assert second.status == status, second.body
    if rule:
        assert rule.lower() in json.loads(second.body)["detail"].lower()


async def test_subjects_of_refused_requests_reach_no_upstream_and_cost_no_lookup(
    start_sidecar: SidecarFactory, config_dir: ConfigDir, upstream: Upstream
) -> None:
    running = await start(
        start_sidecar,
        config_dir,
        upstream,
        [{"path": "/", "allow": {"subject": {"CN": ["Alice Liddell"]}}}],
    )
    await ask(running, upstream, "/x", who=config_dir.certs.bob)
    assert running.sidecar.handler is not None
    identity = running.sidecar.handler.plan.identity
    assert isinstance(identity, VerdictCache)
    assert identity.stats.misses == 0 and identity.stats.hits == 0
    answer = await ask(running, upstream, "/x", who=config_dir.certs.alice)
    assert answer.status == 200 and userinfo(answer)["sub"] == ALICE_SUB
